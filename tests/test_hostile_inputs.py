"""Hostile configs and model inputs: each raises an error from minidiff itself naming the culprit and what is
allowed, instead of a silent wrong value or an error from deep inside torch."""
from __future__ import annotations

import math

import pytest
import torch

import minidiff
from conftest import TINY


@pytest.mark.parametrize("field, value, error, message", [
    ("center_input_sample", "false", TypeError, r"center_input_sample='false': expected bool"),
    ("in_channels", "3", TypeError, r"in_channels='3': expected int"),
    ("in_channels", 3.0, TypeError, r"in_channels=3.0: expected int"),
    ("in_channels", True, TypeError, r"in_channels=True: expected int"),
    ("in_channels", 0, ValueError, r"in_channels=0: values must be >= 1"),
    ("out_channels", -3, ValueError, r"out_channels=-3: values must be >= 1"),
    ("sample_size", 0, ValueError, r"sample_size=0"),
    ("block_out_channels", [], ValueError, r"block_out_channels: at least one block"),
    ("block_out_channels", [16, -32], ValueError, r"block_out_channels=\(16, -32\)"),
    ("layers_per_block", 0, ValueError, r"layers_per_block=0: values must be >= 1"),
    ("norm_eps", 0.0, ValueError, r"norm_eps=0.0 must be > 0"),
    ("norm_eps", -1e-5, ValueError, r"norm_eps=-1e-05 must be > 0"),
    ("norm_eps", math.nan, ValueError, r"norm_eps=nan: must be finite"),
    ("dropout", 1.5, ValueError, r"dropout=1.5 in \[0, 1\)"),
    ("norm_num_groups", 0, ValueError, r"norm_num_groups=0"),
    ("attention_head_dim", 0, ValueError, r"attention_head_dim=0"),
])
def test_bad_unet_config_values(field, value, error, message):
    with pytest.raises(error, match=message):
        minidiff.UNetConfig.from_dict({**TINY, field: value})


@pytest.mark.parametrize("field, value, error, message", [
    ("clip_sample", "false", TypeError, r"clip_sample='false': expected bool"),
    ("num_train_timesteps", 1000.0, TypeError, r"num_train_timesteps=1000.0: expected int"),
    ("beta_end", 1.0, ValueError, r"beta_end=1.0 must be in \(0, 1\)"),
    ("beta_start", 0.0, ValueError, r"beta_start=0.0 must be in \(0, 1\)"),
    ("beta_end", math.nan, ValueError, r"beta_end=nan must be in \(0, 1\)"),
    ("clip_sample_range", 0.0, ValueError, r"clip_sample_range=0.0 must be > 0"),
    ("clip_sample_range", math.inf, ValueError, r"clip_sample_range=inf must be > 0 and finite"),
    ("sample_max_value", -1.0, ValueError, r"sample_max_value=-1.0 must be > 0"),
])
@pytest.mark.parametrize("scheduler", [minidiff.DDPMScheduler, minidiff.DDIMScheduler])
def test_bad_scheduler_config_values(scheduler, field, value, error, message):
    with pytest.raises(error, match=message):
        scheduler(**{field: value})


@pytest.mark.parametrize("betas", [[0.1, math.nan, 0.2], [0.1, -0.2, 0.2], [0.1, 1.0, 0.2]])
def test_bad_trained_betas(betas):
    with pytest.raises(ValueError, match=r"trained_betas must all be in \(0, 1\)"):
        minidiff.DDPMScheduler(num_train_timesteps=3, trained_betas=betas)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return minidiff.UNet.from_config(TINY).eval()


@pytest.mark.parametrize("make_input, error, message", [
    (lambda: [[0.0]], TypeError, r"sample: expected a floating-point tensor, got list"),
    (lambda: torch.zeros(2, 3, 8, 8, dtype=torch.long), TypeError, r"sample: expected a floating-point tensor, got torch.int64"),
    (lambda: torch.zeros(2, 3, 8, 8, dtype=torch.float64), TypeError, r"sample: dtype torch.float64 differs from the model's torch.float32"),
    (lambda: torch.zeros(0, 3, 8, 8), ValueError, r"with B >= 1, got \(0, 3, 8, 8\)"),
    (lambda: torch.zeros(3, 8, 8), ValueError, r"sample: expected \(B, 3, H, W\)"),
])
def test_bad_model_inputs(unet, make_input, error, message):
    with pytest.raises(error, match=message), torch.no_grad():
        unet(make_input(), 5)


@pytest.mark.parametrize("timestep, error, message", [
    ("5", TypeError, "timestep: expected an int, a float or a tensor, got str"),
    (True, TypeError, "timestep: expected an int, a float or a tensor, got bool"),
    (math.nan, ValueError, "timestep: must be finite"),
    (torch.tensor([1.0, math.inf]), ValueError, "timestep: must be finite"),
])
def test_bad_timesteps(unet, timestep, error, message):
    with pytest.raises(error, match=message), torch.no_grad():
        unet(torch.zeros(2, 3, 8, 8), timestep)


def test_a_learned_time_embedding_takes_whole_steps_in_range():
    unet = minidiff.UNet.from_config({**TINY, "time_embedding_type": "learned", "num_train_timesteps": 10}).eval()
    x = torch.zeros(1, 3, 8, 8)
    with torch.no_grad():
        unet(x, 9)
        unet(x, torch.tensor([3.0]))  # a float holding a whole step is that step
        for bad in (2.5, -1, 10):
            with pytest.raises(ValueError, match=r"learned time embedding takes integers in \[0, 9\]"):
                unet(x, bad)

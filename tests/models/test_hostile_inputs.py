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


# ------------------------------------------------------------------------------------ schedulers and sampling
@pytest.mark.parametrize("scheduler", [minidiff.DDPMScheduler(), minidiff.DDIMScheduler()])
@pytest.mark.parametrize("bad", [-1, 1000, 2.5])
def test_timesteps_outside_the_schedule_are_refused(scheduler, bad):
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"timestep .*(outside \[0, 999\]|whole training steps)"):
        scheduler.add_noise(x, x, torch.tensor([bad]))
    with pytest.raises(ValueError, match=r"timestep .*(outside \[0, 999\]|whole training steps)"):
        scheduler.predict_x0(x, bad, x)


def test_ddim_step_refuses_a_negative_timestep_and_bad_eta():
    ddim, x = minidiff.DDIMScheduler(), torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"timestep .*outside \[0, 999\]"):
        ddim.step(x, -20, x, num_inference_steps=50)
    for eta in (5.0, -1.0):
        with pytest.raises(ValueError, match=rf"eta={eta} must be in \[0, 1\]"):
            ddim.step(x, 500, x, num_inference_steps=50, eta=eta, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheduler", [minidiff.DDPMScheduler(), minidiff.DDIMScheduler()])
def test_step_noise_of_another_batch_size_is_refused(scheduler):
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"noise has shape \(5, 3, 4, 4\); the step needs the sample's \(2, 3, 4, 4\)"):
        scheduler.step(x, 500, x, num_inference_steps=50, noise=torch.zeros(5, 3, 4, 4), **(
            {"eta": 1.0} if isinstance(scheduler, minidiff.DDIMScheduler) else {}))


def test_sampling_arguments_are_checked(unet):
    sched = minidiff.DDIMScheduler()
    kwargs = dict(num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"guidance_scale=inf must be a finite number"):
        minidiff.sample(unet, sched, guidance_scale=math.inf, **kwargs)
    with pytest.raises(TypeError, match=r"guides must be a list of guides, got ColorGuidance; pass guides=\[guide\]"):
        minidiff.sample(unet, sched, guides=minidiff.ColorGuidance("#ff0000", scale=1), **kwargs)
    detached = minidiff.LossGuide(lambda x0: x0.detach().mean(dim=(1, 2, 3)), scale=1)
    with pytest.raises(ValueError, match="does not depend on x0 differentiably"):
        minidiff.sample(unet, sched, guides=[detached], **kwargs)
    rounded = minidiff.LossGuide(lambda x0: (x0 > 0).sum(dim=(1, 2, 3)), scale=1)
    with pytest.raises(ValueError, match="of integers that does not depend on x0"):
        minidiff.sample(unet, sched, guides=[rounded], **kwargs)


def test_a_non_finite_result_is_an_error_not_an_image():
    broken = minidiff.UNet.from_config(TINY).eval()
    with torch.no_grad():
        broken.conv_out.bias[0] = math.nan
    with pytest.raises(FloatingPointError, match=r"sample: 192 of 192 values of the result are NaN or inf"):
        minidiff.sample(broken, minidiff.DDPMScheduler(clip_sample=False), num_inference_steps=2, progress=False)


def test_an_out_of_range_null_class_label_is_named():
    cond = minidiff.UNet.from_config({**TINY, "num_class_embeds": 4}).eval()
    with pytest.raises(ValueError, match=r"null_class_label=7 must be an int in \[0, 3\]"):
        minidiff.sample(cond, minidiff.DDIMScheduler(), num_inference_steps=2, class_labels=torch.tensor([1]),
                        guidance_scale=2.0, null_class_label=7, progress=False)


@pytest.mark.parametrize("images, error, message", [
    (torch.full((1, 3, 8, 8), 200.0), ValueError, r"init_images must hold images in \[-1, 1\].*from 200 to 200"),
    (torch.full((1, 3, 8, 8), math.nan), ValueError, r"init_images must hold images in \[-1, 1\]"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), TypeError, r"init_images must be floating-point images"),
])
def test_init_images_out_of_range_are_named(unet, images, error, message):
    with pytest.raises(error, match=message):
        minidiff.sample(unet, minidiff.DDIMScheduler(), init_images=images, strength=0.5, num_inference_steps=2,
                        progress=False)


def test_conditioning_of_the_wrong_kind_is_named():
    labelled = minidiff.UNet.from_config({**TINY, "num_class_embeds": 4}).eval()
    with pytest.raises(TypeError, match=r"class_labels: expected a tensor, got list"), torch.no_grad():
        labelled(torch.zeros(2, 3, 8, 8), 5, class_labels=[1, 2])
    cross = minidiff.UNet.from_config(dict(
        _class_name="UNet2DConditionModel", sample_size=8, in_channels=3, out_channels=3, block_out_channels=[16, 32],
        layers_per_block=1, norm_num_groups=8, attention_head_dim=2, cross_attention_dim=12,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn")).eval()
    x = torch.zeros(2, 3, 8, 8)
    with torch.no_grad():
        assert cross(x, 5, encoder_hidden_states=torch.zeros(2, 7, 12)).shape == x.shape
        with pytest.raises(ValueError, match=r"encoder_hidden_states: expected shape \(2, S, D\) with D in \[12\]"):
            cross(x, 5, encoder_hidden_states=torch.zeros(2, 7, 10))
        with pytest.raises(ValueError, match=r"got \(3, 7, 12\)"):
            cross(x, 5, encoder_hidden_states=torch.zeros(3, 7, 12))
        with pytest.raises(TypeError, match="encoder_hidden_states: expected a floating-point tensor, got torch.int64"):
            cross(x, 5, encoder_hidden_states=torch.zeros(2, 7, 12, dtype=torch.long))

"""Hostile configs and model inputs: each raises an error from minidiff itself naming the culprit and what is
allowed, instead of a silent wrong value or an error from deep inside torch."""
from __future__ import annotations

import math

import numpy as np
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


# ------------------------------------------------------------------------------------ found by the issue-19 attack
@pytest.mark.parametrize("data", [[("in_channels", 3)], None, '{"in_channels": 3}'])
def test_a_config_that_is_not_a_dict_is_named(data):
    with pytest.raises(TypeError, match=r"UNetConfig.from_dict: expected a dict"):
        minidiff.UNet.from_config(data)
    with pytest.raises(TypeError, match=r"UNet: config must be a UNetConfig"):
        minidiff.UNet(data or "config")


@pytest.mark.parametrize("change, message", [
    (dict(attention_head_dim=3), r"attention_head_dim=3 \(the width of a head\) must divide the 32 channels"),
    (dict(attn_norm_num_groups=3), r"attn_norm_num_groups=3 must divide the mid block's 32 channels"),
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), r"CrossAttn blocks \(.*mid_block_type\) need"),
    (dict(block_out_channels=[2 ** 40, 2 ** 41]), r"block_out_channels=.*values must be >= 1 and <= 1048576"),
])
def test_configs_diffusers_would_build_differently_or_not_at_all_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        minidiff.UNetConfig.from_dict({**TINY, **change})


def test_inputs_on_the_meta_device_or_of_another_dtype_are_named():
    labelled = minidiff.UNet.from_config({**TINY, "num_class_embeds": 4}).eval()
    x, meta = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8, device="meta")
    with torch.no_grad():
        with pytest.raises(ValueError, match="sample is on the meta device"):
            labelled(meta, 5, class_labels=torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="timestep is on the meta device"):
            labelled(x, torch.tensor(5, device="meta"), class_labels=torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="class_labels is on the meta device"):
            labelled(x, 5, class_labels=torch.tensor([1, 2], device="meta"))
        with pytest.raises(ValueError, match=r"class_labels must be integers in \[0, 3\]"):
            labelled(x, 5, class_labels=torch.tensor([True, False]))
        image_conditioned = minidiff.UNet.from_config({**TINY, "conditioning_channels": 3}).eval()
        with pytest.raises(ValueError, match="conditioning_image is on the meta device"):
            image_conditioned(x, 5, conditioning_image=meta)


@pytest.fixture(scope="module")
def cross():
    return minidiff.UNet.from_config(dict(
        _class_name="UNet2DConditionModel", sample_size=8, in_channels=3, out_channels=3, block_out_channels=[8, 16],
        layers_per_block=1, norm_num_groups=4, attention_head_dim=2, cross_attention_dim=6,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn")).eval()


@pytest.mark.parametrize("context, error, message", [
    (torch.zeros(2, 3, 6, dtype=torch.float64), TypeError, r"encoder_hidden_states: dtype torch.float64 differs"),
    (torch.zeros(2, 0, 6), ValueError, r"encoder_hidden_states: expected shape \(2, S, D\) with D in \[6\] and S >= 1"),
    (torch.zeros(2, 3, 6, device="meta"), ValueError, r"encoder_hidden_states is on the meta device"),
])
def test_bad_cross_attention_contexts_are_named(cross, context, error, message):
    with pytest.raises(error, match=message), torch.no_grad():
        cross(torch.zeros(2, 3, 8, 8), 5, encoder_hidden_states=context)


@pytest.mark.parametrize("changes, error, message", [
    (dict(num_train_timesteps=10 ** 12), ValueError, r"num_train_timesteps must be in \[1, 1000000\]"),
    (dict(num_train_timesteps=3, trained_betas="0.1,0.2"), TypeError, r"trained_betas: expected a list of floats"),
    (dict(num_train_timesteps=3, trained_betas=5), TypeError, r"trained_betas: expected a list of floats"),
    (dict(num_train_timesteps=1, trained_betas=["a"]), TypeError, r"trained_betas: expected a list of floats"),
])
def test_bad_scheduler_sizes_and_betas_are_named(changes, error, message):
    with pytest.raises(error, match=message):
        minidiff.DDPMScheduler(**changes)


def test_steps_offset_past_the_schedule_is_refused_before_sampling(unet):
    assert int(minidiff.DDPMScheduler(steps_offset=1).timesteps(1000)[0]) == 1000  # as diffusers lists them
    with pytest.raises(ValueError, match=r"steps_offset=1 puts timesteps\(1000\) past the last training step 999"):
        minidiff.sample(unet, minidiff.DDPMScheduler(steps_offset=1), num_inference_steps=1000, progress=False)
    with pytest.raises(ValueError, match=r"steps_offset=2000 puts timesteps\(10\) past"):
        minidiff.sample(unet, minidiff.DPMSolverMultistepScheduler(steps_offset=2000, timestep_spacing="leading"),
                        num_inference_steps=10, progress=False)
    with pytest.raises(ValueError, match=r"steps_offset=1 puts timesteps\(1000\) past"):
        minidiff.invert(unet, minidiff.DDIMScheduler(steps_offset=1), torch.zeros(1, 3, 8, 8), 1000, progress=False)


@pytest.mark.parametrize("value", [math.nan, math.inf, 100.0])
def test_a_lambda_min_clipped_that_leaves_no_timestep_is_refused(value):
    with pytest.raises(ValueError, match=rf"lambda_min_clipped={value}"):
        minidiff.DPMSolverMultistepScheduler(lambda_min_clipped=value)


@pytest.mark.parametrize("timestep, error, message", [
    (500.7, ValueError, r"timestep 500.7: expected whole training steps"),
    ("500", TypeError, r"timestep: expected one timestep .* got str"),
    (None, TypeError, r"timestep: expected one timestep .* got NoneType"),
    (torch.tensor([500, 0]), TypeError, r"timestep: expected one timestep .* got a tensor of shape \(2,\)"),
    (1000, ValueError, r"timestep 1000 is outside \[0, 999\]"),
])
@pytest.mark.parametrize("scheduler", [minidiff.DDPMScheduler(), minidiff.DDIMScheduler(),
                                       minidiff.DPMSolverMultistepScheduler()])
def test_one_step_takes_one_whole_timestep_in_range(scheduler, timestep, error, message):
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(error, match=message):
        scheduler.step(x, timestep, x, num_inference_steps=2, generator=torch.Generator())
    with pytest.raises(error, match=message):
        scheduler.predict_x0(x, timestep, x)


def test_ddim_inversion_refuses_a_negative_timestep():
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"timestep -5 is outside \[0, 999\]"):
        minidiff.DDIMScheduler().invert_step(x, -5, x, num_inference_steps=50)


@pytest.mark.parametrize("eta, error", [("0.5", TypeError), (True, TypeError), (None, TypeError),
                                        (math.nan, ValueError)])
def test_eta_must_be_a_number(eta, error):
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(error, match=r"eta="):
        minidiff.DDIMScheduler().step(x, 500, x, num_inference_steps=50, eta=eta)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(model_output=[[0.0]]), TypeError, r"model_output: expected a floating-point tensor, got list"),
    (dict(sample=np.zeros((1, 3, 4, 4), np.float32)), TypeError, r"sample: expected a floating-point tensor"),
    (dict(noise=np.zeros((1, 3, 4, 4), np.float32)), TypeError, r"noise: expected a floating-point tensor"),
    (dict(noise=torch.zeros(1, 3, 4, 4, dtype=torch.long)), TypeError, r"noise: expected a floating-point tensor"),
    (dict(generator=42), TypeError, r"generator: expected a torch.Generator, a list of them"),
])
def test_step_arguments_of_the_wrong_kind_are_named(kwargs, error, message):
    x = torch.zeros(1, 3, 4, 4)
    args = {**dict(model_output=x, timestep=500, sample=x, num_inference_steps=2, generator=None), **kwargs}
    with pytest.raises(error, match=message):
        minidiff.DDPMScheduler().step(**args)


@pytest.mark.parametrize("x0, noise, t, error, message", [
    (torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, 4, 4), 5, ValueError, r"noise has shape \(1, 3, 4, 4\); it must have"),
    (torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2), 5, ValueError, r"noise has shape \(2, 3, 2, 2\)"),
    (torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.tensor([1, 2, 3]), ValueError,
     r"timestep: 3 timesteps for a batch of 2"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.long), torch.zeros(2, 3, 4, 4), 5, TypeError,
     r"x0: expected a floating-point tensor, got torch.int64"),
])
def test_add_noise_never_broadcasts_or_casts_silently(x0, noise, t, error, message):
    with pytest.raises(error, match=message):
        minidiff.DDPMScheduler().add_noise(x0, noise, t)


@pytest.mark.parametrize("config", [[("beta_end", 0.02)], None, "scheduler_config.json"])
def test_a_scheduler_config_that_is_not_a_dict_is_named(config):
    with pytest.raises(TypeError, match=r"DDIMScheduler.from_config: expected a config dict"):
        minidiff.DDIMScheduler.from_config(config)


def test_a_dpm_history_of_the_wrong_kind_is_named():
    dpm, x = minidiff.DPMSolverMultistepScheduler(), torch.zeros(1, 3, 4, 4)
    t = int(dpm.timesteps(10)[1])
    with pytest.raises(TypeError, match=r"history must be the \(timestep, tensor\) pairs"):
        dpm.step(x, t, x, num_inference_steps=10, history=[1, 2])

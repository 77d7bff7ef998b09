"""DDPM/DDIM schedulers: parity with diffusers 0.42.1 (schedules, timesteps, steps, forward process,
config files) and the errors for bad input."""
import dataclasses
import json

import diffusers
import pytest
import torch
from torch.testing import assert_close

from minidiff.schedulers import (DDIMScheduler, DDIMSchedulerConfig, DDPMScheduler, DDPMSchedulerConfig,
                                 SchedulerOutput, randn)

OURS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
THEIRS = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}
SCHEDULES = {"ddpm": ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"),
             "ddim": ("linear", "scaled_linear", "squaredcos_cap_v2")}
CLIPPING = [dict(clip_sample=False), dict(clip_sample=True), dict(clip_sample=False, thresholding=True),
            dict(clip_sample=True, thresholding=True)]
N = 10
TIGHT = dict(rtol=1e-6, atol=1e-6)  # the arithmetic is diffusers' own; only reordering may differ


def pair(kind: str, **config):
    return OURS[kind](**config), THEIRS[kind](**config)


def inputs(seed: int, out_channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(model_output, sample) large enough for clipping and thresholding (sample_max_value 2) to act."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, out_channels, 4, 4, generator=g) * 1.5, torch.randn(2, 3, 4, 4, generator=g) * 1.5


def assert_same_step(ours, theirs, model_output, sample, step_kwargs=None):
    """Step both at the first, a middle and the last timestep with equally seeded generators: same
    outputs, and the generators consumed alike."""
    step_kwargs = step_kwargs or {}
    theirs.set_timesteps(N)
    for t in theirs.timesteps[[0, N // 2, -1]]:
        g_ours, g_theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        expected = theirs.step(model_output, t, sample, generator=g_theirs, **step_kwargs)
        got = ours.step(model_output, t, sample, num_inference_steps=N, generator=g_ours, **step_kwargs)
        assert isinstance(got, SchedulerOutput)
        assert_close(got.prev_sample, expected.prev_sample, **TIGHT, msg=f"prev_sample at t={int(t)}")
        assert_close(got.pred_original_sample, expected.pred_original_sample, **TIGHT, msg=f"x0 at t={int(t)}")
        assert torch.equal(g_ours.get_state(), g_theirs.get_state()), f"noise draws differ at t={int(t)}"


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("kind,schedule", [(k, s) for k in SCHEDULES for s in SCHEDULES[k]])
def test_schedule_matches_diffusers(kind, schedule, rescale):
    ours, theirs = pair(kind, beta_schedule=schedule, beta_start=0.00085, beta_end=0.012,
                        rescale_betas_zero_snr=rescale)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(ours, name).dtype == torch.float32
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def test_trained_betas_override_the_schedule():
    betas = torch.linspace(0.001, 0.2, 20).tolist()
    ours, theirs = pair("ddpm", num_train_timesteps=20, trained_betas=betas, beta_schedule="scaled_linear")
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert ours.config.trained_betas == tuple(betas)


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_timesteps_match_set_timesteps(kind, spacing, steps_offset):
    ours, theirs = pair(kind, timestep_spacing=spacing, steps_offset=steps_offset)
    for n in (1, 2, 7, 10, 48, 333, 999, 1000):
        theirs.set_timesteps(n)
        got = ours.timesteps(n)
        assert got.dtype == torch.int64 and torch.equal(got, theirs.timesteps), n


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_float_spacings_match_for_every_step_count(spacing):
    """Float rounding ties (e.g. 937.5) must fall the same way as in diffusers, for every N."""
    ours, theirs = pair("ddpm", timestep_spacing=spacing)
    for n in range(1, 1001):
        theirs.set_timesteps(n)
        assert torch.equal(ours.timesteps(n), theirs.timesteps), n


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_previous_timestep(spacing):
    ours, theirs = pair("ddpm", timestep_spacing=spacing)
    theirs.set_timesteps(7)
    assert [ours.previous_timestep(t, 7) for t in theirs.timesteps] == \
        [int(theirs.previous_timestep(t)) for t in theirs.timesteps]
    ddim = DDIMScheduler(timestep_spacing=spacing)
    assert [ddim.previous_timestep(t, 7) for t in ddim.timesteps(7)] == [int(t) - 142 for t in ddim.timesteps(7)]


@pytest.mark.parametrize("clipping", CLIPPING, ids=["noclip", "clip", "threshold", "clip+threshold"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned",
                                           "learned_range"])
def test_ddpm_step_matches_diffusers(variance_type, prediction_type, clipping):
    config = dict(variance_type=variance_type, prediction_type=prediction_type, sample_max_value=2.0, **clipping)
    learned = variance_type.startswith("learned")
    model_output, sample = inputs(0, out_channels=6 if learned else 3)
    if variance_type == "learned":  # a variance: positive and small
        model_output[:, 3:] = model_output[:, 3:].abs() * 1e-3
    elif variance_type == "learned_range":  # an interpolation weight in [-1, 1]
        model_output[:, 3:] = model_output[:, 3:].tanh()
    assert_same_step(*pair("ddpm", **config), model_output, sample)


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_step_spacings(spacing, steps_offset):
    assert_same_step(*pair("ddpm", timestep_spacing=spacing, steps_offset=steps_offset), *inputs(1))


@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("clipping", CLIPPING, ids=["noclip", "clip", "threshold", "clip+threshold"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_matches_diffusers(eta, prediction_type, clipping, set_alpha_to_one, use_clipped):
    ours, theirs = pair("ddim", prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one,
                        sample_max_value=2.0, timestep_spacing="trailing", **clipping)
    assert_same_step(ours, theirs, *inputs(2), dict(eta=eta, use_clipped_model_output=use_clipped))


def test_step_with_explicit_noise_is_the_pure_update():
    model_output, sample = inputs(3)
    z = torch.randn(sample.shape, generator=torch.Generator().manual_seed(4))
    ddpm = DDPMScheduler()
    t, prev_t = 500, ddpm.previous_timestep(500, 10)
    assert prev_t == 400
    assert_close(ddpm.step(model_output, t, sample, num_inference_steps=10, noise=z).prev_sample,
                 ddpm.update(model_output, t, prev_t, sample, z).prev_sample, rtol=0, atol=0)
    ours, theirs = pair("ddim")
    theirs.set_timesteps(10)
    expected = theirs.step(model_output, 500, sample, eta=1.0, variance_noise=z).prev_sample
    assert_close(ours.step(model_output, 500, sample, num_inference_steps=10, eta=1.0, noise=z).prev_sample, expected)
    with pytest.raises(ValueError, match="either generator or noise"):
        ddpm.step(model_output, t, sample, num_inference_steps=10, noise=z, generator=torch.Generator())
    with pytest.raises(ValueError, match="needs noise"):
        ddpm.update(model_output, t, prev_t, sample)


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_predict_x0_is_the_step_x0(variance_type):
    sched = DDPMScheduler(variance_type=variance_type, prediction_type="v_prediction")
    model_output, sample = inputs(5, out_channels=6 if variance_type == "learned_range" else 3)
    out = sched.step(model_output, 300, sample, num_inference_steps=10, noise=torch.zeros_like(sample))
    assert_close(sched.predict_x0(model_output, torch.tensor(300), sample), out.pred_original_sample, rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_forward_process_matches_diffusers(prediction_type):
    ours, theirs = pair("ddpm", beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    x0, noise = inputs(6)
    t = torch.tensor([0, 999])
    assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=0, atol=0)
    assert_close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), rtol=0, atol=0)
    assert_close(ours.add_noise(x0, noise, torch.tensor(123)), theirs.add_noise(x0, noise, torch.tensor(123)))
    target = {"epsilon": noise, "sample": x0, "v_prediction": theirs.get_velocity(x0, noise, t)}[prediction_type]
    assert_close(ours.training_target(x0, noise, t), target)
    half = ours.add_noise(x0.half(), noise.half(), t)
    assert half.dtype == torch.float16 and torch.equal(half, theirs.add_noise(x0.half(), noise.half(), t))


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_saved_config_loads_in_diffusers(kind, tmp_path):
    extra = {"variance_type": "learned_range"} if kind == "ddpm" else {"set_alpha_to_one": False}
    ours = OURS[kind](beta_schedule="squaredcos_cap_v2", clip_sample=False, prediction_type="v_prediction",
                      timestep_spacing="trailing", steps_offset=1, thresholding=True, **extra)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == OURS[kind].__name__ and saved["_diffusers_version"] == "0.42.1"
    theirs = THEIRS[kind].from_pretrained(tmp_path)
    assert {k: theirs.config[k] for k in saved if not k.startswith("_")} == ours.config.to_dict()
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_reads_diffusers_saved_config(kind, tmp_path):
    extra = {"variance_type": "fixed_large"} if kind == "ddpm" else {"set_alpha_to_one": False}
    theirs = THEIRS[kind](beta_schedule="scaled_linear", clip_sample_range=2.0, prediction_type="sample",
                          timestep_spacing="linspace", rescale_betas_zero_snr=True, **extra)
    theirs.save_pretrained(tmp_path / "scheduler")  # pipeline layout: found in scheduler/
    ours = OURS[kind].from_pretrained(tmp_path)
    assert ours.config.to_dict() == {k: theirs.config[k] for k in ours.config.to_dict()}
    assert ours.config == OURS[kind].from_config(theirs.config).config


def test_reads_an_old_google_ddpm_config(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
        "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "timestep_values": None,
        "trained_betas": None, "variance_type": "fixed_small", "tensor_format": "pt"}))
    assert DDPMScheduler.from_pretrained(tmp_path).config == DDPMSchedulerConfig()


def test_ddim_from_a_ddpm_config():
    ddpm, theirs_ddpm = pair("ddpm", beta_schedule="squaredcos_cap_v2", variance_type="fixed_large")
    theirs = diffusers.DDIMScheduler.from_config(theirs_ddpm.config)
    for source in (ddpm.config, dict(theirs_ddpm.config)):
        ddim = DDIMScheduler.from_config(source)
        assert isinstance(ddim.config, DDIMSchedulerConfig)
        assert ddim.config.to_dict() == {k: theirs.config[k] for k in ddim.config.to_dict()}
    assert DDPMScheduler.from_config(DDIMScheduler(set_alpha_to_one=False).config).config == DDPMSchedulerConfig()


def test_configs_are_frozen_and_schedulers_stateless():
    sched = DDPMScheduler()
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.config.beta_end = 0.5
    with pytest.raises(AttributeError):
        sched.alphas_cumprod = None
    assert torch.equal(sched.timesteps(10), sched.timesteps(10)) and sched.timesteps(5).shape == (5,)


@pytest.mark.parametrize("kind,fields,match", [
    ("ddpm", dict(variance_type="fixed_large_log"), r"variance_type.*fixed_small"),
    ("ddim", dict(beta_schedule="sigmoid"), r"beta_schedule.*squaredcos_cap_v2"),
    ("ddpm", dict(beta_schedule="cosine"), r"beta_schedule.*laplace"),
    ("ddim", dict(timestep_spacing="uniform"), r"timestep_spacing.*trailing"),
    ("ddpm", dict(prediction_type="x0"), r"prediction_type.*v_prediction"),
    ("ddpm", dict(num_train_timesteps=0), "num_train_timesteps"),
    ("ddpm", dict(num_train_timesteps=3, trained_betas=[0.1, 0.2]), "trained_betas has 2 values"),
    ("ddim", dict(dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio"),
])
def test_bad_field_values(kind, fields, match):
    with pytest.raises(ValueError, match=match):
        OURS[kind](**fields)


@pytest.mark.parametrize("fields", [dict(num_train_timesteps="1000"), dict(clip_sample=1), dict(beta_end=True)])
def test_bad_field_types(fields):
    with pytest.raises(TypeError, match=next(iter(fields))):
        DDPMScheduler(**fields)


def test_unknown_math_changing_field():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DDIMScheduler.from_config({"_class_name": "DDIMScheduler", "use_karras_sigmas": True})


@pytest.mark.parametrize("n", [0, 1001, 2.5])
def test_bad_num_inference_steps(n):
    ddpm, ddim = DDPMScheduler(), DDIMScheduler()
    model_output, sample = inputs(0)
    with pytest.raises(ValueError, match=rf"num_inference_steps={n}.*1 and num_train_timesteps=1000"):
        ddpm.timesteps(n)
    with pytest.raises(ValueError, match="num_train_timesteps=1000"):
        ddim.step(model_output, 999, sample, num_inference_steps=n)


def test_bad_step_inputs():
    model_output, sample = inputs(0)
    with pytest.raises(ValueError, match="timestep 950 is not one of timesteps"):
        DDPMScheduler().step(model_output, 950, sample, num_inference_steps=10)
    with pytest.raises(ValueError, match="2 x 3 channels"):
        DDPMScheduler(variance_type="learned").predict_x0(model_output, 900, sample)
    with pytest.raises(ValueError, match="shape"):
        DDIMScheduler().step(model_output[:, :2], 900, sample, num_inference_steps=10)


def test_config_file_errors_name_the_file(tmp_path):
    file = tmp_path / "scheduler" / "scheduler_config.json"
    file.parent.mkdir()
    file.write_text("{not json")
    with pytest.raises(ValueError, match="scheduler_config.json: malformed JSON"):
        DDPMScheduler.from_pretrained(tmp_path)
    file.write_text(json.dumps({"variance_type": "fixed_large_log"}))
    with pytest.raises(ValueError, match=r"scheduler_config.json: .*variance_type"):
        DDPMScheduler.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json"):
        DDIMScheduler.from_pretrained(tmp_path / "empty")


def test_randn_matches_diffusers_randn_tensor():
    from diffusers.utils.torch_utils import randn_tensor
    shape = (3, 2, 4, 4)
    assert torch.equal(randn(shape, generator=torch.Generator().manual_seed(0)),
                       randn_tensor(shape, generator=torch.Generator().manual_seed(0)))
    generators = [torch.Generator().manual_seed(s) for s in range(3)]
    expected = randn_tensor(shape, generator=[torch.Generator().manual_seed(s) for s in range(3)])
    assert torch.equal(randn(shape, generator=generators), expected)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn(shape, generator=generators[:2])

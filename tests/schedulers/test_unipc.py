"""UniPCMultistepScheduler: parity with diffusers 0.42.1 over its option grid (timesteps, every step of a
sampling run driven as its pipelines drive it, images of a UNet's sampling loop), the explicit history,
the corrector as an addition (guides keep their effect), configs, errors."""
import json
import warnings

import diffusers
import pytest
import torch
from test_dpm_solver import ATOL, RTOL, model, start, twin_unets
from torch.testing import assert_close

import minidiff
from minidiff.io import load_scheduler, pretrained_path
from minidiff.schedulers import DPMSolverMultistepScheduler, UniPCMultistepScheduler


def theirs(**config) -> diffusers.UniPCMultistepScheduler:
    return diffusers.UniPCMultistepScheduler(**config)


def run_theirs(config: dict, n: int, x: torch.Tensor, begin: int = 0) -> tuple[torch.Tensor, list]:
    """diffusers driven as its pipelines drive it: set_timesteps, then step at every timestep from ``begin``."""
    sched = theirs(**config)
    sched.set_timesteps(n)
    sched.set_begin_index(begin)
    xs = []
    for t in sched.timesteps[begin:]:
        x = sched.step(model(x, t), t, x).prev_sample
        xs.append(x)
    return sched.timesteps, xs


def run_ours(config: dict, n: int, x: torch.Tensor, begin: int = 0) -> tuple[torch.Tensor, list]:
    sched = UniPCMultistepScheduler(**config)
    history, xs = (), []
    for t in sched.timesteps(n)[begin:]:
        out = sched.step(model(x, t), t, x, num_inference_steps=n, history=history)
        assert len(out.history) <= sched.config.solver_order
        x, history = out.prev_sample, out.history
        xs.append(x)
    return sched.timesteps(n), xs


def assert_same_run(config: dict, steps=(5, 16), begin: int = 0) -> None:
    for n in steps:
        expected_ts, expected = run_theirs(config, n, start(), begin)
        got_ts, got = run_ours(config, n, start(), begin)
        assert torch.equal(got_ts, expected_ts), n
        scale = max(1.0, *(b.abs().max().item() for b in expected))
        for i, (a, b) in enumerate(zip(got, expected)):
            # bh1's large first steps: diffusers' float32 coefficients differ from minidiff's float64 ones by 1e-5
            assert_close(a, b, rtol=RTOL, atol=2 * ATOL * scale, msg=f"step {i} of {n}")


@pytest.mark.parametrize("prediction_type,spacing", [("epsilon", "linspace"), ("sample", "leading"),
                                                     ("v_prediction", "trailing")])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_sampling_run_matches_diffusers(order, predict_x0, solver_type, prediction_type, spacing):
    config = dict(solver_order=order, predict_x0=predict_x0, solver_type=solver_type,
                  prediction_type=prediction_type, timestep_spacing=spacing)
    if solver_type == "bh1" or not predict_x0:
        config["final_sigmas_type"] = "sigma_min"  # diffusers returns NaN at a last step to sigma 0 here
    assert_same_run(config)


@pytest.mark.parametrize("config", [
    dict(lower_order_final=False, solver_order=3, final_sigmas_type="sigma_min"),
    dict(disable_corrector=[0, 2], solver_order=3),
    dict(disable_corrector=[1], predict_x0=False, final_sigmas_type="sigma_min"),
    dict(thresholding=True, sample_max_value=1.5, solver_order=3),
    dict(thresholding=True, sample_max_value=1.0, timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="leading", solver_order=3),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
         timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(timestep_spacing="leading", steps_offset=1),
    dict(num_train_timesteps=100, trained_betas=torch.linspace(0.001, 0.1, 100).tolist(), solver_order=3),
], ids=["order3-no-lower-final", "no-corrector-0-2", "no-corrector-eps", "threshold", "clip-by-threshold",
        "cos-leading", "zero-snr-v", "offset", "trained-betas"])
def test_options_match_diffusers(config):
    assert_same_run(config)


def test_a_run_may_start_at_a_later_timestep_as_img2img_does():
    assert_same_run(dict(solver_order=3), steps=(10,), begin=4)


def test_bh1_to_sigma_zero_ends_at_the_predicted_x0_where_diffusers_gives_nan():
    config, n = dict(solver_type="bh1", solver_order=3), 6
    _, expected = run_theirs(config, n, start())
    _, got = run_ours(config, n, start())
    assert expected[-1].isnan().all()   # its last step multiplies B(h) = -inf by 0
    for a, b in zip(got[:-1], expected[:-1]):
        assert_close(a, b, rtol=RTOL, atol=ATOL * 100)
    sched, x = UniPCMultistepScheduler(**config), got[-2]
    t = int(sched.timesteps(n)[-1])
    assert_close(got[-1], sched.predict_x0(model(x, t), t, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("config", [dict(), dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min",
                                                beta_schedule="squaredcos_cap_v2")])
def test_images_match_diffusers_loop(config):
    """minidiff.sample with UniPC = a diffusers UNet2DModel driven by its UniPCMultistepScheduler."""
    reference, unet = twin_unets()
    sched = theirs(**config)
    sched.set_timesteps(6)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(reference(x, t).sample, t, x).prev_sample
    got = minidiff.sample(unet.eval(), UniPCMultistepScheduler(**config), batch_size=2, num_inference_steps=6,
                          generator=torch.Generator().manual_seed(0), progress=False)
    assert_close(got, x, rtol=1e-5, atol=5e-5 * max(1.0, x.abs().max().item()))  # cosine: x0 ~ 100 at t = 999


def test_history_is_explicit_and_the_scheduler_stateless():
    sched = UniPCMultistepScheduler(solver_order=3)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in vars(sched).items()}
    x, ts, history = start(), sched.timesteps(20).tolist(), ()
    for i in range(4):
        out = sched.step(model(x, ts[i]), ts[i], x, num_inference_steps=20, history=history)
        assert [t for t, _ in out.history] == ts[max(0, i - 2):i + 1]  # solver_order entries, oldest first
        again = sched.step(model(x, ts[i]), ts[i], x, num_inference_steps=20, history=history)
        assert torch.equal(again.prev_sample, out.prev_sample)
        x, history = out.prev_sample, out.history
    for k, v in vars(sched).items():
        assert torch.equal(v, state[k]) if torch.is_tensor(v) else v == state[k], k
    with pytest.raises(ValueError, match="needs the history the step at timestep .* returned"):
        sched.step(model(x, ts[5]), ts[5], x, num_inference_steps=20, history=history)
    with pytest.raises(TypeError, match="history must be the"):
        sched.step(model(x, ts[4]), ts[4], x, num_inference_steps=20, history=[x])
    with pytest.raises(ValueError, match=r"history: the output at timestep \d+ has shape \(1, 3, 4, 4\)"):
        sched.step(model(x, ts[4]), ts[4], x, num_inference_steps=20, history=tuple((t, m[:1]) for t, m in history))


def test_the_corrector_keeps_a_change_made_to_x_between_steps():
    """The corrected x_t is x_t plus a correction that depends on the model outputs only: a shift a guide
    (or an inpainting mask) makes to x_t survives it, where diffusers' corrector recomputes x_t from the
    step before and drops the shift. (An x0-predicting model, so that the shift leaves its x0 alone.)"""
    sched, n = UniPCMultistepScheduler(prediction_type="sample"), 10
    ts, x = sched.timesteps(n).tolist(), start()
    first = sched.step(model(x, ts[0]), ts[0], x, num_inference_steps=n)
    shift = torch.full_like(x, 0.1)
    plain = sched.step(model(first.prev_sample, ts[1]), ts[1], first.prev_sample, num_inference_steps=n,
                       history=first.history)
    moved = sched.step(model(first.prev_sample, ts[1]), ts[1], first.prev_sample + shift, num_inference_steps=n,
                       history=first.history)
    level = sched.previous_timestep(ts[1], n)
    ratio = float(sched._alpha_sigma(level)[1] / sched._alpha_sigma(ts[1])[1])   # sigma_next / sigma_t
    assert_close(moved.prev_sample - plain.prev_sample, ratio * shift, rtol=1e-4, atol=1e-6)


def test_built_from_the_shipped_ddpm_config_and_a_dpm_solver_config_as_diffusers_does(tmp_path):
    folder = pretrained_path("shapes-32")
    ours = UniPCMultistepScheduler.from_pretrained(folder)
    reference = diffusers.UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    assert ours.config.to_dict() == {k: (tuple(v) if isinstance(v, list) else v)
                                     for k, v in reference.config.items() if k in ours.config.to_dict()}
    assert UniPCMultistepScheduler.from_config(DPMSolverMultistepScheduler().config).config.solver_type == "bh2"
    UniPCMultistepScheduler(disable_corrector=[1, 3], solver_order=3).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "UniPCMultistepScheduler" and saved["disable_corrector"] == [1, 3]
    loaded = load_scheduler(tmp_path)
    assert isinstance(loaded, UniPCMultistepScheduler) and loaded.config.disable_corrector == (1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_loaded = diffusers.UniPCMultistepScheduler.from_pretrained(tmp_path)
    assert theirs_loaded.config.disable_corrector == [1, 3] and theirs_loaded.config.solver_order == 3
    theirs(solver_type="bh1", predict_x0=False, final_sigmas_type="sigma_min").save_pretrained(tmp_path)
    assert load_scheduler(tmp_path).config.solver_type == "bh1"   # with solver_p=None, sigma_min=None & co.


@pytest.mark.parametrize("fields,error,match", [
    (dict(solver_type="bh3"), ValueError, "solver_type='bh3'"),
    (dict(solver_order=4), ValueError, r"solver_order=4.*\[1, 2, 3\]"),
    (dict(predict_x0=False), ValueError, "final_sigmas_type='zero' needs predict_x0=True"),
    (dict(lower_order_final=False), ValueError, "final_sigmas_type='zero' needs lower_order_final=True"),
    (dict(disable_corrector="1"), TypeError, "disable_corrector='1'"),
    (dict(disable_corrector=[-1]), TypeError, "ints >= 0"),
    (dict(disable_corrector=[True]), TypeError, "ints >= 0"),
    (dict(predict_x0=1), TypeError, "predict_x0=1"),
])
def test_bad_config_values(fields, error, match):
    with pytest.raises(error, match=match):
        UniPCMultistepScheduler(**fields)


def test_bad_steps():
    sched, x = UniPCMultistepScheduler(), start()
    with pytest.raises(ValueError, match="timestep 123 is not one of timesteps"):
        sched.step(model(x, 123), 123, x, num_inference_steps=10)
    with pytest.raises(ValueError, match="repeated timesteps"):
        UniPCMultistepScheduler(timestep_spacing="leading").timesteps(1000)

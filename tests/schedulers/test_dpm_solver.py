"""DPMSolverMultistepScheduler: parity with diffusers 0.42.1 over its option grid (timesteps, every step of a
sampling run driven as its pipelines drive it, images of DDPMPipeline), the explicit history, configs, errors."""
import json
import warnings

import diffusers
import pytest
import torch
from torch.testing import assert_close

import minidiff
from minidiff.io import load_scheduler, pretrained_path
from minidiff.schedulers import DPMSolverMultistepScheduler, MultistepOutput

# minidiff takes the solver's coefficients in float64 where diffusers has float32: differences of a few float32
# ulps of the largest term, which the stand-in model below makes up to ~100 at the noisiest steps
RTOL, ATOL = 1e-5, 1e-5


def theirs(**config) -> diffusers.DPMSolverMultistepScheduler:
    with warnings.catch_warnings():  # "dpmsolver is deprecated"
        warnings.simplefilter("ignore")
        return diffusers.DPMSolverMultistepScheduler(**config)


def model(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth, nonlinear stand-in for a network, so that the multistep differences matter."""
    return 0.8 * x * torch.cos(torch.tensor(float(t)) / 700) + 0.3 * torch.sin(3 * x) + 0.05 * float(t) / 1000


def start(channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.5


def run_theirs(config: dict, n: int, x: torch.Tensor, out_channels: int = 3) -> tuple[torch.Tensor, list]:
    """diffusers driven as DDPMPipeline drives it: set_timesteps, then step at every timestep."""
    sched = theirs(**config)
    sched.set_timesteps(n)
    generator, xs = torch.Generator().manual_seed(3), []
    for t in sched.timesteps:
        x = sched.step(widen(model(x, t), out_channels), t, x, generator=generator).prev_sample
        xs.append(x)
    return sched.timesteps, xs


def run_ours(config: dict, n: int, x: torch.Tensor, out_channels: int = 3) -> tuple[torch.Tensor, list]:
    sched = DPMSolverMultistepScheduler(**config)
    generator, history, xs = torch.Generator().manual_seed(3), (), []
    for t in sched.timesteps(n):
        out = sched.step(widen(model(x, t), out_channels), t, x, num_inference_steps=n, history=history,
                         generator=generator)
        assert isinstance(out, MultistepOutput) and len(out.history) <= sched.config.solver_order - 1
        x, history = out.prev_sample, out.history
        xs.append(x)
    return sched.timesteps(n), xs


def widen(model_output: torch.Tensor, channels: int) -> torch.Tensor:
    """A learned-variance model's output: the prediction, then as many variance channels."""
    return model_output if channels == model_output.shape[1] else torch.cat([model_output, model_output.tanh()], 1)


def assert_same_run(config: dict, steps=(5, 16), out_channels: int = 3) -> None:
    for n in steps:  # 5 < 15 <= 16: with and without lower_order_final's lowered orders
        expected_ts, expected = run_theirs(config, n, start(), out_channels)
        got_ts, got = run_ours(config, n, start(), out_channels)
        assert torch.equal(got_ts, expected_ts), n
        scale = max(1.0, *(b.abs().max().item() for b in expected))
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_close(a, b, rtol=RTOL, atol=ATOL * scale, msg=f"step {i} of {n}")


GRID = [(algorithm, order) for algorithm in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
        for order in (1, 2, 3) if not (algorithm.startswith("sde") and order == 3)]


@pytest.mark.parametrize("prediction_type,spacing", [("epsilon", "linspace"), ("sample", "leading"),
                                                     ("v_prediction", "trailing")])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("algorithm,order", GRID)
def test_sampling_run_matches_diffusers(algorithm, order, solver_type, prediction_type, spacing):
    config = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type,
                  prediction_type=prediction_type, timestep_spacing=spacing)
    if not algorithm.endswith("++"):
        config["final_sigmas_type"] = "sigma_min"  # diffusers allows "zero" only for the ++ types
    assert_same_run(config)


@pytest.mark.parametrize("config", [
    dict(lower_order_final=False),
    dict(lower_order_final=False, solver_order=3, final_sigmas_type="sigma_min"),
    dict(euler_at_final=True, final_sigmas_type="sigma_min", solver_order=3),
    dict(final_sigmas_type="sigma_min", algorithm_type="sde-dpmsolver++"),
    dict(thresholding=True, sample_max_value=2.0, solver_order=3),
    dict(thresholding=True, sample_max_value=1.0, timestep_spacing="trailing"),   # s = 1: a plain clamp
    dict(thresholding=True, sample_max_value=1.5, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-3.0),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
         timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(timestep_spacing="leading", steps_offset=1, solver_type="heun"),
    dict(num_train_timesteps=100, trained_betas=torch.linspace(0.001, 0.1, 100).tolist(), solver_order=3),
], ids=["no-lower-final", "order3-no-lower-final-sigmamin", "euler-final", "sde-sigmamin", "threshold",
        "clip-by-threshold", "threshold-dpmsolver", "cos-lambda-clip-trailing", "cos-lambda-clip", "zero-snr-v", "offset-heun",
        "trained-betas"])
def test_options_match_diffusers(config):
    assert_same_run(config)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
def test_learned_variance_channels_are_dropped(variance_type, algorithm):
    config = dict(variance_type=variance_type, algorithm_type=algorithm, final_sigmas_type="sigma_min")
    assert_same_run(config, steps=(6,), out_channels=6)


@pytest.mark.parametrize("config", [dict(), dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_timesteps_match_set_timesteps(spacing, config):
    ours, reference = DPMSolverMultistepScheduler(timestep_spacing=spacing, **config), theirs(timestep_spacing=spacing,
                                                                                               **config)
    for n in (1, 2, 7, 10, 15, 20, 25, 50, 100, 250, 499):
        reference.set_timesteps(n)
        assert torch.equal(ours.timesteps(n), reference.timesteps), n


def test_repeated_timesteps_are_refused():
    with pytest.raises(ValueError, match="num_inference_steps=1000 gives repeated timesteps"):
        DPMSolverMultistepScheduler(timestep_spacing="leading").timesteps(1000)


def test_history_is_explicit_and_the_scheduler_stateless():
    sched = DPMSolverMultistepScheduler(solver_order=3)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in vars(sched).items()}
    x = start()
    ts = sched.timesteps(20).tolist()
    first = sched.step(model(x, ts[0]), ts[0], x, num_inference_steps=20)
    assert [t for t, _ in first.history] == [ts[0]]
    second = sched.step(model(first.prev_sample, ts[1]), ts[1], first.prev_sample, num_inference_steps=20,
                        history=first.history)
    assert [t for t, _ in second.history] == ts[:2]
    third = sched.step(model(second.prev_sample, ts[2]), ts[2], second.prev_sample, num_inference_steps=20,
                       history=second.history)
    assert [t for t, _ in third.history] == ts[1:3]  # solver_order - 1 entries, oldest first
    # a pure function: the same inputs give the same step, and order 1 ignores the history
    again = sched.update(model(second.prev_sample, ts[2]), ts[2], ts[3], second.prev_sample, second.history)
    assert torch.equal(again.prev_sample, third.prev_sample)
    euler = sched.update(model(x, ts[0]), ts[0], ts[1], x, history=second.history, order=1)
    assert torch.equal(euler.prev_sample, first.prev_sample)
    for k, v in vars(sched).items():
        assert torch.equal(v, state[k]) if torch.is_tensor(v) else v == state[k], k
    with pytest.raises(ValueError, match="order=3 needs .* 2 earlier outputs in history"):
        sched.update(model(x, ts[1]), ts[1], ts[2], x, history=first.history, order=3)
    with pytest.raises(ValueError, match=r"history: the output at timestep \d+ has shape \(2, 3, 2, 2\)"):
        sched.update(model(x, ts[1]), ts[1], ts[2], x, history=((ts[0], x[..., :2, :2]),))


def test_predict_x0_is_the_step_x0():
    sched = DPMSolverMultistepScheduler(prediction_type="v_prediction", thresholding=True, sample_max_value=1.2)
    x = start()
    t = sched.timesteps(10)[3]
    out = sched.step(model(x, t), t, x, num_inference_steps=10)
    assert_close(sched.predict_x0(model(x, t), t, x), out.pred_original_sample, rtol=0, atol=0)


def twin_unets() -> tuple[diffusers.UNet2DModel, minidiff.UNet]:
    """A small random diffusers UNet2DModel and the minidiff UNet with its weights."""
    torch.manual_seed(0)
    reference = diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                      up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    unet = minidiff.UNet.from_config(dict(reference.config, _class_name="UNet2DModel"))
    unet.load_state_dict(reference.state_dict())
    return reference, unet.eval()


def test_images_match_ddpm_pipeline():
    """minidiff.sample with DPM-Solver++ = diffusers' DDPMPipeline driving its DPMSolverMultistepScheduler."""
    reference, unet = twin_unets()
    for config in (dict(), dict(solver_order=3, solver_type="heun", beta_schedule="squaredcos_cap_v2"),
                   dict(algorithm_type="sde-dpmsolver++", timestep_spacing="trailing")):
        pipe = diffusers.DDPMPipeline(unet=reference, scheduler=theirs(**config))
        pipe.set_progress_bar_config(disable=True)
        expected = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=6,
                        output_type="pt").images
        got = minidiff.sample(unet.eval(), DPMSolverMultistepScheduler(**config), batch_size=2, num_inference_steps=6,
                              generator=torch.Generator().manual_seed(0), progress=False)
        assert_close((got / 2 + 0.5).clamp(0, 1), expected, rtol=1e-5, atol=5e-5, msg=str(config))


def test_built_from_the_shipped_ddpm_config_as_diffusers_does(tmp_path):
    folder = pretrained_path("shapes-32")
    ours = DPMSolverMultistepScheduler.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = diffusers.DPMSolverMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    assert ours.config.to_dict() == {k: reference.config[k] for k in ours.config.to_dict()}
    assert ours.config.timestep_spacing == "leading" and ours.config.beta_schedule == "squaredcos_cap_v2"
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DPMSolverMultistepScheduler"
    assert isinstance(load_scheduler(tmp_path), DPMSolverMultistepScheduler)
    loaded = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert {k: loaded.config[k] for k in saved if not k.startswith("_")} == ours.config.to_dict()


def test_reads_a_diffusers_saved_config(tmp_path):
    theirs(solver_order=3, algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_type="heun",
           lambda_min_clipped=-5.1, variance_type="learned_range").save_pretrained(tmp_path)
    ours = DPMSolverMultistepScheduler.from_pretrained(tmp_path)  # with use_karras_sigmas=False & co.
    assert (ours.config.solver_order, ours.config.algorithm_type, ours.config.lambda_min_clipped,
            ours.config.variance_type) == (3, "dpmsolver", -5.1, "learned_range")
    data = json.loads((tmp_path / "scheduler_config.json").read_text())
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DPMSolverMultistepScheduler.from_config({**data, "use_karras_sigmas": True})


@pytest.mark.parametrize("fields,match", [
    (dict(algorithm_type="dpmsolver"), "final_sigmas_type='zero' needs algorithm_type 'dpmsolver\\+\\+'"),
    (dict(algorithm_type="sde-dpmsolver++", solver_order=3), "solver_order 1 or 2"),
    (dict(solver_order=4), r"solver_order=4.*\[1, 2, 3\]"),
    (dict(algorithm_type="deis"), "algorithm_type='deis'"),
    (dict(solver_type="bh2"), "solver_type='bh2'"),
    (dict(final_sigmas_type="one"), "final_sigmas_type='one'"),
    (dict(beta_schedule="sigmoid"), "beta_schedule='sigmoid'"),
])
def test_bad_config_values(fields, match):
    with pytest.raises(ValueError, match=match):
        DPMSolverMultistepScheduler(**fields)


def test_bad_steps():
    sched = DPMSolverMultistepScheduler()
    x = start()
    with pytest.raises(ValueError, match="timestep 123 is not one of timesteps"):
        sched.step(model(x, 123), 123, x, num_inference_steps=10)
    with pytest.raises(ValueError, match="needs noise"):
        DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++").update(model(x, 999), 999, 899, x)

"""Editing: DDIM inversion (parity with diffusers' DDIMInverseScheduler), img2img and inpainting with every
sampler, guides and classifier-free guidance through ``minidiff.sample``, and the errors for bad input."""
import warnings

import diffusers
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import minidiff
from conftest import TINY, diffusers_twin
from minidiff.sampling.guidance import ColorGuidance, color_loss
from minidiff.schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

TARGET = (0.1, 0.9, 0.5)
# DPM-Solver does not clip x0; thresholding at sample_max_value 1 clips it to [-1, 1] as DDPM and DDIM do, which
# keeps these random models' samples bounded. "leading" spacing, as DDPM and DDIM: the cheap guide gradient
# d x0 / d x_t = 1 / sqrt(alpha_bar_t) is 156 at t = 999 (the first "linspace" step), where a scale-40 guide
# throws x_t far off.
SAMPLERS = {"ddpm": lambda: DDPMScheduler(), "ddim": lambda: DDIMScheduler(),
            "dpm2": lambda: DPMSolverMultistepScheduler(timestep_spacing="leading", thresholding=True),
            "dpm3": lambda: DPMSolverMultistepScheduler(solver_order=3, timestep_spacing="leading", thresholding=True),
            "unipc": lambda: UniPCMultistepScheduler(solver_order=3, timestep_spacing="leading", thresholding=True)}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return minidiff.UNet.from_config(TINY).eval()


@pytest.fixture(scope="module")
def class_unet():
    torch.manual_seed(0)
    return minidiff.UNet.from_config(dict(TINY, num_class_embeds=3)).eval()   # row 2: the null class


def images(n: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run(unet, scheduler, steps=4, **kwargs):
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return minidiff.sample(unet, scheduler, num_inference_steps=steps, progress=False, **kwargs)


def model(x, t):
    return 0.7 * x * torch.cos(torch.tensor(float(t)) / 600) + 0.2 * torch.sin(2 * x)


# --- DDIM inversion -----------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    dict(),
    dict(timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False),
    dict(steps_offset=1, set_alpha_to_one=False, prediction_type="sample", beta_schedule="squaredcos_cap_v2"),
    dict(clip_sample_range=0.5, thresholding=True),   # the inverse scheduler clips but never thresholds
], ids=["default", "trailing-v-noclip", "offset-final0-x0-cos", "clip-range"])
def test_inverse_steps_match_ddim_inverse_scheduler(config):
    ours = DDIMScheduler(**config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = diffusers.DDIMInverseScheduler.from_config(ours.config.to_dict())
    for n in (4, 10):
        reference.set_timesteps(n)
        assert torch.equal(ours.inverse_timesteps(n), reference.timesteps)
        x_ours = x_theirs = images() * 1.3
        for t in reference.timesteps:
            expected = reference.step(model(x_theirs, t), t, x_theirs)
            got = ours.invert_step(model(x_ours, t), t, x_ours, num_inference_steps=n)
            assert_close(got.prev_sample, expected.prev_sample, rtol=1e-6, atol=1e-6)
            assert_close(got.pred_original_sample, expected.pred_original_sample, rtol=1e-6, atol=1e-6)
            x_ours, x_theirs = got.prev_sample, expected.prev_sample


def test_invert_matches_diffusers_and_reconstructs(unet):
    """minidiff.invert = the loop of diffusers' inversion pipelines over DDIMInverseScheduler, same weights."""
    reference, ddim, x = diffusers_twin(unet), DDIMScheduler(), images()
    inverse = diffusers.DDIMInverseScheduler.from_config(ddim.config.to_dict())
    inverse.set_timesteps(5)
    expected = x
    with torch.no_grad():
        for t in inverse.timesteps:
            expected = inverse.step(reference(expected, t).sample, t, expected).prev_sample
    latents = minidiff.invert(unet, ddim, x, num_inference_steps=5, progress=False)
    assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(minidiff.invert(unet, DDPMScheduler(), x, num_inference_steps=5, progress=False), latents)
    recon = run(unet, ddim, steps=5, noise=latents, batch_size=2)
    assert recon.shape == x.shape and torch.isfinite(recon).all()


def test_inversion_of_an_exact_denoiser_is_exact():
    """With a model that knows the data (one image; eps = (x - sqrt(a) x0) / sqrt(1 - a)), inversion then
    DDIM sampling returns the image."""
    target = images(1)
    ddim = DDIMScheduler(clip_sample=False)

    class Oracle(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))
            self.config = type("C", (), {"in_channels": 3, "sample_size": 8})

        def forward(self, x, t):
            a = ddim.alphas_cumprod[int(t)]
            return (x - a ** 0.5 * target) / (1 - a) ** 0.5

    latents = minidiff.invert(Oracle(), ddim, target, num_inference_steps=10, progress=False)
    assert_close(run(Oracle(), ddim, steps=10, noise=latents), target, rtol=1e-4, atol=1e-4)


def test_invert_rejects_linspace_and_bad_images(unet):
    with pytest.raises(ValueError, match="timestep_spacing 'leading' or 'trailing'"):
        minidiff.invert(unet, DDIMScheduler(timestep_spacing="linspace"), images(), progress=False)
    with pytest.raises(ValueError, match=r"images must be a \(B, 3, H, W\) tensor"):
        minidiff.invert(unet, DDIMScheduler(), images()[0], progress=False)


# --- guides and classifier-free guidance with every sampler --------------------------------------------

class Counting(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet, self.config, self.calls = unet, unet.config, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.unet(*args, **kwargs)


class GaussianData(nn.Module):
    """The exact eps-prediction model of data x0 ~ N(0, s^2 I): E[eps | x_t] = sigma x_t / (alpha^2 s^2 + sigma^2)
    (alpha^2 = alpha_bar_t, sigma^2 = 1 - alpha_bar_t); a trained model's stand-in with known behaviour."""

    def __init__(self, alphas_cumprod: torch.Tensor, s: float = 0.5):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.config = type("Config", (), {"in_channels": 3, "sample_size": 8})
        self.alphas_cumprod, self.s, self.calls = alphas_cumprod, s, 0

    def forward(self, x, t):
        self.calls += 1
        a = self.alphas_cumprod[int(t)]
        return self.scale * (1 - a) ** 0.5 * x / (a * self.s ** 2 + 1 - a)


@pytest.mark.parametrize("name", SAMPLERS)
def test_colour_guidance_with_every_sampler(name, monkeypatch):
    scheduler = SAMPLERS[name]()
    steps = []
    monkeypatch.setattr(type(scheduler), "step", lambda self, *a, _step=type(scheduler).step, **k: steps.append(1)
                        or _step(self, *a, **k))
    model = GaussianData(scheduler.alphas_cumprod)
    plain = run(model, scheduler, batch_size=4)
    assert model.calls == len(steps) == 4   # one model call and one scheduler step per iteration
    guided = run(model, scheduler, batch_size=4, guides=[ColorGuidance(TARGET, scale=40)])
    assert color_loss(guided, TARGET).mean() < 0.5 * color_loss(plain, TARGET).mean()
    assert torch.equal(run(model, scheduler, batch_size=4, guides=[ColorGuidance(TARGET, scale=0)]), plain)


@pytest.mark.parametrize("name", SAMPLERS)
def test_classifier_free_guidance_with_every_sampler(class_unet, name):
    scheduler, labels = SAMPLERS[name](), torch.tensor([0, 1])
    counted = Counting(class_unet)
    guided = run(counted, scheduler, batch_size=2, class_labels=labels, guidance_scale=3.0)
    assert counted.calls == 4   # conditional and unconditional halves in one batched call per step
    conditional = run(class_unet, scheduler, batch_size=2, class_labels=labels)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, conditional)
    edited = run(class_unet, scheduler, class_labels=labels, guidance_scale=3.0, init_images=images(),
                 mask=torch.ones(8, 8).tril(), guides=[ColorGuidance(TARGET, scale=5)])
    assert torch.isfinite(edited).all()


# --- img2img and inpainting ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLERS)
def test_strength_zero_returns_the_input_and_one_keeps_almost_nothing(unet, name):
    scheduler, a, b, noise = SAMPLERS[name](), images(seed=1), images(seed=2), torch.randn(2, 3, 8, 8)
    assert torch.equal(run(unet, scheduler, init_images=a, strength=0.0), a)
    starts = []  # x at the first timestep: sqrt(alpha_bar) init + sqrt(1 - alpha_bar) noise
    from_a = run(unet, scheduler, steps=10, init_images=a, strength=1.0, noise=noise,
                 callback=lambda i, t, x, out: starts.append(x) if i == 0 else None)
    run(unet, scheduler, steps=10, init_images=b, strength=1.0, noise=noise,
        callback=lambda i, t, x, out: starts.append(x) if i == 0 else None)
    t0 = scheduler.timesteps(10)[0]
    assert_close(starts[0] - starts[1], scheduler.alphas_cumprod[t0] ** 0.5 * (a - b))
    assert scheduler.alphas_cumprod[t0] ** 0.5 < 0.02
    half = run(unet, scheduler, steps=10, init_images=a, strength=0.3, noise=noise)
    assert (half - a).abs().mean() < (from_a - a).abs().mean()


@pytest.mark.parametrize("strength,calls", [(1.0, 10), (0.6, 6), (0.25, 2), (0.05, 0)])
def test_strength_picks_the_last_timesteps(unet, strength, calls):
    counted, seen = Counting(unet), []
    run(counted, DDIMScheduler(), steps=10, init_images=images(), strength=strength,
        callback=lambda i, t, x, out: seen.append(int(t)))
    assert counted.calls == calls and seen == DDIMScheduler().timesteps(10).tolist()[10 - calls:]


@pytest.mark.parametrize("name", ["ddim", "dpm2", "unipc"])
def test_img2img_matches_diffusers_img2img_loop(unet, name):
    """As diffusers' img2img pipelines: timesteps[t_start:], set_begin_index(t_start), x = add_noise(x0, noise, t)."""
    ours = SAMPLERS[name]()
    reference_scheduler = getattr(diffusers, type(ours).__name__)(**ours.config.to_dict())
    reference, x0, noise = diffusers_twin(unet), images(), torch.randn(2, 3, 8, 8)
    reference_scheduler.set_timesteps(10)
    timesteps = reference_scheduler.timesteps[4:]
    if hasattr(reference_scheduler, "set_begin_index"):
        reference_scheduler.set_begin_index(4)
    x = reference_scheduler.add_noise(x0, noise, timesteps[:1])
    with torch.no_grad():
        for t in timesteps:
            x = reference_scheduler.step(reference(x, t).sample, t, x).prev_sample
    assert_close(run(unet, ours, steps=10, init_images=x0, strength=0.6, noise=noise), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SAMPLERS)
def test_masked_out_pixels_are_the_input_exactly(unet, name):
    scheduler, x0 = SAMPLERS[name](), images()
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    filled = run(unet, scheduler, steps=5, init_images=x0, mask=mask)
    keep = (mask == 0).expand_as(x0)
    assert torch.equal(filled[keep], x0[keep]) and not torch.allclose(filled[~keep], x0[~keep])
    assert torch.equal(run(unet, scheduler, steps=5, init_images=x0, mask=torch.zeros(8, 8)), x0)
    assert torch.equal(run(unet, scheduler, steps=5, init_images=x0, mask=torch.zeros(8, 8), strength=0.5), x0)


def test_mask_of_ones_is_img2img(unet):
    x0, noise = images(), torch.randn(2, 3, 8, 8)
    masked = run(unet, DDIMScheduler(), init_images=x0, mask=torch.ones(1, 3, 8, 8), strength=0.7, noise=noise)
    assert torch.equal(masked, run(unet, DDIMScheduler(), init_images=x0, strength=0.7, noise=noise))


@pytest.mark.parametrize("kwargs,match", [
    (dict(strength=1.5), r"strength=1.5 must be a number in \[0, 1\]"),
    (dict(strength=-0.1), r"strength=-0.1 must be"),
    (dict(strength=float("nan")), r"strength=nan must be"),
    (dict(strength="0.5"), r"strength='0.5' must be"),
    (dict(mask=torch.ones(2, 1, 4, 4)), r"mask has shape \(2, 1, 4, 4\); expected"),
    (dict(mask=torch.ones(3, 1, 8, 8)), r"mask has shape \(3, 1, 8, 8\)"),
    (dict(mask=torch.ones(1, 8, 8)), r"mask has shape \(1, 8, 8\)"),
    (dict(mask=torch.full((8, 8), 2.0)), r"mask values must be in \[0, 1\]"),
    (dict(mask=torch.full((8, 8), float("nan"))), r"mask values must be in \[0, 1\]"),
    (dict(mask=[[1.0]]), "mask must be a tensor"),
    (dict(init_images=images()[:, :1]), r"init_images must be a \(B, 3, H, W\) tensor"),
    (dict(batch_size=3), "batch_size=3 but init_images holds 2 images"),
    (dict(noise=torch.zeros(1, 3, 8, 8)), r"noise has shape \(1, 3, 8, 8\); expected \(2, 3, 8, 8\)"),
])
def test_bad_edit_inputs(unet, kwargs, match):
    kwargs = {"init_images": images(), **kwargs}
    with pytest.raises(ValueError, match=match):
        run(unet, DDIMScheduler(), **kwargs)


def test_strength_and_mask_need_init_images(unet):
    with pytest.raises(ValueError, match="pass init_images"):
        run(unet, DDIMScheduler(), strength=0.5)
    with pytest.raises(ValueError, match="pass init_images"):
        run(unet, DDIMScheduler(), mask=torch.ones(8, 8))

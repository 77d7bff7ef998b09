"""sample(): parity with diffusers' DDPMPipeline and DDIMPipeline on the same tiny UNet, plus the
loop's options (noise, generators, progress, callback)."""
from types import SimpleNamespace

import diffusers
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from conftest import TINY

from minidiff import UNet
from minidiff.sampling import sample
from minidiff.schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

BATCH = 2
# The two UNets run different, equally exact convolution kernels (minidiff's CPU inference is channels_last,
# diffusers' NCHW): ~1e-6 relative per call, which a few sampling steps grow to ~1e-5 in [0, 1] images
# (atol: 1/78 of one 8-bit level).
IMAGE_TOLERANCE = dict(rtol=1e-5, atol=5e-5)


def make_models(out_channels: int) -> tuple[nn.Module, diffusers.UNet2DModel]:
    """(minidiff's UNet, a diffusers UNet2DModel with the same weights for the pipelines)."""
    torch.manual_seed(0)
    reference = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=out_channels, block_out_channels=(8, 16), norm_num_groups=4,
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    ours = UNet.from_config(dict(reference.config, _class_name="UNet2DModel"))
    ours.load_state_dict(reference.state_dict())
    return ours.eval(), reference


@pytest.fixture(scope="module")
def models():
    return make_models(out_channels=3)


@pytest.fixture(scope="module")
def learned_variance_models():
    return make_models(out_channels=6)


def pipeline_images(pipeline_class, unet, scheduler, steps: int, **kwargs) -> torch.Tensor:
    pipe = pipeline_class(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=BATCH, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                output_type="pt", **kwargs).images


def our_images(model, scheduler, steps: int, **kwargs) -> torch.Tensor:
    x = sample(model, scheduler, batch_size=BATCH, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(0), progress=False, **kwargs)
    assert x.shape == (BATCH, 3, 8, 8)
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("config", [
    dict(),
    dict(timestep_spacing="trailing", prediction_type="v_prediction", variance_type="fixed_large"),
    dict(timestep_spacing="linspace", prediction_type="sample", clip_sample=False),
    dict(steps_offset=1, variance_type="fixed_small_log", beta_schedule="squaredcos_cap_v2"),
    dict(thresholding=True, sample_max_value=1.5, beta_schedule="scaled_linear"),
], ids=["default", "trailing-v-large", "linspace-x0-noclip", "offset-smalllog-cos", "threshold"])
def test_ddpm_matches_pipeline(models, config):
    model, reference = models
    expected = pipeline_images(diffusers.DDPMPipeline, reference, diffusers.DDPMScheduler(**config), 6)
    assert_close(our_images(model, DDPMScheduler(**config), 6), expected, **IMAGE_TOLERANCE)


def test_ddpm_learned_range_matches_pipeline(learned_variance_models):
    model, reference = learned_variance_models
    config = dict(variance_type="learned_range", timestep_spacing="trailing")
    expected = pipeline_images(diffusers.DDPMPipeline, reference, diffusers.DDPMScheduler(**config), 5)
    assert_close(our_images(model, DDPMScheduler(**config), 5), expected, **IMAGE_TOLERANCE)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("config,use_clipped", [
    (dict(), False),
    (dict(timestep_spacing="trailing", prediction_type="v_prediction", set_alpha_to_one=False), True),
    (dict(timestep_spacing="linspace", prediction_type="sample", clip_sample=False), False),
    (dict(steps_offset=1, beta_schedule="squaredcos_cap_v2", thresholding=True), True),
], ids=["default", "trailing-v-final0-clipped", "linspace-x0-noclip", "offset-cos-threshold-clipped"])
def test_ddim_matches_pipeline(models, config, use_clipped, eta):
    model, reference = models
    expected = pipeline_images(diffusers.DDIMPipeline, reference, diffusers.DDIMScheduler(**config), 7, eta=eta,
                               use_clipped_model_output=use_clipped)
    got = our_images(model, DDIMScheduler(**config), 7, eta=eta, use_clipped_model_output=use_clipped)
    assert_close(got, expected, **IMAGE_TOLERANCE)


def test_list_of_generators_matches_pipeline(models):
    model, reference = models
    pipe = diffusers.DDPMPipeline(unet=reference, scheduler=diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=BATCH, generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
                    num_inference_steps=4, output_type="pt").images
    got = sample(model, DDPMScheduler(), batch_size=BATCH, num_inference_steps=4, progress=False,
                 generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    assert_close((got / 2 + 0.5).clamp(0, 1), expected, **IMAGE_TOLERANCE)
    with pytest.raises(ValueError, match="1 generators for a batch of 2"):
        sample(model, DDPMScheduler(), batch_size=BATCH, generator=[torch.Generator()], progress=False)


def test_noise_is_the_starting_sample(models):
    model, _ = models
    noise = torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    drawn = sample(model, DDIMScheduler(), batch_size=BATCH, num_inference_steps=3, progress=False,
                   generator=torch.Generator().manual_seed(0))
    given = sample(model, DDIMScheduler(), batch_size=BATCH, num_inference_steps=3, progress=False, noise=noise)
    assert torch.equal(drawn, given)
    with pytest.raises(ValueError, match=r"noise has shape \(1, 3, 8, 8\); expected \(2, 3, 8, 8\)"):
        sample(model, DDIMScheduler(), batch_size=BATCH, noise=noise[:1], progress=False)


def test_progress_bar(models, capsys):
    model, _ = models
    sample(model, DDIMScheduler(), num_inference_steps=3, progress=False)
    assert capsys.readouterr() == ("", "")
    sample(model, DDIMScheduler(), num_inference_steps=3, progress=True)
    assert "3/3" in capsys.readouterr().err


def test_callback_observes_every_step(models):
    model, _ = models
    calls = []
    x = sample(model, DDPMScheduler(), num_inference_steps=5, progress=False,
               generator=torch.Generator().manual_seed(1), callback=lambda *args: calls.append(args))
    assert [i for i, *_ in calls] == list(range(5))
    assert [int(t) for _, t, _, _ in calls] == DDPMScheduler().timesteps(5).tolist()
    for (_, _, _, out), (_, _, x_next, _) in zip(calls, calls[1:]):
        assert torch.equal(out.prev_sample, x_next)
    assert torch.equal(calls[-1][3].prev_sample, x)


def test_model_gets_conditioning_only_when_given_and_a_0d_timestep(models):
    model, _ = models
    calls = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, x, t, **conditioning):
            calls.append((t, conditioning))
            return self.inner(x, t)

    labels, context = torch.tensor([1, 2]), torch.zeros(BATCH, 4, 8)
    sample(Recorder(), DDIMScheduler(), batch_size=BATCH, num_inference_steps=2, progress=False)
    sample(Recorder(), DDIMScheduler(), batch_size=BATCH, num_inference_steps=2, progress=False,
           class_labels=labels, encoder_hidden_states=context)
    assert [c for _, c in calls[:2]] == [{}, {}]
    assert all(c["class_labels"] is labels and c["encoder_hidden_states"] is context for _, c in calls[2:])
    assert [(t.ndim, t.dtype, int(t)) for t, _ in calls[:2]] == [(0, torch.int64, 500), (0, torch.int64, 0)]


def test_shape_and_dtype_follow_the_model():
    class Zero(nn.Module):  # float64 parameters, a rectangular sample_size as read from JSON
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.zeros((), dtype=torch.float64))
            self.config = SimpleNamespace(in_channels=2, sample_size=[4, 6])

        def forward(self, x, t):
            return x * self.scale

    x = sample(Zero(), DDIMScheduler(), batch_size=3, num_inference_steps=2, progress=False)
    assert x.shape == (3, 2, 4, 6) and x.dtype == torch.float64


def test_bad_options(models):
    model, _ = models
    with pytest.raises(ValueError, match="DDIMScheduler only"):
        sample(model, DDPMScheduler(), eta=0.5, progress=False)
    with pytest.raises(ValueError, match="num_inference_steps=2000"):
        sample(model, DDIMScheduler(), num_inference_steps=2000, progress=False)


def test_image_conditioned_sampling_guides_against_the_zero_image():
    """conditioning_image reaches the unet in the single guidance mechanism: w = 1 is plain conditional
    sampling, w != 1 one batched forward per step whose second half sees the all-zero image."""
    torch.manual_seed(0)
    unet = UNet.from_config({**TINY, "conditioning_channels": 3}).eval()
    scheduler = DDIMScheduler(num_train_timesteps=50)
    condition = torch.rand(2, 3, 8, 8)
    seen = []
    unet.register_forward_hook(lambda module, args, kwargs, out: seen.append(kwargs["conditioning_image"]),
                               with_kwargs=True)
    kwargs = dict(conditioning_image=condition, num_inference_steps=2, progress=False)
    plain = sample(unet, scheduler, generator=torch.Generator().manual_seed(1), **kwargs)
    same = sample(unet, scheduler, generator=torch.Generator().manual_seed(1), guidance_scale=1.0, **kwargs)
    assert plain.shape == (2, 3, 8, 8) and torch.equal(plain, same)
    seen.clear()
    sample(unet, scheduler, guidance_scale=2.0, **kwargs)
    assert len(seen) == 2 and all(c.shape[0] == 4 for c in seen)
    assert torch.equal(seen[0][:2], condition) and seen[0][2:].abs().sum() == 0
    with pytest.raises(ValueError, match="image-conditioned; expected shape"):
        sample(unet, scheduler, conditioning_image=torch.rand(2, 1, 8, 8), num_inference_steps=1,
                        progress=False)


@pytest.mark.parametrize("scheduler", [DDIMScheduler(num_train_timesteps=50), DDPMScheduler(num_train_timesteps=50),
                                       DPMSolverMultistepScheduler(num_train_timesteps=50),
                                       UniPCMultistepScheduler(num_train_timesteps=50)], ids=type)
def test_low_resolution_consistency_makes_samples_average_down_to_it(scheduler):
    torch.manual_seed(0)
    unet = UNet.from_config({**TINY, "sample_size": 16, "conditioning_channels": 3}).eval()
    low = torch.rand(2, 3, 4, 4) * 2 - 1
    condition = torch.nn.functional.interpolate(low, scale_factor=4)
    plain = sample(unet, scheduler, conditioning_image=condition, num_inference_steps=4, progress=False,
                   generator=torch.Generator().manual_seed(0))
    x = sample(unet, scheduler, conditioning_image=condition, low_resolution=low, num_inference_steps=4, progress=False,
               generator=torch.Generator().manual_seed(0))
    down = lambda images: torch.nn.functional.avg_pool2d(images, 4)  # noqa: E731
    assert (down(x) - low).abs().max() < 1e-4 < (down(plain) - low).abs().max()
    with pytest.raises(ValueError, match=r"low_resolution has shape \(2, 3, 5, 5\)"):
        sample(unet, scheduler, conditioning_image=condition, low_resolution=torch.zeros(2, 3, 5, 5),
               num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="low_resolution must be a"):
        sample(unet, scheduler, conditioning_image=condition, low_resolution=torch.zeros(2, 1, 4, 4),
               num_inference_steps=1, progress=False)

"""Loss guidance: the predictor contract, schedules indexed by the timestep, combining and clipping
guides, the two gradient modes, DDPM/DDIM through ``minidiff.sample``, and bad inputs."""
from __future__ import annotations

import math

import pytest
import torch

import minidiff
from conftest import TINY
from minidiff.sampling.guidance import ColorGuidance, LossGuide, color_loss, guided_predictor, parse_color, schedule_factor

TARGET = (0.1, 0.9, 0.5)
SCHEDULERS = (minidiff.DDPMScheduler, minidiff.DDIMScheduler)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return minidiff.UNet.from_config(TINY).eval()


def _sample(unet, scheduler, guides=None, through_unet=False, steps=4, **kwargs):
    if guides is not None:
        kwargs.update(guides=guides, guide_through_unet=through_unet)
    return minidiff.sample(unet, scheduler, batch_size=4, num_inference_steps=steps, progress=False,
                           generator=torch.Generator().manual_seed(0), **kwargs)


def _denoise(unet):
    return lambda x, t: unet(x, t)


def _sum_x0(x0):  # d/dx0 = 1 everywhere: the step then shows the chain rule and the factors
    return x0.sum(dim=(1, 2, 3))


@pytest.mark.parametrize("scheduler_class", SCHEDULERS)
@pytest.mark.parametrize("through_unet", [False, True])
def test_colour_guidance_lowers_the_colour_loss(unet, scheduler_class, through_unet):
    scheduler = scheduler_class()
    plain = _sample(unet, scheduler)
    guided = _sample(unet, scheduler, [ColorGuidance(TARGET, scale=40)], through_unet)
    assert color_loss(guided, TARGET).mean() < 0.8 * color_loss(plain, TARGET).mean()


@pytest.mark.parametrize("scheduler_class", SCHEDULERS)
@pytest.mark.parametrize("through_unet", [False, True])
def test_scale_zero_is_bit_identical(unet, scheduler_class, through_unet):
    scheduler = scheduler_class()
    guides = [ColorGuidance(TARGET, scale=0), LossGuide(_sum_x0, scale=0, clip_grad_norm=1.0)]
    assert torch.equal(_sample(unet, scheduler, guides, through_unet), _sample(unet, scheduler))


def test_composes_with_classifier_free_guidance():
    torch.manual_seed(0)
    unet = minidiff.UNet.from_config(dict(TINY, num_class_embeds=3)).eval()   # row 2: the null class
    cfg = {"class_labels": torch.tensor([0, 1, 0, 1]), "guidance_scale": 3.0}
    # eps as the model gives it: this untrained model's x0 estimates saturate, and recomputing eps from the
    # clipped x0 (the default under classifier-free guidance) swallows most of any shift of x_t here (loss
    # ratio 0.90). Not so on a trained model: the digits model of examples/class_conditioned.py at w = 2 with
    # a brightness LossGuide reached the target mean with either setting.
    cfg["use_clipped_model_output"] = False
    scheduler = minidiff.DDIMScheduler()
    plain = _sample(unet, scheduler, **cfg)
    assert torch.equal(_sample(unet, scheduler, [ColorGuidance(TARGET, scale=0)], **cfg), plain)
    guided = _sample(unet, scheduler, [ColorGuidance(TARGET)], **cfg)
    assert color_loss(guided, TARGET).mean() < 0.8 * color_loss(plain, TARGET).mean()


def test_schedule_factor_is_indexed_by_the_timestep(unet):
    # epsilon prediction without clipping: x0 = (x - sqrt(1 - a) eps) / sqrt(a), so d sum(x0) / dx = 1/sqrt(a)
    scheduler = minidiff.DDIMScheduler(clip_sample=False)
    t = scheduler.timesteps(10)[5]                       # 400: the loop counter (5) would pick alpha_bar_5
    a = scheduler.alphas_cumprod[t].item()
    x = torch.randn(2, 3, 8, 8)
    for schedule, factor in [("none", 1.0), ("alpha_bar", a), ("sqrt_alpha_bar", a ** 0.5),
                             ("sqrt_one_minus_alpha_bar", (1 - a) ** 0.5)]:
        assert schedule_factor(schedule, scheduler, t) == pytest.approx(factor)
        predict = guided_predictor(_denoise(unet), scheduler, [LossGuide(_sum_x0, 3.0, schedule)])
        x_new, _ = predict(x, t)
        torch.testing.assert_close(x - x_new, torch.full_like(x, 3.0 * factor / a ** 0.5))


def test_model_output_is_the_unguided_one_and_x_is_moved(unet):
    scheduler = minidiff.DDPMScheduler()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor(500)
    with torch.no_grad():
        expected = unet(x, t)
        for through_unet in (False, True):
            predict = guided_predictor(_denoise(unet), scheduler, [ColorGuidance(TARGET)], through_unet=through_unet)
            x_new, output = predict(x, t)
            torch.testing.assert_close(output, expected)
            assert not output.requires_grad and not x_new.requires_grad
            assert not torch.equal(x_new, x)


def test_two_guides_add_up(unet):
    scheduler = minidiff.DDIMScheduler()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor(300)
    a = ColorGuidance(TARGET, scale=20, schedule="sqrt_alpha_bar")
    b = LossGuide(lambda x0: (x0 ** 2).mean(dim=(1, 2, 3)), scale=5, schedule="sqrt_one_minus_alpha_bar")

    def step(guides):
        return x - guided_predictor(_denoise(unet), scheduler, guides)(x, t)[0]
    torch.testing.assert_close(step([a, b]), step([a]) + step([b]))


def test_clip_grad_norm_caps_each_guides_step_per_sample(unet):
    scheduler = minidiff.DDIMScheduler()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor(300)
    clipped = LossGuide(_sum_x0, scale=1e4, clip_grad_norm=0.5)
    other = ColorGuidance(TARGET, scale=10)

    def step(guides):
        return x - guided_predictor(_denoise(unet), scheduler, guides)(x, t)[0]
    alone = step([clipped])
    torch.testing.assert_close(alone.flatten(1).norm(dim=1), torch.full((3,), 0.5))
    torch.testing.assert_close(step([clipped, other]), alone + step([other]))
    small = LossGuide(_sum_x0, scale=1e-3, clip_grad_norm=0.5)   # under the cap: untouched
    torch.testing.assert_close(step([small]), step([LossGuide(_sum_x0, scale=1e-3)]))


def test_the_gradient_flows_through_the_unet_only_in_that_mode(unet):
    # with x0-prediction, x0 = unet(x, t): the cheap gradient is zero, the through-UNet one is not
    scheduler = minidiff.DDIMScheduler(prediction_type="sample")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor(300)
    guide = [ColorGuidance(TARGET)]
    cheap, _ = guided_predictor(_denoise(unet), scheduler, guide)(x, t)
    deep, _ = guided_predictor(_denoise(unet), scheduler, guide, through_unet=True)(x, t)
    assert torch.equal(cheap, x)
    assert (deep - x).abs().max() > 0
    # with eps-prediction both move x, differently
    scheduler = minidiff.DDIMScheduler()
    cheap, _ = guided_predictor(_denoise(unet), scheduler, guide)(x, t)
    deep, _ = guided_predictor(_denoise(unet), scheduler, guide, through_unet=True)(x, t)
    assert not torch.allclose(cheap, deep)


def test_the_step_does_not_depend_on_the_batch(unet):
    scheduler = minidiff.DDPMScheduler()
    x, t = torch.randn(4, 3, 8, 8), torch.tensor(700)
    predict = guided_predictor(_denoise(unet), scheduler, [ColorGuidance(TARGET)])
    torch.testing.assert_close(predict(x, t)[0][:1], predict(x[:1], t)[0])


def test_colour_loss_is_the_courses_per_sample():
    images = torch.rand(3, 3, 4, 4) * 2 - 1
    course = (images - (torch.tensor(TARGET) * 2 - 1)[None, :, None, None]).abs().mean()
    per_sample = color_loss(images, TARGET)
    assert per_sample.shape == (3,)
    torch.testing.assert_close(per_sample.mean(), course)


def test_colour_parsing():
    assert parse_color("#55FFAA") == parse_color("55ffaa") == (0x55 / 255, 1.0, 0xAA / 255)
    assert parse_color([0, 1, 0.5]) == (0.0, 1.0, 0.5)
    assert ColorGuidance("#000000").target == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("target", ["#55FFA", "55FFAAA", "#GG0000", "red", (0.1, 0.2), (0.1, 1.2, 0.3),
                                    (-0.1, 0.5, 0.5), ("a", 0, 0)])
def test_bad_colours_are_rejected(target):
    with pytest.raises(ValueError, match="colou?r"):
        ColorGuidance(target)


@pytest.mark.parametrize("kwargs, match", [
    ({"scale": -1}, "scale=-1"), ({"scale": math.nan}, "scale=nan"), ({"scale": "40"}, "scale='40'"),
    ({"schedule": "cosine"}, "schedule='cosine'.*allowed.*sqrt_alpha_bar"),
    ({"clip_grad_norm": 0}, "clip_grad_norm=0"), ({"clip_grad_norm": -2.0}, "clip_grad_norm=-2.0"),
])
def test_bad_guide_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ColorGuidance(TARGET, **kwargs)
    with pytest.raises(ValueError, match=match):
        LossGuide(_sum_x0, **kwargs)


def test_bad_losses_and_images_are_rejected(unet):
    scheduler = minidiff.DDPMScheduler()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor(10)
    with pytest.raises(TypeError, match="callable"):
        LossGuide("not a function")
    with pytest.raises(ValueError, match=r"one loss per sample, shape \(2,\)"):
        guided_predictor(_denoise(unet), scheduler, [LossGuide(lambda x0: x0.mean())])(x, t)
    with pytest.raises(TypeError, match="not a guide.*LossGuide"):
        guided_predictor(_denoise(unet), scheduler, [_sum_x0])
    with pytest.raises(ValueError, match="RGB"):
        color_loss(torch.zeros(2, 1, 8, 8), TARGET)

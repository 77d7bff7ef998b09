"""Hostile arguments to sample() and invert(): each raises an error from minidiff naming the culprit and what is
allowed, before any step runs, instead of an error from deep inside torch or a silent wrong value."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import minidiff
from minidiff.sampling.guidance import parse_color

TINY = dict(_class_name="UNet2DModel", sample_size=8, in_channels=3, out_channels=3, block_out_channels=[8, 16],
            layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
            down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return minidiff.UNet.from_config(TINY).eval()


def run(unet, scheduler=None, **kwargs):
    return minidiff.sample(unet, scheduler or minidiff.DDIMScheduler(), num_inference_steps=2, progress=False,
                           **kwargs)


class OutputObject(nn.Module):
    """A model that returns an output object, as diffusers' models do."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config = unet, unet.config

    def forward(self, x, t, **kwargs):
        return {"sample": self.unet(x, t, **kwargs)}


@pytest.mark.parametrize("scheduler", ["ddim", object()])
def test_a_scheduler_that_is_not_minidiffs_is_named(unet, scheduler):
    with pytest.raises(TypeError, match=r"scheduler must be a minidiff scheduler"):
        minidiff.sample(unet, scheduler, num_inference_steps=2, progress=False)
    with pytest.raises(TypeError, match=r"scheduler must be a minidiff scheduler"):
        minidiff.invert(unet, scheduler, torch.zeros(1, 3, 8, 8), 2, progress=False)


def test_a_model_that_is_not_a_unet_or_has_no_weights_is_named(unet):
    with pytest.raises(TypeError, match=r"unet must be a model with a config"):
        run(None)
    with pytest.raises(TypeError, match=r"unet returned a dict, not a tensor"):
        run(OutputObject(unet))
    with pytest.raises(ValueError, match=r"unet is on the meta device"):
        run(minidiff.UNet.from_config(TINY).to("meta"))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(noise=np.zeros((1, 3, 8, 8), np.float32)), TypeError, r"noise: expected a floating-point tensor, got nd"),
    (dict(noise=torch.zeros(1, 3, 8, 8, dtype=torch.long)), TypeError, r"noise: expected a floating-point tensor"),
    (dict(noise=torch.zeros(1, 3, 8, 8, device="meta")), ValueError, r"noise is on the meta device"),
    (dict(init_images=torch.zeros(0, 3, 8, 8), strength=0.5), ValueError, r"init_images must be .* with B >= 1"),
    (dict(init_images=torch.zeros(1, 3, 8, 8, device="meta")), ValueError, r"init_images is on the meta device"),
    (dict(init_images=torch.zeros(1, 3, 8, 8), mask=torch.ones(8, 8, device="meta")), ValueError,
     r"mask is on the meta device"),
    (dict(low_resolution=torch.zeros(0, 3, 4, 4)), ValueError, r"low_resolution must be .* with B >= 1"),
    (dict(callback=5), TypeError, r"callback must be a function"),
    (dict(generator=42), TypeError, r"generator: expected a torch.Generator"),
    (dict(eta="x"), TypeError, r"eta='x': expected float"),
])
def test_bad_sampling_arguments_are_named(unet, kwargs, error, message):
    with pytest.raises(error, match=message):
        run(unet, **kwargs)


def test_conditions_of_another_batch_are_named_before_guidance_doubles_it():
    labelled = minidiff.UNet.from_config({**TINY, "num_class_embeds": 4}).eval()
    with pytest.raises(ValueError, match=r"class_labels has shape \(3,\); expected shape \(2,\)"):
        run(labelled, batch_size=2, class_labels=torch.tensor([1, 2, 3]), guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"class_labels has shape \(3,\); expected shape \(2,\)"):
        minidiff.invert(labelled, minidiff.DDIMScheduler(), torch.zeros(2, 3, 8, 8), 2, progress=False,
                        class_labels=torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(images=torch.zeros(0, 3, 8, 8)), ValueError, r"images must be .* with B >= 1"),
    (dict(images=torch.zeros(1, 3, 8, 8, device="meta")), ValueError, r"images is on the meta device"),
    (dict(callback="x"), TypeError, r"callback must be a function"),
    (dict(guidance_scale=math.nan, class_labels=torch.tensor([1])), ValueError,
     r"guidance_scale=nan must be a finite number"),
])
def test_bad_inversion_arguments_are_named(kwargs, error, message):
    labelled = minidiff.UNet.from_config({**TINY, "num_class_embeds": 4}).eval()
    kwargs = {"images": torch.zeros(1, 3, 8, 8), **kwargs}
    with pytest.raises(error, match=message):
        minidiff.invert(labelled, minidiff.DDIMScheduler(), num_inference_steps=2, progress=False, **kwargs)


@pytest.mark.parametrize("color", [None, 5])
def test_a_colour_that_is_not_a_triple_or_hex_is_named(color):
    with pytest.raises(ValueError, match=rf"color {color} must be 3 numbers"):
        parse_color(color)

"""The model function every sampler calls: ``denoise(x, t) -> model_output``, the unet with its conditioning
bound and, for classifier-free guidance, wrapped to mix the conditional and unconditional outputs."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..schedulers import Scheduler
from .guidance import Denoiser


def check_call(unet: Any, scheduler: Any, callback: Any) -> Tensor:
    """Check the model, scheduler and callback a sampler gets; returns the model's first parameter (its
    device and dtype are the samples')."""
    if not isinstance(unet, nn.Module) or not hasattr(unet, "config"):
        raise TypeError(f"unet must be a model with a config (a minidiff.UNet), got {type(unet).__name__}")
    if not isinstance(scheduler, Scheduler):
        raise TypeError(f"scheduler must be a minidiff scheduler (DDPMScheduler, DDIMScheduler, "
                        f"DPMSolverMultistepScheduler, UniPCMultistepScheduler), got {type(scheduler).__module__}.{type(scheduler).__name__}; "
                        "convert a diffusers one with minidiff.DDIMScheduler.from_config(dict(its.config))")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a function (i, t, x, out) or None, got {type(callback).__name__}")
    param = next(unet.parameters(), None)
    if param is None or param.is_meta:
        raise ValueError("unet has no weights" if param is None else "unet is on the meta device: load its weights "
                         "first (minidiff.load_unet)")
    return param


def check_batch(batch: int, **conditions: Any) -> None:
    """Each given condition tensor must hold one entry per sample of the batch."""
    for name, value in conditions.items():
        if torch.is_tensor(value) and value.ndim and len(value) != batch:
            raise ValueError(f"{name} has shape {tuple(value.shape)}; expected shape ({batch},"
                             f"{' ...' if value.ndim > 1 else ''}): one entry per sample of the batch")


def _output(out: Any) -> Tensor:
    """The model's output, which must be a tensor (a diffusers model returns an output object)."""
    if not torch.is_tensor(out):
        raise TypeError(f"unet returned a {type(out).__name__}, not a tensor: the samplers need a model that returns "
                        "its prediction, such as a minidiff.UNet (minidiff.load_unet reads diffusers folders)")
    return out


def _model_fn(unet: nn.Module, conditioning: dict[str, Tensor]) -> Denoiser:
    """``denoise(x, t)``: the unet with its conditioning bound; only the given kwargs are passed."""
    def denoise(x: Tensor, t: Tensor) -> Tensor:
        return _output(unet(x, t, **conditioning))
    return denoise


def _null_conditioning(unet: nn.Module, conditioning: dict[str, Tensor], null_class_label: int | None,
                       uncond_encoder_hidden_states: Tensor | None) -> dict[str, Tensor]:
    """The unconditional twin of ``conditioning``: the null class (by default the last row of the class
    embedding, where minidiff's condition dropout trains it), the given or all-zero context, the all-zero
    conditioning image (what condition dropout trains)."""
    if not conditioning:
        raise ValueError("guidance_scale != 1 needs class_labels, encoder_hidden_states or conditioning_image "
                         "to guide towards")
    null = {}
    if "class_labels" in conditioning:
        labels = conditioning["class_labels"]
        n = unet.config.num_class_embeds
        if n is None and null_class_label is None:
            raise ValueError("classifier-free guidance with class labels needs null_class_label: this UNet has no "
                             "class embedding table whose last row would be the null class")
        label = n - 1 if null_class_label is None else null_class_label
        if isinstance(label, bool) or not isinstance(label, int) or n is not None and not 0 <= label < n:
            raise ValueError(f"null_class_label={label!r} must be an int in [0, {n - 1}] (the class embedding "
                             f"has {n} rows; minidiff's label dropout trains the last)")
        null["class_labels"] = torch.full_like(labels, label)
    if "encoder_hidden_states" in conditioning:
        context = conditioning["encoder_hidden_states"]
        null["encoder_hidden_states"] = torch.zeros_like(context) if uncond_encoder_hidden_states is None \
            else _null_context(uncond_encoder_hidden_states, context)
    if "conditioning_image" in conditioning:
        null["conditioning_image"] = torch.zeros_like(conditioning["conditioning_image"])
    return null


def _null_context(uncond: Tensor, context: Tensor) -> Tensor:
    """``uncond`` (1 or B, L, D) broadcast to the context's shape, or a clear error."""
    if not torch.is_tensor(uncond) or uncond.ndim != 3 or uncond.shape[0] not in (1, context.shape[0]) \
            or uncond.shape[1:] != context.shape[1:]:
        got = tuple(uncond.shape) if torch.is_tensor(uncond) else type(uncond).__name__
        raise ValueError(f"uncond_encoder_hidden_states: expected shape (1 or {context.shape[0]}, "
                         f"{context.shape[1]}, {context.shape[2]}) like encoder_hidden_states, got {got}")
    return uncond.expand_as(context).to(context)


def classifier_free(unet: nn.Module, conditioning: dict[str, Tensor], null: dict[str, Tensor],
                    guidance_scale: float) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): m = m(x, null) + w (m(x, c) - m(x, null)),
    with the conditional and unconditional halves in ONE batched forward per step."""
    both = {k: torch.cat([conditioning[k], null[k]]) for k in conditioning}

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        cond, uncond = _output(unet(torch.cat([x, x]), t, **both)).chunk(2)
        return uncond + guidance_scale * (cond - uncond)
    return denoise


def denoiser(unet: nn.Module, *, class_labels: Tensor | None = None, encoder_hidden_states: Tensor | None = None,
             conditioning_image: Tensor | None = None, guidance_scale: float = 1.0, null_class_label: int | None = None,
             uncond_encoder_hidden_states: Tensor | None = None) -> Denoiser:
    """``denoise(x, t)`` for ``unet`` with the given conditioning; classifier-free guidance when
    ``guidance_scale`` != 1 (against ``null_class_label`` / ``uncond_encoder_hidden_states``, see
    ``minidiff.sample``)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number (1: no guidance)")
    conditioning = {name: value for name, value in (("class_labels", class_labels),
                                                    ("encoder_hidden_states", encoder_hidden_states),
                                                    ("conditioning_image", conditioning_image))
                    if value is not None}
    if guidance_scale == 1.0:
        return _model_fn(unet, conditioning)
    null = _null_conditioning(unet, conditioning, null_class_label, uncond_encoder_hidden_states)
    return classifier_free(unet, conditioning, null, guidance_scale)

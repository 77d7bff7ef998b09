"""Sampling: one short loop over a scheduler's timesteps.

The model is called through a single function ``denoise(x, t) -> model_output`` built by ``_model_fn``;
guidance (classifier-free, loss guides) composes as wrappers around that function, never as options
threaded through the loop. The result equals diffusers' DDPMPipeline / DDIMPipeline for the same
weights, scheduler config and ``torch.Generator`` (before their ``(x / 2 + 0.5).clamp(0, 1)``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..schedulers import DDIMScheduler, DDPMScheduler, Generator, SchedulerOutput, randn
from .guidance import Denoiser, Guide, guided_predictor

Callback = Callable[[int, Tensor, Tensor, SchedulerOutput], None]


def _model_fn(unet: nn.Module, conditioning: dict[str, Tensor]) -> Denoiser:
    """``denoise(x, t)``: the unet with its conditioning bound; only the given kwargs are passed."""
    def denoise(x: Tensor, t: Tensor) -> Tensor:
        return unet(x, t, **conditioning)
    return denoise


def _null_conditioning(unet: nn.Module, conditioning: dict[str, Tensor], null_class_label: int | None,
                       uncond_encoder_hidden_states: Tensor | None) -> dict[str, Tensor]:
    """The unconditional twin of ``conditioning``: the null class (by default the last row of the class
    embedding, where minidiff's label dropout trains it) and/or the given or all-zero context."""
    if not conditioning:
        raise ValueError("guidance_scale != 1 needs class_labels or encoder_hidden_states to guide towards")
    null = {}
    if "class_labels" in conditioning:
        labels = conditioning["class_labels"]
        label = unet.config.num_class_embeds - 1 if null_class_label is None else null_class_label
        null["class_labels"] = torch.full_like(labels, label)
    if "encoder_hidden_states" in conditioning:
        context = conditioning["encoder_hidden_states"]
        null["encoder_hidden_states"] = torch.zeros_like(context) if uncond_encoder_hidden_states is None \
            else uncond_encoder_hidden_states.expand_as(context).to(context)
    return null


def classifier_free(unet: nn.Module, conditioning: dict[str, Tensor], null: dict[str, Tensor],
                    guidance_scale: float) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): m = m(x, null) + w (m(x, c) - m(x, null)),
    with the conditional and unconditional halves in ONE batched forward per step."""
    both = {k: torch.cat([conditioning[k], null[k]]) for k in conditioning}

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        cond, uncond = unet(torch.cat([x, x]), t, **both).chunk(2)
        return uncond + guidance_scale * (cond - uncond)
    return denoise


def _initial_noise(unet: nn.Module, batch_size: int, generator: Generator, noise: Tensor | None,
                   device: torch.device, dtype: torch.dtype) -> Tensor:
    """x_T: ``noise`` if given (checked), else drawn as diffusers' pipelines do."""
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    shape = (batch_size, unet.config.in_channels, height, width)
    if noise is None:
        return randn(shape, generator=generator, device=device, dtype=dtype)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {shape} "
                         "(batch_size, unet.config.in_channels, *unet.config.sample_size)")
    return noise.to(device=device, dtype=dtype)


def _step_options(scheduler: DDPMScheduler | DDIMScheduler, eta: float, use_clipped_model_output: bool | None,
                  guidance_scale: float) -> dict:
    """DDIM's step options. ``use_clipped_model_output=None`` means: on under classifier-free guidance.
    Guidance scales eps up; DDIM then clips x0 but would keep the unclipped eps in its x_t direction
    term, re-injecting the excess as noise (textured garbage from w ~ 3 on); eps recomputed from the
    clipped x0 keeps x_{t-1} consistent (measured on the digits: w=5 judged 28% -> 100%)."""
    if isinstance(scheduler, DDIMScheduler):
        if use_clipped_model_output is None:
            use_clipped_model_output = guidance_scale != 1.0
        return {"eta": eta, "use_clipped_model_output": use_clipped_model_output}
    if eta != 0.0 or use_clipped_model_output:
        raise ValueError(f"eta={eta} and use_clipped_model_output={use_clipped_model_output} apply to a "
                         f"DDIMScheduler only, got a {type(scheduler).__name__}")
    return {}


def sample(unet: nn.Module, scheduler: DDPMScheduler | DDIMScheduler, *, batch_size: int = 1,
           num_inference_steps: int = 50, generator: Generator = None, eta: float = 0.0,
           class_labels: Tensor | None = None, encoder_hidden_states: Tensor | None = None,
           use_clipped_model_output: bool | None = None, progress: bool = True, callback: Callback | None = None,
           noise: Tensor | None = None, guidance_scale: float = 1.0, null_class_label: int | None = None,
           uncond_encoder_hidden_states: Tensor | None = None, guides: Sequence[Guide] = (),
           guide_through_unet: bool = False) -> Tensor:
    """Generate ``batch_size`` samples in [-1, 1] (unclamped; images are ``(x / 2 + 0.5).clamp(0, 1)``).

    ``unet(x, t, class_labels=..., encoder_hidden_states=...) -> Tensor`` must expose
    ``unet.config.in_channels`` and ``unet.config.sample_size`` (int or (H, W)); samples take the device and
    dtype of its parameters. ``generator`` (one, or one per sample) draws x_T and then the step noise, in
    diffusers' order; ``noise`` gives x_T instead. ``eta`` and ``use_clipped_model_output`` are DDIM's;
    the latter defaults to on with classifier-free guidance, else off (diffusers' default).
    ``callback(i, t, x, out)`` observes each step: x is the sample at t, ``out.prev_sample`` the next one.

    ``guidance_scale`` w != 1 applies classifier-free guidance against the null class (``null_class_label``,
    default the last class row) or the null context (``uncond_encoder_hidden_states``, default zeros).
    ``guides`` (see minidiff.guidance) steer x_t with the gradient of a loss on the predicted x0; with
    ``guide_through_unet`` the gradient also flows through the model.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    param = next(unet.parameters())
    x = _initial_noise(unet, batch_size, generator, noise, param.device, param.dtype)
    conditioning = {name: value for name, value in (("class_labels", class_labels),
                                                    ("encoder_hidden_states", encoder_hidden_states))
                    if value is not None}
    denoise = _model_fn(unet, conditioning)
    if guidance_scale != 1.0:
        null = _null_conditioning(unet, conditioning, null_class_label, uncond_encoder_hidden_states)
        denoise = classifier_free(unet, conditioning, null, guidance_scale)
    predict = guided_predictor(denoise, scheduler, guides, through_unet=guide_through_unet)
    options = _step_options(scheduler, eta, use_clipped_model_output, guidance_scale)
    timesteps = scheduler.timesteps(num_inference_steps)
    # no_grad, not inference_mode: guides re-enable autograd inside predict.
    with torch.no_grad():
        for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress)):
            x, model_output = predict(x, t.to(x.device))
            out = scheduler.step(model_output, t, x, num_inference_steps=num_inference_steps,
                                 generator=generator, **options)
            if callback is not None:
                callback(i, t, x, out)
            x = out.prev_sample
    return x

"""Sampling: one short loop over a scheduler's timesteps, for every scheduler (DDPM, DDIM, DPM-Solver).

The model is called through a single function ``denoise(x, t) -> model_output`` (see ``denoiser``);
classifier-free guidance and loss guides compose as wrappers around that function, never as options
threaded through the loop, so every sampler gets them. The loop, not the scheduler, holds a multistep
solver's history of earlier outputs. The result equals diffusers' DDPMPipeline / DDIMPipeline (or a
DDPMPipeline driving DPMSolverMultistepScheduler) for the same weights, scheduler config and
``torch.Generator`` (before their ``(x / 2 + 0.5).clamp(0, 1)``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checks import check_tensor
from ..schedulers import DDIMScheduler, Generator, MultistepOutput, Scheduler, SchedulerOutput, randn
from .denoiser import check_batch, check_call, denoiser
from .editing import ImageEdit, LowResolution, check_images
from .guidance import Guide, guided_predictor

Callback = Callable[[int, Tensor, Tensor, SchedulerOutput], None]


def _shape(unet: nn.Module, batch_size: int | None, init_images: Tensor | None, noise: Tensor | None,
           conditioning_image: Tensor | None) -> tuple[int, ...]:
    """(B, C, H, W) of the samples: the init_images' shape, else batch_size (default: the batch of the noise or
    the conditioning image, or 1) and the conditioning image's size or the unet config's sample_size."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    if init_images is not None:
        init_images = check_images(init_images, unet.config.in_channels)
        if batch_size is not None and batch_size != len(init_images):
            raise ValueError(f"batch_size={batch_size} but init_images holds {len(init_images)} images")
        return tuple(init_images.shape)
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if torch.is_tensor(conditioning_image) and conditioning_image.dim() == 4:
        height, width = conditioning_image.shape[2:]
        if batch_size is None:
            batch_size = len(conditioning_image)
    if batch_size is None and torch.is_tensor(noise) and noise.dim() == 4:
        batch_size = len(noise)
    return (batch_size or 1, unet.config.in_channels, height, width)


def _initial_noise(shape: tuple[int, ...], generator: Generator, noise: Tensor | None, device: torch.device,
                   dtype: torch.dtype) -> Tensor:
    """x_T: ``noise`` if given (checked), else drawn as diffusers' pipelines do."""
    if noise is None:
        return randn(shape, generator=generator, device=device, dtype=dtype)
    check_tensor("noise", noise, floating=True)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {shape} "
                         "(batch_size, unet.config.in_channels, *unet.config.sample_size, or init_images' shape)")
    return noise.to(device=device, dtype=dtype)


def _step_options(scheduler: Scheduler, eta: float, use_clipped_model_output: bool | None,
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


def sample(unet: nn.Module, scheduler: Scheduler, *, batch_size: int | None = None, num_inference_steps: int = 50,
           generator: Generator = None, eta: float = 0.0, class_labels: Tensor | None = None,
           encoder_hidden_states: Tensor | None = None, use_clipped_model_output: bool | None = None,
           progress: bool = True, callback: Callback | None = None, noise: Tensor | None = None,
           guidance_scale: float = 1.0, null_class_label: int | None = None,
           uncond_encoder_hidden_states: Tensor | None = None, guides: Sequence[Guide] = (),
           guide_through_unet: bool = False, init_images: Tensor | None = None, strength: float = 1.0,
           mask: Tensor | None = None, conditioning_image: Tensor | None = None,
           low_resolution: Tensor | None = None) -> Tensor:
    """Generate ``batch_size`` samples in [-1, 1] (unclamped; images are ``(x / 2 + 0.5).clamp(0, 1)``) with a
    DDPM, DDIM or DPM-Solver scheduler; ``batch_size`` defaults to the batch of ``noise``, ``init_images`` or
    ``conditioning_image``, else 1; a conditioning image also sets the samples' height and width.

    ``unet(x, t, class_labels=..., encoder_hidden_states=..., conditioning_image=...) -> Tensor`` must expose
    ``unet.config.in_channels`` and ``unet.config.sample_size`` (int or (H, W)); samples take the device and
    dtype of its parameters. ``generator`` (one, or one per sample) draws x_T and then the step noise, in
    diffusers' order; ``noise`` gives x_T instead. ``eta`` and ``use_clipped_model_output`` are DDIM's;
    the latter defaults to on with classifier-free guidance, else off (diffusers' default).
    ``callback(i, t, x, out)`` observes each step: x is the sample at t, ``out.prev_sample`` the next one.

    Conditions: ``class_labels`` (B,), ``encoder_hidden_states`` (B, L, D) for cross-attention (e.g. a text
    encoder's output), ``conditioning_image`` (B, C', H, W) concatenated to x_t (e.g. an upsampled
    low-resolution image); any of them together. ``guidance_scale`` w != 1 applies classifier-free guidance
    against the null of every given condition: the null class (``null_class_label``, default the last class
    row), the null context (``uncond_encoder_hidden_states``, e.g. the empty prompt's; default zeros) and an
    all-zero conditioning image.
    ``guides`` (see minidiff.guidance) steer x_t with the gradient of a loss on the predicted x0; with
    ``guide_through_unet`` the gradient also flows through the model.

    ``init_images`` (B, C, H, W) in [-1, 1] edit images (see minidiff.sampling.editing): ``strength`` in
    [0, 1] picks the timestep to start from (img2img; 0 returns the images), ``mask`` (1 = generate,
    0 = keep) inpaints; the noise x_T (drawn or given) noises the images. ``low_resolution`` (B, C, H/f, W/f)
    makes the samples average down (f x f blocks) to it exactly: super-resolution consistency (DDNM).
    """
    param = check_call(unet, scheduler, callback)
    shape = _shape(unet, batch_size, init_images, noise, conditioning_image)
    check_batch(shape[0], class_labels=class_labels, encoder_hidden_states=encoder_hidden_states,
                conditioning_image=conditioning_image)
    x = _initial_noise(shape, generator, noise, param.device, param.dtype)
    denoise = denoiser(unet, class_labels=class_labels, encoder_hidden_states=encoder_hidden_states,
                       conditioning_image=conditioning_image, guidance_scale=guidance_scale,
                       null_class_label=null_class_label,
                       uncond_encoder_hidden_states=uncond_encoder_hidden_states)
    predict = guided_predictor(denoise, scheduler, guides, through_unet=guide_through_unet)
    options = _step_options(scheduler, eta, use_clipped_model_output, guidance_scale)
    timesteps = scheduler.checked_timesteps(num_inference_steps)
    edit = None
    if init_images is not None:
        edit = ImageEdit.check(init_images, x, strength, mask)
        timesteps = edit.timesteps(timesteps)
        if len(timesteps) == 0:
            return edit.images.clone()
        x = edit.start(scheduler, timesteps[0].to(x.device))
    elif strength != 1.0 or mask is not None:
        raise ValueError("strength and mask edit init_images; pass init_images too")
    consistency = None if low_resolution is None else LowResolution.check(low_resolution, x)
    # no_grad, not inference_mode: guides re-enable autograd inside predict.
    with torch.no_grad():
        for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress)):
            x, model_output = predict(x, t.to(x.device))
            out = scheduler.step(model_output, t, x, num_inference_steps=num_inference_steps,
                                 generator=generator, **options)
            if isinstance(out, MultistepOutput):  # the loop carries a multistep solver's history
                options["history"] = out.history
            next_t = timesteps[i + 1].to(x.device) if i + 1 < len(timesteps) else None
            if consistency is not None:
                out = dataclasses.replace(out, prev_sample=consistency.project(scheduler, out, next_t))
            if edit is not None and edit.mask is not None:
                out = dataclasses.replace(out, prev_sample=edit.keep_known(scheduler, out.prev_sample, next_t))
            if callback is not None:
                callback(i, t, x, out)
            x = out.prev_sample
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise FloatingPointError(f"sample: {bad} of {x.numel()} values of the result are NaN or inf (a guide or "
                                 f"guidance_scale={guidance_scale} too strong, or a model that outputs them)")
    return x

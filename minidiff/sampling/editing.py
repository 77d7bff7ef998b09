"""Editing images with a trained model: DDIM inversion, img2img (SDEdit) and inpainting.

- ``invert`` runs DDIM backwards (Song et al. 2021 sec. 4.3; diffusers' DDIMInverseScheduler), from images
  to the x_T from which ``sample(unet, ddim, noise=latents)`` reconstructs them.
- img2img (SDEdit, Meng et al. 2022): start sampling from the images noised to an intermediate timestep,
  the first of the last ``int(N * strength)`` of the N timesteps (diffusers' img2img rule: strength 1 starts
  at the first timestep, from almost pure noise; strength 0 returns the images).
- inpainting: after every step, the pixels where ``mask`` is 0 are replaced by the images noised to the
  next timestep with the starting noise, and by the images themselves after the last step (the replacement
  of RePaint, Lugmayr et al. 2022, without its resampling jumps; as diffusers' inpainting pipelines do).
- super-resolution consistency: after every step the low frequencies of the predicted x0 are made those of a
  low-resolution image (DDNM, Wang et al. 2023), so that the result averages down to it exactly.
``minidiff.sample`` does img2img and inpainting with ``init_images``, ``strength`` and ``mask``, and the
consistency with ``low_resolution``; every sampler, guide and classifier-free guidance works with them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checks import check_tensor
from ..schedulers import DDIMScheduler, Scheduler, SchedulerOutput
from .denoiser import check_batch, check_call, denoiser


RANGE_SLACK = 1.5  # how far past [-1, 1] an image may reach: unclamped samples overshoot slightly


def check_images(images: Tensor, channels: int, name: str = "init_images") -> Tensor:
    """``images`` as a float (B, C, H, W) tensor with the model's channel count, or a ValueError."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != channels or images.shape[0] == 0:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name} must be a (B, {channels}, H, W) tensor of images in [-1, 1] with B >= 1, got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be floating-point images in [-1, 1], got {images.dtype} "
                        "(uint8 pixels: images.float() / 127.5 - 1)")
    check_tensor(name, images)
    low, high = images.min().item(), images.max().item()
    if not (-RANGE_SLACK <= low and high <= RANGE_SLACK):  # NaN fails too
        raise ValueError(f"{name} must hold images in [-1, 1] (samples may overshoot a little), got values from "
                         f"{low:.3g} to {high:.3g}; images in [0, 1] become x * 2 - 1")
    return images


@dataclass(frozen=True)
class ImageEdit:
    """img2img and inpainting in the sampling loop: the images, the starting noise, the mask (broadcast
    to the images' shape, 1 = generate, 0 = keep) or None, and the strength."""
    images: Tensor
    noise: Tensor
    mask: Tensor | None
    strength: float

    @classmethod
    def check(cls, images: Tensor, noise: Tensor, strength: float, mask: Tensor | None) -> "ImageEdit":
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"strength={strength!r} must be a number in [0, 1] (1: start from the first "
                             "timestep, almost pure noise; 0: return init_images)")
        images = images.to(noise)
        if mask is not None:
            mask = _check_mask(mask, images)
        return cls(images, noise, mask, float(strength))

    def timesteps(self, timesteps: Tensor) -> Tensor:
        """The last min(int(N * strength), N) of the N timesteps (diffusers' img2img)."""
        n = len(timesteps)
        return timesteps[n - min(int(n * self.strength), n):]

    def start(self, scheduler: Scheduler, t: Tensor) -> Tensor:
        """x_t of q(x_t | x0 = images) with the starting noise."""
        return scheduler.add_noise(self.images, self.noise, t)

    def keep_known(self, scheduler: Scheduler, x: Tensor, next_t: Tensor | None) -> Tensor:
        """``x`` with the known pixels (mask 0) replaced by the images noised to ``next_t`` (the images
        themselves when None: after the last step)."""
        if self.mask is None:
            return x
        known = self.images if next_t is None else scheduler.add_noise(self.images, self.noise, next_t)
        return torch.lerp(known, x, self.mask)  # exactly ``known`` where the mask is 0, ``x`` where 1


@dataclass(frozen=True)
class LowResolution:
    """The low-resolution images ``y`` (B, C, H / factor, W / factor) the samples must average down to, with
    A = factor x factor block averaging and its pseudo-inverse A+ = nearest upsampling (A A+ = I). DDNM's
    null-space projection of the predicted x0, x0 <- x0 + A+(y - A x0), moved onto the step's result:
    x_prev <- x_prev + sqrt(alpha_bar_prev) A+(y - A x0) (exactly DDNM for DDIM with eta 0); after the last
    step A(x) = y."""
    images: Tensor
    factor: int

    @classmethod
    def check(cls, low: Tensor, x: Tensor) -> "LowResolution":
        low = check_images(low, x.shape[1], "low_resolution")
        height, width = x.shape[2:]
        factor = height // low.shape[2] if low.shape[2] else 0
        if low.shape[0] != x.shape[0] or factor < 1 or \
                (low.shape[2] * factor, low.shape[3] * factor) != (height, width):
            raise ValueError(f"low_resolution has shape {tuple(low.shape)}; expected ({x.shape[0]}, {x.shape[1]}, "
                             f"h, w) with the samples' {height}x{width} an integer multiple f of h x w")
        return cls(low.to(x), factor)

    def project(self, scheduler: Scheduler, out: SchedulerOutput, next_t: Tensor | None) -> Tensor:
        """The step's ``prev_sample`` made consistent with the low-resolution images (see the class)."""
        residual = self.images - F.avg_pool2d(out.pred_original_sample, self.factor)
        correction = F.interpolate(residual, scale_factor=self.factor, mode="nearest")
        scale = 1.0 if next_t is None else scheduler.alphas_cumprod[next_t.cpu()].sqrt().item()
        return out.prev_sample + scale * correction


def _check_mask(mask: Tensor, images: Tensor) -> Tensor:
    """The mask as a float tensor of the images' shape; it may be (H, W), (B or 1, 1 or C, H, W)."""
    batch, channels, height, width = images.shape
    if not torch.is_tensor(mask):
        raise ValueError(f"mask must be a tensor (1 = generate, 0 = keep), got {type(mask).__name__}")
    check_tensor("mask", mask)
    full = mask[None, None] if mask.ndim == 2 else mask
    if full.ndim != 4 or full.shape[0] not in (1, batch) or full.shape[1] not in (1, channels) \
            or full.shape[2:] != (height, width):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected (H, W) or (B or 1, 1 or C, H, W) with "
                         f"(H, W) = {(height, width)}, B = {batch}, C = {channels} (the init_images' shape)")
    full = full.to(images)
    if not bool(((full >= 0) & (full <= 1)).all()):
        raise ValueError("mask values must be in [0, 1] (1 = generate, 0 = keep), got values from "
                         f"{float(full.min())} to {float(full.max())}")
    return full.expand_as(images)


def invert(unet: nn.Module, scheduler: Scheduler, images: Tensor, num_inference_steps: int = 50, *,
           class_labels: Tensor | None = None, encoder_hidden_states: Tensor | None = None,
           conditioning_image: Tensor | None = None, guidance_scale: float = 1.0, null_class_label: int | None = None,
           uncond_encoder_hidden_states: Tensor | None = None, progress: bool = True,
           callback: Callable[[int, Tensor, Tensor, SchedulerOutput], None] | None = None) -> Tensor:
    """DDIM inversion: the deterministic x_T of ``images`` (B, C, H, W) in [-1, 1], at the noise level of the
    first timestep of ``timesteps(num_inference_steps)``, from which ``sample(unet, ddim, noise=latents,
    num_inference_steps=...)`` reconstructs them. Each step is ``DDIMScheduler.invert_step`` (equal to
    diffusers' DDIMInverseScheduler for the same config); a scheduler of another class is converted with
    ``DDIMScheduler.from_config``. Clipping x0 (clip_sample) makes the inverse steps lossy: a config with
    clip_sample=False reconstructs more faithfully (benchmarks/samplers.py measures both). Conditioning and
    classifier-free guidance as in ``minidiff.sample``; ``callback(i, t, x, out)`` observes each step."""
    param = check_call(unet, scheduler, callback)
    ddim = scheduler if isinstance(scheduler, DDIMScheduler) else DDIMScheduler.from_config(scheduler.config)
    x = check_images(images, unet.config.in_channels, "images").to(device=param.device, dtype=param.dtype)
    check_batch(len(x), class_labels=class_labels, encoder_hidden_states=encoder_hidden_states,
                conditioning_image=conditioning_image)
    denoise = denoiser(unet, class_labels=class_labels, encoder_hidden_states=encoder_hidden_states,
                       conditioning_image=conditioning_image, guidance_scale=guidance_scale,
                       null_class_label=null_class_label,
                       uncond_encoder_hidden_states=uncond_encoder_hidden_states)
    timesteps = ddim.inverse_timesteps(num_inference_steps)
    with torch.no_grad():
        for i, t in enumerate(tqdm(timesteps, desc="inverting", disable=not progress)):
            out = ddim.invert_step(denoise(x, t.to(x.device)), t, x, num_inference_steps=num_inference_steps)
            if callback is not None:
                callback(i, t, x, out)
            x = out.prev_sample
    return x

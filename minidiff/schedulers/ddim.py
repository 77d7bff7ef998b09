"""DDIM: denoising diffusion implicit models (Song et al. 2021), deterministic at eta = 0."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Generator, Scheduler, SchedulerConfig, SchedulerOutput


@dataclass(frozen=True)
class DDIMSchedulerConfig(SchedulerConfig):
    set_alpha_to_one: bool = True          # alpha_bar after the last step: 1, or alpha_bar_0 if False


class DDIMScheduler(Scheduler):
    """Denoising diffusion implicit models (Song et al. 2021): eta = 0 is deterministic, eta = 1 is DDPM-like."""
    config_class = DDIMSchedulerConfig

    def previous_timestep(self, t: int | Tensor, num_inference_steps: int) -> int:
        """t - T // N, whatever the spacing (diffusers' rule; with "linspace" it is not the next entry)."""
        return int(t) - self.num_train_timesteps // self._check_steps(num_inference_steps)

    def update(self, model_output: Tensor, t: int, prev_t: int, sample: Tensor, noise: Tensor | None = None,
               *, eta: float = 0.0, use_clipped_model_output: bool = False) -> SchedulerOutput:
        """Song et al. 2021 eq. 12: x_prev = sqrt(a_p) x0 + sqrt(1 - a_p - sigma^2) eps + sigma noise, with
        sigma = eta sqrt((1 - a_p) / (1 - a_t)) sqrt(1 - a_t / a_p) (eq. 16); a_p = 1 (or alpha_bar_0 when
        set_alpha_to_one is False) past the end. ``use_clipped_model_output`` recomputes eps from the
        clipped x0."""
        t, prev_t = int(t), int(prev_t)
        model_output, _ = self._split(model_output, sample)
        a_t = self._alphas_cumprod[t]
        a_p = self._alphas_cumprod[prev_t] if prev_t >= 0 else (
            torch.tensor(1.0) if self._config.set_alpha_to_one else self._alphas_cumprod[0])
        x0, eps = self._x0_eps(model_output, t, sample)
        x0 = self._clip(x0)
        if use_clipped_model_output:
            eps = (sample - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
        sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) ** 0.5
        prev = a_p ** 0.5 * x0 + (1 - a_p - sigma ** 2) ** 0.5 * eps
        if eta > 0:
            if noise is None:
                raise ValueError(f"DDIM update with eta={eta} > 0 needs noise")
            prev = prev + sigma * noise
        return SchedulerOutput(prev, x0)

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor, *, num_inference_steps: int,
             generator: Generator = None, noise: Tensor | None = None, eta: float = 0.0,
             use_clipped_model_output: bool = False) -> SchedulerOutput:
        """One step of an N-step schedule; noise is drawn only when eta > 0."""
        t = int(timestep)
        prev_t = self.previous_timestep(t, num_inference_steps)
        noise = self._noise(eta > 0, sample, generator, noise)
        return self.update(model_output, t, prev_t, sample, noise, eta=eta,
                           use_clipped_model_output=use_clipped_model_output)

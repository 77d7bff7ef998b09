"""DDIM: denoising diffusion implicit models (Song et al. 2021), deterministic at eta = 0."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_type
from .base import ClipSampleConfig, Generator, Scheduler, SchedulerOutput, x0_and_eps


def check_eta(eta: float) -> None:
    """eta must be a number in [0, 1]."""
    check_type("eta", eta, "float")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta} must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise)")


@dataclass(frozen=True)
class DDIMSchedulerConfig(ClipSampleConfig):
    set_alpha_to_one: bool = True          # alpha_bar after the last step: 1, or alpha_bar_0 if False


class DDIMScheduler(Scheduler):
    """Denoising diffusion implicit models (Song et al. 2021): eta = 0 is deterministic, eta = 1 is DDPM-like."""
    config_class = DDIMSchedulerConfig

    def previous_timestep(self, t: int | Tensor, num_inference_steps: int) -> int:
        """t - T // N, whatever the spacing (diffusers' rule; with "linspace" it is not the next entry)."""
        return self.timestep_index(t) - self.num_train_timesteps // self._check_steps(num_inference_steps)

    def _alpha_bar(self, t: int) -> Tensor:
        """alpha_bar_t; below 0 (past the end of sampling, before the start of inversion) 1, or alpha_bar_0
        when set_alpha_to_one is False."""
        if t >= 0:
            return self._alphas_cumprod[t]
        return torch.tensor(1.0) if self._config.set_alpha_to_one else self._alphas_cumprod[0]

    def update(self, model_output: Tensor, t: int, prev_t: int, sample: Tensor, noise: Tensor | None = None,
               *, eta: float = 0.0, use_clipped_model_output: bool = False) -> SchedulerOutput:
        """Song et al. 2021 eq. 12: x_prev = sqrt(a_p) x0 + sqrt(1 - a_p - sigma^2) eps + sigma noise, with
        sigma = eta sqrt((1 - a_p) / (1 - a_t)) sqrt(1 - a_t / a_p) (eq. 16); a_p = 1 (or alpha_bar_0 when
        set_alpha_to_one is False) past the end. ``use_clipped_model_output`` recomputes eps from the
        clipped x0."""
        t, prev_t = self.timestep_index(t), int(prev_t)
        check_eta(eta)
        model_output, _ = self._split(model_output, sample)
        a_t, a_p = self._alphas_cumprod[t], self._alpha_bar(prev_t)
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
        t = self.timestep_index(timestep)
        check_eta(eta)
        prev_t = self.previous_timestep(t, num_inference_steps)
        noise = self._noise(eta > 0, sample, generator, noise)
        return self.update(model_output, t, prev_t, sample, noise, eta=eta,
                           use_clipped_model_output=use_clipped_model_output)

    def inverse_timesteps(self, num_inference_steps: int) -> Tensor:
        """The ascending timesteps of DDIM inversion: ``timesteps(N)`` reversed, as diffusers'
        DDIMInverseScheduler sets them ("leading" or "trailing" spacing only: with "linspace" the steps
        t - T // N would not land on the timesteps)."""
        if self._config.timestep_spacing == "linspace":
            raise ValueError("DDIM inversion needs timestep_spacing 'leading' or 'trailing', got 'linspace' "
                             "(its timesteps are not T // N apart)")
        return self.checked_timesteps(num_inference_steps).flip(0)

    def invert_update(self, model_output: Tensor, t: int, prev_t: int, sample: Tensor) -> SchedulerOutput:
        """Song et al. 2021 eq. 12 at eta = 0 run backwards, from noise level prev_t up to t:
        x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with x0 and eps predicted from the sample at prev_t and the
        model output at timestep t (the approximation eps(x_prev, t) ~ eps(x_t, t) of diffusers'
        DDIMInverseScheduler); a_prev below 0 as in ``update``. x0 is clipped if clip_sample (diffusers'
        inverse scheduler does not threshold)."""
        t, prev_t = self.timestep_index(t), int(prev_t)
        model_output, _ = self._split(model_output, sample)
        a_t, a_p = self._alphas_cumprod[t], self._alpha_bar(prev_t)
        x0, eps = x0_and_eps(self._config.prediction_type, model_output, sample, a_p ** 0.5, (1 - a_p) ** 0.5)
        cfg = self._config
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return SchedulerOutput(a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * eps, x0)

    def invert_step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor, *,
                    num_inference_steps: int) -> SchedulerOutput:
        """One step of an N-step inversion: from noise level t - T // N to timestep t of
        ``inverse_timesteps(N)``."""
        t = self.timestep_index(timestep)
        return self.invert_update(model_output, t, self.previous_timestep(t, num_inference_steps), sample)

"""DDPM: ancestral sampling (Ho et al. 2020) over any descending subset of the training timesteps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import ClipSampleConfig, Generator, Scheduler, SchedulerOutput

# fixed_large_log is left out: diffusers takes sqrt(log(beta)) there, which is NaN.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


@dataclass(frozen=True)
class DDPMSchedulerConfig(ClipSampleConfig):
    variance_type: str = "fixed_small"     # posterior variance: beta_tilde, beta, or learned (see VARIANCE_TYPES)

    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        **ClipSampleConfig.choices,
        "beta_schedule": ClipSampleConfig.choices["beta_schedule"] + ("sigmoid", "laplace"),
        "variance_type": VARIANCE_TYPES,
    }


class DDPMScheduler(Scheduler):
    """Ancestral sampling of Ho et al. 2020 over any descending subset of timesteps."""
    config_class = DDPMSchedulerConfig

    def previous_timestep(self, t: int | Tensor, num_inference_steps: int) -> int:
        """The entry after ``t`` in ``timesteps(num_inference_steps)``, or -1 after the last one."""
        ts, t = self.timesteps(num_inference_steps).tolist(), self.timestep_index(t)
        if t not in ts:
            raise ValueError(f"timestep {t} is not one of timesteps({num_inference_steps}) = {ts}")
        i = ts.index(t)
        return ts[i + 1] if i + 1 < len(ts) else -1

    def update(self, model_output: Tensor, t: int, prev_t: int, sample: Tensor,
               noise: Tensor | None = None) -> SchedulerOutput:
        """Sample x_{prev_t} ~ q(x_{prev_t} | x_t, x0) (Ho et al. 2020 eq. 6/7, generalised to a jump
        t -> prev_t): with alpha' = a_t / a_p and beta' = 1 - alpha',
        mean = sqrt(a_p) beta' / (1 - a_t) x0 + sqrt(alpha') (1 - a_p) / (1 - a_t) x_t, plus std * noise
        at every t > 0 (diffusers' rule: only t = 0 returns the bare mean)."""
        t, prev_t = self.timestep_index(t), int(prev_t)
        model_output, predicted_variance = self._split(model_output, sample)
        a_t = self._alphas_cumprod[t]
        a_p = self._alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        alpha = a_t / a_p
        beta = 1 - alpha
        x0 = self._clip(self._x0_eps(model_output, t, sample)[0])
        mean = (a_p ** 0.5 * beta) / (1 - a_t) * x0 + alpha ** 0.5 * (1 - a_p) / (1 - a_t) * sample
        if t == 0:
            return SchedulerOutput(mean, x0)
        if noise is None:
            raise ValueError(f"DDPM update at t={t} > 0 needs noise")
        return SchedulerOutput(mean + self._std(beta, a_t, a_p, predicted_variance) * noise, x0)

    def _std(self, beta: Tensor, a_t: Tensor, a_p: Tensor, predicted_variance: Tensor | None) -> Tensor:
        """Posterior std: beta_tilde = (1 - a_p) / (1 - a_t) beta' (eq. 7, "fixed_small") or beta'
        ("fixed_large", sec. 3.2); "learned_range" interpolates their logs (Nichol & Dhariwal 2021 eq. 15)."""
        small = torch.clamp((1 - a_p) / (1 - a_t) * beta, min=1e-20)
        kind = self._config.variance_type
        if kind == "fixed_small":
            return small ** 0.5
        if kind == "fixed_small_log":  # the same value, computed as diffusers does for bitwise parity
            return torch.exp(0.5 * torch.log(small))
        if kind == "fixed_large":
            return beta ** 0.5
        if kind == "learned":
            return predicted_variance ** 0.5
        frac = (predicted_variance + 1) / 2
        return torch.exp(0.5 * (frac * torch.log(beta) + (1 - frac) * torch.log(small)))

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor, *, num_inference_steps: int,
             generator: Generator = None, noise: Tensor | None = None) -> SchedulerOutput:
        """One step of an N-step schedule; noise is drawn (randn of the sample's shape) only when t > 0."""
        t = self.timestep_index(timestep)
        prev_t = self.previous_timestep(t, num_inference_steps)
        noise = self._noise(t > 0, sample, generator, noise)
        return self.update(model_output, t, prev_t, sample, noise)

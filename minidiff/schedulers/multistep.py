"""What the multistep exponential-integrator solvers (DPM-Solver, UniPC) share: their config fields, the noise
levels alpha_t, sigma_t and the half log-SNR lambda_t = log(alpha_t / sigma_t) of every timestep
(x_t = alpha_t x0 + sigma_t eps), the level after the last step, and diffusers' timesteps for them.

Stateless like the other schedulers: what a multistep solver needs from earlier steps is returned in its
MultistepOutput (``carry``) and passed back by the sampling loop, never kept in the scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .base import History, Scheduler, SchedulerConfig


@dataclass(frozen=True)
class MultistepSchedulerConfig(SchedulerConfig):
    solver_order: int = 2                  # 2 for guided sampling, 3 for unconditional
    lower_order_final: bool = True         # lower the order of the last steps (each solver has its rule)
    final_sigmas_type: str = "zero"        # noise level after the last step: 0, or sigma_0 ("sigma_min")
    timestep_spacing: str = "linspace"     # diffusers' default for these schedulers

    choices: ClassVar[dict[str, tuple]] = {
        **SchedulerConfig.choices,
        "solver_order": (1, 2, 3),
        "final_sigmas_type": ("zero", "sigma_min"),
    }


def check_history(history: History, sample: Tensor) -> None:
    """``history`` must be (timestep, tensor) pairs, as a MultistepOutput holds them, of the sample's shape."""
    if not isinstance(history, (tuple, list)) or not all(
            isinstance(e, tuple) and len(e) == 2 and torch.is_tensor(e[1]) for e in history):
        raise TypeError("history must be the (timestep, tensor) pairs of the earlier steps, as the previous "
                        f"step's MultistepOutput.history holds them; got {type(history).__name__}")
    for t, output in history:
        if output.shape != sample.shape:
            raise ValueError(f"history: the output at timestep {t} has shape {tuple(output.shape)} but the sample has "
                             f"{tuple(sample.shape)}: pass the history of this run's previous step")


class MultistepScheduler(Scheduler):
    """Noise levels and timesteps of the multistep solvers; subclasses define ``step``."""
    config_class: ClassVar[type[SchedulerConfig]] = MultistepSchedulerConfig

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        if self._config.rescale_betas_zero_snr:  # alpha_bar_T = 0 would give sigma_T = inf: diffusers' 2^-24
            alphas_cumprod = self._alphas_cumprod.clone()
            alphas_cumprod[-1] = 2.0 ** -24
            self._alphas_cumprod = alphas_cumprod
        s = ((1 - self._alphas_cumprod) / self._alphas_cumprod) ** 0.5  # noise level of x_t / alpha_t, float32
        # alpha = 1 / sqrt(s^2 + 1), sigma = s alpha, lambda = log(alpha / sigma) of every timestep, then (index -1)
        # of the level after the last step: s = 0 (lambda = inf) or s_0 (final_sigmas_type)
        s = torch.cat([s, s[:1] if self._config.final_sigmas_type == "sigma_min" else torch.zeros(1)])
        alpha = 1 / (s ** 2 + 1) ** 0.5
        self._alpha, self._sigma = alpha, s * alpha
        self._levels = list(zip(alpha.tolist(), self._sigma.tolist(),
                                (torch.log(alpha) - torch.log(self._sigma)).tolist()))
        self._last = self.num_train_timesteps  # the timesteps run over 0 .. _last - 1

    def timesteps(self, num_inference_steps: int) -> Tensor:
        """diffusers' set_timesteps(N) for these solvers: with L = T (DPM-Solver: the timesteps whose lambda is
        at least lambda_min_clipped), linspace: round(linspace(0, L - 1, N + 1)) without the 0; leading:
        arange(N + 1) * (L // (N + 1)) without the 0, plus steps_offset; trailing: round(arange(L, 0, -T / N))
        - 1; descending. Raises ValueError if timesteps repeat."""
        n, cfg, last = self._check_steps(num_inference_steps), self._config, self._last
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif cfg.timestep_spacing == "leading":
            ts = (np.arange(n + 1) * (last // (n + 1))).round()[::-1][:-1] + cfg.steps_offset
        else:
            ts = np.arange(last, 0, -self.num_train_timesteps / n).round() - 1
        ts = ts.astype(np.int64)
        if len(np.unique(ts)) != len(ts):
            raise ValueError(f"num_inference_steps={n} gives repeated timesteps with timestep_spacing="
                             f"{cfg.timestep_spacing!r} ({ts.tolist()}); use fewer steps")
        return torch.from_numpy(ts.copy())

    def _position(self, t: int, num_inference_steps: int) -> tuple[int, list[int]]:
        ts = self.timesteps(num_inference_steps).tolist()
        if t not in ts:
            raise ValueError(f"timestep {t} is not one of timesteps({num_inference_steps}) = {ts}")
        return ts.index(t), ts

    def previous_timestep(self, t: int | Tensor, num_inference_steps: int) -> int:
        """The entry after ``t`` in ``timesteps(num_inference_steps)``, or -1 (the final noise level) after the last."""
        i, ts = self._position(self.timestep_index(t), num_inference_steps)
        return ts[i + 1] if i + 1 < len(ts) else -1

    def _alpha_sigma(self, t: int) -> tuple[Tensor, Tensor]:
        """alpha_t, sigma_t (float32) as diffusers computes them from s = sqrt((1 - alpha_bar_t) / alpha_bar_t);
        t = -1 is the level after the last step."""
        return self._alpha[t], self._sigma[t]

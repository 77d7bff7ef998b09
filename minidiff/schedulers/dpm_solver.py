"""DPM-Solver and DPM-Solver++ multistep (Lu et al. 2022a, 2022b): ODE/SDE solvers that need few model calls.

In the half log-SNR lambda = log(alpha / sigma) (x_t = alpha_t x0 + sigma_t eps) the probability-flow ODE has
the exact solution (2022a eq. 3.4 for the noise prediction eps; 2022b sec. 4 for the data prediction x0)

    x_t = sigma_t / sigma_s x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda         (dpmsolver++)
    x_t = alpha_t / alpha_s x_s - alpha_t int_{lambda_s}^{lambda_t} e^-lambda eps(lambda) dlambda      (dpmsolver)

and a Taylor expansion of x0 (or eps) around lambda_s, its derivatives estimated by divided differences of the
outputs at earlier steps (the multistep history), integrates exactly. With h = lambda_t - lambda_s, both read

    x_t = ratio x_s - scale (psi0(g) D0 + psi1(g) D1 + psi2(g) D2),
    psi0(g) = e^g - 1,  psi1(g) = psi0(g) / g - 1,  psi2(g) = (psi0(g) - g) / g^2 - 1/2,

with (ratio, scale, g) = (sigma_t / sigma_s, alpha_t, -h) for dpmsolver++ and (alpha_t / alpha_s, sigma_t, h)
for dpmsolver. D0 is the newest output, D1 ~ h d/dlambda and D2 ~ h^2 d2/dlambda2 its divided differences
over the earlier steps (the multistep methods of 2022b; its Alg. 2, DPM-Solver++(2M), is the order-2 "midpoint"
form, with psi0 / 2 in place of psi1).
The SDE variants (2022b sec. 5) integrate the reverse SDE the same way: sde-dpmsolver++ has
ratio = sigma_t / sigma_s e^-h and g = -2h, sde-dpmsolver scale = 2 sigma_t, plus fresh noise.

Stateless like the other schedulers: ``update`` takes the earlier outputs as an explicit ``history`` of
(timestep, output) pairs and returns the new one in a MultistepOutput; the sampling loop carries it.
``step`` picks the order as diffusers' DPMSolverMultistepScheduler does, so that the loop reproduces its
pipelines' images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Generator, History, MultistepOutput, x0_and_eps
from .ddpm import VARIANCE_TYPES
from .multistep import MultistepScheduler, MultistepSchedulerConfig, check_history

ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
# lower_order_final lowers the order of the last steps only for schedules shorter than this (diffusers' rule)
LOWER_ORDER_FINAL_BELOW = 15


@dataclass(frozen=True)
class DPMSolverMultistepSchedulerConfig(MultistepSchedulerConfig):
    algorithm_type: str = "dpmsolver++"    # data (++) or noise prediction; sde-* add noise at every step
    solver_type: str = "midpoint"          # the order-2 term: midpoint or heun
    euler_at_final: bool = False           # order 1 at the last step whatever the number of steps
    lambda_min_clipped: float = -math.inf  # leave out the timesteps whose lambda is below this
    variance_type: str | None = None       # "learned"/"learned_range": the model's extra variance channels are dropped

    choices: ClassVar[dict[str, tuple]] = {
        **MultistepSchedulerConfig.choices,
        "algorithm_type": ALGORITHM_TYPES,
        "solver_type": ("midpoint", "heun"),
        "variance_type": (None, *VARIANCE_TYPES),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.final_sigmas_type == "zero" and not self.algorithm_type.endswith("++"):
            raise ValueError(f"{name}.final_sigmas_type='zero' needs algorithm_type 'dpmsolver++' or "
                             f"'sde-dpmsolver++', got {self.algorithm_type!r}; use final_sigmas_type='sigma_min'")
        if math.isnan(self.lambda_min_clipped):
            raise ValueError(f"{name}.lambda_min_clipped=nan: expected a number (-inf: keep every timestep)")
        if self.algorithm_type.startswith("sde") and self.solver_order == 3:
            raise ValueError(f"{name}: algorithm_type={self.algorithm_type!r} supports solver_order 1 or 2 "
                             "(the papers' SDE solvers), got 3")


def _psi(g: float) -> tuple[float, float, float]:
    """psi0, psi1, psi2 of the module docstring: the integrals of e^(g u) u^k / k! over [0, 1], in closed form."""
    psi0 = math.exp(g) - 1.0
    return psi0, psi0 / g - 1.0, (psi0 - g) / g ** 2 - 0.5


def _weights(lambdas: list[float], h: float, psi: tuple[float, float, float], midpoint: bool) -> list[float]:
    """w with psi0 D0 + psi1 D1 + psi2 D2 = sum_k w_k m_k for the outputs m_k at lambdas[k] (newest first):
    D0 = m0; D1 = (m0 - m1) / r0 (order 2); order 3: D1 = d0 + r0 / (r0 + r1) (d0 - d1),
    D2 = (d0 - d1) / (r0 + r1) with d0 = (m0 - m1) / r0, d1 = (m1 - m2) / r1 (r_k = h_k / h)."""
    psi0, psi1, psi2 = psi
    if len(lambdas) == 1:
        return [psi0]
    r0 = (lambdas[0] - lambdas[1]) / h
    if len(lambdas) == 2:
        c1 = 0.5 * psi0 if midpoint else psi1
        return [psi0 + c1 / r0, -c1 / r0]
    r1 = (lambdas[1] - lambdas[2]) / h
    k = 1.0 / (r0 + r1)
    a, b = psi1 * (1.0 + r0 * k) + psi2 * k, -(psi1 * r0 + psi2) * k   # the weights of d0 and d1
    return [psi0 + a / r0, -a / r0 + b / r1, -b / r1]


class DPMSolverMultistepScheduler(MultistepScheduler):
    """DPM-Solver++ (default) and DPM-Solver, multistep, orders 1-3, with diffusers' config and images."""
    config_class = DPMSolverMultistepSchedulerConfig

    def __init__(self, **fields: object) -> None:
        super().__init__(**fields)
        # the timesteps whose lambda = log(alpha / sigma) is at least lambda_min_clipped: 0 .. last - 1
        alpha_bar = self._alphas_cumprod
        lambdas = torch.log(alpha_bar ** 0.5) - torch.log((1 - alpha_bar) ** 0.5)
        clipped = int(torch.searchsorted(lambdas.flip(0), self._config.lambda_min_clipped))
        self._last = self.num_train_timesteps - clipped
        if self._last < 1:
            raise ValueError(f"lambda_min_clipped={self._config.lambda_min_clipped} leaves out every timestep (the "
                             f"largest lambda is {float(lambdas[0]):.3g}); use a smaller value, -inf keeps them all")

    def _solver_input(self, model_output: Tensor, t: int, sample: Tensor) -> tuple[Tensor, Tensor]:
        """(what the solver integrates: x0 for the ++ types, eps otherwise; the predicted x0), thresholded
        if the config says so (then eps is recomputed from the thresholded x0)."""
        alpha, sigma = self._alpha_sigma(t)
        x0, eps = x0_and_eps(self._config.prediction_type, self._split(model_output, sample)[0], sample, alpha, sigma)
        if self._config.algorithm_type.endswith("++"):
            x0 = self._clip(x0)
            return x0, x0
        if self._config.thresholding:
            x0 = self._clip((sample - sigma * eps) / alpha)
            eps = (sample - alpha * x0) / sigma
        return eps, (sample - sigma * eps) / alpha

    def update(self, model_output: Tensor, t: int, prev_t: int, sample: Tensor, history: History = (),
               noise: Tensor | None = None, *, order: int | None = None) -> MultistepOutput:
        """One solver step from timestep t to prev_t (-1: the final level) of the given ``order`` (default:
        the highest that ``solver_order`` and the history allow), using the newest order - 1 entries of
        ``history`` (the (timestep, output) pairs of earlier steps, oldest first). ``noise`` is the fresh
        noise of the SDE types. Computed in float32 at least; returns x_{prev_t}, the predicted x0 and the
        history for the next step."""
        t, prev_t, cfg = self.timestep_index(t), int(prev_t), self._config
        check_history(history, sample)
        order = min(cfg.solver_order, len(history) + 1) if order is None else order
        if not 1 <= order <= min(cfg.solver_order, len(history) + 1):
            raise ValueError(f"order={order} needs 1 <= order <= solver_order={cfg.solver_order} and "
                             f"{order - 1} earlier outputs in history (got {len(history)})")
        if cfg.algorithm_type.startswith("sde") and noise is None:
            raise ValueError(f"algorithm_type={cfg.algorithm_type!r} needs noise")
        d0, x0 = self._solver_input(model_output, t, sample)
        entries = (*history[len(history) - order + 1:], (t, d0)) if order > 1 else ((t, d0),)
        prev = self._combine(entries, prev_t, sample.float(), noise)
        keep = (*history, (t, d0))[-(cfg.solver_order - 1):] if cfg.solver_order > 1 else ()
        return MultistepOutput(prev.to(model_output.dtype), x0, keep)

    def _combine(self, entries: History, prev_t: int, x: Tensor, noise: Tensor | None) -> Tensor:
        """x_{prev_t} = ratio x - scale sum_k w_k m_k (+ noise) from x at the newest entry's timestep and the
        entries' outputs m_k (module docstring), the coefficients in float64, one pass over x per output."""
        (t, _), cfg = entries[-1], self._config
        (alpha_s, sigma_s, lambda_s), (alpha_t, sigma_t, lambda_t) = self._levels[t], self._levels[prev_t]
        h, kind = lambda_t - lambda_s, cfg.algorithm_type
        if kind == "dpmsolver++":
            ratio, scale, g = sigma_t / sigma_s, alpha_t, -h
        elif kind == "dpmsolver":
            ratio, scale, g = alpha_t / alpha_s, sigma_t, h
        elif kind == "sde-dpmsolver++":
            ratio, scale, g = sigma_t / sigma_s * math.exp(-h), alpha_t, -2.0 * h
        else:
            ratio, scale, g = alpha_t / alpha_s, 2.0 * sigma_t, h
        psi = _psi(g)
        newest_first = entries[::-1]
        weights = _weights([self._levels[t_k][2] for t_k, _ in newest_first], h, psi, cfg.solver_type == "midpoint")
        prev = x * ratio
        for w, (_, m) in zip(weights, newest_first):
            prev.add_(m, alpha=-scale * w)
        if noise is not None:
            noise_std = sigma_t * (-psi[0] if kind == "sde-dpmsolver++" else math.exp(2.0 * h) - 1.0) ** 0.5
            prev.add_(noise.float(), alpha=noise_std)
        return prev

    def _order(self, index: int, num_steps: int, history_length: int) -> int:
        """diffusers' order at step ``index`` of ``num_steps``: as high as solver_order and the history allow,
        1 at the last step (euler_at_final, final_sigmas_type zero, or lower_order_final under 15 steps) and
        at most 2 at the one before (lower_order_final under 15 steps)."""
        cfg, short = self._config, num_steps < LOWER_ORDER_FINAL_BELOW
        order = min(cfg.solver_order, history_length + 1)
        if index == num_steps - 1 and (cfg.euler_at_final or cfg.final_sigmas_type == "zero"
                                       or (cfg.lower_order_final and short)):
            return 1
        if index == num_steps - 2 and cfg.lower_order_final and short:
            return min(order, 2)
        return order

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor, *, num_inference_steps: int,
             history: History = (), generator: Generator = None, noise: Tensor | None = None) -> MultistepOutput:
        """One step of an N-step schedule, in the order diffusers takes; an SDE type draws its noise
        (float32, the sample's shape) from ``generator`` at every step, after the model output."""
        t = self.timestep_index(timestep)
        index, ts = self._position(t, num_inference_steps)
        prev_t = ts[index + 1] if index + 1 < len(ts) else -1
        noise = self._noise(self._config.algorithm_type.startswith("sde"), sample, generator, noise, torch.float32)
        order = self._order(index, len(ts), len(history))
        return self.update(model_output, t, prev_t, sample, history, noise, order=order)

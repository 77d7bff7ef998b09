"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) and a corrector (UniC) that reuses the model call
the next step makes anyway, so that the corrector raises the order at no extra model call.

In the half log-SNR lambda = log(alpha / sigma), with m the data prediction x0 ("predict_x0", hh = -h) or the
noise prediction eps (hh = h), h = lambda_t - lambda_s0, r_k = (lambda_{s_k} - lambda_s0) / h and
D_k = (m_k - m0) / r_k for the outputs m_k of earlier steps (eq. 5 and Alg. 2-3 of the paper):

    x_t = ratio x_s0 - scale (e^hh - 1) m0 - scale B(h) sum_k a_k D_k,

(ratio, scale) = (sigma_t / sigma_s0, alpha_t) for x0 and (alpha_t / alpha_s0, sigma_t) for eps;
B(h) = hh ("bh1") or e^hh - 1 ("bh2"). The a_k solve R a = g with R_ik = r_k^(i-1) and
g_i = i! hh phi_{i+1}(hh) / B(h), phi_1(hh) = (e^hh - 1) / hh, phi_{i+1} = (phi_i - 1 / i!) / hh; UniP-2 takes
a = 1/2. UniC adds the new output m_t, taken at x_t, as one more difference D_t = m_t - m0 (r = 1), with
its own a (1/2 at order 1), and recomputes x_t. Since both start from the same x_s0, the corrected x_t is
x_t plus the difference of the two sums: the corrector needs only the history of outputs, and a guide's
or an inpainting mask's change to x_t survives it.

Stateless: ``step`` takes the (timestep, output) pairs of the last ``solver_order`` steps as ``history`` and
returns the new one in a MultistepOutput; the sampling loop carries it. The images equal diffusers'
UniPCMultistepScheduler driven as its pipelines drive it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from torch import Tensor

from .base import Generator, History, MultistepOutput, x0_and_eps
from .multistep import MultistepScheduler, MultistepSchedulerConfig, check_history

# solver types of DPM-Solver configs, which diffusers maps to "bh2" when it builds UniPC from them
DPM_SOLVER_TYPES = ("midpoint", "heun", "logrho")


@dataclass(frozen=True)
class UniPCMultistepSchedulerConfig(MultistepSchedulerConfig):
    predict_x0: bool = True                 # integrate the x0 prediction (else eps)
    solver_type: str = "bh2"                # B(h) = e^hh - 1 ("bh2", for most uses) or hh ("bh1": < 10 steps)
    disable_corrector: tuple[int, ...] = ()  # steps (0-based) whose result the next step leaves uncorrected

    choices: ClassVar[dict[str, tuple]] = {**MultistepSchedulerConfig.choices, "solver_type": ("bh1", "bh2")}

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.solver_type in DPM_SOLVER_TYPES:
            object.__setattr__(self, "solver_type", "bh2")
        steps = self.disable_corrector
        if isinstance(steps, (str, bytes)) or not isinstance(steps, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in steps):
            raise TypeError(f"{name}.disable_corrector={steps!r}: expected a list of step indices (ints >= 0)")
        object.__setattr__(self, "disable_corrector", tuple(steps))
        super().__post_init__()
        if self.final_sigmas_type == "zero" and not self.predict_x0:
            raise ValueError(f"{name}.final_sigmas_type='zero' needs predict_x0=True (the eps form divides by "
                             "sigma = 0 at the last step); use final_sigmas_type='sigma_min'")
        if self.final_sigmas_type == "zero" and not self.lower_order_final and self.solver_order > 1:
            raise ValueError(f"{name}.final_sigmas_type='zero' needs lower_order_final=True (the step to sigma = 0 "
                             "must be of order 1: it has h = inf); use final_sigmas_type='sigma_min'")


def _coefficients(hh: float, bh2: bool, order: int) -> tuple[float, float, list[float]]:
    """(e^hh - 1, B(h), g_1..g_order) of the module docstring."""
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1 if bh2 else hh
    phi, factorial, g = h_phi_1 / hh - 1.0, 1, []
    for i in range(1, order + 1):
        g.append(phi * factorial / b_h)
        factorial *= i + 1
        phi = phi / hh - 1.0 / factorial
    return h_phi_1, b_h, g


def _solve(rks: list[float], g: list[float]) -> list[float]:
    """a with sum_k r_k^(i-1) a_k = g_i, i = 1..len(rks)."""
    matrix = np.array([[r ** i for r in rks] for i in range(len(rks))], dtype=np.float64)
    return np.linalg.solve(matrix, np.array(g[:len(rks)], dtype=np.float64)).tolist()


class UniPCMultistepScheduler(MultistepScheduler):
    """UniPC (bh1/bh2), multistep, orders 1-3, on x0 or eps, with diffusers' config and images."""
    config_class = UniPCMultistepSchedulerConfig

    def _solver_input(self, model_output: Tensor, t: int, sample: Tensor) -> tuple[Tensor, Tensor]:
        """(what the solver integrates: x0, thresholded as the config says, or eps; the predicted x0)."""
        alpha, sigma = self._alpha_sigma(t)
        x0, eps = x0_and_eps(self._config.prediction_type, self._split(model_output, sample)[0], sample, alpha, sigma)
        x0 = self._clip(x0)
        return (x0 if self._config.predict_x0 else eps), x0

    def _order(self, index: int, num_steps: int, earlier: int) -> int:
        """diffusers' order at step ``index`` after ``earlier`` steps of this run: solver_order, at most
        earlier + 1, and with lower_order_final at most the number of steps left."""
        cfg = self._config
        left = num_steps - index if cfg.lower_order_final else cfg.solver_order
        return min(cfg.solver_order, left, earlier + 1)

    def _terms(self, t: int, u: int, earlier: History) -> tuple[float, float, float, list[float]]:
        """For a step from t to u with the outputs ``earlier`` (newest first) before t: (ratio, scale,
        e^hh - 1, B(h), r_k)."""
        (alpha_t, sigma_t, lambda_t), (alpha_u, sigma_u, lambda_u) = self._levels[t], self._levels[u]
        h = lambda_u - lambda_t
        rks = [(self._levels[s][2] - lambda_t) / h for s, _ in earlier]
        if self._config.predict_x0:
            return sigma_u / sigma_t, alpha_u, -h, rks
        return alpha_u / alpha_t, sigma_u, h, rks

    def _correction(self, m_t: Tensor, t: int, history: History, order: int) -> Tensor:
        """UniC-``order`` at t minus UniP-``order`` from the newest history entry s0 to t: what the corrector
        adds to x_t (module docstring)."""
        (s0, m0), earlier = history[-1], history[-order:-1][::-1]
        _, scale, hh, rks = self._terms(s0, t, earlier)
        _, b_h, g = _coefficients(hh, self._config.solver_type == "bh2", order)
        corrector = [0.5] if order == 1 else _solve(rks + [1.0], g)
        predictor = [] if order == 1 else [0.5] if order == 2 else _solve(rks, g)
        out = (m_t.float() - m0) * (-scale * b_h * corrector[-1])
        for (_, m_k), r_k, a_c, a_p in zip(earlier, rks, corrector, predictor):
            out.add_(m_k - m0, alpha=-scale * b_h * (a_c - a_p) / r_k)
        return out

    def _predict(self, x: Tensor, m_t: Tensor, t: int, u: int, earlier: History, order: int) -> Tensor:
        """UniP-``order`` from x at t to u, with m_t and the outputs ``earlier`` (newest first)."""
        ratio, scale, hh, rks = self._terms(t, u, earlier)
        h_phi_1, b_h, g = _coefficients(hh, self._config.solver_type == "bh2", order)
        prev = x * ratio
        prev.add_(m_t, alpha=-scale * h_phi_1)
        if order > 1:  # order 1 has no B(h) term (bh1's B(h) is infinite at a last step to sigma = 0)
            rhos = [0.5] if order == 2 else _solve(rks, g)
            for (_, m_k), r_k, a in zip(earlier, rks, rhos):
                prev.add_(m_k - m_t, alpha=-scale * b_h * a / r_k)
        return prev

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor, *, num_inference_steps: int,
             history: History = (), generator: Generator = None) -> MultistepOutput:
        """One step of an N-step schedule as diffusers takes it: the corrector on ``sample`` (after a first
        step, unless disable_corrector names the previous step), then the predictor. ``history`` holds the
        (timestep, solver input) pairs of the earlier steps of this run, oldest first, as the previous step
        returned them (empty at the first step, which may be a later timestep, as in img2img).
        Deterministic: ``generator`` is accepted for the sampling loop and not used. Computed in float32 at
        least; returns the next sample, the predicted x0 and the history for the next step."""
        t, cfg = self.timestep_index(timestep), self._config
        index, ts = self._position(t, num_inference_steps)
        check_history(history, sample)
        history = tuple(history) if index else ()  # a new run: nothing earlier counts
        if history and history[-1][0] != ts[index - 1]:
            raise ValueError(f"step {index} (timestep {t}) of {num_inference_steps} needs the history the step at "
                             f"timestep {ts[index - 1]} returned, got one that ends at timestep {history[-1][0]}")
        m_t, x0 = self._solver_input(model_output, t, sample)
        x, taken = sample.float(), len(history)
        if taken and index - 1 not in cfg.disable_corrector:
            x = x + self._correction(m_t, t, history, self._order(index - 1, len(ts), taken - 1))
        order = self._order(index, len(ts), taken)
        earlier = history[len(history) - order + 1:][::-1] if order > 1 else ()
        prev = self._predict(x, m_t.float(), t, ts[index + 1] if index + 1 < len(ts) else -1, earlier, order)
        return MultistepOutput(prev.to(model_output.dtype), x0, (*history, (t, m_t))[-cfg.solver_order:])

"""Loss guidance: steer sampling with the gradient of a differentiable loss on the predicted x0.

At each step the sampler asks ``guided_predictor(denoise, scheduler, guides)`` for (x, model_output):
the guides' gradient moves x_t before the scheduler step,

    x_t <- x_t - sum_i  factor_i(t) * clip_i( grad_{x_t}  scale_i * sum_b loss_i(x0_hat(x_t))_b ),

where x0_hat is the scheduler's (clipped) prediction of x0 (Ho et al. 2020 eq. 15). This is the score
shift of classifier guidance (Dhariwal & Nichol 2021, Alg. 1/2) with a loss in place of -log p(y | x_t),
so it works alike for every sampler (DDPM, DDIM, DPM-Solver: one predict per step, then one step)
and composes with classifier-free guidance already inside ``denoise``.
The per-sample losses are summed over the batch so a sample's step does not depend on the batch size.

A guide is any object with ``scale``, ``schedule``, ``clip_grad_norm`` and ``loss(x0) -> (B,)``;
``LossGuide`` wraps a function, ``ColorGuidance`` is the course's colour loss, ``minidiff.sampling.clip`` has CLIP.
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Callable, Iterable, Protocol, Sequence

import torch
from torch import Tensor

from ..schedulers import Scheduler

Denoiser = Callable[[Tensor, Tensor], Tensor]
Predictor = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
# Gradient scaling over time, as a function of alpha_bar_t (the notebook compares these four).
SCHEDULES: dict[str, Callable[[float], float]] = {
    "none": lambda alpha_bar: 1.0,
    "alpha_bar": lambda alpha_bar: alpha_bar,
    "sqrt_alpha_bar": math.sqrt,
    "sqrt_one_minus_alpha_bar": lambda alpha_bar: math.sqrt(1.0 - alpha_bar),
}
_HEX = re.compile(r"#?([0-9a-fA-F]{6})")


class Guide(Protocol):
    """What ``guided_predictor`` needs from a guide."""
    scale: float                    # weight of the loss; 0 switches the guide off exactly
    schedule: str                   # a key of SCHEDULES
    clip_grad_norm: float | None    # max per-sample L2 norm of the guide's step, or None

    def loss(self, x0: Tensor) -> Tensor:
        """One loss per sample, shape (B,), of the predicted x0 (images in [-1, 1])."""


def schedule_factor(schedule: str, scheduler: Scheduler, t: int | Tensor) -> float:
    """The gradient factor of ``schedule`` at TIMESTEP ``t`` (alpha_bar_t, not the loop counter's)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not supported; allowed: {list(SCHEDULES)}")
    return SCHEDULES[schedule](float(scheduler.alphas_cumprod[int(t)]))


class LossGuide:
    """Guide sampling with ``fn(x0) -> (B,)``, any differentiable per-sample loss of the predicted x0.

    ``scale`` weighs the loss; ``schedule`` scales the gradient over time (see SCHEDULES);
    ``clip_grad_norm`` caps the per-sample L2 norm of the step this guide makes to x_t.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], scale: float = 1.0, schedule: str = "none",
                 clip_grad_norm: float | None = None):
        if not callable(fn):
            raise TypeError(f"fn must be a callable x0 -> per-sample losses (B,), got {type(fn).__name__}")
        name = type(self).__name__
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < math.inf:
            raise ValueError(f"{name}: scale={scale!r} must be a finite number >= 0")
        if schedule not in SCHEDULES:
            raise ValueError(f"{name}: schedule={schedule!r} is not supported; allowed: {list(SCHEDULES)}")
        if clip_grad_norm is not None and (isinstance(clip_grad_norm, bool) or not isinstance(
                clip_grad_norm, (int, float)) or not 0 < clip_grad_norm < math.inf):
            raise ValueError(f"{name}: clip_grad_norm={clip_grad_norm!r} must be None or a finite number > 0")
        self.fn, self.scale, self.schedule, self.clip_grad_norm = fn, float(scale), schedule, clip_grad_norm

    def loss(self, x0: Tensor) -> Tensor:
        return self.fn(x0)

    def _describe(self) -> str:
        return f"fn={getattr(self.fn, '__qualname__', self.fn)}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self._describe()}, scale={self.scale}, schedule={self.schedule!r}, "
                f"clip_grad_norm={self.clip_grad_norm})")


def parse_color(color: str | Sequence[float]) -> tuple[float, float, float]:
    """An RGB triple in [0, 1] from a hex string ("#55FFAA" or "55FFAA") or a triple of numbers in [0, 1]."""
    if isinstance(color, str):
        match = _HEX.fullmatch(color.strip())
        if match is None:
            raise ValueError(f"color {color!r} is not a hex colour; expected '#RRGGBB' or 'RRGGBB'")
        digits = match[1]
        return tuple(int(digits[i:i + 2], 16) / 255 for i in (0, 2, 4))
    values = tuple(color) if isinstance(color, Iterable) else ()
    if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"color {color!r} must be 3 numbers (R, G, B) in [0, 1] or a hex string")
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"color {color!r} has components outside [0, 1]; RGB values must be in [0, 1]")
    return tuple(float(v) for v in values)


def color_loss(x0: Tensor, target: Sequence[float]) -> Tensor:
    """The course's colour loss per sample: mean |x0 - (2 target - 1)| over channels and pixels, (B,)."""
    if x0.ndim != 4 or x0.shape[1] != 3:
        raise ValueError(f"colour guidance needs RGB images (B, 3, H, W), got shape {tuple(x0.shape)}")
    goal = torch.tensor(target, device=x0.device, dtype=x0.dtype).view(1, 3, 1, 1) * 2 - 1
    return (x0 - goal).abs().mean(dim=(1, 2, 3))


class ColorGuidance(LossGuide):
    """Pull the images towards an RGB colour: the course's colour loss, with the notebook's scale 40.

    The loss is a per-sample mean, so the strength per pixel grows as images get smaller: on the 32x32
    shapes-32 model (cosine schedule, 40 DDIM steps) scale 40 gives nearly flat colour (distance to the
    target 3% of the unguided), 5 tints the shapes (36%); ``schedule="alpha_bar"`` softens early steps.
    """

    def __init__(self, target: str | Sequence[float], scale: float = 40.0, schedule: str = "none",
                 clip_grad_norm: float | None = None):
        self.target = parse_color(target)
        super().__init__(partial(color_loss, target=self.target), scale, schedule, clip_grad_norm)

    def _describe(self) -> str:
        return f"target={self.target}"


def _clip_per_sample(step: Tensor, max_norm: float) -> Tensor:
    norms = step.flatten(1).norm(dim=1).view(-1, *(1,) * (step.ndim - 1))
    return step * (max_norm / norms.clamp(min=1e-12)).clamp(max=1.0)


def _total_loss(guides: Sequence[Guide], x0: Tensor, scheduler: Scheduler, t: Tensor) -> Tensor:
    """sum_i factor_i(t) * scale_i * sum_b loss_i(x0)_b; each guide must return one loss per sample."""
    total = x0.new_zeros(())
    for guide in guides:
        loss = guide.loss(x0)
        if not torch.is_tensor(loss) or loss.shape != (x0.shape[0],):
            shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
            raise ValueError(f"{guide!r}.loss(x0) returned {shape}; it must return one loss per sample, "
                             f"shape ({x0.shape[0]},)")
        if not loss.is_floating_point() or (x0.requires_grad and not loss.requires_grad):
            raise ValueError(f"{guide!r}.loss(x0) returned a {loss.dtype} tensor "
                             f"{'' if loss.is_floating_point() else 'of integers '}that does not depend on x0 "
                             "differentiably (detached, rounded or computed outside autograd): it cannot guide")
        total = total + schedule_factor(guide.schedule, scheduler, t) * guide.scale * loss.sum()
    return total


def _guide_step(guides: Sequence[Guide], x: Tensor, x0: Tensor, scheduler: Scheduler,
                t: Tensor) -> Tensor:
    """The amount to subtract from x. Guides without clipping share one backward pass (their steps add
    linearly); a clipped guide needs its own gradient to clip."""
    unclipped = [g for g in guides if g.clip_grad_norm is None]
    passes = [(unclipped, None)] if unclipped else []
    passes += [([g], g.clip_grad_norm) for g in guides if g.clip_grad_norm is not None]
    step = torch.zeros_like(x)
    for i, (group, max_norm) in enumerate(passes):
        loss = _total_loss(group, x0, scheduler, t)
        if not loss.requires_grad:  # x0 does not depend on x (x0-prediction in cheap mode): no step
            continue
        (grad,) = torch.autograd.grad(loss, x, retain_graph=i + 1 < len(passes))
        step += grad if max_norm is None else _clip_per_sample(grad, max_norm)
    return step


def guided_predictor(denoise: Denoiser, scheduler: Scheduler, guides: Sequence[Guide], *,
                     through_unet: bool = False) -> Predictor:
    """Wrap ``denoise(x, t) -> model_output`` into ``predict(x, t) -> (guided x, model_output)``.

    Cheap mode: the model runs without autograd and the gradient reaches x_t only through x0_hat's
    explicit dependence on x_t. ``through_unet=True`` also backpropagates through the model (stronger,
    about twice the memory). Either way ``model_output`` is the model's output at the unguided x_t, and
    guides with scale 0 are skipped, so they give exactly the unguided sample.
    """
    if not isinstance(guides, (list, tuple)):
        raise TypeError(f"guides must be a list of guides, got {type(guides).__name__}; pass guides=[guide]")
    for guide in guides:
        missing = [name for name in ("scale", "schedule", "clip_grad_norm", "loss") if not hasattr(guide, name)]
        if missing:
            raise TypeError(f"{guide!r} is not a guide: it lacks {missing}; wrap a loss function x0 -> (B,) "
                            "in minidiff.guidance.LossGuide(fn, scale)")
    active = [g for g in guides if g.scale != 0]

    def predict(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if not active:
            return x, denoise(x, t)
        if not through_unet:
            with torch.no_grad():
                model_output = denoise(x, t)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_()
            if through_unet:
                model_output = denoise(x_in, t)
            x0 = scheduler.predict_x0(model_output, t, x_in)
            step = _guide_step(active, x_in, x0, scheduler, t)
        return x.detach() - step, model_output.detach()
    return predict

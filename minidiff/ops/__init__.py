"""Fused ops for the UNet and the schedulers, each with a pure-torch reference, behind one dispatcher.

Backends (``set_backend`` / ``with backend(name):``; the environment variable ``MINIDIFF_OPS`` sets the
starting one, e.g. ``MINIDIFF_OPS=reference``):
  "auto"       Triton kernels on CUDA tensors, the C++ kernels (ops/cpu.py) on CPU tensors, else the reference
  "reference"  the pure-torch references (ops/reference.py)
  "triton"     the Triton kernels (CUDA tensors, or any tensor under TRITON_INTERPRET=1)
  "cpu"        the C++ kernels (CPU tensors)
  "compile"    torch.compile of the reference math
Autograd: whenever autograd records (grad enabled and an input requires grad) the updates run the
differentiable reference, and so does ``group_norm_act``, except float32 on the CPU path ("auto" or "cpu"),
which has a C++ backward (cpu.GroupNormAct). A kernel also defers to the reference
for what it does not implement (gelu/mish, float16 on CPU, a compiler missing). ``attention`` is
F.scaled_dot_product_attention on every backend but "reference", except float32 CPU heads of 8 or 16
channels on the CPU path, which take the C++ kernels (cpu.Attention, with their own backward).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import warnings
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from . import cpu, reference

BACKENDS = ("auto", "reference", "triton", "cpu", "compile")
__all__ = ["BACKENDS", "attention", "backend", "ddim_update", "ddpm_update", "get_backend", "group_norm_act",
           "set_backend"]


def _validated(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; allowed: {list(BACKENDS)}")
    if name == "triton" and not _HAS_TRITON:
        raise ValueError("ops backend 'triton' needs the triton package, which is not installed")
    return name


_HAS_TRITON = importlib.util.find_spec("triton") is not None
_backend = _validated(os.environ.get("MINIDIFF_OPS", "auto"))
_compiled: dict[Callable, Callable] = {}


def set_backend(name: str) -> None:
    """Select the backend of every op: one of ``BACKENDS``."""
    global _backend
    _backend = _validated(name)


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside the ``with`` block, then restore the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _path(x: torch.Tensor, *inputs: torch.Tensor | None) -> str:
    """The backend that runs an op on ``x``: "auto" resolved, "reference" while autograd records."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *inputs)):
        return "reference"
    if _backend == "auto":
        if x.is_cuda and _HAS_TRITON:
            return "triton"
        return "cpu" if x.device.type == "cpu" else "reference"
    if _backend == "triton" and not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"ops backend 'triton' runs on CUDA tensors (or under TRITON_INTERPRET=1), got {x.device}")
    if _backend == "cpu" and x.device.type != "cpu":
        raise ValueError(f"ops backend 'cpu' runs on CPU tensors, got {x.device}")
    return _backend


def _triton():
    from . import triton_kernels  # imports triton: only when a Triton kernel runs

    return triton_kernels


def _compile(fn: Callable) -> Callable:
    """torch.compile'd ``fn`` (cached; shapes turn dynamic after the first recompile, so a UNet's many
    shapes stay under dynamo's recompile limit); ``fn`` itself, after a one-time warning, if compiling fails."""
    if fn not in _compiled:
        compiled = torch.compile(fn)

        def run(*args, **kwargs):
            try:
                return compiled(*args, **kwargs)
            except Exception as err:  # inductor raises many types (no compiler, unsupported op, ...)
                warnings.warn(f"minidiff.ops: torch.compile failed ({type(err).__name__}: {err}); "
                              "using the reference ops", RuntimeWarning, stacklevel=3)
                _compiled[fn] = fn
                return fn(*args, **kwargs)

        _compiled[fn] = run
    return _compiled[fn]


def group_norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                   eps: float = 1e-5, *, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                   add: torch.Tensor | None = None, act: str = "silu") -> torch.Tensor:
    """act(GroupNorm(x + add) * (1 + scale) + shift) for x (B, C, H, W) or (B, C, L), fp32/bf16/fp16
    (statistics in fp32); ``add``/``scale``/``shift`` are (B, C) or (B, C, 1, 1); act in silu, gelu, relu,
    mish, none. ``add`` is ResnetBlock2D's "default" timestep mode, scale/shift its "scale_shift" mode."""
    reference.check_group_norm_args(x, weight, bias, num_groups, act)
    add, scale, shift = (reference.channel_vector(t, x, n) for t, n in ((add, "add"), (scale, "scale"),
                                                                        (shift, "shift")))
    path = _path(x, weight, bias, add, scale, shift)
    args = (x, weight, bias, num_groups, eps, scale, shift, add, act)
    if (path == "reference" and _backend in ("auto", "cpu")
            and cpu.supports_group_norm_backward(x, act, weight, bias, add, scale, shift)):
        return cpu.GroupNormAct.apply(x, weight, bias, add, scale, shift, num_groups, eps, act)
    if path == "triton" and act in cpu.KERNEL_ACTIVATIONS and x.numel() > 0:
        return _triton().group_norm_act(*args)
    if path == "cpu" and cpu.supports_group_norm(x, act):
        return cpu.group_norm_act(*args)
    fn = _compile(reference.group_norm_act) if path == "compile" else reference.group_norm_act
    return fn(x, weight, bias, num_groups, eps, scale=scale, shift=shift, add=add, act=act)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax(Q K^T / sqrt(d)) V: q (B, Lq, C), k and v (B, Lk, C) -> (B, Lq, C), d = C / heads."""
    if _backend == "reference":
        return reference.attention(q, k, v, heads)
    reference.check_attention_args(q, k, v, heads)
    if _backend in ("auto", "cpu") and cpu.supports_attention(q, k, v, heads):
        return cpu.Attention.apply(q, k, v, heads)
    batch, length, channels = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, heads, L, d)
        return t.reshape(batch, -1, heads, channels // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # (B, heads, Lq, d)
    return out.transpose(1, 2).reshape(batch, length, channels)


def _x0_eps_coefficients(alpha_bar_t: float, prediction_type: str) -> tuple[float, float, float, float]:
    """(cx, cm, ex, em) with x0 = cx x + cm m and eps = ex x + em m (reference.predict_x0_eps is linear)."""
    a, b = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
    if prediction_type == "epsilon":
        return 1 / a, -b / a, 0.0, 1.0
    if prediction_type == "sample":
        return 0.0, 1.0, 1 / b, -a / b
    return a, -b, b, a


def _linear_update(x: torch.Tensor, m: torch.Tensor, noise: torch.Tensor | None,
                   c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' update in torch (for "compile"); ``c`` holds cpu.UPDATE_COEFFICIENTS as a tensor, so
    that new timesteps do not recompile."""
    xf, mf = x.float(), m.float()
    x0 = (c[0] * xf + c[1] * mf).clamp(-c[2], c[2])
    prev = c[3] * x0 + c[4] * xf + c[5] * mf
    if noise is not None:
        prev = prev + c[6] * noise.float()
    return prev.to(x.dtype), x0.to(x.dtype)


def _update(x: torch.Tensor, m: torch.Tensor, noise: torch.Tensor | None, coefficients: dict[str, float],
            ref: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    path = _path(x, m, noise)
    if path == "triton":
        return _triton().scheduler_update(x, m, noise, coefficients)
    if path == "cpu" and cpu.supports_update(x):
        return cpu.scheduler_update(x, m, noise, coefficients)
    if path == "compile":
        c = torch.tensor([coefficients[k] for k in cpu.UPDATE_COEFFICIENTS], device=x.device)
        return _compile(_linear_update)(x, m, noise, c)
    return ref()


def ddpm_update(x: torch.Tensor, model_output: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float,
                sigma: float = 0.0, noise: torch.Tensor | None = None, prediction_type: str = "epsilon",
                clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM step in one pass: (prev_sample, x0); see reference.ddpm_update for the math. ``sigma`` is
    the std of the added ``noise`` (0 at the last step); ``clip`` clamps x0 to [-clip, clip]."""
    alpha_bar_t, alpha_bar_prev, sigma = float(alpha_bar_t), float(alpha_bar_prev), float(sigma)
    reference.check_update_args(x, model_output, noise, sigma, prediction_type, clip)
    cx, cm, _, _ = _x0_eps_coefficients(alpha_bar_t, prediction_type)
    alpha = alpha_bar_t / alpha_bar_prev
    coefficients = dict(cx=cx, cm=cm, clip=math.inf if clip is None else clip,
                        p0=math.sqrt(alpha_bar_prev) * (1 - alpha) / (1 - alpha_bar_t),
                        px=math.sqrt(alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar_t), pm=0.0, sigma=sigma)
    return _update(x, model_output, noise if sigma > 0 else None, coefficients, lambda: reference.ddpm_update(
        x, model_output, alpha_bar_t, alpha_bar_prev, sigma, noise, prediction_type, clip))


def ddim_update(x: torch.Tensor, model_output: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float,
                sigma: float = 0.0, noise: torch.Tensor | None = None, prediction_type: str = "epsilon",
                clip: float | None = None, use_clipped_model_output: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step in one pass: (prev_sample, x0); see reference.ddim_update for the math. ``sigma`` is
    eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) (0 for deterministic DDIM)."""
    alpha_bar_t, alpha_bar_prev, sigma = float(alpha_bar_t), float(alpha_bar_prev), float(sigma)
    reference.check_update_args(x, model_output, noise, sigma, prediction_type, clip)
    cx, cm, ex, em = _x0_eps_coefficients(alpha_bar_t, prediction_type)
    direction = math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0))
    p0, px, pm = math.sqrt(alpha_bar_prev), direction * ex, direction * em
    if use_clipped_model_output:  # eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t), folded into p0 and px
        b = math.sqrt(1 - alpha_bar_t)
        p0, px, pm = p0 - direction * math.sqrt(alpha_bar_t) / b, direction / b, 0.0
    coefficients = dict(cx=cx, cm=cm, clip=math.inf if clip is None else clip, p0=p0, px=px, pm=pm, sigma=sigma)
    return _update(x, model_output, noise if sigma > 0 else None, coefficients, lambda: reference.ddim_update(
        x, model_output, alpha_bar_t, alpha_bar_prev, sigma, noise, prediction_type, clip,
        use_clipped_model_output))

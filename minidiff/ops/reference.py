"""Pure-torch references of the fused ops: the ground truth that every fast path is tested against.

They compute in float32 or wider (statistics, softmax, scheduler math) and return the input dtype, and
they are differentiable, so the dispatcher also uses them whenever autograd is recording.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "mish": F.mish, "none": lambda h: h}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 if it is float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D NHWC tensor that is not also contiguous (as (B, C, 1, 1) ones are), else
    contiguous_format: the layout the kernels read ``x`` in and write their outputs in."""
    nhwc = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if nhwc else torch.contiguous_format


def channel_vector(t: torch.Tensor | None, x: torch.Tensor, name: str) -> torch.Tensor | None:
    """``t`` of shape (B, C) or (B, C, 1, ...) as (B, C); ``None`` stays ``None``."""
    if t is None:
        return None
    batch, channels = x.shape[:2]
    if t.dim() < 2 or tuple(t.shape[:2]) != (batch, channels) or any(s != 1 for s in t.shape[2:]):
        raise ValueError(f"{name} must have shape ({batch}, {channels}) or ({batch}, {channels}, 1, ...) "
                         f"for x of shape {tuple(x.shape)}, got {tuple(t.shape)}")
    return t.reshape(batch, channels)


def check_group_norm_args(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          num_groups: int, act: str) -> None:
    """Raise a ValueError naming the first argument of ``group_norm_act`` that is not allowed."""
    if x.dim() < 3:
        raise ValueError(f"x must be (B, C, H, W) or (B, C, L), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"num_groups={num_groups} must be positive and divide the {channels} channels of x")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(p.shape)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not supported; allowed: {sorted(ACTIVATIONS)}")


def group_norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                   eps: float = 1e-5, *, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                   add: torch.Tensor | None = None, act: str = "silu") -> torch.Tensor:
    """act(GroupNorm(x + add) * (1 + scale) + shift) (Wu & He 2018; scale/shift: FiLM, Perez et al. 2018).

    ``add``, ``scale`` and ``shift`` are per-(sample, channel) tensors of shape (B, C) or (B, C, 1, 1).
    """
    check_group_norm_args(x, weight, bias, num_groups, act)
    h = _wide(x)
    if add is not None:
        h = h + _expand(channel_vector(add, x, "add"), h)
    h = F.group_norm(h, num_groups, None if weight is None else weight.to(h.dtype),
                     None if bias is None else bias.to(h.dtype), eps)
    if scale is not None:
        h = h * (1 + _expand(channel_vector(scale, x, "scale"), h))
    if shift is not None:
        h = h + _expand(channel_vector(shift, x, "shift"), h)
    return ACTIVATIONS[act](h).to(x.dtype)


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C, 1, ...) broadcastable against ``like``, in its dtype."""
    return t.to(like.dtype).reshape(*t.shape, *([1] * (like.dim() - 2)))


def check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> None:
    """Raise a ValueError unless q is (B, Lq, C), k and v are (B, Lk, C) and heads divides C."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"attention needs q (B, Lq, C) and k, v (B, Lk, C); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if heads < 1 or q.shape[2] % heads:
        raise ValueError(f"heads={heads} must be positive and divide the {q.shape[2]} channels")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1), d = C / heads:
    (B, Lq, C), (B, Lk, C), (B, Lk, C) -> (B, Lq, C), explicit matmuls in float32."""
    check_attention_args(q, k, v, heads)
    batch, length, channels = q.shape
    d = channels // heads

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, heads, L, d)
        return _wide(t).reshape(batch, -1, heads, d).transpose(1, 2)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, h, Lq, Lk)
    return (weights @ split(v)).transpose(1, 2).reshape(batch, length, channels).to(q.dtype)


def check_update_args(x: torch.Tensor, model_output: torch.Tensor, noise: torch.Tensor | None, sigma: float,
                      prediction_type: str, clip: float | None) -> None:
    """Raise a ValueError for mismatched shapes, a missing noise, or an unknown prediction type."""
    if model_output.shape != x.shape or (noise is not None and noise.shape != x.shape):
        raise ValueError(f"model_output and noise must have the shape of x {tuple(x.shape)}, got "
                         f"{tuple(model_output.shape)} and {None if noise is None else tuple(noise.shape)}")
    if sigma < 0 or (sigma > 0 and noise is None):
        raise ValueError(f"sigma={sigma} must be >= 0, and noise is required when sigma > 0")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; allowed: {list(PREDICTION_TYPES)}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip={clip} must be None or > 0")


def predict_x0_eps(x: torch.Tensor, m: torch.Tensor, alpha_bar_t: float,
                   prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from the model output m at x_t = sqrt(a) x0 + sqrt(1 - a) eps (Ho et al. 2020, eq. 4);
    v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022, section 4)."""
    a, b = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
    if prediction_type == "epsilon":
        return (x - b * m) / a, m
    if prediction_type == "sample":
        return m, (x - a * m) / b
    return a * x - b * m, a * m + b * x


def ddpm_update(x: torch.Tensor, model_output: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float,
                sigma: float = 0.0, noise: torch.Tensor | None = None, prediction_type: str = "epsilon",
                clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM step x_t -> x_{t'} (Ho et al. 2020, eq. 7): returns (prev_sample, x0) with
    x0 = clamp(predicted x0, -clip, clip) and prev = c0 x0 + c1 x_t + sigma * noise, where
    c0 = sqrt(a_prev) beta' / (1 - a_t), c1 = sqrt(alpha') (1 - a_prev) / (1 - a_t), alpha' = a_t / a_prev,
    beta' = 1 - alpha'. ``sigma`` is the step's noise std (the scheduler's variance choice)."""
    check_update_args(x, model_output, noise, sigma, prediction_type, clip)
    xf = _wide(x)
    x0, _ = predict_x0_eps(xf, model_output.to(xf.dtype), alpha_bar_t, prediction_type)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    alpha = alpha_bar_t / alpha_bar_prev
    c0 = math.sqrt(alpha_bar_prev) * (1 - alpha) / (1 - alpha_bar_t)
    c1 = math.sqrt(alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    prev = c0 * x0 + c1 * xf
    if sigma > 0:
        prev = prev + sigma * noise.to(xf.dtype)
    return prev.to(x.dtype), x0.to(x.dtype)


def ddim_update(x: torch.Tensor, model_output: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float,
                sigma: float = 0.0, noise: torch.Tensor | None = None, prediction_type: str = "epsilon",
                clip: float | None = None, use_clipped_model_output: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (Song et al. 2021, eq. 12): returns (prev_sample, x0) with
    prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * noise, where
    sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev) (eq. 16) is given by the caller.
    eps comes from the unclipped prediction unless ``use_clipped_model_output`` (then from the clipped x0)."""
    check_update_args(x, model_output, noise, sigma, prediction_type, clip)
    xf = _wide(x)
    x0, eps = predict_x0_eps(xf, model_output.to(xf.dtype), alpha_bar_t, prediction_type)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    if use_clipped_model_output:
        eps = (xf - math.sqrt(alpha_bar_t) * x0) / math.sqrt(1 - alpha_bar_t)
    direction = math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0))
    prev = math.sqrt(alpha_bar_prev) * x0 + direction * eps
    if sigma > 0:
        prev = prev + sigma * noise.to(xf.dtype)
    return prev.to(x.dtype), x0.to(x.dtype)

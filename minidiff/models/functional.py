"""The two composite ops of the UNet's layers in pure PyTorch, and how a layer finds them.

``group_norm_act`` and ``attention`` are what every minidiff model runs by default, on every device; they are
also the ground truth that the optional kernels of ``minidiff.kernels`` are tested against. A layer reaches
them through its ``ops`` attribute (``UsesOps``): ``minidiff.optimize`` gives the layers of one model another
``Ops``, so the choice belongs to that model, never to the process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "mish": F.mish, "none": lambda h: h}
# diffusers' act_fn names (config.json) -> ACTIVATIONS' names
ACT_FN_NAMES = {"silu": "silu", "swish": "silu", "mish": "mish", "gelu": "gelu", "relu": "relu"}


def activation(act_fn: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function for a diffusers ``act_fn`` name."""
    return ACTIVATIONS[ACT_FN_NAMES[act_fn]]


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
    (B, Lq, C), (B, Lk, C), (B, Lk, C) -> (B, Lq, C), by torch's fused scaled_dot_product_attention."""
    check_attention_args(q, k, v, heads)
    batch, length, channels = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, heads, L, d)
        return t.reshape(batch, -1, heads, channels // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # (B, heads, Lq, d)
    return out.transpose(1, 2).reshape(batch, length, channels)


@dataclass(frozen=True)
class Ops:
    """The implementations a model's layers call for their two composite ops."""
    group_norm_act: Callable[..., torch.Tensor]
    attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


REFERENCE_OPS = Ops(group_norm_act, attention)


class UsesOps:
    """Mixin of the layers that call ``ops``: the class default is pure PyTorch; an instance attribute set by
    ``minidiff.optimize`` (and removed by ``restore``) selects other kernels for that layer only."""
    ops: Ops = REFERENCE_OPS

    def norm_act(self, norm: nn.GroupNorm, x: torch.Tensor, act: str, **kwargs) -> torch.Tensor:
        """act(norm(x)) with the norm's own parameters; ``kwargs``: add, scale, shift (see group_norm_act)."""
        return self.ops.group_norm_act(x, norm.weight, norm.bias, norm.num_groups, norm.eps, act=act, **kwargs)

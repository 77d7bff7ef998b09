"""The fused ops ``minidiff.optimize`` gives a model's layers, as ``Ops`` sets that choose a kernel per call.

``KERNELS`` names the sets:
  "auto"       the C++ kernels (cpu.py) for CPU tensors; elsewhere the pure-torch ops, since only the CPU
               kernels are proven faster by measurement (benchmarks/ops.py)
  "cpu"        the C++ kernels (CPU tensors only)
  "triton"     the Triton GroupNorm kernel (CUDA tensors, or any tensor under TRITON_INTERPRET=1)
  "reference"  the pure-torch ops every model runs by default (``minidiff.models.functional``)
A kernel defers to the reference for what it does not cover (gelu/mish, float16 on CPU, heads of other widths,
a compiler missing). While autograd records, GroupNorm runs the C++ kernel's own backward for float32 CPU
tensors and the differentiable reference otherwise; the C++ attention kernel has its own backward.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..models import functional as reference
from ..models.functional import Ops
from . import cpu

KERNELS = ("auto", "cpu", "triton", "reference")


def _records_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _cpu_group_norm_act(x, weight, bias, num_groups, eps=1e-5, *, scale=None, shift=None, add=None, act="silu"):
    """reference.group_norm_act by the C++ kernels where they cover the call (forward, and the backward for
    float32), else by the reference."""
    reference.check_group_norm_args(x, weight, bias, num_groups, act)
    add, scale, shift = (reference.channel_vector(t, x, n) for t, n in ((add, "add"), (scale, "scale"),
                                                                        (shift, "shift")))
    if _records_grad(x, weight, bias, add, scale, shift):
        if cpu.supports_group_norm_backward(x, act, weight, bias, add, scale, shift):
            return cpu.GroupNormAct.apply(x, weight, bias, add, scale, shift, num_groups, eps, act)
    elif cpu.supports_group_norm(x, act):
        return cpu.group_norm_act(x, weight, bias, num_groups, eps, scale, shift, add, act)
    return reference.group_norm_act(x, weight, bias, num_groups, eps, scale=scale, shift=shift, add=add, act=act)


def _cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """reference.attention by the C++ kernels for float32 heads of cpu.ATTENTION_HEAD_DIMS channels."""
    reference.check_attention_args(q, k, v, heads)
    if cpu.supports_attention(q, k, v, heads):
        return cpu.Attention.apply(q, k, v, heads)
    return reference.attention(q, k, v, heads)


def _triton_group_norm_act(x, weight, bias, num_groups, eps=1e-5, *, scale=None, shift=None, add=None, act="silu"):
    """reference.group_norm_act by the Triton kernel for calls that record no gradient."""
    reference.check_group_norm_args(x, weight, bias, num_groups, act)
    on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if (on_device and act in cpu.KERNEL_ACTIVATIONS and x.numel() > 0
            and not _records_grad(x, weight, bias, add, scale, shift)):
        from . import triton_kernels  # imports triton: only when its kernel runs

        add, scale, shift = (reference.channel_vector(t, x, n) for t, n in ((add, "add"), (scale, "scale"),
                                                                            (shift, "shift")))
        return triton_kernels.group_norm_act(x, weight, bias, num_groups, eps, scale, shift, add, act)
    return reference.group_norm_act(x, weight, bias, num_groups, eps, scale=scale, shift=shift, add=add, act=act)


@dataclass(frozen=True)
class _ByDevice:
    """``on_cpu`` for CPU tensors (the first argument's device), else ``elsewhere``: an object rather than a
    closure, so that an optimized model pickles (``torch.save(unet)``)."""
    on_cpu: Callable[..., torch.Tensor]
    elsewhere: Callable[..., torch.Tensor]

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return (self.on_cpu if x.device.type == "cpu" else self.elsewhere)(x, *args, **kwargs)


CPU_OPS = Ops(_cpu_group_norm_act, _cpu_attention)
TRITON_OPS = Ops(_triton_group_norm_act, reference.attention)
AUTO_OPS = Ops(_ByDevice(_cpu_group_norm_act, reference.group_norm_act),
               _ByDevice(_cpu_attention, reference.attention))
OPS = {"auto": AUTO_OPS, "cpu": CPU_OPS, "triton": TRITON_OPS, "reference": reference.REFERENCE_OPS}


def ops_for(kernels: str) -> Ops:
    """The ``Ops`` named ``kernels`` (one of KERNELS)."""
    if kernels not in OPS:
        raise ValueError(f"kernels={kernels!r} is not known; allowed: {list(KERNELS)}")
    if kernels == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError("kernels='triton' needs the triton package, which is not installed")
    return OPS[kernels]

"""Triton kernel for CUDA: fused GroupNorm(+add, scale/shift)+activation.

Forward only (the fused ops run the differentiable reference when autograd records). They also run on
CPU tensors under TRITON_INTERPRET=1 (set before triton is imported), which is how the tests check them.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..models.functional import memory_format
from .cpu import KERNEL_ACTIVATIONS

_MAX_BLOCK = 2048


@triton.jit
def _group_values(x_ptr, add_ptr, n, g, idx, size, hw, C, cpg, stride_n, stride_c, stride_hw, HAS_ADD: tl.constexpr):
    """Values ``idx`` (flat over channel, position) of group g of sample n, plus ``add``, in float32 (0 outside),
    with their channels, offsets and mask."""
    mask = idx < size
    c = g * cpg + idx // hw
    offset = n * stride_n + c * stride_c + (idx % hw) * stride_hw
    v = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        v += tl.load(add_ptr + n * C + c, mask=mask, other=0.0)
    return v, c, offset, mask


@triton.jit
def _group_norm_act_kernel(x_ptr, y_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, C, hw, cpg,
                           stride_n, stride_c, stride_hw, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                           ACT: tl.constexpr, BLOCK: tl.constexpr):
    # one program per (sample, group): mean, then variance about it, then the output (two-pass statistics)
    n = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    size = cpg * hw
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, size, BLOCK):
        v, c, offset, mask = _group_values(x_ptr, add_ptr, n, g, start + lanes, size, hw, C, cpg,
                                           stride_n, stride_c, stride_hw, HAS_ADD)
        acc += v
    mean = tl.sum(acc, axis=0) / size
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, size, BLOCK):
        v, c, offset, mask = _group_values(x_ptr, add_ptr, n, g, start + lanes, size, hw, C, cpg,
                                           stride_n, stride_c, stride_hw, HAS_ADD)
        d = tl.where(mask, v - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / size + eps)
    for start in range(0, size, BLOCK):
        v, c, offset, mask = _group_values(x_ptr, add_ptr, n, g, start + lanes, size, hw, C, cpg,
                                           stride_n, stride_c, stride_hw, HAS_ADD)
        h = (v - mean) * rstd
        if HAS_W:
            h = h * tl.load(w_ptr + c, mask=mask, other=1.0)
        if HAS_B:
            h = h + tl.load(b_ptr + c, mask=mask, other=0.0)
        if HAS_SCALE:
            h = h * (1.0 + tl.load(scale_ptr + n * C + c, mask=mask, other=0.0))
        if HAS_SHIFT:
            h = h + tl.load(shift_ptr + n * C + c, mask=mask, other=0.0)
        if ACT == 1:
            h = h * tl.sigmoid(h)
        if ACT == 2:
            h = tl.maximum(h, 0.0)
        tl.store(y_ptr + offset, h.to(y_ptr.dtype.element_ty), mask=mask)


def group_norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                   eps: float, scale: torch.Tensor | None, shift: torch.Tensor | None, add: torch.Tensor | None,
                   act: str) -> torch.Tensor:
    """The fused kernel on validated arguments (``add``/``scale``/``shift`` already (B, C)); contiguous and
    channels_last inputs are read in place, other layouts are made contiguous first."""
    nhwc = memory_format(x) == torch.channels_last
    x = x if nhwc else x.contiguous()
    y = torch.empty_like(x)
    batch, channels, hw = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    cpg = channels // num_groups
    stride_c, stride_hw = (1, channels) if nhwc else (hw, 1)
    params = [None if t is None else t.detach().float().contiguous() for t in (weight, bias, add, scale, shift)]
    # absent parameters are never read (their HAS_ flag is off): x stands in for the pointer
    pointers = [x if t is None else t for t in params]
    block = min(_MAX_BLOCK, triton.next_power_of_2(cpg * hw))
    _group_norm_act_kernel[(batch, num_groups)](
        x, y, *pointers, channels, hw, cpg, channels * hw, stride_c, stride_hw, eps,
        *(t is not None for t in params), ACT=KERNEL_ACTIVATIONS[act],
        BLOCK=block, num_warps=max(1, min(8, block // 256)))
    return y

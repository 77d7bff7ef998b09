"""The fast CPU path of ``minidiff.optimize``: a small C++/OpenMP library (cpu.cpp), compiled with the system
compiler when ``optimize`` first needs it and cached per source, compiler and CPU (``-march=native``).

- GroupNorm(+add, scale/shift)+activation: each (sample, group) task computes its statistics, then writes
  act(x k + off) while the group is still in cache, 8 lanes at a time with an inline exp (libm's expf does not
  vectorise): one read and one write of x where the reference makes several passes and temporaries. The
  backward (GroupNormAct) recomputes the statistics from x and saves only x.
- Attention with heads of 8 or 16 channels, where torch's CPU attention is slow: one task per (batch, head)
  keeps the head's keys and values in L1 and scores several keys against several queries at a time; the
  backward recomputes the probabilities from the saved row log-sum-exps.
Covered: float32 and bfloat16 (GroupNorm backward and attention: float32), contiguous or channels_last,
activations silu/relu/none. The library links the libgomp torch has loaded, so torch.set_num_threads applies;
ctypes releases the GIL. No compiler: a one-time warning, and the pure-torch ops run instead.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch

from ..files import atomic_path, cache_dir
from ..models.functional import memory_format

_SOURCE = Path(__file__).with_name("cpu.cpp")
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-march=native", "-fno-math-errno", "-fno-trapping-math"]
KERNEL_ACTIVATIONS = {"none": 0, "silu": 1, "relu": 2}
# narrow heads, where torch's CPU attention is slow (at d = 32 SDPA is faster: benchmarks/ops.py)
ATTENTION_HEAD_DIMS = (8, 16)
_DTYPES = (torch.float32, torch.bfloat16)
_lock = threading.Lock()
_library: ctypes.CDLL | None | bool = None  # None: not built yet; False: building failed


def _cpu_signature() -> str:
    """The CPU's feature flags: -march=native builds must not be shared across different CPUs."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def build(code: str | None = None, name: str = "ops_cpu") -> Path:
    """Compile C++ ``code`` (with OpenMP if the compiler has it) into the cache as a shared library named
    after ``name``, once per code and CPU; the path of the library. ``code`` defaults to cpu.cpp's kernels;
    winograd.py builds its own with it."""
    code = _SOURCE.read_text() if code is None else code
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise FileNotFoundError("no C++ compiler found (set CXX)")
    key = hashlib.sha256("\n".join([code, compiler, *_FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    target = cache_dir("kernels") / f"{name}_{key}.so"
    if target.exists():
        return target
    print(f"minidiff: compiling the C++ kernels {name} (once per CPU; cached in {target.parent})", file=sys.stderr)
    source = target.with_suffix(".cpp")
    with atomic_path(source) as tmp:
        tmp.write_text(code)
    errors = []
    for extra in (["-fopenmp"], []):  # without OpenMP the kernels still work, on one thread
        try:
            with atomic_path(target) as tmp:  # a failed compile must not leave a library in the cache
                result = subprocess.run([compiler, *_FLAGS, *extra, str(source), "-o", str(tmp)],
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    raise subprocess.CalledProcessError(result.returncode, compiler, stderr=result.stderr)
            return target
        except subprocess.CalledProcessError as err:
            errors.append(err.stderr.strip()[-500:])
    raise OSError(f"{compiler} failed: {errors[-1]}")


def load() -> ctypes.CDLL | None:
    """The built library, or None (after a one-time warning) when it cannot be built."""
    global _library
    with _lock:
        if _library is None:
            try:
                _library = _declare(ctypes.CDLL(str(build())))
            except (OSError, subprocess.SubprocessError) as err:
                warnings.warn(f"minidiff.kernels: the fast CPU kernels are unavailable ({err}); "
                              "using the reference ops", RuntimeWarning, stacklevel=3)
                _library = False
        return _library or None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.md_group_norm_act.argtypes = [i32, i32, i32, ptr, ptr] + [ptr] * 5 + [i64] * 4 + [f32]
    lib.md_group_norm_act_backward.argtypes = [i32, i32] + [ptr] * 13 + [i64] * 4 + [f32]
    lib.md_attention.argtypes = [i64] + [ptr] * 5 + [i64] * 7 + [f32]
    lib.md_attention_backward.argtypes = [i64] + [ptr] * 9 + [i64] * 7 + [f32]
    for fn in (lib.md_group_norm_act, lib.md_group_norm_act_backward, lib.md_attention,
               lib.md_attention_backward):
        fn.restype = None
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def supports_group_norm(x: torch.Tensor, act: str) -> bool:
    return (x.device.type == "cpu" and x.dtype in _DTYPES and act in KERNEL_ACTIVATIONS and x.numel() > 0
            and load() is not None)


def group_norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                   eps: float, scale: torch.Tensor | None, shift: torch.Tensor | None, add: torch.Tensor | None,
                   act: str) -> torch.Tensor:
    """The fused kernel on validated arguments; ``add``/``scale``/``shift`` already (B, C)."""
    nhwc = _is_nhwc(x)
    x = x if nhwc else x.contiguous()
    y = torch.empty_like(x)
    # float32 contiguous copies (none for float32 parameters), held here while the kernel reads them
    params = [None if t is None else t.detach().float().contiguous() for t in (weight, bias, add, scale, shift)]
    load().md_group_norm_act(int(x.dtype == torch.bfloat16), KERNEL_ACTIVATIONS[act], int(nhwc), _ptr(x), _ptr(y),
                              *map(_ptr, params), x.shape[0], x.shape[1], math.prod(x.shape[2:]), num_groups, eps)
    return y


def _is_nhwc(x: torch.Tensor) -> bool:
    return memory_format(x) == torch.channels_last


def supports_group_norm_backward(x: torch.Tensor, act: str, *others: torch.Tensor | None) -> bool:
    """The differentiable kernel: float32 CPU tensors throughout."""
    return (supports_group_norm(x, act) and x.dtype == torch.float32
            and all(t is None or t.dtype == torch.float32 for t in others))


class GroupNormAct(torch.autograd.Function):
    """group_norm_act with the C++ backward (cpu.cpp: md_group_norm_act_backward, which recomputes the
    statistics from x): float32 only, for training. Inputs as for group_norm_act."""

    @staticmethod
    def forward(ctx, x, weight, bias, add, scale, shift, num_groups: int, eps: float, act: str):
        ctx.save_for_backward(x, weight, bias, add, scale, shift)
        ctx.num_groups, ctx.eps, ctx.act = num_groups, eps, act
        return group_norm_act(x, weight, bias, num_groups, eps, scale, shift, add, act)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, add, scale, shift = ctx.saved_tensors
        nhwc = _is_nhwc(x)
        x = x if nhwc else x.contiguous()
        dy = dy.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        (batch, channels), needs = x.shape[:2], ctx.needs_input_grad
        dx = torch.empty_like(x)
        dw, db = x.new_empty(batch, channels), x.new_empty(batch, channels)  # per sample, summed below
        grads = {name: x.new_empty(batch, channels) if t is not None and needs[i] else None
                 for i, (name, t) in enumerate((("add", add), ("scale", scale), ("shift", shift)), start=3)}
        params = [None if t is None else t.detach().contiguous() for t in (weight, bias, add, scale, shift)]
        load().md_group_norm_act_backward(
            KERNEL_ACTIVATIONS[ctx.act], int(nhwc), _ptr(x), _ptr(dy), _ptr(dx), *map(_ptr, params), _ptr(dw),
            _ptr(db), *(_ptr(g) for g in grads.values()), batch, channels, math.prod(x.shape[2:]),
            ctx.num_groups, ctx.eps)
        return (dx if needs[0] else None, dw.sum(0) if weight is not None and needs[1] else None,
                db.sum(0) if bias is not None and needs[2] else None, *grads.values(), None, None, None)


def supports_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """The attention kernels: float32 CPU tensors, heads of ATTENTION_HEAD_DIMS channels."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32
            and q.shape[2] // heads in ATTENTION_HEAD_DIMS and q.numel() > 0 and k.shape[1] > 0
            and load() is not None)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (B, L, C) as the kernels read it: unit channel stride and a batch stride of L rows (a slice of a
    q|k|v projection is one), else a contiguous copy."""
    return t if t.stride(2) == 1 and t.stride(0) == t.shape[1] * t.stride(1) else t.contiguous()


def _attention_call(fn, q: torch.Tensor, k: torch.Tensor, heads: int, *tensors: torch.Tensor | None) -> None:
    """md_attention(_backward)(d, *tensors, B, heads, Lq, Lk, ldq, ldk, ldv, scale) for q (B, Lq, C), k (B, Lk, .)."""
    (batch, lq, channels), lk = q.shape, k.shape[1]
    d = channels // heads
    fn(d, *map(_ptr, tensors), batch, heads, lq, lk, *(t.stride(1) for t in tensors[:3]), d ** -0.5)


class Attention(torch.autograd.Function):
    """softmax(Q K^T / sqrt(d)) V per head on validated (B, L, C) inputs (cpu.cpp: md_attention; the
    backward recomputes the probabilities from the saved row log-sum-exps)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        q, k, v = map(_rows, (q, k, v))
        o = q.new_empty(q.shape)
        lse = q.new_empty(q.shape[0], heads, q.shape[1]) if any(ctx.needs_input_grad) else None
        _attention_call(load().md_attention, q, k, heads, q, k, v, o, lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.heads = heads
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: torch.Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = (t.new_empty(t.shape) for t in (q, k, v))
        _attention_call(load().md_attention_backward, q, k, ctx.heads, q, k, v, o, dout.contiguous(), lse, dq,
                        dk, dv)
        return dq, dk, dv, None

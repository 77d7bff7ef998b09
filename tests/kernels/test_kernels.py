"""minidiff.kernels: each fused kernel equals its pure-torch reference (minidiff.models.functional), the
references equal torch's modules and the explicit math, and the ``Ops`` sets choose a kernel per call and fall
back as documented. The Triton kernel runs under TRITON_INTERPRET=1 in a subprocess (the variable must be set
before triton is imported)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minidiff.kernels import cpu, fused
from minidiff.models import functional as reference

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_cpu_kernels = pytest.mark.skipif(cpu.load() is None, reason="no C++ compiler for the CPU kernels")
VARIANTS = ["plain", "add", "scale_shift", "all"]
LAYOUTS = ["contiguous", "channels_last", "sequence", "transposed"]
ALL_OPS = ["auto", "cpu", "triton", "reference"]


def _gn_inputs(variant: str, layout: str = "contiguous", dtype=torch.float32, shape=(2, 12, 5, 7)):
    g = torch.Generator().manual_seed(0)
    if layout == "sequence":
        shape = shape[:2] + (shape[2] * shape[3],)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if layout == "transposed":  # neither layout: copied to contiguous first
        x = x.transpose(2, 3)
    b, c = shape[:2]
    w, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    vec = [torch.randn(b, c, generator=g) for _ in range(3)]
    kwargs = {"plain": {}, "add": dict(add=vec[0][:, :, None, None]), "scale_shift": dict(scale=vec[1], shift=vec[2]),
              "all": dict(add=vec[0], scale=vec[1], shift=vec[2])}[variant]
    return x, w, bias, kwargs


def _kernels(calls: list, name: str) -> int:
    return sum(kernel == name for kernel, _ in calls)


# ---- GroupNorm + activation: the C++ kernel against the reference ----

@needs_cpu_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ["silu", "relu", "none"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_group_norm_act_equals_reference(variant, act, layout, kernel_calls):
    x, w, b, kwargs = _gn_inputs(variant, layout)
    out = fused.CPU_OPS.group_norm_act(x, w, b, 4, 1e-5, act=act, **kwargs)
    assert _kernels(kernel_calls, "group_norm_act") == 1
    torch.testing.assert_close(out, reference.group_norm_act(x, w, b, 4, 1e-5, act=act, **kwargs),
                               atol=1e-5, rtol=1e-5)
    layout_kept = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout_kept)


@needs_cpu_kernels
def test_cpu_group_norm_act_extremes(kernel_calls):
    x, w, b, _ = _gn_inputs("plain")
    # SiLU saturates: |v| up to ~300, where exp(-v) overflows float32
    out = fused.CPU_OPS.group_norm_act(x, 100 * w, b, 4)
    torch.testing.assert_close(out, reference.group_norm_act(x, 100 * w, b, 4), atol=1e-5, rtol=1e-5)
    x = torch.cat([x[:1] + 1000, torch.ones_like(x[:1])])  # a large offset, constant channels
    out = fused.CPU_OPS.group_norm_act(x, w, b, 4)
    exact = reference.group_norm_act(x.double(), w.double(), b.double(), 4)
    torch_error = (reference.group_norm_act(x, w, b, 4) - exact).abs().max()
    assert (out - exact).abs().max() <= 1.5 * torch_error + 1e-6  # as accurate as torch in float32
    assert _kernels(kernel_calls, "group_norm_act") == 2


@needs_cpu_kernels
@pytest.mark.parametrize("variant", ["plain", "all"])
def test_cpu_group_norm_act_bf16(variant, kernel_calls):
    x, w, b, kwargs = _gn_inputs(variant, dtype=torch.bfloat16, shape=(2, 16, 9, 9))
    out = fused.CPU_OPS.group_norm_act(x, w, b, 8, 1e-5, **kwargs)
    assert out.dtype == torch.bfloat16 and _kernels(kernel_calls, "group_norm_act") == 1
    # both round once from float32: at most one bf16 step apart
    torch.testing.assert_close(out.float(), reference.group_norm_act(x, w, b, 8, 1e-5, **kwargs).float(),
                               atol=1e-2, rtol=1e-2)


@needs_cpu_kernels
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_group_norm_act_bf16_rounding_and_nan(channels_last):
    """The vectorised bf16 store rounds to nearest even like torch and keeps NaN a NaN; the tail of a row
    (9 x 9 pixels, 16 channels: neither a multiple of the 8-lane vectors) takes the same arithmetic."""
    x = torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(0)).bfloat16()
    x[1, :2, 0, 0] = float("nan")  # sample 1, group 0 -> NaN statistics
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.ones(16), torch.zeros(16)
    out = fused.CPU_OPS.group_norm_act(x, w, b, 8, act="none").float()
    ref = reference.group_norm_act(x, w, b, 8, act="none").float()
    assert out[1, :2].isnan().all() and not out[0].isnan().any() and not out[1, 2:].isnan().any()
    finite = ~ref.isnan()
    # exact float32 math would round identically; the kernels' float32 differs from torch's by ~1e-6,
    # so at most a few values sit on the other side of a bf16 rounding boundary
    assert (out[finite] != ref[finite]).float().mean() < 0.02
    torch.testing.assert_close(out[finite], ref[finite], atol=1e-2, rtol=1e-2)


def test_reference_group_norm_act_equals_torch_modules():
    x, w, b, kwargs = _gn_inputs("all")
    norm = torch.nn.GroupNorm(4, 12, eps=1e-6)
    norm.weight.data, norm.bias.data = w, b
    add, scale, shift = (kwargs[k][:, :, None, None] for k in ("add", "scale", "shift"))
    h = norm(x + add) * (1 + scale) + shift
    for act, fn in [("silu", F.silu), ("gelu", F.gelu), ("mish", F.mish), ("relu", F.relu), ("none", lambda t: t)]:
        torch.testing.assert_close(reference.group_norm_act(x, w, b, 4, 1e-6, act=act, **kwargs), fn(h))
    assert set(reference.ACTIVATIONS) == {"silu", "gelu", "mish", "relu", "none"}


@pytest.mark.parametrize("ops", ["auto", "cpu"])
def test_fallbacks_for_what_kernels_lack_are_exact(ops, kernel_calls):
    """gelu and mish, float16 and float64: the reference itself, bit for bit, and no kernel call."""
    x, w, b, _ = _gn_inputs("plain")
    group_norm_act = fused.ops_for(ops).group_norm_act
    for xv, act in [(x, "gelu"), (x, "mish"), (x.half(), "silu"), (x.double(), "silu")]:
        assert torch.equal(group_norm_act(xv, w, b, 4, act=act), reference.group_norm_act(xv, w, b, 4, act=act))
    assert group_norm_act(x[:0], w, b, 4).shape == x[:0].shape  # an empty batch
    assert not kernel_calls


# ---- GroupNorm + activation: what autograd records ----

@pytest.mark.parametrize("ops", ALL_OPS)
def test_group_norm_act_gradients_equal_reference(ops):
    x, w, b, kwargs = _gn_inputs("all")
    leaves = [t.clone().requires_grad_() for t in (x, w, b, kwargs["add"], kwargs["scale"], kwargs["shift"])]

    def loss(fn):
        xl, wl, bl, add, scale, shift = leaves
        out = fn(xl, wl, bl, 4, 1e-5, add=add, scale=scale, shift=shift)
        return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()

    grads = torch.autograd.grad(loss(fused.ops_for(ops).group_norm_act), leaves)
    for got, want in zip(grads, torch.autograd.grad(loss(reference.group_norm_act), leaves)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("ops", ["auto", "cpu"])
def test_ops_pick_the_cpu_kernel_and_its_backward(ops, monkeypatch):
    """Per call: no_grad -> the forward kernel; autograd recording float32 -> the kernel with its C++ backward;
    float64, or autograd recording bfloat16 -> the reference (a stand-in kernel: this needs no compiler)."""
    calls = []
    monkeypatch.setattr(cpu, "group_norm_act", lambda *args: calls.append(args) or args[0].clone())
    monkeypatch.setattr(cpu, "supports_group_norm", lambda x, act: x.dtype in (torch.float32, torch.bfloat16))
    group_norm_act = fused.ops_for(ops).group_norm_act
    x, w, b, _ = _gn_inputs("plain")
    group_norm_act(x, w, b, 4)
    assert len(calls) == 1
    with torch.no_grad():
        group_norm_act(x, w.requires_grad_(), b, 4)
    assert len(calls) == 2
    out = group_norm_act(x, w, b, 4)  # autograd records, float32: the kernel with its C++ backward
    assert len(calls) == 3 and type(out.grad_fn).__name__ == "GroupNormActBackward"
    out = group_norm_act(x.double(), w.double(), b.double(), 4)  # float64: the reference
    assert len(calls) == 3 and out.grad_fn is not None and type(out.grad_fn).__name__ != "GroupNormActBackward"
    out = group_norm_act(x.bfloat16(), w, b, 4)  # bf16 with gradients: the reference (no bf16 C++ backward)
    assert len(calls) == 3 and type(out.grad_fn).__name__ != "GroupNormActBackward"
    for other in (reference.REFERENCE_OPS, fused.TRITON_OPS):  # neither calls the C++ kernel on CPU tensors
        other.group_norm_act(x, w, b, 4)
    assert len(calls) == 3


def test_auto_ops_run_the_reference_off_the_cpu():
    """AUTO_OPS: the C++ kernels for CPU tensors only (the meta device stands in for CUDA)."""
    chosen = []
    op = fused._ByDevice(lambda x: chosen.append("cpu"), lambda x: chosen.append("elsewhere"))
    op(torch.ones(1))
    op(torch.ones(1, device="meta"))
    assert chosen == ["cpu", "elsewhere"]
    x, w, b, _ = _gn_inputs("plain")
    out = fused.AUTO_OPS.group_norm_act(x.to("meta"), w.to("meta"), b.to("meta"), 4)
    assert out.device.type == "meta" and out.shape == x.shape


@needs_cpu_kernels
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sequence"])
@pytest.mark.parametrize("act", ["silu", "relu", "none"])
@pytest.mark.parametrize("variant", ["plain", "add", "scale_shift", "no_affine"])
def test_cpu_backward_equals_reference_gradients(layout, act, variant):
    """The C++ backward against autograd through the reference: x, weight, bias, add, scale, shift. 12
    channels in 4 groups: the channels_last rows end in a 4-channel tail; 5 x 7 maps in 8-lane runs too."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 12, 5, 7, generator=g) * 2 + 0.5
    x = {"contiguous": x, "channels_last": x.to(memory_format=torch.channels_last), "sequence": x.flatten(2)}[layout]
    w, b = (None, None) if variant == "no_affine" else (torch.randn(12, generator=g), torch.randn(12, generator=g))
    extra = {"add": dict(add=torch.randn(3, 12, generator=g)),
             "scale_shift": dict(scale=0.3 * torch.randn(3, 12, generator=g), shift=torch.randn(3, 12, generator=g))
             }.get(variant, {})
    leaves = [t.requires_grad_() for t in (x, w, b, *extra.values()) if t is not None]
    dy = torch.randn(x.shape, generator=g)
    results = []
    for ops in (fused.CPU_OPS, reference.REFERENCE_OPS):
        out = ops.group_norm_act(x, w, b, 4, 1e-5, act=act, **extra)
        results.append([out, *torch.autograd.grad(out, leaves, dy)])
    assert type(results[0][0].grad_fn).__name__ == "GroupNormActBackward"
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, atol=2e-5 * ref.abs().max().item(), rtol=1e-4)


@needs_cpu_kernels
def test_cpu_backward_only_for_the_inputs_that_need_it():
    x, w, b, kwargs = _gn_inputs("all")
    x.requires_grad_()
    out = fused.CPU_OPS.group_norm_act(x, w, b, 4, **kwargs)
    assert type(out.grad_fn).__name__ == "GroupNormActBackward"
    (dx,) = torch.autograd.grad(out.sum(), x)
    (ref,) = torch.autograd.grad(reference.group_norm_act(x, w, b, 4, **kwargs).sum(), x)
    torch.testing.assert_close(dx, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ops", ALL_OPS)
@pytest.mark.parametrize("bad, message", [
    (dict(num_groups=5), "num_groups=5"),
    (dict(weight=torch.ones(3)), "weight must have shape"),
    (dict(add=torch.ones(2, 12, 2)), "add must have shape"),
    (dict(scale=torch.ones(12)), "scale must have shape"),
    (dict(act="tanh"), "act='tanh'"),
    (dict(x=torch.ones(12)), "x must be"),
])
def test_group_norm_act_rejects_bad_arguments(ops, bad, message):
    x, w, b, _ = _gn_inputs("plain")
    args = dict(x=x, weight=w, bias=b, num_groups=4) | bad
    with pytest.raises(ValueError, match=message):
        fused.ops_for(ops).group_norm_act(**args)


# ---- attention ----

def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head by explicit matrix products, in float64."""
    d = q.shape[2] // heads
    q, k, v = (t.double() for t in (q, k, v))
    per_head = [[t[..., i * d:(i + 1) * d] for t in (q, k, v)] for i in range(heads)]
    return torch.cat([torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), -1) @ vh for qh, kh, vh in per_head], -1)


@pytest.mark.parametrize("ops", ALL_OPS)
@pytest.mark.parametrize("heads, lk", [(1, 9), (4, 5), (2, 7)])
def test_attention_equals_explicit_math(ops, heads, lk):
    """Every Ops set (SDPA for the reference; the C++ kernel for 8 channels a head) against the math."""
    g = torch.Generator().manual_seed(heads)
    q, k, v = torch.randn(2, 7, 16, generator=g), *torch.randn(2, 2, lk, 16, generator=g)
    want = _explicit_attention(q, k, v, heads).float()
    torch.testing.assert_close(fused.ops_for(ops).attention(q, k, v, heads), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="heads=3"):
        fused.ops_for(ops).attention(q, k, v, 3)
    with pytest.raises(ValueError, match="attention needs"):
        fused.ops_for(ops).attention(q, k[:, :, :8], v, heads)


@needs_cpu_kernels
@pytest.mark.parametrize("d", cpu.ATTENTION_HEAD_DIMS)
@pytest.mark.parametrize("batch, heads, lq, lk", [(2, 3, 13, 13), (1, 2, 4, 21), (3, 1, 9, 1), (2, 4, 33, 8)])
def test_cpu_attention_kernel_equals_reference_with_gradients(d, batch, heads, lq, lk, kernel_calls):
    """Queries and keys not multiples of the kernels' blocks (8 lanes, 4-6 rows), one key, cross-attention."""
    g = torch.Generator().manual_seed(lq * lk + d)
    q = (torch.randn(batch, lq, heads * d, generator=g) * 2).requires_grad_()
    k, v = ((torch.randn(batch, lk, heads * d, generator=g) * 2).requires_grad_() for _ in range(2))
    out, want = fused.CPU_OPS.attention(q, k, v, heads), reference.attention(q, k, v, heads)
    assert type(out.grad_fn).__name__ == "AttentionBackward"  # the kernel ran, with its own backward
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, _explicit_attention(q, k, v, heads).float(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fused.AUTO_OPS.attention(q, k, v, heads), want, rtol=1e-5, atol=1e-5)
    assert _kernels(kernel_calls, "attention") == 2
    dout = torch.randn(out.shape, generator=g)
    for ours, ref in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * max(ref.abs().max().item(), 1.0))


@needs_cpu_kernels
def test_cpu_attention_reads_slices_of_a_projection(kernel_calls):
    """q, k, v as column slices of one (B, L, 3C) projection (unit channel stride, a row stride of 3C)."""
    qkv = torch.randn(2, 11, 3 * 16, generator=torch.Generator().manual_seed(5))
    q, k, v = qkv.split(16, dim=2)
    torch.testing.assert_close(fused.CPU_OPS.attention(q, k, v, 2), reference.attention(q, k, v, 2),
                               rtol=1e-5, atol=1e-5)
    assert _kernels(kernel_calls, "attention") == 1


@pytest.mark.parametrize("ops", ["auto", "cpu"])
def test_attention_fallbacks_are_exact(ops, kernel_calls):
    """Heads of 32 or 4 channels, float64 and bfloat16: SDPA itself, with its own autograd, and no kernel call."""
    g = torch.Generator().manual_seed(1)
    for dtype, channels, heads in [(torch.float32, 64, 2), (torch.float32, 16, 4), (torch.float64, 16, 2),
                                   (torch.bfloat16, 16, 2)]:
        q, k, v = (torch.randn(2, 6, channels, generator=g).to(dtype).requires_grad_() for _ in range(3))
        out = fused.ops_for(ops).attention(q, k, v, heads)
        assert torch.equal(out, reference.attention(q, k, v, heads))
        assert type(out.grad_fn).__name__ != "AttentionBackward"
    assert not kernel_calls


# ---- the Ops sets ----

def test_ops_sets_and_their_names(monkeypatch):
    assert fused.KERNELS == ("auto", "cpu", "triton", "reference")
    assert fused.ops_for("reference") is reference.REFERENCE_OPS
    assert reference.REFERENCE_OPS == reference.Ops(reference.group_norm_act, reference.attention)
    assert {fused.ops_for(name) for name in ("auto", "cpu")} == {fused.AUTO_OPS, fused.CPU_OPS}
    with pytest.raises(dataclasses.FrozenInstanceError):
        fused.AUTO_OPS.attention = reference.attention
    with pytest.raises(ValueError, match=r"kernels='fast' is not known; allowed: \['auto', 'cpu', 'triton', "):
        fused.ops_for("fast")
    monkeypatch.setattr(fused.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="needs the triton package"):
        fused.ops_for("triton")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_ops_on_cpu_tensors_are_the_reference(monkeypatch):
    """Without TRITON_INTERPRET, CPU tensors take the reference exactly (and triton is not needed for it)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, b, kwargs = _gn_inputs("all")
    assert torch.equal(fused.TRITON_OPS.group_norm_act(x, w, b, 4, **kwargs),
                       reference.group_norm_act(x, w, b, 4, **kwargs))


# ---- building the C++ kernels ----

def test_missing_compiler_warns_once_and_uses_reference(monkeypatch, tmp_path, kernel_calls):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MINIDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu, "_library", None)  # restored afterwards: later tests load the real library
    x, w, b, _ = _gn_inputs("plain")
    q = torch.randn(1, 5, 16)
    with pytest.warns(RuntimeWarning, match="fast CPU kernels are unavailable") as caught:
        out = [fused.CPU_OPS.group_norm_act(x, w, b, 4) for _ in range(2)]
        attended = fused.AUTO_OPS.attention(q, q, q, 2)
    assert len(caught) == 1 and cpu.load() is None
    assert torch.equal(out[1], reference.group_norm_act(x, w, b, 4))
    assert torch.equal(attended, reference.attention(q, q, q, 2))
    assert not kernel_calls and not list((tmp_path / "cache").glob("**/*.so"))


def test_failed_build_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    """A compiler that fails must not leave an (empty) library behind, which later loads would find
    (a bug: the atomic write renamed the empty output into the cache whenever the compile failed)."""
    failing = tmp_path / "failing-c++"
    failing.write_text("#!/bin/sh\necho 'error: no' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("MINIDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(failing))
    with pytest.raises(OSError, match="error: no"):
        cpu.build("int f() { return 1; }", "probe")
    assert not list((tmp_path / "cache").glob("**/*.so"))


@pytest.mark.skipif(not (cpu.shutil.which("c++") or cpu.shutil.which("g++")), reason="no C++ compiler")
def test_build_says_so_once_and_caches(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MINIDIFF_CACHE", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    code = 'extern "C" int f() { return 1; }'
    library = cpu.build(code, "probe")
    assert library.parent == tmp_path / "kernels" and library.stat().st_size > 0
    assert "minidiff: compiling the C++ kernels probe" in capsys.readouterr().err
    assert cpu.build(code, "probe") == library and capsys.readouterr().err == ""  # cached: silent
    assert cpu.build(code + "\n", "probe") != library  # another source, another library


# ---- Triton ----

def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)


_INTERPRETED = """
import json, torch
from minidiff.kernels import fused, triton_kernels
from minidiff.models import functional as reference
triton_kernels._MAX_BLOCK = 64  # several blocks per group: the loops run more than once
kernel, calls = triton_kernels.group_norm_act, []
triton_kernels.group_norm_act = lambda *args: calls.append(1) or kernel(*args)
torch.manual_seed(0)
errors = {}
x = torch.randn(2, 8, 5, 6) * 2 + 1
w, b, add, scale, shift = torch.randn(8), torch.randn(8), torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
cases = {"plain silu": (x, {}), "add relu": (x, dict(add=add, act="relu")),
         "scale_shift none": (x, dict(scale=scale, shift=shift, act="none")),
         "all channels_last": (x.to(memory_format=torch.channels_last), dict(add=add, scale=scale, shift=shift)),
         "sequence": (x.flatten(2), dict(add=add[:, :, None])), "bf16": (x.bfloat16(), dict(scale=scale, shift=shift))}
def tolerance_units(got, want):  # <= 1 within the tolerance of the dtype
    tol = 2e-2 if got.dtype == torch.bfloat16 else 1e-5
    return ((got.float() - want.float()).abs() / (tol + tol * want.float().abs())).max().item()
for name, (xv, kw) in cases.items():
    got, want = fused.TRITON_OPS.group_norm_act(xv, w, b, 4, **kw), reference.group_norm_act(xv, w, b, 4, **kw)
    errors[name] = (tolerance_units(got, want), str(got.dtype), got.stride() == xv.stride())
kernel_calls = len(calls)
recorded = fused.TRITON_OPS.group_norm_act(x.requires_grad_(), w, b, 4)  # autograd records: the reference
print(json.dumps(dict(errors=errors, kernel_calls=kernel_calls, after_grad=len(calls),
                      grad_fn=type(recorded.grad_fn).__name__)))
"""


@pytest.mark.multiprocess
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_under_interpreter_equals_reference():
    result = _run_python(_INTERPRETED, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    errors = report["errors"]
    assert len(errors) == 6 and report["kernel_calls"] == 6
    for name, (err, dtype, same_strides) in errors.items():
        assert err <= 1 and same_strides, (name, err, same_strides)
    assert errors["bf16"][1] == "torch.bfloat16"
    assert report["after_grad"] == 6 and report["grad_fn"] != "NoneType"


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_triton_kernel_on_cuda(dtype, tol):
    for variant in VARIANTS:
        x, w, b, kwargs = _gn_inputs(variant, dtype=dtype, shape=(4, 64, 33, 17))
        x, w, b = x.cuda(), w.cuda(), b.cuda()
        kwargs = {k: v.cuda() for k, v in kwargs.items()}
        for xv in (x, x.to(memory_format=torch.channels_last)):
            with torch.no_grad():
                got = fused.TRITON_OPS.group_norm_act(xv, w, b, 32, **kwargs)
            torch.testing.assert_close(got.float(), reference.group_norm_act(x, w, b, 32, **kwargs).float(),
                                       atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_ops_on_cuda_are_the_reference(kernel_calls):
    """Only the CPU kernels are proven faster: on CUDA tensors "auto" runs the pure-torch ops, bit for bit."""
    x, w, b, kwargs = _gn_inputs("all")
    x, w, b = x.cuda(), w.cuda(), b.cuda()
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    assert torch.equal(fused.AUTO_OPS.group_norm_act(x, w, b, 4, **kwargs),
                       reference.group_norm_act(x, w, b, 4, **kwargs))
    q = torch.randn(2, 9, 16, device="cuda")
    assert torch.equal(fused.AUTO_OPS.attention(q, q, q, 2), reference.attention(q, q, q, 2))
    assert not kernel_calls

"""minidiff.ops: every fast path equals its reference; the references equal torch's modules and diffusers'
schedulers; the dispatcher picks, switches and fails over as documented. Triton kernels run under
TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton is imported)."""
from __future__ import annotations

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

from minidiff import ops
from minidiff.ops import cpu, reference

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_cpu_kernels = pytest.mark.skipif(cpu._load() is None, reason="no C++ compiler for the CPU kernels")
VARIANTS = ["plain", "add", "scale_shift", "all"]
LAYOUTS = ["contiguous", "channels_last", "sequence", "transposed"]


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


@needs_cpu_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ["silu", "relu", "none"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_group_norm_act_equals_reference(variant, act, layout):
    x, w, b, kwargs = _gn_inputs(variant, layout)
    with ops.backend("cpu"):
        out = ops.group_norm_act(x, w, b, 4, 1e-5, act=act, **kwargs)
    torch.testing.assert_close(out, reference.group_norm_act(x, w, b, 4, 1e-5, act=act, **kwargs),
                               atol=1e-5, rtol=1e-5)
    layout_kept = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout_kept)


@needs_cpu_kernels
def test_cpu_group_norm_act_extremes():
    x, w, b, _ = _gn_inputs("plain")
    with ops.backend("cpu"):  # SiLU saturates: |v| up to ~300, where exp(-v) overflows float32
        out = ops.group_norm_act(x, 100 * w, b, 4)
    torch.testing.assert_close(out, reference.group_norm_act(x, 100 * w, b, 4), atol=1e-5, rtol=1e-5)
    x = torch.cat([x[:1] + 1000, torch.ones_like(x[:1])])  # a large offset, constant channels
    with ops.backend("cpu"):
        out = ops.group_norm_act(x, w, b, 4)
    exact = reference.group_norm_act(x.double(), w.double(), b.double(), 4)
    torch_error = (reference.group_norm_act(x, w, b, 4) - exact).abs().max()
    assert (out - exact).abs().max() <= 1.5 * torch_error + 1e-6  # as accurate as torch in float32


@needs_cpu_kernels
@pytest.mark.parametrize("variant", ["plain", "all"])
def test_cpu_group_norm_act_bf16(variant):
    x, w, b, kwargs = _gn_inputs(variant, dtype=torch.bfloat16, shape=(2, 16, 9, 9))
    with ops.backend("cpu"):
        out = ops.group_norm_act(x, w, b, 8, 1e-5, **kwargs)
    assert out.dtype == torch.bfloat16
    # both round once from float32: at most one bf16 step apart
    torch.testing.assert_close(out.float(), reference.group_norm_act(x, w, b, 8, 1e-5, **kwargs).float(),
                               atol=1e-2, rtol=1e-2)


@needs_cpu_kernels
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_group_norm_act_bf16_rounding_and_nan(channels_last):
    """The vectorised bf16 store rounds to nearest even like torch and keeps NaN a NaN; the tail of a row
    (9 x 9 pixels, 16 channels: neither a multiple of the 8-lane vectors) takes the same arithmetic."""
    x = torch.randn(2, 16, 9, 9).bfloat16()
    x[1, :2, 0, 0] = float("nan")  # sample 1, group 0 -> NaN statistics
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.ones(16), torch.zeros(16)
    with ops.backend("cpu"):
        out = ops.group_norm_act(x, w, b, 8, act="none").float()
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


def test_fallbacks_for_what_kernels_lack_are_exact():
    x, w, b, _ = _gn_inputs("plain")
    with ops.backend("cpu"):
        for xv, act in [(x, "gelu"), (x, "mish"), (x.half(), "silu")]:
            assert torch.equal(ops.group_norm_act(xv, w, b, 4, act=act), reference.group_norm_act(xv, w, b, 4, act=act))


@pytest.mark.parametrize("backend", ["auto", "cpu", "compile"])
def test_group_norm_act_gradients_equal_reference(backend):
    x, w, b, kwargs = _gn_inputs("all")
    leaves = [t.clone().requires_grad_() for t in (x, w, b, kwargs["add"], kwargs["scale"], kwargs["shift"])]

    def loss(fn):
        xl, wl, bl, add, scale, shift = leaves
        out = fn(xl, wl, bl, 4, 1e-5, add=add, scale=scale, shift=shift)
        return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()

    with ops.backend(backend):
        grads = torch.autograd.grad(loss(ops.group_norm_act), leaves)
    for got, want in zip(grads, torch.autograd.grad(loss(reference.group_norm_act), leaves)):
        torch.testing.assert_close(got, want)


def test_dispatch_picks_the_cpu_kernel_and_its_backward(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "group_norm_act", lambda *args: calls.append(args) or args[0].clone())
    monkeypatch.setattr(cpu, "supports_group_norm", lambda x, act: True)
    x, w, b, _ = _gn_inputs("plain")
    with ops.backend("auto"):
        ops.group_norm_act(x, w, b, 4)
        assert len(calls) == 1
        with torch.no_grad():
            ops.group_norm_act(x, w.requires_grad_(), b, 4)
        assert len(calls) == 2
        out = ops.group_norm_act(x, w, b, 4)  # autograd records, float32: the kernel with its C++ backward
        assert len(calls) == 3 and type(out.grad_fn).__name__ == "GroupNormActBackward"
        out = ops.group_norm_act(x.double(), w.double(), b.double(), 4)  # float64: the reference
        assert len(calls) == 3 and type(out.grad_fn).__name__ != "GroupNormActBackward"
    with ops.backend("reference"):
        ops.group_norm_act(x, w, b, 4)
    assert len(calls) == 3


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
    for name in ("auto", "reference"):
        with ops.backend(name):
            out = ops.group_norm_act(x, w, b, 4, 1e-5, act=act, **extra)
        results.append([out, *torch.autograd.grad(out, leaves, dy)])
    assert type(results[0][0].grad_fn).__name__ == "GroupNormActBackward"
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, atol=2e-5 * ref.abs().max().item(), rtol=1e-4)


@needs_cpu_kernels
def test_cpu_backward_only_for_the_inputs_that_need_it():
    x, w, b, kwargs = _gn_inputs("all")
    x.requires_grad_()
    with ops.backend("auto"):
        (dx,) = torch.autograd.grad(ops.group_norm_act(x, w, b, 4, **kwargs).sum(), x)
    (ref,) = torch.autograd.grad(reference.group_norm_act(x, w, b, 4, **kwargs).sum(), x)
    torch.testing.assert_close(dx, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad, message", [
    (dict(num_groups=5), "num_groups=5"),
    (dict(weight=torch.ones(3)), "weight must have shape"),
    (dict(add=torch.ones(2, 12, 2)), "add must have shape"),
    (dict(scale=torch.ones(12)), "scale must have shape"),
    (dict(act="tanh"), "act='tanh'"),
    (dict(x=torch.ones(12)), "x must be"),
])
def test_group_norm_act_rejects_bad_arguments(bad, message):
    x, w, b, _ = _gn_inputs("plain")
    args = dict(x=x, weight=w, bias=b, num_groups=4) | bad
    with pytest.raises(ValueError, match=message):
        ops.group_norm_act(**args)


@pytest.mark.parametrize("heads, lk", [(1, 9), (4, 5)])
def test_attention_equals_reference_and_explicit_math(heads, lk):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 7, 16, generator=g), *torch.randn(2, 2, lk, 16, generator=g)
    d = 16 // heads
    heads_qkv = [[t[..., i * d:(i + 1) * d] for t in (q, k, v)] for i in range(heads)]
    want = torch.cat([torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), -1) @ vh for qh, kh, vh in heads_qkv], -1)
    torch.testing.assert_close(reference.attention(q, k, v, heads), want)
    torch.testing.assert_close(ops.attention(q, k, v, heads), want)
    with pytest.raises(ValueError, match="heads=3"):
        ops.attention(q, k, v, 3)
    with pytest.raises(ValueError, match="attention needs"):
        ops.attention(q, k[:, :, :8], v, heads)


@needs_cpu_kernels
@pytest.mark.parametrize("d", cpu.ATTENTION_HEAD_DIMS)
@pytest.mark.parametrize("batch, heads, lq, lk", [(2, 3, 13, 13), (1, 2, 4, 21), (3, 1, 9, 1), (2, 4, 33, 8)])
def test_cpu_attention_kernel_equals_reference_with_gradients(d, batch, heads, lq, lk):
    """Queries and keys not multiples of the kernels' blocks (8 lanes, 4-6 rows), one key, cross-attention."""
    g = torch.Generator().manual_seed(lq * lk + d)
    q = (torch.randn(batch, lq, heads * d, generator=g) * 2).requires_grad_()
    k, v = ((torch.randn(batch, lk, heads * d, generator=g) * 2).requires_grad_() for _ in range(2))
    out, want = ops.attention(q, k, v, heads), reference.attention(q, k, v, heads)
    assert type(out.grad_fn).__name__ == "AttentionBackward"  # the kernel ran
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ops.attention(q, k, v, heads), want, rtol=1e-5, atol=1e-5)
    dout = torch.randn(out.shape, generator=g)
    for ours, ref in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * max(ref.abs().max().item(), 1.0))


def _update_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 8, 8, generator=g).to(dtype) for _ in range(3)]


@needs_cpu_kernels
@pytest.mark.parametrize("prediction_type", reference.PREDICTION_TYPES)
@pytest.mark.parametrize("clip, sigma", [(None, 0.0), (1.0, 0.3)])
def test_cpu_updates_equal_reference(prediction_type, clip, sigma):
    x, m, noise = _update_inputs()
    for used_clipped in (False, True):
        args = (x, m, 0.3, 0.55, sigma, noise, prediction_type, clip, used_clipped)
        with ops.backend("cpu"):
            got = ops.ddim_update(*args)
        for a, b in zip(got, reference.ddim_update(*args)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with ops.backend("cpu"):
        got = ops.ddpm_update(x, m, 0.3, 0.55, sigma, noise, prediction_type, clip)
    for a, b in zip(got, reference.ddpm_update(x, m, 0.3, 0.55, sigma, noise, prediction_type, clip)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_cpu_kernels
def test_cpu_updates_bf16():
    x, m, noise = _update_inputs(torch.bfloat16)
    with ops.backend("cpu"):
        got = ops.ddim_update(x, m, 0.3, 0.55, 0.2, noise, "v_prediction", 1.0)
    for a, b in zip(got, reference.ddim_update(x, m, 0.3, 0.55, 0.2, noise, "v_prediction", 1.0)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("prediction_type", reference.PREDICTION_TYPES)
@pytest.mark.parametrize("eta, clip", [(0.0, False), (1.0, True)])
def test_ddim_update_matches_diffusers(prediction_type, eta, clip):  # with clip: also use_clipped_model_output
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(prediction_type=prediction_type, clip_sample=clip)
    sched.set_timesteps(10)
    x, m, noise = _update_inputs()
    t, prev_t = 601, 501
    want = sched.step(m, t, x, eta=eta, use_clipped_model_output=clip, variance_noise=noise)
    a_t, a_p = sched.alphas_cumprod[t].item(), sched.alphas_cumprod[prev_t].item()
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    for backend in ("reference", "auto"):
        with ops.backend(backend):
            prev, x0 = ops.ddim_update(x, m, a_t, a_p, sigma, noise, prediction_type, 1.0 if clip else None, clip)
        torch.testing.assert_close(prev, want.prev_sample, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(x0, want.pred_original_sample, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", reference.PREDICTION_TYPES)
def test_ddpm_update_matches_diffusers(prediction_type):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(prediction_type=prediction_type)
    sched.set_timesteps(10)
    x, m, _ = _update_inputs()
    t, prev_t = 600, 500
    want = sched.step(m, t, x, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    a_t, a_p = sched.alphas_cumprod[t].item(), sched.alphas_cumprod[prev_t].item()
    sigma = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))  # fixed_small
    for backend in ("reference", "auto"):
        with ops.backend(backend):
            prev, x0 = ops.ddpm_update(x, m, a_t, a_p, sigma, noise, prediction_type, 1.0)
        torch.testing.assert_close(prev, want.prev_sample, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(x0, want.pred_original_sample, atol=2e-5, rtol=1e-5)


def test_updates_reject_bad_arguments():
    x, m, noise = _update_inputs()
    with pytest.raises(ValueError, match="noise is required"):
        ops.ddim_update(x, m, 0.3, 0.5, 0.1)
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        ops.ddpm_update(x, m, 0.3, 0.5, prediction_type="x0")
    with pytest.raises(ValueError, match="shape of x"):
        ops.ddpm_update(x, m[:1], 0.3, 0.5)
    with pytest.raises(ValueError, match="clip=0"):
        ops.ddim_update(x, m, 0.3, 0.5, clip=0)


def test_backend_switching_and_errors():
    start = ops.get_backend()
    with ops.backend("reference"):
        assert ops.get_backend() == "reference"
        with pytest.raises(RuntimeError), ops.backend("cpu"):
            assert ops.get_backend() == "cpu"
            raise RuntimeError
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == start
    with pytest.raises(ValueError, match="unknown ops backend 'cuda'"):
        ops.set_backend("cuda")
    assert ops.get_backend() == start
    if HAS_TRITON and not os.environ.get("TRITON_INTERPRET"):
        x, w, b, _ = _gn_inputs("plain")
        with ops.backend("triton"), pytest.raises(ValueError, match="runs on CUDA tensors"):
            ops.group_norm_act(x, w, b, 4)


def test_compile_backend_runs_the_compiled_math(monkeypatch):
    compiled = []  # torch.compile stands in as the identity: a real compile takes 10-30 s on 2 cores
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)
    monkeypatch.setattr(ops, "_compiled", {})
    x, w, b, kwargs = _gn_inputs("all")
    xs, m, noise = _update_inputs()
    with ops.backend("compile"), torch.no_grad():
        torch.testing.assert_close(ops.group_norm_act(x, w, b, 4, **kwargs),
                                   reference.group_norm_act(x, w, b, 4, **kwargs))
        for got, want in zip(ops.ddim_update(xs, m, 0.3, 0.6, 0.2, noise, "sample", 1.0),
                             reference.ddim_update(xs, m, 0.3, 0.6, 0.2, noise, "sample", 1.0)):
            torch.testing.assert_close(got, want)
    assert compiled == [reference.group_norm_act, ops._linear_update]


def test_compile_failure_warns_and_uses_reference(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    monkeypatch.setattr(ops, "_compiled", {})
    x, w, b, _ = _gn_inputs("plain")
    with ops.backend("compile"), torch.no_grad(), pytest.warns(RuntimeWarning, match="no working C"):
        out = ops.group_norm_act(x, w, b, 4)
    assert torch.equal(out, reference.group_norm_act(x, w, b, 4))


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)


def test_environment_variable_sets_the_backend():
    result = _run_python("""
        import importlib, os
        import minidiff.ops as o
        print(o.get_backend())
        os.environ["MINIDIFF_OPS"] = "fast"
        try:
            importlib.reload(o)
        except ValueError as err:
            print(err)
    """, MINIDIFF_OPS="reference")
    assert result.stdout.splitlines() == ["reference", f"unknown ops backend 'fast'; allowed: {list(ops.BACKENDS)}"]


def test_missing_compiler_warns_once_and_uses_reference(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MINIDIFF_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu, "_library", None)
    x, w, b, _ = _gn_inputs("plain")
    with ops.backend("cpu"), pytest.warns(RuntimeWarning, match="fast CPU kernels are unavailable") as caught:
        out = [ops.group_norm_act(x, w, b, 4) for _ in range(2)]
    assert len(caught) == 1
    assert torch.equal(out[1], reference.group_norm_act(x, w, b, 4))


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
    monkeypatch.delenv("CXX")
    if cpu.shutil.which("c++") or cpu.shutil.which("g++"):
        assert cpu.build("extern \"C\" int f() { return 1; }", "probe").stat().st_size > 0


_INTERPRETED = """
import json, torch
from minidiff import ops
from minidiff.ops import reference, triton_kernels
triton_kernels._MAX_BLOCK = 64  # several blocks per group: the loops run more than once
torch.manual_seed(0)
errors = {}
x = torch.randn(2, 8, 5, 6) * 2 + 1
w, b, add, scale, shift = torch.randn(8), torch.randn(8), torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
cases = {"plain silu": (x, {}), "add relu": (x, dict(add=add, act="relu")),
         "scale_shift none": (x, dict(scale=scale, shift=shift, act="none")),
         "all channels_last": (x.to(memory_format=torch.channels_last), dict(add=add, scale=scale, shift=shift)),
         "sequence": (x.flatten(2), dict(add=add)), "bf16": (x.bfloat16(), dict(scale=scale, shift=shift))}
def tolerance_units(got, want):  # <= 1 within the tolerance of the dtype
    tol = 2e-2 if got.dtype == torch.bfloat16 else 1e-5
    return ((got.float() - want.float()).abs() / (tol + tol * want.float().abs())).max().item()
with ops.backend("triton"):
    for name, (xv, kw) in cases.items():
        got, want = ops.group_norm_act(xv, w, b, 4, **kw), reference.group_norm_act(xv, w, b, 4, **kw)
        errors[name] = (tolerance_units(got, want), str(got.dtype), got.stride() == xv.stride())
    xs, m, noise = torch.randn(3, 2, 3, 4, 4).unbind(0)
    for pt in reference.PREDICTION_TYPES:
        got = ops.ddim_update(xs, m, 0.3, 0.6, 0.2, noise, pt, 1.0)
        want = reference.ddim_update(xs, m, 0.3, 0.6, 0.2, noise, pt, 1.0)
        errors["ddim " + pt] = (max(map(tolerance_units, got, want)), "", True)
    got, want = ops.ddpm_update(xs, m, 0.3, 0.6), reference.ddpm_update(xs, m, 0.3, 0.6)
    errors["ddpm"] = (max(map(tolerance_units, got, want)), "", True)
print(json.dumps(errors))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_under_interpreter_equal_reference():
    result = _run_python(_INTERPRETED, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == 10
    for name, (err, dtype, same_strides) in errors.items():
        assert err <= 1 and same_strides, (name, err, same_strides)
    assert errors["bf16"][1] == "torch.bfloat16"


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_triton_kernels_on_cuda(dtype, tol):
    for variant in VARIANTS:
        x, w, b, kwargs = _gn_inputs(variant, dtype=dtype, shape=(4, 64, 33, 17))
        x, w, b = x.cuda(), w.cuda(), b.cuda()
        kwargs = {k: v.cuda() for k, v in kwargs.items()}
        for xv in (x, x.to(memory_format=torch.channels_last)):
            with torch.no_grad():
                got = ops.group_norm_act(xv, w, b, 32, **kwargs)
            torch.testing.assert_close(got.float(), reference.group_norm_act(x, w, b, 32, **kwargs).float(),
                                       atol=tol, rtol=tol)
    xs, m, noise = (t.cuda() for t in _update_inputs(dtype))
    for a, b in zip(ops.ddim_update(xs, m, 0.3, 0.6, 0.2, noise, "epsilon", 1.0),
                    reference.ddim_update(xs, m, 0.3, 0.6, 0.2, noise, "epsilon", 1.0)):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)

"""Winograd F(2x2, 3x3): equal to F.conv2d in value and gradients (C++ kernels and pure-torch reference), and
minidiff.optimize(winograd=True) equal to the eager model, reversible."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F

import minidiff
from minidiff.ops import winograd
from minidiff.optimize import restore
from conftest import TINY, random_unet

needs_kernels = pytest.mark.skipif(winograd._library() is None, reason="no C++ compiler for the Winograd kernels")
optimize_module = sys.modules["minidiff.optimize"]  # minidiff.optimize is the function
# (B, C, K, H, W): even and odd sizes, one-pixel maps, an odd number of tile rows in several images
SHAPES = [(2, 5, 7, 6, 8), (3, 4, 6, 5, 7), (1, 3, 2, 1, 1), (2, 8, 3, 2, 3), (3, 6, 4, 9, 4)]


@pytest.fixture(params=["kernels", "reference"])
def path(request, monkeypatch):
    if request.param == "kernels" and winograd._library() is None:
        pytest.skip("no C++ compiler for the Winograd kernels")
    if request.param == "reference":
        monkeypatch.setattr(winograd, "_library", lambda: None)
    return request.param


def _inputs(shape, channels_last=False, bias=True, dtype=torch.float32):
    b, c, k, h, w = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    weight = torch.randn(k, c, 3, 3, generator=g, dtype=dtype)
    return x, weight, torch.randn(k, generator=g, dtype=dtype) if bias else None


def _close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    err = (ours - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), f"max abs difference {err}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_and_gradients_equal_conv2d(path, shape, channels_last):
    x, weight, bias = (t.requires_grad_() for t in _inputs(shape, channels_last))
    ref = F.conv2d(x, weight, bias, padding=1)
    out = winograd.winograd_conv3x3(x, weight, bias)
    assert out.shape == ref.shape
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=memory_format)
    _close(out, ref)
    grad = torch.randn_like(ref)
    for ours, theirs in zip(torch.autograd.grad(out, (x, weight, bias), grad),
                            torch.autograd.grad(ref, (x, weight, bias), grad)):
        _close(ours, theirs)


def test_without_bias_and_partial_gradients(path):
    x, weight, _ = _inputs((2, 4, 5, 7, 6), bias=False)
    weight.requires_grad_()
    out = winograd.winograd_conv3x3(x, weight)
    _close(out, F.conv2d(x, weight, padding=1))
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, weight, grad)
    (ref,) = torch.autograd.grad(F.conv2d(x, weight, padding=1), weight, grad)
    _close(ours, ref)


def test_transformed_weight_cache_and_its_gradient(path):
    x, weight, bias = _inputs((2, 4, 5, 6, 6))
    u = winograd.transform_weight(weight)
    assert u.shape == (16, 5, 4)
    with torch.no_grad():
        _close(winograd.winograd_conv3x3(x, weight, bias, transformed_weight=u), F.conv2d(x, weight, bias, padding=1))
    weight.requires_grad_()  # the cache is a value: the weight still receives its gradient
    out = winograd.winograd_conv3x3(x, weight, bias, transformed_weight=u)
    (ours,) = torch.autograd.grad(out.sum(), weight)
    (ref,) = torch.autograd.grad(F.conv2d(x, weight, bias, padding=1).sum(), weight)
    _close(ours, ref)


def test_float64_takes_the_reference_exactly():
    x, weight, bias = _inputs((2, 3, 4, 5, 6), dtype=torch.float64)
    assert not winograd.has_fast_path(x, weight)
    _close(winograd.winograd_conv3x3(x, weight, bias), F.conv2d(x, weight, bias, padding=1), tol=1e-12)


@pytest.mark.parametrize("args, match", [((torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 5, 5)), "3, 3"),
                                         ((torch.zeros(1, 4, 4, 4), torch.zeros(3, 2, 3, 3)), "does not match"),
                                         ((torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 3, 3), torch.zeros(2)),
                                          "bias")])
def test_bad_shapes_raise(args, match):
    with pytest.raises(ValueError, match=match):
        winograd.winograd_conv3x3(*args)


def test_missing_compiler_warns_and_uses_reference(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MINIDIFF_CACHE", str(tmp_path))
    winograd._library.cache_clear()
    try:
        x, weight, bias = _inputs((1, 2, 3, 4, 4))
        with pytest.warns(RuntimeWarning, match="Winograd|winograd"):
            out = winograd.winograd_conv3x3(x, weight, bias)
        _close(out, F.conv2d(x, weight, bias, padding=1))
    finally:
        winograd._library.cache_clear()  # later tests load the real library again


@pytest.fixture
def pair(seeded, monkeypatch):
    """(eager TINY unet, winograd-optimized copy), with every 3x3 convolution a candidate (TINY is narrow)."""
    monkeypatch.setattr(optimize_module, "WINOGRAD_MIN_CHANNELS", 1)
    calls = []
    monkeypatch.setattr(optimize_module, "winograd_conv3x3",
                        lambda *a, **k: calls.append(a[0].shape) or winograd.winograd_conv3x3(*a, **k))
    unet = random_unet(TINY)
    fast = minidiff.optimize(copy.deepcopy(unet), winograd=True)
    return unet, fast, calls


def _unet_inputs():
    return torch.randn(2, 3, 8, 8), torch.tensor([10, 900])


@needs_kernels
def test_optimized_inference_and_training_equal_eager(pair):
    unet, fast, calls = pair
    x, t = _unet_inputs()
    with torch.no_grad():
        _close(fast(x, t), unet(x, t), tol=1e-4)
    candidates = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
                  and m.stride == (1, 1)]  # not the stride-2 downsampler
    assert all("forward" in vars(m) for m in candidates)
    assert 0 < len(calls) < len(candidates) and all(s[2:] == (8, 8) for s in calls)  # 4x4 maps keep oneDNN
    calls.clear()
    grads = []
    for model in (unet.train(), fast.train()):
        model(x, t).square().mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert calls and all(s[2:] == (8, 8) for s in calls)
    floor = 1e-3 * max(g.abs().max().item() for g in grads[0].values())
    for name, g in grads[0].items():
        err = (grads[1][name] - g).abs().max().item()
        assert err <= 1e-4 * max(g.abs().max().item(), floor), name


@needs_kernels
def test_cached_filter_transform_follows_weight_updates(pair):
    unet, fast, _ = pair
    x, t = _unet_inputs()
    with torch.no_grad():
        fast(x, t)
        for model in (unet, fast):
            model.conv_in.weight.mul_(2)  # in place, like an optimizer step
        _close(fast(x, t), unet(x, t), tol=1e-4)
        fast.load_state_dict(unet.state_dict())
        _close(fast(x, t), unet(x, t), tol=1e-4)


@needs_kernels
def test_restore_and_deepcopy(pair):
    unet, fast, calls = pair
    x, t = _unet_inputs()
    twin = copy.deepcopy(fast)  # like an EMA copy: its convolutions use their own weights
    with torch.no_grad():
        twin.conv_in.bias.add_(1.0)
        assert not torch.allclose(twin(x, t), fast(x, t))
    assert restore(fast) is fast
    assert not any("forward" in vars(m) or "_minidiff_winograd" in vars(m) for m in fast.modules())
    calls.clear()
    with torch.no_grad():
        _close(fast(x, t), unet(x, t), tol=1e-4)
    assert not calls
    assert "forward" in vars(twin.conv_in)  # restoring the original left the copy optimized


def test_winograd_argument_checks(seeded):
    with pytest.raises(TypeError, match="winograd"):
        minidiff.optimize(random_unet(TINY), winograd=1)
    with pytest.raises(ValueError, match="compile"):
        minidiff.optimize(random_unet(TINY), winograd=True, compile=True)

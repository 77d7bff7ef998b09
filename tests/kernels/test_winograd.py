"""Winograd F(2x2, 3x3) and F(4x4, 3x3): equal to F.conv2d in value and gradients (C++ kernels and pure-torch
reference, one and two threads), and minidiff.optimize(winograd=True) equal to the eager model, reversible."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import minidiff
from minidiff.kernels import winograd
from minidiff.kernels.fast_path import restore
from conftest import TINY, random_unet

needs_kernels = pytest.mark.skipif(winograd.load() is None, reason="no C++ compiler for the Winograd kernels")
from minidiff.kernels import fast_path as optimize_module
# (B, C, K, H, W): sizes that are and are not multiples of 2 and 4, one-pixel maps, an odd number of tile rows
# in several images, K not a multiple of the matrix kernel's 16 columns; channels that are not multiples of 8
# take the reference even on the "kernels" path
SHAPES = [(2, 8, 16, 6, 8), (3, 16, 8, 5, 7), (1, 8, 8, 1, 1), (2, 8, 24, 2, 3), (3, 16, 16, 9, 4),
          (2, 64, 48, 12, 10), (2, 5, 7, 6, 8)]
# Relative error bounds, ~4x the largest measured over these shapes and 10 seeds: 1.1e-6 for F(2x2, 3x3), 7.2e-6
# for F(4x4, 3x3), whose transforms hold larger numbers (4, 5, 8, 1/24); both paths, outputs and gradients
TOLERANCE = {2: 5e-6, 4: 3e-5}


@pytest.fixture(params=["kernels", "reference"])
def path(request, monkeypatch):
    if request.param == "kernels" and winograd.load() is None:
        pytest.skip("no C++ compiler for the Winograd kernels")
    if request.param == "reference":
        monkeypatch.setattr(winograd, "load", lambda: None)
    return request.param


def _inputs(shape, channels_last=False, bias=True, dtype=torch.float32):
    b, c, k, h, w = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    weight = torch.randn(k, c, 3, 3, generator=g, dtype=dtype)
    return x, weight, torch.randn(k, generator=g, dtype=dtype) if bias else None


def _close(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = (ours - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), f"max abs difference {err}"


@pytest.mark.parametrize("tile", winograd.TILES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_and_gradients_equal_conv2d(path, shape, channels_last, tile):
    x, weight, bias = (t.requires_grad_() for t in _inputs(shape, channels_last))
    assert winograd.has_fast_path(x, weight) == (path == "kernels" and shape[1] % 8 == shape[2] % 8 == 0)
    ref = F.conv2d(x, weight, bias, padding=1)
    out = winograd.winograd_conv3x3(x, weight, bias, tile=tile)
    assert out.shape == ref.shape
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=memory_format)
    _close(out, ref, TOLERANCE[tile])
    grad = torch.randn_like(ref)
    for ours, theirs in zip(torch.autograd.grad(out, (x, weight, bias), grad),
                            torch.autograd.grad(ref, (x, weight, bias), grad)):
        _close(ours, theirs, TOLERANCE[tile])


@needs_kernels
@pytest.mark.parametrize("tile", winograd.TILES)
@pytest.mark.parametrize("chunk_tiles", [1, 32, winograd.CHUNK_TILES])
@pytest.mark.parametrize("shared", [False, True])
def test_two_threads(monkeypatch, tile, chunk_tiles, shared):
    """Threads split the chunks: the forward's outputs, the backward's overlapping input patches (chunks of
    tile rows: even chunks, then odd ones; chunks of whole images, 32 and 128 here: one pass) and its weight
    gradient, either per-thread copies summed at the end or whole positions from shared transforms."""
    monkeypatch.setattr(winograd, "_shared_backward", lambda *shape: shared)
    x, weight, bias = (t.requires_grad_() for t in _inputs((3, 16, 24, 13, 9)))
    ref = F.conv2d(x, weight, bias, padding=1)
    grad = torch.randn_like(ref)
    torch.set_num_threads(2)
    try:
        out = winograd.winograd_conv3x3(x, weight, bias, tile=tile, chunk_tiles=chunk_tiles)
        grads = torch.autograd.grad(out, (x, weight, bias), grad)
    finally:
        torch.set_num_threads(1)
    _close(out, ref, TOLERANCE[tile])
    for ours, theirs in zip(grads, torch.autograd.grad(ref, (x, weight, bias), grad)):
        _close(ours, theirs, TOLERANCE[tile])


def test_shared_backward_for_few_tiles_and_many_channels():
    torch.set_num_threads(2)
    try:
        assert winograd._shared_backward(2, 8, 4, 4, 256, 256)  # 32 tiles: a copy of dU would be 4 MB
        assert not winograd._shared_backward(4, 8, 32, 32, 64, 64)  # 512 tiles of 64 channels
    finally:
        torch.set_num_threads(1)
    assert not winograd._shared_backward(2, 8, 4, 4, 256, 256)  # one thread: no copies to save


@needs_kernels
@pytest.mark.parametrize("tile", winograd.TILES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_weight_read_and_its_gradient_written_in_its_own_layout(tile, layout):
    """The filter transforms read the weight in place; the weight's gradient comes in the weight's layout
    (autograd then accumulates it without a copy)."""
    x, weight, bias = _inputs((2, 16, 24, 6, 7))
    if layout == "channels_last":
        weight = weight.to(memory_format=torch.channels_last)
    else:  # every other input channel of a wider weight: not dense
        weight = torch.stack([weight, torch.randn_like(weight)], dim=2).flatten(1, 2)[:, ::2]
    weight.requires_grad_()
    out = winograd.winograd_conv3x3(x, weight, bias, tile=tile)
    ref = F.conv2d(x, weight, bias, padding=1)
    _close(out, ref, TOLERANCE[tile])
    grad = torch.randn_like(ref)
    (ours,) = torch.autograd.grad(out, weight, grad)
    (theirs,) = torch.autograd.grad(ref, weight, grad)
    _close(ours, theirs, TOLERANCE[tile])
    if layout == "channels_last":
        assert ours.stride() == weight.stride()


@pytest.mark.parametrize("tile", winograd.TILES)
def test_without_bias_and_partial_gradients(path, tile):
    x, weight, _ = _inputs((2, 8, 16, 7, 6), bias=False)
    weight.requires_grad_()
    out = winograd.winograd_conv3x3(x, weight, tile=tile)
    _close(out, F.conv2d(x, weight, padding=1), TOLERANCE[tile])
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, weight, grad)
    (ref,) = torch.autograd.grad(F.conv2d(x, weight, padding=1), weight, grad)
    _close(ours, ref, TOLERANCE[tile])


def _from_panels(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The kernels' (P, rows * cols) layout, 16-column panels, back to (P, rows, cols)."""
    panels = [packed[:, j * rows:(j + min(16, cols - j)) * rows].view(-1, rows, min(16, cols - j))
              for j in range(0, cols, 16)]
    return torch.cat(panels, dim=2)


@pytest.mark.parametrize("tile", winograd.TILES)
@pytest.mark.parametrize("k", [16, 24])
def test_transformed_weight_cache_and_its_gradient(path, tile, k):
    x, weight, bias = _inputs((2, 8, k, 6, 6))
    u = winograd.transform_weight(weight, tile)
    assert u.shape == ((tile + 2) ** 2, 8, k)
    cache = winograd.prepare_weight(weight, tile)  # the kernels' layout where they run
    _close(_from_panels(cache, 8, k) if path == "kernels" else cache, u, 1e-6)
    ref = F.conv2d(x, weight, bias, padding=1)
    with torch.no_grad():
        for given in (cache, u):  # one made for the other path's layout is recomputed
            out = winograd.winograd_conv3x3(x, weight, bias, tile=tile, transformed_weight=given)
            _close(out, ref, TOLERANCE[tile])
    weight.requires_grad_()  # the cache is a value: the weight still receives its gradient
    out = winograd.winograd_conv3x3(x, weight, bias, tile=tile, transformed_weight=cache)
    (ours,) = torch.autograd.grad(out.sum(), weight)
    (ref,) = torch.autograd.grad(F.conv2d(x, weight, bias, padding=1).sum(), weight)
    _close(ours, ref, TOLERANCE[tile])


@pytest.mark.parametrize("tile", winograd.TILES)
def test_float64_takes_the_reference_exactly(tile):
    x, weight, bias = _inputs((2, 3, 4, 5, 6), dtype=torch.float64)
    assert not winograd.has_fast_path(x, weight)
    _close(winograd.winograd_conv3x3(x, weight, bias, tile=tile), F.conv2d(x, weight, bias, padding=1), tol=1e-12)


@pytest.mark.parametrize("args, match", [((torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 5, 5)), "3, 3"),
                                         ((torch.zeros(1, 4, 4, 4), torch.zeros(3, 2, 3, 3)), "does not match"),
                                         ((torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 3, 3), torch.zeros(2)),
                                          "bias")])
def test_bad_shapes_raise(args, match):
    with pytest.raises(ValueError, match=match):
        winograd.winograd_conv3x3(*args)


@pytest.mark.parametrize("chunk_tiles", [0, 2.5])
def test_bad_chunk_raises(chunk_tiles):
    x, weight, _ = _inputs((1, 8, 8, 4, 4))
    with pytest.raises(ValueError, match="chunk_tiles"):
        winograd.winograd_conv3x3(x, weight, chunk_tiles=chunk_tiles)


def test_bad_tile_raises():
    with pytest.raises(ValueError, match="tile"):
        winograd.winograd_conv3x3(torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 3, 3), tile=3)
    with pytest.raises(ValueError, match="tile"):
        winograd.transform_weight(torch.zeros(3, 2, 3, 3), 6)


def test_missing_compiler_warns_and_uses_reference(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MINIDIFF_CACHE", str(tmp_path))
    winograd.load.cache_clear()
    try:
        x, weight, bias = _inputs((1, 8, 8, 4, 4))
        with pytest.warns(RuntimeWarning, match="winograd: the C\\+\\+ kernels are unavailable") as caught:
            out = [winograd.winograd_conv3x3(x, weight, bias) for _ in range(2)]
        assert len(caught) == 1 and not winograd.has_fast_path(x, weight)
        _close(out[1], F.conv2d(x, weight, bias, padding=1), TOLERANCE[4])
        assert not list(tmp_path.glob("**/*.so"))
    finally:
        winograd.load.cache_clear()  # later tests load the real library again


@needs_kernels
@pytest.mark.parametrize("training", [False, True])
def test_autotune_times_every_kernel_and_picks_the_fastest(monkeypatch, training):
    """The kernels take turns, AUTOTUNE_RUNS rounds, and each one's fastest call counts."""
    conv = torch.nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
    kernels = [None, *optimize_module.WINOGRAD_KERNELS]
    rounds = optimize_module.AUTOTUNE_RUNS
    # seconds per round: (4, 128) steadily fast, (2, 32) slow but for its fastest call (the last round)
    fake = dict(zip(kernels, [[5.0] * rounds, [4.0] * rounds, [1.0] * rounds, [3.0] * (rounds - 1) + [0.5],
                              [2.0] * rounds]))
    ran = []

    def seconds(fn):
        fn()  # the real call: every kernel must run on these shapes
        ran.append(fn.args[0])
        return fake[fn.args[0]][ran.count(fn.args[0]) - 1]

    monkeypatch.setattr(optimize_module, "_call_seconds", seconds)
    assert optimize_module._autotune(x, conv, training) == (2, 32)
    assert ran == kernels * rounds  # in turns, not one kernel's calls back to back
    assert conv.weight.grad is None  # the timing ran on copies


def test_kernel_choice_is_remembered_per_shape(monkeypatch):
    monkeypatch.setattr(optimize_module, "_KERNEL_CHOICES", {})
    tuned = []
    monkeypatch.setattr(optimize_module, "_autotune", lambda x, conv, training: tuned.append(x.shape) or (2, 32))
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    for shape in [(2, 16, 8, 8), (2, 16, 8, 8), (2, 16, 4, 4)]:
        assert optimize_module._kernel(torch.empty(shape), conv, False) == (2, 32)
    optimize_module._kernel(torch.empty(2, 16, 8, 8), conv, True)  # training: a new choice
    assert len(tuned) == 3


@pytest.fixture
def pair(seeded, monkeypatch):
    """(eager TINY unet, winograd-optimized copy), with every 3x3 convolution a candidate (TINY is narrow) and
    a stand-in autotuner: the 8x8 maps (batch 2) take F(4x4, 3x3) in inference and F(2x2, 3x3) in training,
    the 4x4 maps oneDNN. ``calls``: (input shape, tile) of every Winograd call."""
    monkeypatch.setattr(optimize_module, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(optimize_module, "_KERNEL_CHOICES", {})
    monkeypatch.setattr(optimize_module, "_autotune",
                        lambda x, conv, training: None if x.shape[-1] != 8 else (2, 32) if training else (4, 128))
    calls = []
    monkeypatch.setattr(optimize_module, "winograd_conv3x3",
                        lambda *a, **k: calls.append((a[0].shape, k["tile"])) or winograd.winograd_conv3x3(*a, **k))
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
    assert 0 < len(calls) < len(candidates) and all(s[2:] == (8, 8) and m == 4 for s, m in calls)
    calls.clear()
    grads = []
    for model in (unet.train(), fast.train()):
        model(x, t).square().mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert calls and all(s[2:] == (8, 8) and m == 2 for s, m in calls)
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


@pytest.mark.parametrize("kwargs, on", [({}, True), (dict(winograd=False), False), (dict(winograd=True), True),
                                        (dict(compile=True, compile_backend="eager"), False)])
def test_winograd_is_on_by_default_unless_compile(monkeypatch, seeded, kwargs, on):
    monkeypatch.setattr(optimize_module, "WINOGRAD_MIN_CHANNELS", 1)
    fast = minidiff.optimize(random_unet(TINY), **kwargs)
    assert ("forward" in vars(fast.conv_in)) == on

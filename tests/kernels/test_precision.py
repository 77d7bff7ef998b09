"""Reduced precision through ``minidiff.optimize(unet, dtype=...)``: the model computes under autocast while the
sampler's arithmetic stays float32; the choice per CPU (native bf16, float16, measured speed); restore()."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import minidiff
from minidiff.sampling import LossGuide

from conftest import TINY, random_unet

from minidiff.kernels import fast_path as optimize_module

SCHEDULERS = (minidiff.DDPMScheduler, minidiff.DDIMScheduler, minidiff.DPMSolverMultistepScheduler)


@pytest.fixture
def forced(monkeypatch):
    """optimize's reduced precision on any CPU: native support assumed and autocast chosen without timing (these
    tests are about numerics and dtypes; which path is faster is benchmarks/precision.py's question)."""
    monkeypatch.setattr(optimize_module, "_check_dtype", lambda dtype, device: dtype)
    monkeypatch.setattr(optimize_module, "_time_dtype", lambda unet, state, *args: state["dtype"])


@pytest.fixture
def fresh_messages(monkeypatch):
    """Forget which one-time warnings were given, so that a test sees its own."""
    monkeypatch.setattr(optimize_module, "_SAID", set())


def conv_out_dtypes(unet) -> list[torch.dtype]:
    """Records the dtype the model's last convolution computes in, one entry per forward."""
    seen = []
    unet.conv_out.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS)
def test_sampler_arithmetic_stays_float32(forced, scheduler_cls):
    """The model runs in bf16, while x_t, the model output the scheduler sees, x0, the update and the guides'
    gradients are float32, with classifier-free guidance and a loss guide through the unet."""
    torch.manual_seed(0)
    unet = minidiff.optimize(random_unet(dict(TINY, num_class_embeds=3)), dtype=torch.bfloat16)
    inside = conv_out_dtypes(unet)
    seen = []

    def loss(x0):
        seen.append(("guide x0", x0.dtype))
        return x0.square().mean((1, 2, 3))

    def callback(i, t, x, out):
        seen.extend([("x_t", x.dtype), ("prev_sample", out.prev_sample.dtype),
                     ("pred_original_sample", out.pred_original_sample.dtype)])

    samples = minidiff.sample(unet, scheduler_cls(), batch_size=2, num_inference_steps=3,
                              class_labels=torch.tensor([0, 1]), guidance_scale=3.0, guides=[LossGuide(loss, scale=0.1)],
                              guide_through_unet=True, generator=torch.Generator().manual_seed(0), callback=callback,
                              progress=False)
    assert inside and set(inside) == {torch.bfloat16}
    assert samples.dtype == torch.float32 and torch.isfinite(samples).all()
    assert {dtype for _, dtype in seen} == {torch.float32}
    assert {name for name, _ in seen} == {"guide x0", "x_t", "prev_sample", "pred_original_sample"}
    assert all(p.dtype == torch.float32 for p in unet.parameters())


def test_bf16_samples_close_to_float32(forced):
    """The same noise sampled by the shipped shapes model in float32 and bf16 (at 16x16, to be quick).
    Tolerance: bf16 keeps 8 significant bits (rounding 2^-9 per op), so a forward's output is off by ~1% (1.1%
    measured on TINY); the sampler is float32 and a trained denoiser pulls the chain towards the data, so the
    samples end about one such error apart: max 0.011-0.013, mean 0.003-0.004 of the [-1, 1] range measured for
    DDIM, DDPM and DPM-Solver with 10 steps. The bounds (max 0.05, i.e. ~6 of 255 grey levels; mean 0.01) leave
    4x margin for other CPUs' bf16 kernels and fail on any drift that compounds."""
    unet, scheduler = minidiff.pretrained("shapes-32")
    unet.config = unet.config.replace(sample_size=16)
    reduced = minidiff.optimize(copy.deepcopy(unet), dtype=torch.bfloat16)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for scheduler_cls in SCHEDULERS:
        sampler = scheduler_cls.from_config(scheduler.config)
        fp32, bf16 = (minidiff.sample(model, sampler, batch_size=2, num_inference_steps=10, noise=noise,
                                      generator=torch.Generator().manual_seed(1), progress=False)
                      for model in (unet, reduced))
        difference = (bf16 - fp32).abs()
        assert 0 < difference.max() < 0.05 and difference.mean() < 0.01, (scheduler_cls.__name__, difference.max())


def test_training_under_reduced_precision(forced):
    """Gradients reach float32 weights through the bf16 forward; the loss is computed on a float32 output."""
    torch.manual_seed(0)
    unet = minidiff.optimize(random_unet(TINY).train(), dtype=torch.bfloat16)
    inside = conv_out_dtypes(unet)
    out = unet(torch.randn(2, 3, 8, 8), torch.tensor([3, 700]))
    assert out.dtype == torch.float32 and inside == [torch.bfloat16]
    out.square().mean().backward()
    grads = [p.grad for p in unet.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_restore_undoes_the_dtype(forced):
    torch.manual_seed(0)
    unet = random_unet(TINY)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        expected = unet(x, t)
        minidiff.optimize(unet, dtype=torch.bfloat16)
        inside = conv_out_dtypes(unet)
        reduced = unet(x, t)
        minidiff.restore(unet)
        restored = unet(x, t)
        minidiff.optimize(unet)  # optimize again without dtype: float32
        optimized = unet(x, t)
    assert inside == [torch.bfloat16, torch.float32, torch.float32]
    assert 0 < (reduced - expected).abs().max() < 0.05 * expected.abs().max()
    assert torch.equal(restored, expected)
    torch.testing.assert_close(optimized, expected, rtol=1e-4, atol=1e-5)


def test_float16_on_a_cpu_without_it_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    with pytest.raises(ValueError, match="float16 on a CPU needs native float16"):
        minidiff.optimize(random_unet(TINY), dtype=torch.float16)


def test_no_native_bf16_warns_once_and_keeps_float32(monkeypatch, fresh_messages):
    """Emulated bf16 is slower than float32: say so once and keep float32 (on x86; elsewhere oneDNN decides)."""
    monkeypatch.setattr(optimize_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.warns(RuntimeWarning, match="no native bfloat16"):
        unet = minidiff.optimize(random_unet(TINY), dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minidiff.optimize(random_unet(TINY), dtype=torch.bfloat16)  # said once already
    inside = conv_out_dtypes(unet)
    with torch.no_grad():
        unet(torch.randn(1, 3, 8, 8), torch.tensor([5]))
    assert inside == [torch.float32]


@pytest.mark.parametrize("faster", [None, torch.bfloat16])
def test_the_faster_precision_is_kept_per_input_shape(monkeypatch, fresh_messages, faster):
    """On a CPU with native bf16 the first call of each input signature times float32 against autocast and keeps
    the faster (with a warning when that is float32); later calls of that signature reuse the choice."""
    monkeypatch.setattr(optimize_module, "_check_dtype", lambda dtype, device: dtype)
    timed = []

    def fastest(fns, runs):
        timed.append(sorted(map(str, fns)))
        for fn in fns.values():
            fn()  # the candidates run
        return faster

    monkeypatch.setattr(optimize_module, "_fastest", fastest)
    unet = minidiff.optimize(random_unet(TINY), dtype=torch.bfloat16)
    inside = conv_out_dtypes(unet)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for batch in (1, 1, 2):
            unet(torch.randn(batch, 3, 8, 8), torch.tensor([5] * batch))
    assert timed == [["None", "torch.bfloat16"]] * 2  # once per batch size
    chosen = faster or torch.float32
    # each timing runs float32 and bf16 once, then the call itself runs the chosen precision
    assert inside == [torch.float32, torch.bfloat16, chosen, chosen, torch.float32, torch.bfloat16, chosen]
    slower = [w for w in caught if "measured slower than float32" in str(w.message)]
    assert len(slower) == (1 if faster is None else 0)


def test_unsupported_dtypes_are_refused():
    for dtype in (torch.float64, torch.int8, "bf16"):
        with pytest.raises(ValueError, match="dtype="):
            minidiff.optimize(random_unet(TINY), dtype=dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_on_cuda_keeps_float32_outside():
    torch.manual_seed(0)
    unet = minidiff.optimize(random_unet(TINY).cuda(), dtype=torch.float16)
    inside = conv_out_dtypes(unet)
    out = minidiff.sample(unet, minidiff.DDIMScheduler(), batch_size=2, num_inference_steps=3, progress=False)
    assert out.dtype == torch.float32 and set(inside) == {torch.float16}

"""minidiff.optimize: same outputs and gradients as the eager model, same state_dict, reversible; the kernels it
chooses belong to that one model (other models and threads keep the pure-torch ops); a process that does not
call it compiles nothing."""
from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import minidiff
from minidiff.kernels import fused
from minidiff.kernels.fast_path import restore
from minidiff.models.functional import REFERENCE_OPS, UsesOps
from conftest import TINY, random_unet

ROOT = Path(__file__).resolve().parents[2]

CONDITIONAL = dict(_class_name="UNet2DConditionModel", sample_size=8, in_channels=4, out_channels=4,
                   block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
                   down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=12)
CASES = {"UNet2DModel": dict(TINY, num_class_embeds=5), "UNet2DConditionModel": CONDITIONAL}


def _inputs(unet: minidiff.UNet) -> tuple[torch.Tensor, torch.Tensor, dict]:
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)
    kwargs = {"encoder_hidden_states": torch.randn(2, 3, 12)} if c.is_conditional else \
        {"class_labels": torch.tensor([1, 4])}
    return x, torch.tensor([10, 900]), kwargs


def _close(ours: torch.Tensor, ref: torch.Tensor, floor: float = 1.0) -> None:
    """Equal to 1e-4 of the reference's largest value (or of ``floor``, if larger)."""
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * max(ref.abs().max().item(), floor), f"max abs difference {err}"


@pytest.fixture(params=list(CASES))
def pair(request, seeded):
    """(eager unet, optimized deep copy) with the same weights."""
    unet = random_unet(CASES[request.param])
    return unet, minidiff.optimize(copy.deepcopy(unet))


def test_inference_output_equals_eager(pair, kernel_calls):
    unet, fast = pair
    x, t, kwargs = _inputs(unet)
    with torch.no_grad():
        ref = unet(x, t, **kwargs)
        assert not kernel_calls  # the eager model runs the pure-torch ops
        out = fast(x, t, **kwargs)
    assert kernel_calls or not fused.cpu.load()  # the optimized one the C++ kernels
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert out.is_contiguous() and out.shape == ref.shape
    _close(out, ref)


def test_training_gradients_equal_eager(pair):
    unet, fast = pair
    x, t, kwargs = _inputs(unet)
    grads = []
    for model in (unet.train(), fast.train()):
        model.zero_grad()
        model(x, t, **kwargs).square().mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert all(g is not None for g in grads[1].values())
    # relative to each gradient's size, down to 1e-3 of the largest (a bias followed by a norm has a
    # gradient that is zero up to rounding)
    floor = 1e-3 * max(g.abs().max().item() for g in grads[0].values())
    for name, g in grads[0].items():
        _close(grads[1][name], g, floor=floor)


def test_state_dict_keys_and_values_unchanged(pair, tmp_path):
    unet, fast = pair
    ref, state = unet.state_dict(), fast.state_dict()
    assert list(state) == list(ref)
    assert all(torch.equal(state[k], ref[k]) for k in ref)
    minidiff.save_unet(fast, tmp_path)  # safetensors needs contiguous tensors: save_unet must make them
    loaded = minidiff.load_unet(tmp_path)
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_restore_undoes_everything(pair):
    unet, fast = pair
    x, t, kwargs = _inputs(unet)
    assert restore(fast) is fast
    assert fast.conv_in.weight.is_contiguous() and "forward" not in vars(fast)
    with torch.no_grad():
        _close(fast(x, t, **kwargs), unet(x, t, **kwargs))
    assert restore(fast) is fast  # restoring a plain model is a no-op


@pytest.fixture(scope="module")
def compiled_pair():
    """(eager, compiled) TINY unets with the cheap "eager" compile backend: that tests the wiring (dynamo
    through the ops dispatcher); inductor takes minutes here and runs in benchmarks/unet_vs_diffusers.py.
    Tests take deep copies, which reuse the traced graphs (one trace per mode, shared by the tests)."""
    torch.manual_seed(0)
    unet = random_unet(TINY)
    return unet, minidiff.optimize(copy.deepcopy(unet), compile=True, compile_backend="eager")


@pytest.mark.slow
def test_compiled_forward_equals_eager_and_keeps_gradients(compiled_pair):
    unet, fast = map(copy.deepcopy, compiled_pair)
    x, t, _ = _inputs(unet)
    with torch.no_grad():
        _close(fast.eval()(x, t), unet.eval()(x, t))
    fast.train()(x, t).square().mean().backward()
    assert all(p.grad is not None for p in fast.parameters())


@pytest.mark.slow
def test_frozen_graph_only_for_inference_on_its_weights(compiled_pair):
    """The frozen graph serves no-grad calls while the weights are unchanged; training calls and calls
    after an in-place weight update (optimizer step, load_state_dict) take the unfrozen graph."""
    unet = copy.deepcopy(compiled_pair[1])
    calls = []
    state = vars(unet)["_minidiff_optimize"]
    for name in ("frozen", "compiled"):  # stand-ins that log which graph runs ("eager" freezes nothing)
        state[name] = lambda *a, name=name, fn=state["compiled"], **k: calls.append(name) or fn(*a, **k)
    x, t, _ = _inputs(unet)
    with torch.no_grad():
        unet.eval()(x, t)
        unet(x, t)
    unet.train()(x, t).sum().backward()
    with torch.no_grad():
        unet.conv_in.bias.add_(1.0)
        unet.eval()(x, t)
    assert calls == ["frozen", "frozen", "compiled", "compiled"]


@pytest.mark.slow
def test_deepcopy_of_optimized_model_is_independent(compiled_pair):
    unet = copy.deepcopy(compiled_pair[1]).eval()
    twin = copy.deepcopy(unet)
    with torch.no_grad():
        twin.conv_out.bias.add_(1.0)
    x, t, _ = _inputs(unet)
    with torch.no_grad():
        assert not torch.allclose(twin(x, t), unet(x, t))
    restore(twin)
    assert "forward" in vars(unet)  # restoring the copy left the original optimized


@pytest.mark.parametrize("kwargs, error", [(dict(channels_last="yes"), TypeError), (dict(compile=1), TypeError)])
def test_bad_arguments_raise(kwargs, error, seeded):
    with pytest.raises(error, match=next(iter(kwargs))):
        minidiff.optimize(random_unet(TINY), **kwargs)
    with pytest.raises(TypeError, match="minidiff UNet"):
        minidiff.optimize(torch.nn.Linear(2, 2))


def _ops_modules(unet: minidiff.UNet) -> list[UsesOps]:
    return [m for m in unet.modules() if isinstance(m, UsesOps)]


@pytest.mark.parametrize("kernels, ops", [(None, fused.AUTO_OPS), ("cpu", fused.CPU_OPS),
                                          ("reference", REFERENCE_OPS)])
def test_kernels_belong_to_the_optimized_model_alone(kernels, ops, seeded):
    unet = random_unet(TINY)
    fast = minidiff.optimize(copy.deepcopy(unet), kernels=kernels, winograd=False)
    assert len(_ops_modules(fast)) > 4  # the UNet, its resnets and attentions
    assert all(m.ops is ops for m in _ops_modules(fast))
    assert all("ops" not in vars(m) and m.ops is REFERENCE_OPS for m in _ops_modules(unet))  # the original's
    twin = copy.deepcopy(fast)  # an EMA copy keeps the kernels (copies of the same Ops)
    assert all(m.ops == ops for m in _ops_modules(twin))
    restore(fast)
    assert all("ops" not in vars(m) and m.ops is REFERENCE_OPS for m in _ops_modules(fast))
    assert all(m.ops == ops for m in _ops_modules(twin))  # restoring the original left the copy optimized
    restore(twin)
    assert all(m.ops is REFERENCE_OPS for m in _ops_modules(twin))


def test_deepcopy_of_optimized_model_runs_the_kernels(seeded, kernel_calls):
    unet = random_unet(TINY)
    twin = copy.deepcopy(minidiff.optimize(copy.deepcopy(unet), winograd=False))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        _close(twin(x, t), unet(x, t))
    if fused.cpu.load() is not None:
        assert {kernel for kernel, _ in kernel_calls} == {"group_norm_act", "attention"}


@pytest.mark.parametrize("kernels", ["auto", "cpu", "reference"])
def test_optimized_model_pickles(kernels, seeded, kernel_calls):
    """torch.save(unet) of a whole optimized model (a bug: the "auto" ops were closures, which do not pickle)."""
    unet = random_unet(TINY)
    fast = minidiff.optimize(copy.deepcopy(unet), kernels=kernels)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        fast(x, t)  # the Winograd filter transforms are cached now: they pickle too
        loaded = pickle.loads(pickle.dumps(fast))
        assert all(m.ops == fast.ops for m in _ops_modules(loaded))
        kernel_calls.clear()
        _close(loaded(x, t), unet(x, t))
    assert bool(kernel_calls) == (kernels != "reference" and fused.cpu.load() is not None)


def test_environment_variable_sets_the_default_kernels(monkeypatch, seeded):
    monkeypatch.setenv("MINIDIFF_KERNELS", "cpu")
    fast = minidiff.optimize(random_unet(TINY), winograd=False)
    assert all(m.ops is fused.CPU_OPS for m in _ops_modules(fast))
    assert all(m.ops is fused.AUTO_OPS for m in _ops_modules(minidiff.optimize(fast, kernels="auto")))
    monkeypatch.setenv("MINIDIFF_KERNELS", "fast")
    with pytest.raises(ValueError, match="kernels='fast'"):
        minidiff.optimize(fast)


def test_compiled_model_keeps_the_reference_ops(compiled_pair):
    assert all("ops" not in vars(m) and m.ops is REFERENCE_OPS for m in _ops_modules(compiled_pair[1]))
    with pytest.raises(ValueError, match="compile=True traces the pure-torch ops"):
        minidiff.optimize(copy.deepcopy(compiled_pair[0]), compile=True, kernels="cpu")


@pytest.mark.parametrize("kernels", ["fast", "cuda", ""])
def test_unknown_kernels_raise(kernels, seeded):
    unet = random_unet(TINY)
    with pytest.raises(ValueError, match=r"kernels=.* allowed: \['auto', 'cpu', 'triton', 'reference'\]"):
        minidiff.optimize(unet, kernels=kernels)
    assert "_minidiff_optimize" not in vars(unet) and all("ops" not in vars(m) for m in _ops_modules(unet))


def test_threads_each_get_the_ops_of_their_own_model(seeded, kernel_calls):
    """Two threads at once, one with an optimized model, one with a plain model of the same architecture and
    weights, taking turns call by call: the plain model never calls a C++ kernel, the optimized one calls them
    in every forward, and both give the reference output. A process-wide switch of the ops, as minidiff once
    had, fails this."""
    if fused.cpu.load() is None:
        pytest.skip("no C++ compiler for the CPU kernels")
    rounds = 20
    plain = random_unet(TINY)
    fast = minidiff.optimize(copy.deepcopy(plain))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        want = plain(x, t)
        fast(x, t)  # first call: the Winograd autotuner, and the kernel calls of one forward
    per_forward = {kernel: sum(k == kernel for k, _ in kernel_calls) for kernel in ("group_norm_act", "attention")}
    assert all(per_forward.values()), per_forward
    kernel_calls.clear()
    turns, outputs, errors = threading.Barrier(2, timeout=60), {"plain": [], "optimized": []}, []

    def run(model: minidiff.UNet) -> None:
        try:
            for _ in range(rounds):
                turns.wait()
                with torch.no_grad():
                    outputs[threading.current_thread().name].append(model(x, t))
        except Exception as err:  # noqa: BLE001  (reported by the main thread)
            errors.append(err)
            turns.abort()

    threads = [threading.Thread(target=run, args=(model,), name=name)
               for name, model in (("plain", plain), ("optimized", fast))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert {thread for _, thread in kernel_calls} == {"optimized"}
    for kernel, count in per_forward.items():
        assert sum(k == kernel for k, _ in kernel_calls) == rounds * count
    assert len(outputs["plain"]) == len(outputs["optimized"]) == rounds
    for out in outputs["plain"]:  # the same ops (a thread may sum in another order: not bit for bit)
        torch.testing.assert_close(out, want)
    for out in outputs["optimized"]:
        _close(out, want)


_FRESH_PROCESS = """
import json, sys
import torch, torch.nn.functional as F
import minidiff
from minidiff.kernels import cpu, winograd
torch.manual_seed(0)
unet, scheduler = minidiff.pretrained("shapes-32")
small = minidiff.UNet.from_config({tiny})
x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
with torch.no_grad():
    plain = small(x, t)
if {optimize}:
    minidiff.optimize(small)
    minidiff.optimize(unet)
with torch.no_grad():
    out = small(x, t)
images = minidiff.sample(unet, scheduler, batch_size=1, num_inference_steps=2, progress=False,
                         generator=torch.Generator().manual_seed(0))
unet.train()  # a training step
x0, noise, t = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.tensor([5, 700])
F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t), noise).backward()
print(json.dumps(dict(error=(out - plain).abs().max().item(), images=list(images.shape),
                      grads=all(p.grad is not None for p in unet.parameters()),
                      loaded=[cpu._library not in (None, False), winograd.load.cache_info().currsize > 0])))
"""


def _fresh_process(cache: Path, optimize: bool) -> tuple[dict, str]:
    code = _FRESH_PROCESS.format(tiny=TINY, optimize=optimize)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINIDIFF_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("MINIDIFF_KERNELS", None)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.multiprocess
def test_fresh_process_with_defaults_compiles_nothing(tmp_path):
    """Build a UNet, load the shipped model, sample and take a training step: pure PyTorch, nothing built or
    loaded, the cache directory left empty."""
    cache = tmp_path / "cache"
    cache.mkdir()
    report, stderr = _fresh_process(cache, optimize=False)
    assert report["images"] == [1, 3, 32, 32] and report["grads"] and report["error"] == 0
    assert report["loaded"] == [False, False]
    assert not list(cache.rglob("*")) and "compiling" not in stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fresh_process_optimize_builds_what_it_uses(tmp_path):
    """``minidiff.optimize`` in a fresh process compiles the C++ and Winograd kernels into the cache, saying so
    on stderr, and the optimized model gives the plain model's outputs."""
    if fused.cpu.load() is None:
        pytest.skip("no C++ compiler for the CPU kernels")
    report, stderr = _fresh_process(tmp_path, optimize=True)
    assert report["loaded"] == [True, True] and report["grads"] and report["error"] < 1e-4
    libraries = sorted(p.name.split("_")[0] for p in (tmp_path / "kernels").glob("*.so"))
    assert libraries == ["ops", "winograd"]
    assert stderr.count("minidiff: compiling the C++ kernels") == 2

"""minidiff.optimize: same outputs and gradients as the eager model, same state_dict, reversible."""
from __future__ import annotations

import copy

import pytest
import torch

import minidiff
from minidiff.kernels.optimize import restore
from conftest import TINY, random_unet

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


def test_inference_output_equals_eager(pair):
    unet, fast = pair
    x, t, kwargs = _inputs(unet)
    with torch.no_grad():
        ref, out = unet(x, t, **kwargs), fast(x, t, **kwargs)
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


def test_compiled_forward_equals_eager_and_keeps_gradients(compiled_pair):
    unet, fast = map(copy.deepcopy, compiled_pair)
    x, t, _ = _inputs(unet)
    with torch.no_grad():
        _close(fast.eval()(x, t), unet.eval()(x, t))
    fast.train()(x, t).square().mean().backward()
    assert all(p.grad is not None for p in fast.parameters())


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

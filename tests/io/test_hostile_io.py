"""Hostile model folders: each case raises an error from minidiff that names the culprit, or loads correctly;
nothing hangs, nothing loads silently wrong."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import minidiff
from conftest import TINY

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    minidiff.save_unet(minidiff.UNet.from_config(TINY), tmp_path / "unet")
    return tmp_path / "unet"


def _shard(folder, names: list[str]) -> dict[str, str]:
    """Split the folder's weights into two shards written as ``names``; returns the weight map."""
    state = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    keys = sorted(state)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
    weight_map = {}
    for name, part in zip(names, halves):
        target = folder / name if not os.path.isabs(name) else name
        save_file({k: state[k] for k in part}, str(target))
        weight_map.update(dict.fromkeys(part, name))
    (folder / f"{WEIGHTS}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


def test_a_sharded_folder_loads(folder):
    reference = minidiff.load_unet(folder).state_dict()
    _shard(folder, ["a.safetensors", "b.safetensors"])
    loaded = minidiff.load_unet(folder).state_dict()
    assert all(torch.equal(reference[k], loaded[k]) for k in reference)


@pytest.mark.timeout(20)
def test_a_fifo_shard_is_refused_not_read(folder):
    _shard(folder, ["a.safetensors", "b.safetensors"])
    (folder / "b.safetensors").unlink()
    os.mkfifo(folder / "b.safetensors")
    with pytest.raises(ValueError, match=r"b\.safetensors: not a regular file"):
        minidiff.load_unet(folder)


@pytest.mark.timeout(20)
def test_a_fifo_weights_file_is_refused_not_read(folder):
    (folder / WEIGHTS).unlink()
    os.mkfifo(folder / WEIGHTS)
    with pytest.raises(ValueError, match="not a regular file"):
        minidiff.load_unet(folder)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "sub/b.safetensors", "ABSOLUTE"])
def test_shard_names_must_stay_inside_the_folder(folder, tmp_path, bad):
    (folder / "sub").mkdir()
    bad = str(tmp_path / "abs.safetensors") if bad == "ABSOLUTE" else bad
    _shard(folder, ["a.safetensors", bad])
    with pytest.raises(ValueError, match="must be a file name in"):
        minidiff.load_unet(folder)


def test_a_tensor_in_two_shards_is_refused(folder):
    weight_map = _shard(folder, ["a.safetensors", "b.safetensors"])
    a = load_file(folder / "a.safetensors")
    b = load_file(folder / "b.safetensors")
    key = next(iter(a))
    save_file({**b, key: a[key]}, str(folder / "b.safetensors"))
    with pytest.raises(ValueError, match=rf"{key}.*two shards, a\.safetensors and b\.safetensors"):
        minidiff.load_unet(folder)
    assert weight_map


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weights_of_another_dtype_are_converted_to_the_models(folder, dtype):
    reference = minidiff.load_unet(folder)
    state = load_file(folder / WEIGHTS)
    save_file({k: v.to(dtype) for k, v in state.items()}, str(folder / WEIGHTS))
    loaded = minidiff.load_unet(folder)
    assert loaded.dtype == torch.float32 and all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():  # runs, and close to the float32 weights (rounded to dtype)
        assert torch.allclose(loaded(x, 5), reference(x, 5), atol=0.05)
    assert minidiff.load_unet(folder, dtype=torch.float64).dtype == torch.float64


def test_mixed_dtypes_are_refused_naming_the_tensors(folder):
    state = load_file(folder / WEIGHTS)
    state["conv_in.weight"] = state["conv_in.weight"].half()
    save_file(state, str(folder / WEIGHTS))
    with pytest.raises(ValueError, match=r"one floating dtype.*float16: conv_in\.weight"):
        minidiff.load_unet(folder)


def test_integer_weights_are_refused(folder):
    state = load_file(folder / WEIGHTS)
    state = {k: v.to(torch.int32) for k, v in state.items()}
    save_file(state, str(folder / WEIGHTS))
    with pytest.raises(ValueError, match="int32"):
        minidiff.load_unet(folder)


def test_a_bad_dtype_argument_is_refused(folder):
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        minidiff.load_unet(folder, dtype="float16")


# ------------------------------------------------------------------------------------ found by the issue-19 attack
@pytest.mark.parametrize("path", [None, 123, ""])
def test_a_path_that_is_not_a_path_is_named(path):
    with pytest.raises(TypeError, match=r"path=.*: expected a folder path"):
        minidiff.load_unet(path)


def test_a_config_nested_too_deeply_is_malformed_json(folder):
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"config\.json: malformed JSON \(nested too deeply\)"):
        minidiff.load_unet(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(folder, value):
    state = load_file(folder / WEIGHTS)
    state["conv_in.bias"] = torch.full_like(state["conv_in.bias"], value)
    save_file(state, str(folder / WEIGHTS))
    with pytest.raises(ValueError, match=r"1 tensors hold NaN or inf values: conv_in\.bias"):
        minidiff.load_unet(folder)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(variant="../x"), ValueError, r"variant='\.\./x': expected None or a name such as 'fp16'"),
    (dict(variant=""), ValueError, r"variant='': expected None or a name"),
    (dict(variant=5), ValueError, r"variant=5: expected None or a name"),
    (dict(device="gpu"), ValueError, r"load_unet: device='gpu' is not a torch device"),
    (dict(strict="no"), TypeError, r"load_unet: strict='no': expected bool"),
])
def test_bad_load_options_are_named(folder, kwargs, error, message):
    with pytest.raises(error, match=message):
        minidiff.load_unet(folder, **kwargs)


@pytest.mark.parametrize("config, error, message", [
    ({"_class_name": ["DDIMScheduler"]}, ValueError, r"scheduler \['DDIMScheduler'\] is not supported"),
    ({"_class_name": "DDIMScheduler", "num_train_timesteps": 10 ** 11}, ValueError,
     r"num_train_timesteps must be in \[1, 1000000\]"),
    ({"_class_name": "DDIMScheduler", "num_train_timesteps": 3, "trained_betas": "abc"}, TypeError,
     r"trained_betas: expected a list of floats"),
])
def test_bad_scheduler_configs_are_named(tmp_path, config, error, message):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=message):
        minidiff.load_scheduler(tmp_path)


def test_saving_something_else_or_onto_a_file_is_refused(tmp_path):
    with pytest.raises(TypeError, match=r"save_unet: unet must be a minidiff.UNet, got Linear"):
        minidiff.save_unet(torch.nn.Linear(2, 2), tmp_path / "linear")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match=r"a_file: exists and is not a folder"):
        minidiff.save_unet(minidiff.UNet.from_config(TINY), tmp_path / "a_file")
    with pytest.raises(TypeError, match=r"save_pipeline: scheduler must be a minidiff scheduler, got NoneType"):
        minidiff.save_pipeline(minidiff.UNet.from_config(TINY), None, tmp_path / "pipe")

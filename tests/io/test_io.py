"""diffusers-format I/O: round trips both ways, every layout, strictness and safety."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

import minidiff
from minidiff.io import folders as io
from conftest import TINY, diffusers_twin


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return minidiff.UNet.from_config(TINY).eval()


def _same_output(a, b) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out_a, out_b = a(x, 7), b(x, 7)
    out_a = getattr(out_a, "sample", out_a)
    out_b = getattr(out_b, "sample", out_b)
    assert torch.allclose(out_a, out_b, atol=1e-5), (out_a - out_b).abs().max()


def test_minidiff_save_then_diffusers_loads(unet, tmp_path):
    from diffusers import UNet2DModel
    minidiff.save_unet(unet, tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "UNet2DModel"
    _same_output(unet, UNet2DModel.from_pretrained(tmp_path))


@pytest.mark.parametrize("safe", [True, False])
def test_diffusers_save_then_minidiff_loads(unet, tmp_path, safe):
    diffusers_twin(unet).save_pretrained(tmp_path, safe_serialization=safe)
    loaded = minidiff.load_unet(tmp_path)
    assert loaded.config == unet.config
    _same_output(unet, loaded)


def test_sharded_and_variant_checkpoints(unet, tmp_path):
    diffusers_twin(unet).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _same_output(unet, minidiff.load_unet(tmp_path / "sharded"))
    diffusers_twin(unet).save_pretrained(tmp_path / "variant", variant="fp16")
    _same_output(unet, minidiff.load_unet(tmp_path / "variant", variant="fp16"))


def test_pipeline_folder_both_ways(unet, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler
    DDPMPipeline(diffusers_twin(unet), DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(tmp_path / "d")
    loaded, scheduler = io.load_pipeline(tmp_path / "d")
    _same_output(unet, loaded)
    assert isinstance(scheduler, minidiff.DDPMScheduler)
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
    io.save_pipeline(unet, scheduler, tmp_path / "m")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "m")
    _same_output(unet, pipe.unet)
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"


def test_flat_google_layout_with_legacy_bin(unet, tmp_path):
    """google/ddpm-*: config.json, a .bin with pre-0.15 attention names, scheduler_config.json at the root."""
    legacy = {}
    for key, value in unet.state_dict().items():
        for old, new in io.LEGACY_ATTENTION_NAMES.items():
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert any(".query." in k for k in legacy) and any(".proj_attn." in k for k in legacy)
    torch.save(legacy, tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(unet.config.to_dict()))
    (tmp_path / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.0", "beta_end": 0.02, "beta_schedule": "linear",
         "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
         "variance_type": "fixed_large", "timestep_values": None}))
    loaded, scheduler = io.load_pipeline(tmp_path)
    _same_output(unet, loaded)
    assert scheduler.config.variance_type == "fixed_large"
    from diffusers import UNet2DModel  # the oracle agrees on the legacy file
    _same_output(loaded, UNet2DModel.from_pretrained(tmp_path))


def test_strict_loading_lists_every_problem(unet, tmp_path):
    state = unet.state_dict()
    state.pop("conv_in.bias")
    state["extra.weight"] = torch.zeros(2)
    state["conv_out.weight"] = torch.zeros(3, 16, 1, 1)
    from safetensors.torch import save_file
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(unet.config.to_dict()))
    with pytest.raises(ValueError) as err:
        minidiff.load_unet(tmp_path)
    msg = str(err.value)
    assert "missing: conv_in.bias (16,)" in msg
    assert "unexpected: extra.weight (2,)" in msg
    assert "shape mismatch: conv_out.weight checkpoint (3, 16, 1, 1) vs model (3, 16, 3, 3)" in msg


def test_corrupt_truncated_and_malicious_files(unet, tmp_path):
    minidiff.save_unet(unet, tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors.*truncated or corrupt"):
        minidiff.load_unet(tmp_path)
    weights.unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(tmp_path / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"conv_in.weight": Evil()}, f)
    with pytest.raises(ValueError, match="diffusion_pytorch_model.bin"):
        minidiff.load_unet(tmp_path)


def test_malformed_config_and_missing_files(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: malformed JSON"):
        minidiff.load_unet(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        minidiff.load_unet(tmp_path / "..")
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY, down_block_types=["DownBlock2D", "WeirdBlock"])))
    with pytest.raises(ValueError, match="WeirdBlock"):
        minidiff.load_unet(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors"):
        minidiff.load_unet(tmp_path)


def test_a_crash_while_saving_keeps_the_previous_file(unet, tmp_path, monkeypatch):
    minidiff.save_unet(unet, tmp_path)
    before = (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        open(args[1], "wb").write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(io, "save_file", crash)
    with torch.no_grad():
        unet.conv_in.weight.add_(1)
    with pytest.raises(KeyboardInterrupt):
        minidiff.save_unet(unet, tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]

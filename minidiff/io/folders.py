"""diffusers-format folders: read and write UNets, schedulers and pipelines, strictly and safely.

Reads a model folder (config.json + diffusion_pytorch_model.safetensors, sharded safetensors with an
index, or an old ``.bin`` pickle through ``torch.load(weights_only=True)``), a pipeline folder
(model_index.json + unet/ + scheduler/) and the flat layout of the google/ddpm-* repos. Legacy attention
names (query/key/value/proj_attn) are renamed on load. Never executes code from a file; every write goes
to a temporary file first and is renamed into place.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checks import check_device, check_finite_tensors, check_type
from ..files import DIFFUSERS_VERSION, atomic_path, component_dir, read_json, write_json
from ..models import UNet, UNetConfig
from ..schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, Scheduler, UniPCMultistepScheduler

WEIGHTS_NAME = "diffusion_pytorch_model"
SCHEDULERS = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler,
              "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
              "UniPCMultistepScheduler": UniPCMultistepScheduler}
# pre-0.15 attention blocks (diffusers PR #3387): old projection name -> current name
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"\.(query|key|value|proj_attn)\.(weight|bias)$")


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors or .bin file; an unreadable, truncated or corrupt file raises an error naming it."""
    if not path.is_file():  # a FIFO or device would block or stream forever
        raise ValueError(f"{path}: not a regular file")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as err:
        raise PermissionError(f"{path}: cannot read weights ({err.strerror})") from None
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read weights, the file is truncated or corrupt ({err})") from None
    except Exception as err:  # pickle.UnpicklingError for anything weights_only refuses to execute
        raise ValueError(f"{path}: refused to load: not a plain tensor checkpoint ({err})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path}: expected a flat dict of tensors (a state_dict)")
    return state


def _shard_path(folder: Path, index: Path, shard: Any) -> Path:
    """``folder / shard`` for a shard name of a sharded index: a plain file name inside the folder."""
    if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
        raise ValueError(f"{index}: shard name {shard!r} must be a file name in {folder} (no directories)")
    return folder / shard


def _read_shards(folder: Path, index: Path) -> dict[str, torch.Tensor]:
    """The tensors of every shard an index names; a tensor found in two shards is an error."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: missing or empty 'weight_map'")
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for shard in sorted(set(map(str, weight_map.values()))):
        for key, tensor in _read_weights_file(_shard_path(folder, index, shard)).items():
            if key in state:
                raise ValueError(f"{index}: tensor {key!r} is in two shards, {origin[key]} and {shard}")
            state[key], origin[key] = tensor, shard
    return state


def load_state_dict(folder: str | os.PathLike, variant: str | None = None) -> dict[str, torch.Tensor]:
    """The weights in a model folder: safetensors first, then a sharded index, then ``.bin``."""
    folder = Path(folder)
    if variant is not None and not (isinstance(variant, str) and re.fullmatch(r"[\w\-]+", variant)):
        raise ValueError(f"variant={variant!r}: expected None or a name such as 'fp16' (letters, digits, '_', '-')")
    stem = WEIGHTS_NAME if variant is None else f"{WEIGHTS_NAME}.{variant}"
    for ext in ("safetensors", "bin"):
        single = folder / f"{stem}.{ext}"
        if single.exists():
            return rename_legacy_keys(_read_weights_file(single))
        index = folder / f"{stem}.{ext}.index.json"
        if index.exists():
            if not index.is_file():
                raise ValueError(f"{index}: not a regular file")
            return rename_legacy_keys(_read_shards(folder, index))
    raise FileNotFoundError(f"{folder}: no {stem}.safetensors, {stem}.bin or sharded index found")


def check_dtypes(state: dict[str, torch.Tensor], source: str | os.PathLike) -> torch.dtype:
    """The one floating dtype of a checkpoint's tensors; mixed or non-floating dtypes raise a ValueError
    naming the tensors."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key, tensor in state.items():
        by_dtype.setdefault(tensor.dtype, []).append(key)
    odd = {dtype: keys for dtype, keys in by_dtype.items() if not dtype.is_floating_point}
    if odd or len(by_dtype) > 1:
        listing = "; ".join(f"{str(d).removeprefix('torch.')}: {', '.join(keys[:3])}"
                            f"{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}" for d, keys in by_dtype.items())
        raise ValueError(f"{source}: the weights must all have one floating dtype, found {listing}")
    return next(iter(by_dtype), torch.float32)


def rename_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename pre-0.15 attention keys (``attentions.0.query.weight`` -> ``attentions.0.to_q.weight``)."""
    return {_LEGACY_KEY.sub(lambda m: f".{LEGACY_ATTENTION_NAMES[m[1]]}.{m[2]}", k): v for k, v in state.items()}


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise one ValueError listing every missing, unexpected and mis-shaped tensor."""
    expected = model.state_dict()
    problems = [f"  missing: {k} {tuple(v.shape)}" for k, v in expected.items() if k not in state]
    problems += [f"  unexpected: {k} {tuple(v.shape)}" for k, v in state.items() if k not in expected]
    problems += [f"  shape mismatch: {k} checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if problems:
        raise ValueError(f"weights do not match the {type(model).__name__} config "
                         f"({len(problems)} problems):\n" + "\n".join(problems))


def load_unet(path: str | os.PathLike, *, variant: str | None = None, dtype: torch.dtype | None = None,
              device: str | torch.device | None = None, strict: bool = True) -> UNet:
    """A UNet from a model folder, a pipeline folder (its ``unet/``) or a flat repo. With ``strict``
    (the default) any missing, unexpected or mis-shaped tensor is an error. The weights are converted to
    ``dtype`` (default float32, whatever the file holds, e.g. ``variant="fp16"``); a file mixing dtypes is refused."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"load_unet: dtype must be a floating torch.dtype, got {dtype!r}")
    device = check_device("load_unet: device", device)
    check_type("load_unet: strict", strict, "bool")
    folder = component_dir(path, "unet", "config.json")
    config = UNetConfig.from_dict(read_json(folder / "config.json"))
    state = load_state_dict(folder, variant)
    check_dtypes(state, folder)
    check_finite_tensors(state, folder)
    dtype = dtype or torch.float32
    state = {key: tensor.to(dtype) for key, tensor in state.items()}
    if strict:  # every tensor comes from the file: skip the random initialisation
        with torch.device("meta"):
            unet = UNet(config)
        check_state_dict(unet, state)
        unet.load_state_dict(state, assign=True)
    else:
        unet = UNet(config)
        unet.load_state_dict(state, strict=False)
    return unet.to(device=device, dtype=dtype).eval()


def _output_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder to write into, created if missing; an existing file there is an error."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder; pass a folder path to write the model into")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_unet(unet: UNet, path: str | os.PathLike, *, safe_serialization: bool = True) -> None:
    """Write config.json and the weights (safetensors by default, ``.bin`` if asked) atomically."""
    if not isinstance(unet, UNet):
        raise TypeError(f"save_unet: unet must be a minidiff.UNet, got {type(unet).__name__}")
    folder = _output_folder(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unet.state_dict().items()}
    weights = folder / f"{WEIGHTS_NAME}.{'safetensors' if safe_serialization else 'bin'}"
    with atomic_path(weights) as tmp:
        if safe_serialization:
            save_file(state, tmp, metadata={"format": "pt"})
        else:
            torch.save(state, tmp)
    write_json(folder / "config.json", unet.config.to_dict())


def load_scheduler(path: str | os.PathLike) -> DDPMScheduler | DDIMScheduler:
    """The scheduler of a pipeline or scheduler folder, of the class its config names."""
    folder = component_dir(path, "scheduler", "scheduler_config.json")
    config = read_json(folder / "scheduler_config.json")
    name = config.get("_class_name", "DDPMScheduler")
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise ValueError(f"{folder / 'scheduler_config.json'}: scheduler {name!r} is not supported; "
                         f"allowed: {sorted(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)


def load_pipeline(path: str | os.PathLike, **unet_kwargs: Any) -> tuple[UNet, DDPMScheduler | DDIMScheduler]:
    """(unet, scheduler) from a diffusers DDPM/DDIM pipeline folder or a flat google/ddpm-* repo."""
    return load_unet(path, **unet_kwargs), load_scheduler(path)


def save_pipeline(unet: UNet, scheduler: DDPMScheduler | DDIMScheduler, path: str | os.PathLike,
                  pipeline_class: str | None = None) -> None:
    """Write a pipeline folder (model_index.json, unet/, scheduler/) that diffusers' DDPMPipeline loads."""
    if not isinstance(scheduler, Scheduler):
        raise TypeError(f"save_pipeline: scheduler must be a minidiff scheduler, got {type(scheduler).__name__}")
    folder = _output_folder(path)
    save_unet(unet, folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    scheduler_class = type(scheduler).__name__
    pipeline_class = pipeline_class or ("DDIMPipeline" if scheduler_class == "DDIMScheduler" else "DDPMPipeline")
    write_json(folder / "model_index.json", {
        "_class_name": pipeline_class, "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", scheduler_class], "unet": ["diffusers", unet.config.model_class]})

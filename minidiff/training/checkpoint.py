"""Training checkpoints on disk: the folder format, atomic writes, the newest one, pruning, RNG states.

A checkpoint is the folder ``<root>/step_XXXXXXX`` holding ``unet/`` (trained weights) and ``ema/`` (EMA
weights), both diffusers model folders, ``text_encoder/`` and ``ema_text_encoder/`` when a text encoder
trains, ``training_state.pt`` (optimizer, loss scaler, the RNG states of every process; read back with
``weights_only=True``) and ``trainer_state.json`` (step, data position, EMA update count, config). It is
written under a temporary name beside it and renamed into place only when complete: a crash mid-write never
leaves a half-written ``step_*`` folder, and older ones are untouched.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..files import atomic_path, read_json, write_json
from ..io.folders import check_state_dict, load_state_dict, save_unet

TRAINING_STATE, TRAINER_STATE = "training_state.pt", "trainer_state.json"
TRAINER_STATE_KEYS = frozenset({"step", "ema_num_updates", "total_steps", "config"})
LOCK_NAME = ".lock"

STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; rename it to ``path`` if the block succeeds,
    delete it if it raises. ``path`` must not exist yet."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; refusing to overwrite a checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint is readable like any folder
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints."""
    for _, folder in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(folder)


def remove_partial(root: str | os.PathLike) -> None:
    """Delete the temporary folders a killed writer left under ``root`` (call before writing starts)."""
    for leftover in Path(root).glob(".step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def _folders(net: nn.Module, ema_net: nn.Module | None) -> dict[str, nn.Module]:
    """Checkpoint subfolder -> module, for a ConditionedUNet (``.unet``, ``.text_encoder``) and its EMA."""
    folders = {"unet": net.unet, "ema": ema_net and ema_net.unet, "text_encoder": net.text_encoder,
               "ema_text_encoder": ema_net and ema_net.text_encoder}
    return {name: module for name, module in folders.items() if module is not None}


def save_checkpoint(folder: str | os.PathLike, *, net: nn.Module, ema_net: nn.Module | None,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                    rng_states: list[dict[str, Any]], info: dict[str, Any]) -> Path:
    """Write a checkpoint folder atomically (see the module docstring); ``net`` is the trained
    ConditionedUNet, ``ema_net`` its EMA copy or None."""
    with atomic_dir(folder) as tmp:
        for name, module in _folders(net, ema_net).items():
            if name in ("unet", "ema"):
                save_unet(module, tmp / name)
            else:
                module.save_pretrained(tmp / name)
        with atomic_path(tmp / TRAINING_STATE) as state_file:
            torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                        "rng": rng_states}, state_file)
        write_json(tmp / TRAINER_STATE, info)
    return Path(folder)


def load_checkpoint(folder: str | os.PathLike, *, net: nn.Module, ema_net: nn.Module | None,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load a checkpoint into the given objects; returns (trainer_state.json, per-process RNG states)."""
    folder = Path(folder)
    info = read_json(folder / TRAINER_STATE)
    missing = sorted(TRAINER_STATE_KEYS - info.keys())
    if missing:
        raise ValueError(f"{folder / TRAINER_STATE}: missing keys {missing}")
    for name, module in _folders(net, ema_net).items():
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"{folder}: no {name}/ weights, but this run trains them"
                                    + (" (ema_decay > 0)" if name.startswith("ema") else ""))
        if name in ("unet", "ema"):
            _load_weights(module, folder / name)
        else:
            module.load_weights(folder / name)
    try:
        state = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
    except Exception as err:  # truncated zip, refused pickle, missing or mismatched entries
        raise ValueError(f"{folder / TRAINING_STATE}: cannot restore the optimizer state ({type(err).__name__}: "
                         f"{err})") from None
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    return info, state["rng"]


def _load_weights(model: nn.Module, folder: Path) -> None:
    state = load_state_dict(folder)
    check_state_dict(model, state)
    model.load_state_dict(state)


# ------------------------------------------------------------------------------------------ one run per folder
def lock_output_dir(folder: str | os.PathLike) -> Any:
    """An exclusive lock on ``folder`` (``folder/.lock``) held while the returned file stays open; raises
    RuntimeError when another process holds it: two runs writing into one folder would mix their files."""
    path = Path(folder) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RuntimeError(f"{folder}: another training run is writing to this folder (it holds {path}); "
                           "wait for it to finish or use another output_dir") from None
    return handle


def dataset_identity(dataset: Any, first_item: torch.Tensor) -> dict[str, Any]:
    """What tells one dataset from another without reading it all: its length, the item shape and a hash of
    the first item (not its class: a wrapper around the same data is the same data)."""
    digest = hashlib.sha256(first_item.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"length": len(dataset), "item_shape": list(first_item.shape), "first_item_sha256": digest}


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """The differences between two fingerprints, as readable "key: old -> new" lines."""
    changes = []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += fingerprint_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


# ------------------------------------------------------------------------------------------ RNG
def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a training step reads: python, numpy, torch CPU and CUDA, and ``generator``.
    Only tensors and plain Python values, so ``torch.load(weights_only=True)`` reads it back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    """Inverse of ``capture_rng``."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])

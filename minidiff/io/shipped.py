"""Models shipped inside the package (``minidiff/shipped/<name>/``), as diffusers pipeline folders
(``model_index.json``, ``unet/``, ``scheduler/``, and a README.md model card saying how each was trained)."""
from __future__ import annotations

from pathlib import Path

from ..models import UNet
from ..schedulers import DDIMScheduler, DDPMScheduler
from .folders import load_pipeline

ROOT = Path(__file__).parent.parent / "shipped"


def list_pretrained() -> list[str]:
    """Names of the shipped models, e.g. ``["shapes-32"]``."""
    return sorted(p.name for p in ROOT.iterdir() if (p / "model_index.json").is_file())


def pretrained_path(name: str) -> Path:
    """The pipeline folder of shipped model ``name``."""
    names = list_pretrained()
    if name not in names:
        raise ValueError(f"unknown pretrained model {name!r}; shipped models: {names}")
    return ROOT / name


def pretrained(name: str) -> tuple[UNet, DDPMScheduler | DDIMScheduler]:
    """(unet, scheduler) of shipped model ``name`` (see ``list_pretrained()``), the unet in eval mode."""
    return load_pipeline(pretrained_path(name))

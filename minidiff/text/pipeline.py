"""A text-to-image pipeline folder: diffusers' ``unet/`` and ``scheduler/`` plus minidiff's ``text_encoder/``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..io import load_pipeline, save_pipeline
from ..models import UNet
from ..schedulers import Scheduler
from .encoder import TextEncoder

Encode = Callable[[Sequence[str]], Tensor]


def save_text_pipeline(unet: UNet, scheduler: Scheduler, text_encoder: TextEncoder,
                       path: str | os.PathLike) -> None:
    """Write ``unet/``, ``scheduler/``, ``model_index.json`` and ``text_encoder/`` into ``path``."""
    save_pipeline(unet, scheduler, path)
    text_encoder.save_pretrained(Path(path) / "text_encoder")


def load_text_pipeline(path: str | os.PathLike, device: torch.device | str | None = None
                       ) -> tuple[UNet, Scheduler, Encode]:
    """``(unet, scheduler, encode)`` from a folder ``save_text_pipeline`` (or the Trainer) wrote, where
    ``encode(prompts) -> (B, L, C)`` runs the text encoder without gradients; ``encode([""])`` is the
    unconditional context that classifier-free guidance contrasts with."""
    unet, scheduler = load_pipeline(path, device=device)
    folder = Path(path) / "text_encoder"
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: no text_encoder/ folder; not a text-to-image pipeline")
    encoder = TextEncoder.from_pretrained(folder).to(unet.device)
    if not unet.config.is_conditional or encoder.width not in unet.config.cross_attention_dims:
        raise ValueError(f"{path}: the text encoder's width {encoder.width} does not match the UNet's "
                         f"cross_attention_dim {unet.config.cross_attention_dim}")

    @torch.no_grad()
    def encode(prompts: Sequence[str]) -> Tensor:
        return encoder(prompts).to(unet.dtype)
    encode.encoder = encoder  # the module itself, for inspection
    return unet, scheduler, encode

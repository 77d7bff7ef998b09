"""What the training loop checks and installs before it starts: the model/image check, the autocast
dtype, seeding, gradient checkpointing of the UNet's blocks, and the SIGINT/SIGTERM handlers."""
from __future__ import annotations

import contextlib
import random
import signal
import threading
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..models import UNet
from ..sampling.editing import check_images
from ..schedulers import Scheduler
from .config import TrainConfig


def check_arguments(unet: Any, scheduler: Any, dataset: Any, config: Any) -> None:
    """The Trainer's arguments: a minidiff UNet and scheduler, a non-empty dataset, a TrainConfig whose
    output_dir is a folder and whose sample grids fit the scheduler."""
    for name, value, kind in (("unet", unet, UNet), ("scheduler", scheduler, Scheduler),
                              ("config", config, TrainConfig)):
        if not isinstance(value, kind):
            raise TypeError(f"{name} must be a minidiff {kind.__name__}, got {type(value).__name__}")
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__") or len(dataset) == 0:
        got = "an empty dataset" if hasattr(dataset, "__len__") else type(dataset).__name__
        raise ValueError(f"dataset must be a non-empty map-style dataset (len and [i]), got {got}")
    if Path(config.output_dir).exists() and not Path(config.output_dir).is_dir():
        raise FileExistsError(f"TrainConfig.output_dir={config.output_dir!r} exists and is not a folder")
    if config.log_samples_every and config.sample_steps > scheduler.num_train_timesteps:
        raise ValueError(f"TrainConfig.sample_steps={config.sample_steps} must be <= the scheduler's "
                         f"num_train_timesteps={scheduler.num_train_timesteps} (or log_samples_every=0)")


def check_image(image: Tensor) -> None:
    """The first dataset image, as every one must be: a floating-point (C, H, W) tensor in [-1, 1]."""
    if not torch.is_tensor(image) or image.ndim != 3:
        got = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ValueError(f"dataset images must be (C, H, W) tensors in [-1, 1], got {got}")
    check_images(image[None], image.shape[0], "dataset images")


def prepare_unet(unet: nn.Module, image_shape: tuple[int, ...]) -> nn.Module:
    """Check that ``unet`` can learn images of ``image_shape`` (C, H, W); set its sample_size to (H, W)."""
    config = unet.config
    channels, height, width = image_shape
    if config.in_channels != channels or config.out_channels != channels:
        raise ValueError(f"the images have {channels} channels but the UNet has in_channels={config.in_channels}, "
                         f"out_channels={config.out_channels} (learned-variance outputs are not trained here)")
    factor = 2 ** (len(config.block_out_channels) - 1)
    if height % factor or width % factor:
        raise ValueError(f"the images are {height}x{width} but this UNet's {len(config.block_out_channels)} levels "
                         f"need a height and width that are multiples of {factor}")
    unet.config = config.replace(sample_size=height if height == width else (height, width))
    return unet


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The torch.autocast dtype of "no" | "bf16" | "fp16" (fp16 only on CUDA, where a GradScaler runs)."""
    if mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError(f"mixed_precision='fp16' needs CUDA (device is {device}); use 'bf16' or 'no'")
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (dropout and data augmentation read them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def enable_gradient_checkpointing(unet: nn.Module) -> None:
    """Recompute every resnet and attention layer of a minidiff UNet's blocks during backward instead of
    keeping their activations (Chen et al. 2016): only each layer's inputs stay saved, for one more forward
    per step. Per layer, not per block, so that a recomputation never holds a whole block's activations."""
    if not all(hasattr(unet, name) for name in ("down_blocks", "mid_block", "up_blocks")):
        raise TypeError(f"gradient checkpointing needs a minidiff UNet, got {type(unet).__name__}")
    blocks = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    for block in blocks:
        for layer in [*block.resnets, *(block.attentions or [])]:
            layer.forward = types.MethodType(_checkpointed, layer)


def _checkpointed(layer: nn.Module, *args: Any) -> Any:
    return checkpoint(type(layer).forward, layer, *args, use_reentrant=False)


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[str], None]) -> Iterator[None]:
    """While active, SIGINT/SIGTERM call ``request_stop(signal name)`` (the loop then finishes its step,
    checkpoints and returns); a second signal aborts at once with KeyboardInterrupt. Signal handlers
    can only be installed in the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)
        request_stop(received[0])

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

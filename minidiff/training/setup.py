"""What the training loop checks and installs before it starts: the model/image check, the autocast
dtype, seeding, gradient checkpointing of the UNet's blocks, and the SIGINT/SIGTERM handlers."""
from __future__ import annotations

import contextlib
import random
import signal
import threading
import types
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def prepare_unet(unet: nn.Module, image_shape: tuple[int, ...]) -> nn.Module:
    """Check that ``unet`` can learn images of ``image_shape`` (C, H, W); set its sample_size to (H, W)."""
    config = unet.config
    channels, height, width = image_shape
    if config.in_channels != channels or config.out_channels != channels:
        raise ValueError(f"the images have {channels} channels but the UNet has in_channels={config.in_channels}, "
                         f"out_channels={config.out_channels} (learned-variance outputs are not trained here)")
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

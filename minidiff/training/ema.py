"""Exponential moving average of a model's parameters, kept apart from the trained weights.

The averaged copy is a full module (frozen, eval mode) so it can be sampled from and saved directly;
the trained module is never touched.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(num_updates: int, max_decay: float, warmup: bool = True) -> float:
    """The decay of update number ``num_updates`` (0-based): ``min(max_decay, (1 + n) / (10 + n))``
    with warm-up, so early averages are not dominated by the random-ish starting weights (the
    num_updates rule of TensorFlow's ExponentialMovingAverage); ``max_decay`` without."""
    if not 0.0 <= max_decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {max_decay}")
    return min(max_decay, (1 + num_updates) / (10 + num_updates)) if warmup else max_decay


class EMA:
    """``shadow <- decay * shadow + (1 - decay) * param`` after every optimizer step.

    ``ema.model`` is a deep copy of ``model`` taken at construction; parameters are averaged, buffers are
    copied from the trained model at each update. ``num_updates`` drives the warm-up and is saved with
    checkpoints. Make the EMA before wrapping the model (DDP, gradient checkpointing)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        ema_decay_at(0, decay, warmup)  # validates decay
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold ``model``'s current weights into the average; returns the decay used."""
        decay = ema_decay_at(self.num_updates, self.decay, self.warmup)
        for shadow, param in zip(self.model.parameters(), model.parameters(), strict=True):
            shadow.lerp_(param.detach(), 1.0 - decay)  # shadow + (1 - d)(param - shadow)
        for shadow, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            shadow.copy_(buffer)
        self.num_updates += 1
        return decay

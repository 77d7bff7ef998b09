"""Timestep and class embeddings (names follow diffusers' state-dict keys)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                         max_period: float = 10000.0) -> torch.Tensor:
    """Transformer position encoding of timesteps (Vaswani et al. 2017; Ho et al. 2020 appendix B).

    freq_k = exp(-ln(max_period) * k / (dim/2 - freq_shift)),  emb = [sin(t freq), cos(t freq)]
    (or [cos, sin] with ``flip_sin_to_cos``); float32, zero-padded to ``dim`` when it is odd.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / (half - freq_shift))
    arg = t[:, None].float() * freqs[None, :]
    sin, cos = torch.sin(arg), torch.cos(arg)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class SinusoidalProjection(nn.Module):
    """Weightless positional timestep projection (diffusers' ``Timesteps``)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float):
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim)
        return sinusoidal_embedding(t, self.dim, self.flip_sin_to_cos, self.freq_shift)


class FourierProjection(nn.Module):
    """Random Fourier features of log(t) (Song et al. 2021, score SDE): [sin(2 pi W log t), cos(...)].
    ``weight`` is frozen but saved, as in diffusers' GaussianFourierProjection."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * scale, requires_grad=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, 2 * dim)
        arg = torch.log(t.float())[:, None] * self.weight[None, :].float() * (2 * math.pi)
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class TimestepEmbedding(nn.Module):
    """MLP lifting the projected timestep to the embedding width: linear_2(act(linear_1(x)))."""

    def __init__(self, in_dim: int, dim: int, act: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = act
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))

"""ResnetBlock2D and the conv resamplers (diffusers' ``resnets.j`` / ``downsamplers.0`` / ``upsamplers.0`` keys)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .functional import ACT_FN_NAMES, ACTIVATIONS, UsesOps


class ResnetBlock2D(UsesOps, nn.Module):
    """Pre-activation residual block with a timestep embedding (Ho et al. 2020, after Wide ResNet):

    h = conv1(act(norm1(x)));  h = norm2(h + W e)  or  norm2(h) * (1 + s) + b  with (s, b) = W e
    out = (shortcut(x) + conv2(dropout(act(h)))) / output_scale_factor
    ``up``/``down`` resample both paths (nearest x2 / average-pool /2) after the first activation.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, groups: int, eps: float,
                 act_fn: str = "silu", time_scale_shift: str = "default", dropout: float = 0.0,
                 output_scale_factor: float = 1.0, up: bool = False, down: bool = False):
        super().__init__()
        self.act = ACT_FN_NAMES[act_fn]
        self.scale_shift = time_scale_shift == "scale_shift"
        self.output_scale_factor = output_scale_factor
        self.up, self.down = up, down
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels * (2 if self.scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W), (B, D)
        h = self.norm_act(self.norm1, x, self.act)
        x, h = self._resample(x), self._resample(h)
        h = self.conv1(h)
        t = self.time_emb_proj(ACTIVATIONS[self.act](temb))
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm_act(self.norm2, h, self.act, scale=scale, shift=shift)
        else:
            h = self.norm_act(self.norm2, h, self.act, add=t)
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; ``padding=0`` pads right/bottom by one first, as the google/ddpm-* checkpoints."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

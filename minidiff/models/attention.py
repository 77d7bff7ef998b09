"""Attention layers: the spatial self-attention of UNet2DModel blocks and the Transformer2D of
UNet2DConditionModel blocks (diffusers' ``attentions.j`` keys)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .functional import UsesOps


class Attention(UsesOps, nn.Module):
    """Multi-head attention softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017) over (B, L, C) sequences;
    keys and values come from ``context`` (cross-attention) or from the queries' own sequence."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(dropout)])

    def attend(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:  # self-attention: one product for q, k and v (the ops read the three slices)
            projections = (self.to_q, self.to_k, self.to_v)
            bias = None if self.to_q.bias is None else torch.cat([p.bias for p in projections])
            q, k, v = F.linear(h, torch.cat([p.weight for p in projections]), bias).chunk(3, dim=-1)
        else:
            q, k, v = self.to_q(h), self.to_k(context), self.to_v(context)
        out = self.ops.attention(q, k, v, self.heads)  # (B, L, C)
        return self.to_out[1](self.to_out[0](out))


class SpatialSelfAttention(Attention):
    """Residual self-attention over the H*W positions of a feature map, after an optional GroupNorm."""

    def __init__(self, channels: int, heads: int, groups: int | None, eps: float,
                 rescale_output_factor: float = 1.0):
        super().__init__(channels, heads)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups else None
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:  # (B, C, H, W)
        height = x.shape[2]  # context is unused: the signature matches Transformer2D's
        h = self.norm_act(self.group_norm, x, "none") if self.group_norm is not None else x
        h = self.attend(rearrange(h, "b c h w -> b (h w) c"))
        out = x + rearrange(h, "b (h w) c -> b c h w", h=height)  # x first: the sum keeps x's memory format
        return out if self.rescale_output_factor == 1 else out / self.rescale_output_factor


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): a * gelu(g) with [a, g] = proj(x)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention to the context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, bias=False, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim, bias=False, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # (B, L, C), (B, S, Dc)
        h = self.attn1.attend(self.norm1(h)) + h
        h = self.attn2.attend(self.norm2(h), context) + h
        return self.ff(self.norm3(h)) + h


class Transformer2D(UsesOps, nn.Module):
    """GroupNorm, 1x1 projection in (conv, or linear with ``use_linear_projection``), transformer layers
    over the H*W tokens, projection out, plus the residual input (Rombach et al. 2022)."""

    def __init__(self, channels: int, heads: int, context_dim: int, *, num_layers: int, groups: int,
                 use_linear_projection: bool, dropout: float = 0.0):
        super().__init__()
        self.linear = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        make_proj = (lambda: nn.Linear(channels, channels)) if self.linear else \
            (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = make_proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim, dropout) for _ in range(num_layers))
        self.proj_out = make_proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        height = x.shape[2]
        to_tokens = lambda t: rearrange(t, "b c h w -> b (h w) c")  # noqa: E731
        to_map = lambda t: rearrange(t, "b (h w) c -> b c h w", h=height)  # noqa: E731
        h = self.norm_act(self.norm, x, "none")
        h = self.proj_in(to_tokens(h)) if self.linear else to_tokens(self.proj_in(h))
        for block in self.transformer_blocks:
            h = block(h, context)  # (B, H*W, C)
        # proj_out on the tokens: a 1x1 convolution is the same linear map, and the map stays in x's layout
        h = to_map(F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias))
        return x + h  # x first: the sum keeps x's memory format

"""Down, mid and up blocks of the UNet, built from a UNetConfig (diffusers' ``down_blocks.i``, ``mid_block``
and ``up_blocks.i`` keys).

Each diffusers block type is one row of a table: which attention follows each resnet and how the block
resamples, so the four down and four up block families are two classes instead of eight.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import SpatialSelfAttention, Transformer2D
from .config import UNetConfig
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D

# block type -> (attention after each resnet, resampler); None for the resampler means "conv"
DOWN_BLOCKS = {"DownBlock2D": (None, "conv"), "AttnDownBlock2D": ("self", None),
               "ResnetDownsampleBlock2D": (None, "resnet"), "CrossAttnDownBlock2D": ("cross", "conv")}
UP_BLOCKS = {"UpBlock2D": (None, "conv"), "AttnUpBlock2D": ("self", None),
             "ResnetUpsampleBlock2D": (None, "resnet"), "CrossAttnUpBlock2D": ("cross", "conv")}


class BlockFactory:
    """Builds resnets, attentions and resamplers with the options a config shares across blocks."""

    def __init__(self, config: UNetConfig):
        self.config = config

    def resnet(self, cin: int, cout: int, scale: float = 1.0, **kwargs) -> ResnetBlock2D:
        c = self.config
        return ResnetBlock2D(cin, cout, c.time_embed_dim, groups=c.norm_num_groups, eps=c.norm_eps,
                             act_fn=c.act_fn, time_scale_shift=c.resnet_time_scale_shift, dropout=c.dropout,
                             output_scale_factor=scale, **kwargs)

    def attention(self, kind: str | None, channels: int, block: int, groups: int | None = -1,
                  scale: float = 1.0) -> nn.Module | None:
        """Self-attention (UNet2DModel) or a Transformer2D (UNet2DConditionModel) for block ``block``;
        ``block`` may be negative to index from the end (the up path reads the per-block lists reversed)."""
        c = self.config
        heads = c.heads_per_block[block]
        if kind == "self":
            groups = c.norm_num_groups if groups == -1 else groups
            return SpatialSelfAttention(channels, heads, groups, c.norm_eps, rescale_output_factor=scale)
        if kind == "cross":
            return Transformer2D(channels, heads, c.cross_attention_dims[block],
                                 num_layers=c.transformer_layers[block], groups=c.norm_num_groups,
                                 use_linear_projection=c.use_linear_projection)
        return None

    def resampler(self, kind: str, channels: int, down: bool) -> nn.Module:
        if kind == "resnet":
            return self.resnet(channels, channels, down=down, up=not down)
        return Downsample2D(channels, self.config.downsample_padding) if down else Upsample2D(channels)


def _run_layer(resnet: nn.Module, attention: nn.Module | None, h: torch.Tensor, temb: torch.Tensor,
               context: torch.Tensor | None) -> torch.Tensor:
    h = resnet(h, temb)
    return h if attention is None else attention(h, context)


class DownBlock(nn.Module):
    """``num_layers`` x (resnet [+ attention]), then a downsampler unless it is the last block.
    Every layer's output (and the downsampled one) is kept as a skip connection."""

    def __init__(self, factory: BlockFactory, block_type: str, index: int, cin: int, cout: int, final: bool):
        super().__init__()
        kind, resample = DOWN_BLOCKS[block_type]
        num_layers = factory.config.layers[index]
        self.resnets = nn.ModuleList(factory.resnet(cin if j == 0 else cout, cout) for j in range(num_layers))
        self.attentions = nn.ModuleList(factory.attention(kind, cout, index) for _ in range(num_layers)) \
            if kind else None
        resample = resample or factory.config.downsample_type
        self.downsamplers = None if final else nn.ModuleList([factory.resampler(resample, cout, down=True)])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = _run_layer(resnet, self.attentions[j] if self.attentions else None, h, temb, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h, temb)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    """``num_layers + 1`` x (concat [h, skip] -> resnet [+ attention]), then an upsampler unless last."""

    def __init__(self, factory: BlockFactory, block_type: str, index: int, channels: tuple[int, ...]):
        super().__init__()
        kind, resample = UP_BLOCKS[block_type]
        rev = channels[::-1]
        n = len(rev)
        cout, prev_out, skip_in = rev[index], rev[max(index - 1, 0)], rev[min(index + 1, n - 1)]
        block = n - 1 - index  # the down block this up block mirrors, for per-block options
        num_layers = factory.config.layers[block] + 1
        self.resnets = nn.ModuleList(
            factory.resnet((prev_out if j == 0 else cout) + (skip_in if j == num_layers - 1 else cout), cout)
            for j in range(num_layers))
        self.attentions = nn.ModuleList(factory.attention(kind, cout, block) for _ in range(num_layers)) \
            if kind else None
        resample = resample or factory.config.upsample_type
        final = index == n - 1
        self.upsamplers = None if final else nn.ModuleList([factory.resampler(resample, cout, down=False)])

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C_h + C_skip, H, W)
            h = _run_layer(resnet, self.attentions[j] if self.attentions else None, h, temb, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, temb)
        return h


class MidBlock(nn.Module):
    """resnet, then (attention, resnet) per layer: UNetMidBlock2D (self-attention, or none with
    ``add_attention=False``) and UNetMidBlock2DCrossAttn (Transformer2D layers)."""

    def __init__(self, factory: BlockFactory, block_type: str):
        super().__init__()
        c = factory.config
        channels, scale = c.block_out_channels[-1], c.mid_block_scale_factor
        self.resnets = nn.ModuleList(factory.resnet(channels, channels, scale) for _ in range(2))
        if block_type == "UNetMidBlock2DCrossAttn":
            self.attentions = nn.ModuleList([factory.attention("cross", channels, -1)])
        elif c.add_attention:
            groups = c.attn_norm_num_groups or (c.norm_num_groups if c.resnet_time_scale_shift == "default" else None)
            self.attentions = nn.ModuleList([factory.attention("self", channels, -1, groups, scale)])
        else:
            self.attentions = None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        for j, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                h = self.attentions[j](h, context)
            h = resnet(h, temb)
        return h

"""diffusers config.json dicts of real checkpoints' UNets (as published on the Hugging Face hub; tests prove
parity on them and benchmarks time them), and the small class-, text- and image-conditional configs the
examples train:
``UNet.from_config(ARCHITECTURES["ddpm-cifar10-32"])`` builds the architecture with random weights."""
from __future__ import annotations

from typing import Any

_DOWN, _ATTN_DOWN = "DownBlock2D", "AttnDownBlock2D"
_UP, _ATTN_UP = "UpBlock2D", "AttnUpBlock2D"
_GOOGLE = dict(_class_name="UNet2DModel", attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False,
               freq_shift=1, norm_eps=1e-6, norm_num_groups=32, layers_per_block=2, act_fn="silu",
               in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
               mid_block_scale_factor=1)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    # google/ddpm-cifar10-32 (35.7M parameters, the DDPM paper's CIFAR-10 model)
    "ddpm-cifar10-32": dict(_GOOGLE, sample_size=32, block_out_channels=[128, 256, 256, 256],
                            down_block_types=[_DOWN, _ATTN_DOWN, _DOWN, _DOWN],
                            up_block_types=[_UP, _UP, _ATTN_UP, _UP]),
    # google/ddpm-celebahq-256 and google/ddpm-bedroom-256 (113.7M parameters)
    "ddpm-celebahq-256": dict(_GOOGLE, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
                              down_block_types=[_DOWN] * 4 + [_ATTN_DOWN, _DOWN],
                              up_block_types=[_UP, _ATTN_UP] + [_UP] * 4),
    # johnowhitaker/ddpm-butterflies-32px, base of the course's sd-class-butterflies-32 (18.5M parameters)
    "ddpm-butterflies-32": dict(_class_name="UNet2DModel", sample_size=32, in_channels=3, out_channels=3,
                                block_out_channels=[64, 128, 128, 256], layers_per_block=2,
                                down_block_types=[_DOWN, _DOWN, _ATTN_DOWN, _ATTN_DOWN],
                                up_block_types=[_ATTN_UP, _ATTN_UP, _UP, _UP], attention_head_dim=8,
                                downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5,
                                norm_num_groups=32),
    # the course's class-conditioned MNIST UNet (notebook 02): 1 image + 4 label-embedding channels
    "course-mnist-28": dict(_class_name="UNet2DModel", sample_size=28, in_channels=1, out_channels=1,
                            class_embed_type="concat", num_class_embeds=10, class_embed_dim=4,
                            block_out_channels=[32, 64, 64], layers_per_block=2,
                            down_block_types=[_DOWN, _ATTN_DOWN, _ATTN_DOWN],
                            up_block_types=[_ATTN_UP, _ATTN_UP, _UP]),
    # openai/diffusers-cd_imagenet64_l2's layout (scale_shift, resnet resampling, class embedding), narrower
    "cd-imagenet64-narrow": dict(_class_name="UNet2DModel", sample_size=64, in_channels=3, out_channels=3,
                                 block_out_channels=[32, 64, 96, 128], layers_per_block=3, attention_head_dim=16,
                                 attn_norm_num_groups=8, norm_num_groups=8, num_class_embeds=1000,
                                 down_block_types=["ResnetDownsampleBlock2D", _ATTN_DOWN, _ATTN_DOWN, _ATTN_DOWN],
                                 up_block_types=[_ATTN_UP, _ATTN_UP, _ATTN_UP, "ResnetUpsampleBlock2D"],
                                 downsample_type="resnet", upsample_type="resnet",
                                 resnet_time_scale_shift="scale_shift", dropout=0.0),
    # a small UNet2DConditionModel (cross-attention to a sequence), Stable-Diffusion-like layout
    "small-cross-attention": dict(_class_name="UNet2DConditionModel", sample_size=16, in_channels=4, out_channels=4,
                                  block_out_channels=[32, 64, 64], layers_per_block=2, norm_num_groups=8,
                                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", _DOWN],
                                  up_block_types=[_UP, "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                                  attention_head_dim=4, cross_attention_dim=24),
}


CONDITIONING_MODES = ("concat", "additive", "cross-attention")


def class_conditional_config(mode: str, num_classes: int, image_size: int = 16, channels: int = 1,
                             null_class: bool = True, widths: tuple[int, ...] = (16, 32, 64), layers_per_block: int = 1
                             ) -> dict[str, Any]:
    """A small class-conditional UNet config for one of the course's three conditioning modes:
    "concat" (label embedding broadcast as extra input channels), "additive" (label embedding added to the
    timestep embedding, diffusers' class_embedding) or "cross-attention" (the label as a one-token sequence
    that CrossAttn blocks attend to). ``null_class`` adds the extra row classifier-free guidance trains."""
    if mode not in CONDITIONING_MODES:
        raise ValueError(f"conditioning mode {mode!r} is not supported; allowed: {list(CONDITIONING_MODES)}")
    n = len(widths)
    base = dict(sample_size=image_size, in_channels=channels, out_channels=channels, block_out_channels=list(widths),
                layers_per_block=layers_per_block, norm_num_groups=8, num_class_embeds=num_classes + int(null_class))
    if mode == "cross-attention":
        return dict(base, _class_name="UNet2DConditionModel", class_embed_type="cross_attention",
                    down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
                    up_block_types=["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
                    mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=4, cross_attention_dim=widths[0])
    return dict(base, _class_name="UNet2DModel", class_embed_type="concat" if mode == "concat" else None,
                down_block_types=["DownBlock2D"] + ["AttnDownBlock2D"] * (n - 1),
                up_block_types=["AttnUpBlock2D"] * (n - 1) + ["UpBlock2D"], attention_head_dim=16)


def text_conditional_config(context_dim: int, image_size: int = 32, channels: int = 3,
                            widths: tuple[int, ...] = (16, 32, 64), layers_per_block: int = 1,
                            num_class_embeds: int | None = None) -> dict[str, Any]:
    """A small UNet2DConditionModel whose CrossAttn blocks (all but the full-resolution one) attend to a
    ``context_dim``-wide token sequence, e.g. a text encoder's output; ``num_class_embeds`` adds a class
    embedding to the timestep embedding as a second condition."""
    n = len(widths)
    return dict(_class_name="UNet2DConditionModel", sample_size=image_size, in_channels=channels,
                out_channels=channels, block_out_channels=list(widths), layers_per_block=layers_per_block,
                norm_num_groups=8, down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
                up_block_types=["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
                mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=4, cross_attention_dim=context_dim,
                num_class_embeds=num_class_embeds)


def image_conditional_config(conditioning_channels: int, image_size: int = 32, channels: int = 3,
                             widths: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1) -> dict[str, Any]:
    """A small UNet2DModel taking a ``conditioning_channels`` image concatenated to its input (SR3, Saharia
    et al. 2021: the upsampled low-resolution image), self-attention at the lowest resolution only."""
    n = len(widths)
    return dict(_class_name="UNet2DModel", sample_size=image_size, in_channels=channels, out_channels=channels,
                conditioning_channels=conditioning_channels, block_out_channels=list(widths),
                layers_per_block=layers_per_block, norm_num_groups=8,
                down_block_types=["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D"],
                up_block_types=["AttnUpBlock2D"] + ["UpBlock2D"] * (n - 1), attention_head_dim=16)

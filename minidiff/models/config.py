"""UNetConfig: one frozen dataclass for diffusers' UNet2DModel and UNet2DConditionModel configs.

Field names and defaults are those of diffusers' config.json, so ``UNetConfig.from_dict(json)`` reads a
diffusers folder and ``config.to_dict()`` writes one diffusers loads. A handful of minidiff-only fields
(``class_embed_dim``, ``conditioning_channels``) are written only when used.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..checks import check_type
from ..files import BOOKKEEPING_KEYS, DIFFUSERS_VERSION
from .functional import ACT_FN_NAMES

UNET_2D = "UNet2DModel"
UNET_2D_CONDITION = "UNet2DConditionModel"

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D", "UNetMidBlock2DCrossAttn", None)
ACTIVATIONS = tuple(ACT_FN_NAMES)
# None/"timestep"/"identity" are diffusers' (added to the timestep embedding); "concat" broadcasts a label
# embedding as extra input channels, "cross_attention" makes it a one-token sequence for cross-attention.
CLASS_EMBED_TYPES = (None, "timestep", "identity", "concat", "cross_attention")

# Known diffusers fields minidiff does not implement: accepted only at their default value.
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "addition_embed_type_num_heads": 64, "dual_cross_attention": False,
    "only_cross_attention": False, "mid_block_only_cross_attention": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None,
    "timestep_post_act": None, "time_embedding_act_fn": None, "class_embeddings_concat": False,
    "cross_attention_norm": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "attention_type": "default", "num_attention_heads": None, "reverse_transformer_layers_per_block": None,
}
# UNet2DConditionModel's defaults where they differ from UNet2DModel's.
CONDITION_DEFAULTS: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
MINIDIFF_FIELDS = ("class_embed_dim", "conditioning_channels")
# fields only one of diffusers' two UNet classes accepts (to_dict writes each class its own)
UNET_2D_ONLY = ("add_attention", "attn_norm_num_groups", "downsample_type", "num_train_timesteps", "upsample_type")
CONDITION_ONLY = ("cross_attention_dim", "transformer_layers_per_block", "use_linear_projection", "upcast_attention")


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _numbers(value: Any) -> list:
    """The numbers in an int or a tuple of them (None entries ignored)."""
    return [v for v in (value if isinstance(value, tuple) else (value,)) if v is not None]


# Fields that count something: at least this much (None stays allowed where the annotation allows it).
MINIMUMS = {"sample_size": 1, "in_channels": 1, "out_channels": 1, "time_embedding_dim": 1, "block_out_channels": 1,
            "layers_per_block": 1, "downsample_padding": 0, "attention_head_dim": 1, "norm_num_groups": 1,
            "attn_norm_num_groups": 1, "num_class_embeds": 1, "num_train_timesteps": 1, "cross_attention_dim": 1,
            "transformer_layers_per_block": 1, "class_embed_dim": 1, "conditioning_channels": 0}
MAXIMUM = 2 ** 20  # of every such count: a larger one is a broken config.json, not a model that fits in memory


def _per_block(value: Any, n: int, name: str) -> tuple:
    """Broadcast an int/None option to one value per block, or check a per-block tuple's length."""
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ValueError(f"{name}: expected {n} values (one per block), got {len(value)}")
        return tuple(value)
    return (value,) * n


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a UNet; field names, meanings and defaults are diffusers'."""

    model_class: str = UNET_2D  # written as _class_name: "UNet2DModel" or "UNet2DConditionModel"
    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3  # channels of the noisy sample (extra conditioning channels are separate)
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"  # positional | fourier | learned
    time_embedding_dim: int | None = None  # None -> 4 * block_out_channels[0]
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int | tuple[int, ...] = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1  # 0 -> pad (0, 1, 0, 1) then conv with no padding (google/ddpm-*)
    downsample_type: str = "conv"  # conv | resnet (Attn blocks only)
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    # UNet2DModel: width of one head (None -> one head). UNet2DConditionModel: number of heads.
    attention_head_dim: int | tuple[int, ...] | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"  # default | scale_shift
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None  # only for time_embedding_type="learned"
    # UNet2DConditionModel (cross-attention) fields
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False  # attention always runs with an fp32 softmax here
    # minidiff-only fields
    class_embed_dim: int = 4  # width of the label embedding for class_embed_type="concat"
    conditioning_channels: int = 0  # extra image-shaped condition channels concatenated to the input

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _tuple(getattr(self, f.name))
            check_type(f"UNetConfig.{f.name}", value, f.type)
            object.__setattr__(self, f.name, value)
        self._validate()

    # ------------------------------------------------------------------ validation
    def _choice(self, name: str, allowed: tuple) -> None:
        value = getattr(self, name)
        if value not in allowed:
            raise ValueError(f"UNetConfig.{name}={value!r} is not supported; allowed: {list(allowed)}")

    def _validate(self) -> None:
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("UNetConfig.block_out_channels: at least one block is needed")
        for name, low in MINIMUMS.items():
            if not all(low <= v <= MAXIMUM for v in _numbers(getattr(self, name))):
                raise ValueError(f"UNetConfig.{name}={getattr(self, name)!r}: values must be >= {low} and <= {MAXIMUM}")
        if not self.norm_eps > 0 or not 0 <= self.dropout < 1 or self.mid_block_scale_factor == 0:
            raise ValueError(f"UNetConfig: norm_eps={self.norm_eps} must be > 0, dropout={self.dropout} in [0, 1) "
                             f"and mid_block_scale_factor={self.mid_block_scale_factor} non-zero")
        self._choice("model_class", (UNET_2D, UNET_2D_CONDITION))
        self._choice("time_embedding_type", ("positional", "fourier", "learned"))
        self._choice("downsample_type", ("conv", "resnet"))
        self._choice("upsample_type", ("conv", "resnet"))
        self._choice("act_fn", ACTIVATIONS)
        self._choice("resnet_time_scale_shift", ("default", "scale_shift"))
        self._choice("class_embed_type", CLASS_EMBED_TYPES)
        self._choice("mid_block_type", MID_BLOCK_TYPES)
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            blocks = getattr(self, name)
            for block in blocks:
                if block not in allowed:
                    raise ValueError(f"UNetConfig.{name}: unknown block type {block!r}; allowed: {list(allowed)}")
            if len(blocks) != n:
                raise ValueError(f"UNetConfig.{name}: {len(blocks)} blocks but block_out_channels has {n}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"UNetConfig.block_out_channels: {c} is not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")
        groups = self.attn_norm_num_groups
        if groups is not None and self.block_out_channels[-1] % groups:
            raise ValueError(f"UNetConfig.attn_norm_num_groups={groups} must divide the mid block's "
                             f"{self.block_out_channels[-1]} channels (block_out_channels[-1])")
        for name in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim"):
            _per_block(getattr(self, name), n, name)
        if self.is_conditional:
            self._validate_conditional(n)
        elif any("CrossAttn" in b for b in self.down_block_types + self.up_block_types + (self.mid_block_type or "",)):
            raise ValueError("UNetConfig: CrossAttn blocks (down_block_types, up_block_types, mid_block_type) need "
                             "model_class='UNet2DConditionModel'")
        else:
            self._check_head_dims(n)
        if self.time_embedding_type == "learned" and not self.num_train_timesteps:
            raise ValueError("UNetConfig.num_train_timesteps is required with time_embedding_type='learned'")
        if self.class_embed_type in ("concat", "cross_attention") and not self.num_class_embeds:
            raise ValueError(f"UNetConfig.num_class_embeds is required with class_embed_type={self.class_embed_type!r}")
        if self.class_embed_type == "cross_attention" and not self.is_conditional:
            raise ValueError("UNetConfig.class_embed_type='cross_attention' needs a UNet2DConditionModel")

    def _check_head_dims(self, n: int) -> None:
        """UNet2DModel: attention_head_dim (the width of a head) must divide the channels of each block with
        self-attention (down and up Attn blocks, the mid block)."""
        dims = _per_block(self.attention_head_dim, n, "attention_head_dim")
        attending = {i for i, b in enumerate(self.down_block_types) if b.startswith("Attn")}
        attending |= {n - 1 - i for i, b in enumerate(self.up_block_types) if b.startswith("Attn")}
        if self.mid_block_type is not None and self.add_attention:
            attending.add(n - 1)
        for i in sorted(attending):
            if dims[i] and self.block_out_channels[i] % dims[i]:
                raise ValueError(f"UNetConfig.attention_head_dim={dims[i]} (the width of a head) must divide the "
                                 f"{self.block_out_channels[i]} channels of block {i}, which has attention")

    def _validate_conditional(self, n: int) -> None:
        attn_blocks = [b for b in self.down_block_types + self.up_block_types if b.startswith("Attn")]
        if attn_blocks:
            raise ValueError(f"UNetConfig: {attn_blocks[0]} is not supported in a UNet2DConditionModel; "
                             "use CrossAttnDownBlock2D/CrossAttnUpBlock2D")
        if self.mid_block_type == "UNetMidBlock2D":
            raise ValueError("UNetConfig.mid_block_type='UNetMidBlock2D' is not supported in a "
                             "UNet2DConditionModel; allowed: 'UNetMidBlock2DCrossAttn' or None")
        if self.time_embedding_type != "positional":
            raise ValueError("UNetConfig.time_embedding_type must be 'positional' in a UNet2DConditionModel")
        for c, heads in zip(self.block_out_channels, self.heads_per_block):
            if c % heads:
                raise ValueError(f"UNetConfig.attention_head_dim: {heads} heads do not divide {c} channels")

    # ------------------------------------------------------------------ derived values
    @property
    def is_conditional(self) -> bool:
        """True for a UNet2DConditionModel (cross-attention) config."""
        return self.model_class == UNET_2D_CONDITION

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def layers(self) -> tuple[int, ...]:
        return _per_block(self.layers_per_block, len(self.block_out_channels), "layers_per_block")

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        n = len(self.block_out_channels)
        return _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")

    @property
    def cross_attention_dims(self) -> tuple[int, ...]:
        return _per_block(self.cross_attention_dim, len(self.block_out_channels), "cross_attention_dim")

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        """Number of attention heads in each block (both diffusers conventions resolved)."""
        n = len(self.block_out_channels)
        dims = _per_block(self.attention_head_dim, n, "attention_head_dim")
        if self.is_conditional:  # attention_head_dim is the head count here
            return tuple(d or 1 for d in dims)
        return tuple(c // d if d else 1 for c, d in zip(self.block_out_channels, dims))

    @property
    def extra_input_channels(self) -> int:
        """Channels concatenated to the sample before conv_in (label embedding and image condition)."""
        concat = self.class_embed_dim if self.class_embed_type == "concat" else 0
        return concat + self.conditioning_channels

    # ------------------------------------------------------------------ dict I/O
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNetConfig":
        """Build from a diffusers config.json dict: bookkeeping keys are ignored, unsupported diffusers
        features are rejected unless at their default, unknown keys raise ValueError."""
        if not isinstance(data, dict):
            raise TypeError(f"UNetConfig.from_dict: expected a dict (a parsed config.json), got "
                            f"{type(data).__name__}; load a model folder with minidiff.load_unet(path)")
        model_class = data.get("_class_name", data.get("model_class", UNET_2D))
        values = dict(CONDITION_DEFAULTS) if model_class == UNET_2D_CONDITION else {}
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key in BOOKKEEPING_KEYS:
                continue
            if key in UNSUPPORTED_FIELDS:
                if _tuple(value) != UNSUPPORTED_FIELDS[key]:
                    raise ValueError(f"UNetConfig: {key}={value!r} is not supported by minidiff "
                                     f"(only the default {UNSUPPORTED_FIELDS[key]!r})")
                continue
            if key not in names:
                raise ValueError(f"UNetConfig: unknown config field {key!r}")
            values[key] = value
        values["model_class"] = model_class
        for key in ("down_block_types", "up_block_types", "mid_block_type"):
            if key in values and values[key] is not None:  # pre-0.10 names: UNetResDownBlock2D -> DownBlock2D
                strip = lambda b: b[7:] if b.startswith("UNetRes") else b  # noqa: E731
                values[key] = strip(values[key]) if isinstance(values[key], str) else [strip(b) for b in values[key]]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict diffusers reads (minidiff-only fields only when they are used)."""
        data: dict[str, Any] = {"_class_name": self.model_class, "_diffusers_version": DIFFUSERS_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "model_class" or (f.name in MINIDIFF_FIELDS and value == f.default):
                continue
            if f.name in (UNET_2D_ONLY if self.is_conditional else CONDITION_ONLY):
                continue
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def replace(self, **changes: Any) -> "UNetConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


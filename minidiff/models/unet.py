"""The UNet: diffusers' UNet2DModel and UNet2DConditionModel with the same weight names and numbers."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .blocks import BlockFactory, DownBlock, MidBlock, UpBlock
from ..checks import check_tensor
from .config import UNetConfig
from .embeddings import FourierProjection, SinusoidalProjection, TimestepEmbedding
from .functional import ACT_FN_NAMES, UsesOps, activation


class UNet(UsesOps, nn.Module):
    """Noise-prediction UNet (Ronneberger et al. 2015; Ho et al. 2020) with optional class conditioning
    (added to the timestep embedding, concatenated as input channels, or attended to) and cross-attention.

    ``unet(sample, timestep, class_labels=None, encoder_hidden_states=None, conditioning_image=None)``
    returns a tensor shaped like ``sample`` with ``out_channels`` channels.
    """

    def __init__(self, config: UNetConfig | None = None, **fields: Any):
        super().__init__()
        if config is not None and fields:
            raise TypeError("UNet: pass either a UNetConfig or config fields, not both")
        if config is not None and not isinstance(config, UNetConfig):
            raise TypeError(f"UNet: config must be a UNetConfig, got {type(config).__name__}; build from a "
                            "config.json dict with UNet.from_config(dict)")
        self.config = config = config if config is not None else UNetConfig(**fields)
        channels, dim = config.block_out_channels, config.time_embed_dim
        # UNet2DModel always uses SiLU for the time MLP and the output; UNet2DConditionModel uses act_fn
        act = config.act_fn if config.is_conditional else "silu"
        self.out_act = ACT_FN_NAMES[act]

        self.conv_in = nn.Conv2d(config.in_channels + config.extra_input_channels, channels[0], 3, padding=1)
        self.time_proj, time_in = self._time_projection(config)
        self.time_embedding = TimestepEmbedding(time_in, dim, activation(act))
        self.class_embedding = self._class_embedding(config, time_in, act)

        factory = BlockFactory(config)
        cins = (channels[0],) + channels[:-1]
        last = len(channels) - 1
        self.down_blocks = nn.ModuleList(DownBlock(factory, kind, i, cins[i], channels[i], final=i == last)
                                         for i, kind in enumerate(config.down_block_types))
        self.mid_block = MidBlock(factory, config.mid_block_type) if config.mid_block_type else None
        self.up_blocks = nn.ModuleList(UpBlock(factory, kind, i, channels)
                                       for i, kind in enumerate(config.up_block_types))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    @staticmethod
    def _time_projection(config: UNetConfig) -> tuple[nn.Module, int]:
        c0 = config.block_out_channels[0]
        if config.time_embedding_type == "fourier":
            return FourierProjection(c0), 2 * c0
        if config.time_embedding_type == "learned":
            return nn.Embedding(config.num_train_timesteps, c0), c0
        return SinusoidalProjection(c0, config.flip_sin_to_cos, config.freq_shift), c0

    @staticmethod
    def _class_embedding(config: UNetConfig, time_in: int, act: str) -> nn.Module | None:
        kind, n = config.class_embed_type, config.num_class_embeds
        if kind is None:
            return nn.Embedding(n, config.time_embed_dim) if n else None
        if kind == "timestep":
            return TimestepEmbedding(time_in, config.time_embed_dim, activation(act))
        if kind == "concat":
            return nn.Embedding(n, config.class_embed_dim)
        if kind == "cross_attention":
            return nn.Embedding(n, config.cross_attention_dims[0])
        return None  # "identity": the labels are already embeddings

    # ------------------------------------------------------------------ properties and I/O
    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @property
    def takes_class_labels(self) -> bool:
        return self.config.num_class_embeds is not None or self.config.class_embed_type is not None

    @classmethod
    def from_config(cls, config: UNetConfig | dict[str, Any]) -> "UNet":
        """A randomly initialised UNet from a UNetConfig or a diffusers config.json dict."""
        return cls(config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config))

    # ------------------------------------------------------------------ forward
    def _timesteps(self, timestep: int | float | torch.Tensor, batch: int) -> torch.Tensor:
        if isinstance(timestep, bool) or not (torch.is_tensor(timestep) or isinstance(timestep, (int, float))):
            raise TypeError(f"timestep: expected an int, a float or a tensor, got {type(timestep).__name__}")
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep, device=self.device)
        check_tensor("timestep", t)
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"timestep: expected integer or floating values, got {t.dtype}")
        if t.ndim == 0:
            t = t[None]
        if t.ndim != 1 or t.shape[0] not in (1, batch):
            raise ValueError(f"timestep: expected an int, a 0-d tensor or a ({batch},) tensor, got shape "
                             f"{tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"timestep: must be finite, got {t.tolist()}")
        if self.config.time_embedding_type == "learned":  # a table lookup: whole steps in [0, T)
            T = self.config.num_train_timesteps
            if (t != t.round()).any() or (t < 0).any() or (t >= T).any():
                raise ValueError(f"timestep: a learned time embedding takes integers in [0, {T - 1}], got {t.tolist()}")
            t = t.long()
        return t.to(self.device).expand(batch)

    def _check_labels(self, labels: torch.Tensor, batch: int) -> None:
        if self.config.class_embed_type == "identity":
            if labels.shape != (batch, self.config.time_embed_dim):
                raise ValueError(f"class_labels: expected embeddings of shape ({batch}, "
                                 f"{self.config.time_embed_dim}), got {tuple(labels.shape)}")
            return
        if labels.shape != (batch,):
            raise ValueError(f"class_labels: expected shape ({batch},), got {tuple(labels.shape)}")
        if self.config.class_embed_type == "timestep":
            return
        n = self.config.num_class_embeds
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.min() < 0 \
                or labels.max() >= n:
            raise ValueError(f"class_labels must be integers in [0, {n - 1}], got {labels.tolist()}")

    def _condition(self, x: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor | None,
                   context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Apply class labels the configured way: added to ``emb``, concatenated to ``x``, or as context."""
        if labels is None:
            if self.takes_class_labels:
                raise ValueError("class_labels are required: this UNet is class-conditional "
                                 f"(num_class_embeds={self.config.num_class_embeds})")
            return x, emb, context
        if not self.takes_class_labels:
            raise ValueError("class_labels were given but this UNet has no class embedding "
                             "(set num_class_embeds / class_embed_type in its config)")
        labels = labels.to(self.device)
        self._check_labels(labels, x.shape[0])
        kind = self.config.class_embed_type
        if kind == "concat":
            y = self.class_embedding(labels).to(x.dtype)[:, :, None, None]  # (B, E, 1, 1)
            return torch.cat([x, y.expand(-1, -1, *x.shape[2:])], dim=1), emb, context
        if kind == "cross_attention":
            if context is not None:
                raise ValueError("pass either class_labels or encoder_hidden_states to a "
                                 "class_embed_type='cross_attention' UNet, not both")
            return x, emb, self.class_embedding(labels)[:, None, :].to(x.dtype)  # (B, 1, Dc)
        if kind == "timestep":
            labels = self.time_proj(labels).to(emb.dtype)
        return x, emb + (labels if kind == "identity" else self.class_embedding(labels)).to(emb.dtype), context

    def _check_input(self, sample: torch.Tensor, conditioning_image: torch.Tensor | None) -> None:
        c = self.config
        for name, value in (("sample", sample), ("conditioning_image", conditioning_image)):
            if value is not None:
                check_tensor(name, value, floating=True)
                if value.device != self.device:
                    raise ValueError(f"{name} is on {value.device} but the model is on {self.device}; move it with "
                                     f".to(unet.device)")
        if sample.dtype != self.dtype and not torch.is_autocast_enabled(sample.device.type):
            raise TypeError(f"sample: dtype {sample.dtype} differs from the model's {self.dtype}; convert one of "
                            "them (e.g. sample.to(unet.dtype)) or run under torch.autocast")
        if sample.ndim != 4 or sample.shape[1] != c.in_channels or sample.shape[0] == 0:
            raise ValueError(f"sample: expected (B, {c.in_channels}, H, W) with B >= 1, got {tuple(sample.shape)}")
        factor = 2 ** (len(c.block_out_channels) - 1)
        if sample.shape[2] % factor or sample.shape[3] % factor:
            raise ValueError(f"sample: height and width must be multiples of {factor}, got "
                             f"{tuple(sample.shape[2:])}")
        want = (sample.shape[0], c.conditioning_channels, *sample.shape[2:])
        if conditioning_image is not None and c.conditioning_channels == 0:
            raise ValueError("conditioning_image was given but this UNet takes none "
                             "(UNetConfig.conditioning_channels=0)")
        if c.conditioning_channels and (conditioning_image is None or tuple(conditioning_image.shape) != want):
            got = None if conditioning_image is None else tuple(conditioning_image.shape)
            raise ValueError(f"conditioning_image: this UNet is image-conditioned; expected shape {want} (batch, "
                             f"conditioning_channels, the sample's height and width), got {got}")

    def _check_conditioning(self, labels: torch.Tensor | None, context: torch.Tensor | None, batch: int) -> None:
        if labels is not None:
            if not torch.is_tensor(labels):
                raise TypeError(f"class_labels: expected a tensor, got {type(labels).__name__} (torch.tensor(labels))")
            check_tensor("class_labels", labels)
        if context is None:
            return
        if not self.config.is_conditional:
            raise ValueError("encoder_hidden_states were given but this UNet2DModel has no cross-attention (a "
                             "UNet2DConditionModel has)")
        dims = sorted(set(self.config.cross_attention_dims))
        check_tensor("encoder_hidden_states", context, floating=True)
        if context.ndim != 3 or context.shape[0] != batch or context.shape[1] == 0 or context.shape[2] not in dims:
            raise ValueError(f"encoder_hidden_states: expected shape ({batch}, S, D) with D in {dims} and S >= 1, got "
                             f"{tuple(context.shape)}")
        if context.device != self.device:
            raise ValueError(f"encoder_hidden_states is on {context.device} but the model is on {self.device}; move "
                             "it with .to(unet.device)")
        if context.dtype != self.dtype and not torch.is_autocast_enabled(context.device.type):
            raise TypeError(f"encoder_hidden_states: dtype {context.dtype} differs from the model's {self.dtype}; "
                            "convert it (.to(unet.dtype)) or run under torch.autocast")

    def forward(self, sample: torch.Tensor, timestep: int | float | torch.Tensor,
                class_labels: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                conditioning_image: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(sample, conditioning_image)
        batch = sample.shape[0]
        self._check_conditioning(class_labels, encoder_hidden_states, batch)
        x = 2 * sample - 1 if self.config.center_input_sample else sample
        t = self._timesteps(timestep, batch)
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))  # (B, D)
        x, emb, context = self._condition(x, emb, class_labels, encoder_hidden_states)
        if conditioning_image is not None:
            x = torch.cat([x, conditioning_image.to(x.dtype)], dim=1)
        if self.config.is_conditional and context is None:
            raise ValueError("encoder_hidden_states (B, S, cross_attention_dim) is required by a "
                             "UNet2DConditionModel")

        if x.device.type == "cpu" and not (self.training and torch.is_grad_enabled()):
            # On CPU everything but training steps runs channels_last, whatever the input's layout: oneDNN's
            # NHWC convolutions are faster even with the weights converted at each call; training steps keep
            # the input's layout (they would convert each weight three times); benchmarks/unet_vs_diffusers.py
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context)
            skips += block_skips
        if self.mid_block is not None:
            h = self.mid_block(h, emb, context)
        for block in self.up_blocks:
            h = block(h, skips, emb, context)
        out = self.conv_out(self.norm_act(self.conv_norm_out, h, self.out_act))
        if self.config.time_embedding_type == "fourier":
            out = out / t.reshape(-1, 1, 1, 1).to(out.dtype)
        return out.contiguous()

"""A small text encoder trained from scratch with the UNet: word embeddings plus learned positions through a
pre-norm Transformer encoder (Vaswani et al. 2017); its token outputs are the UNet's cross-attention context
(as in GLIDE, Nichol et al. 2022, and Imagen, Saharia et al. 2022)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..checks import check_finite_tensors
from ..files import atomic_path, read_json, write_json
from .tokenizer import WordTokenizer

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: x + attention(norm(x)), then x + MLP(norm(x)) (GELU, 4x wide)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        x = x + self.out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)"))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """``encoder(prompts: list[str]) -> (B, max_length, width)``: the tokenizer and the transformer in one
    module, so that it trains, saves and loads as one piece."""

    def __init__(self, vocabulary: Sequence[str], max_length: int = 8, width: int = 64, layers: int = 2,
                 heads: int = 4):
        super().__init__()
        for name, value in (("width", width), ("layers", layers), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TextEncoder: {name}={value!r} must be an int >= 1")
        if width % heads:
            raise ValueError(f"TextEncoder: heads={heads} must divide width={width}")
        self.tokenizer = WordTokenizer(vocabulary, max_length)
        self.config = {"vocabulary": list(vocabulary), "max_length": max_length, "width": width, "layers": layers,
                       "heads": heads}
        self.token_embedding = nn.Embedding(len(self.tokenizer), width)
        self.position_embedding = nn.Parameter(torch.randn(max_length, width) * 0.02)
        self.layers = nn.ModuleList(TransformerLayer(width, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width)

    @classmethod
    def from_vocabulary_of(cls, captions: Sequence[str], **kwargs) -> TextEncoder:
        """An untrained encoder whose vocabulary and length fit ``captions`` (see WordTokenizer.from_captions)."""
        tokenizer = WordTokenizer.from_captions(captions)
        return cls(tokenizer.vocabulary, tokenizer.max_length, **kwargs)

    @property
    def width(self) -> int:
        return self.config["width"]

    def forward(self, prompts: Sequence[str]) -> Tensor:
        ids = self.tokenizer(prompts).to(self.token_embedding.weight.device)
        x = self.token_embedding(ids) + self.position_embedding
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)

    # ------------------------------------------------------------------ files
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` (with the vocabulary) and ``model.safetensors``, each atomically."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
        write_json(folder / CONFIG_NAME, {"_class_name": type(self).__name__, **self.config})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> TextEncoder:
        """A TextEncoder from a folder ``save_pretrained`` wrote (strict: every weight present, right shapes)."""
        folder = Path(path)
        config = read_json(folder / CONFIG_NAME)
        if config.pop("_class_name", None) != cls.__name__:
            raise ValueError(f"{folder / CONFIG_NAME}: not a {cls.__name__} config")
        try:
            encoder = cls(**config)
        except (TypeError, ValueError) as err:  # unknown or missing keys, bad values
            raise ValueError(f"{folder / CONFIG_NAME}: not a valid TextEncoder config ({err})") from None
        encoder.load_weights(folder)
        return encoder.eval()

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load ``model.safetensors`` from ``path`` into this encoder, checking names and shapes."""
        file = Path(path) / WEIGHTS_NAME
        try:
            state = load_file(file)
        except Exception as err:  # missing, truncated or not a safetensors file
            raise ValueError(f"{file}: cannot read the text encoder weights ({type(err).__name__}: {err})") from None
        own = self.state_dict()
        problems = sorted(own.keys() ^ state.keys()) + [k for k in own.keys() & state.keys()
                                                         if own[k].shape != state[k].shape]
        if problems:
            raise ValueError(f"{file}: weights do not match the config (missing, unexpected or reshaped: "
                             f"{problems[:5]})")
        check_finite_tensors(state, file)
        self.load_state_dict(state)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items() if k != "vocabulary") + \
            f", vocabulary={len(self.config['vocabulary'])} words"


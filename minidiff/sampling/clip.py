"""CLIP guidance (the course's unit 2, after Crowson's CLIP-guided diffusion): pull samples towards a prompt.

The loss of a predicted x0 is the squared great-circle distance between the CLIP embeddings of random
cut-outs of the image and of the prompt, averaged over the cut-outs. open_clip is imported lazily, so
``import minidiff`` never needs it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .guidance import LossGuide

# CLIP's normalisation (the course's Normalize), for models that do not carry their own.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_SCHEMAS = ("hf-hub:", "local-dir:")


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as err:
        raise ImportError("CLIP guidance needs open_clip: pip install open_clip_torch") from err
    return open_clip


def load_clip(model_name: str = "ViT-B-32", pretrained: str | None = "openai",
              checkpoint_path: str | os.PathLike | None = None) -> tuple[nn.Module, Callable]:
    """(model, tokenizer) of open_clip ``model_name`` with weights from ``checkpoint_path`` (a local file) or
    the ``pretrained`` tag (downloaded once, then read from the Hugging Face cache). Names with an
    ``hf-hub:`` or ``local-dir:`` prefix carry their own weights. Torch files load with weights_only=True."""
    open_clip = _open_clip()
    has_schema = model_name.startswith(_SCHEMAS)
    if not has_schema and model_name not in open_clip.list_models():
        raise ValueError(f"model_name={model_name!r} is not an open_clip model; allowed: the names of "
                         "open_clip.list_models() (e.g. 'ViT-B-32'), 'hf-hub:ORG/REPO' or 'local-dir:PATH'")
    if checkpoint_path is not None:
        if not Path(checkpoint_path).is_file():
            raise FileNotFoundError(f"checkpoint_path={str(checkpoint_path)!r}: no such file")
        source = str(checkpoint_path)
    elif has_schema:
        source = None
    elif pretrained is None:
        raise ValueError("CLIP guidance needs trained CLIP weights: pass pretrained=TAG, checkpoint_path=FILE "
                         "or model=an open_clip model")
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ValueError(f"pretrained={pretrained!r} is not a tag of {model_name}; allowed: {tags}")
        source = pretrained
    try:
        model = open_clip.create_model(model_name, pretrained=source, require_pretrained=True, weights_only=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"cannot load the CLIP weights of {model_name!r} (pretrained={pretrained!r}): {err}\n"
            f"Provide them without network: checkpoint_path='.../open_clip_pytorch_model.bin' (or .safetensors) "
            f"holding {model_name} weights, a tag already in the Hugging Face cache (fill it once with network, "
            "or point HF_HOME at a copy), or model=an open_clip model loaded yourself") from None
    return model, open_clip.get_tokenizer(model_name)


def _image_size(model: nn.Module) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


class CLIPGuidance(LossGuide):
    """Guide towards ``prompt`` with CLIP: per sample, the mean over ``n_cuts`` augmented cut-outs
    (RandomResizedCrop to CLIP's input size, RandomAffine(5), RandomHorizontalFlip, CLIP Normalize) of
    the squared great-circle distance d(u, v) = 2 arcsin(|u - v| / 2)^2 between the unit image and text
    embeddings (each cut-out's random parameters are shared by the batch, as in the course). The text
    embedding is computed once. Weights: ``model=`` (with its ``tokenizer=``, or the one of
    ``model_name``), else ``load_clip(model_name, pretrained, checkpoint_path)``. The model is frozen,
    put in eval mode, and follows the images' device. The augmentations draw from torch's global RNG
    (seed it with ``torch.manual_seed`` for reproducible samples). The default schedule sqrt(alpha_bar)
    is the course's.
    """

    def __init__(self, prompt: str, scale: float = 8.0, n_cuts: int = 4, model_name: str = "ViT-B-32",
                 pretrained: str | None = "openai", checkpoint_path: str | os.PathLike | None = None,
                 model: nn.Module | None = None, tokenizer: Callable | None = None,
                 schedule: str = "sqrt_alpha_bar", clip_grad_norm: float | None = None):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt={prompt!r} must be a non-empty string")
        if isinstance(n_cuts, bool) or not isinstance(n_cuts, int) or n_cuts < 1:
            raise ValueError(f"n_cuts={n_cuts!r} must be an int >= 1")
        super().__init__(self._spherical_loss, scale, schedule, clip_grad_norm)
        if model is not None and checkpoint_path is not None:
            raise ValueError("pass either model= or checkpoint_path=, not both")
        if model is None:
            model, tokenizer = load_clip(model_name, pretrained, checkpoint_path)
        elif tokenizer is None:
            tokenizer = _open_clip().get_tokenizer(model_name)
        self.prompt, self.n_cuts = prompt, n_cuts
        self.model = model.eval().requires_grad_(False)
        self.augment = self._augmentations(model)
        with torch.no_grad():
            device = next(model.parameters()).device
            self.text_embedding = F.normalize(model.encode_text(tokenizer([prompt]).to(device)).float(), dim=-1)

    @staticmethod
    def _augmentations(model: nn.Module) -> nn.Module:
        from torchvision.transforms import v2  # tensor transforms are differentiable

        config = getattr(model.visual, "preprocess_cfg", {})
        return v2.Compose([
            v2.RandomResizedCrop(_image_size(model), antialias=True),
            v2.RandomAffine(degrees=5),
            v2.RandomHorizontalFlip(),
            v2.Normalize(mean=config.get("mean", OPENAI_MEAN), std=config.get("std", OPENAI_STD)),
        ])

    def _spherical_loss(self, x0: Tensor) -> Tensor:
        """(B,) losses of images x0 in [-1, 1]."""
        if x0.ndim != 4 or x0.shape[1] != 3:
            raise ValueError(f"CLIP guidance needs RGB images (B, 3, H, W), got shape {tuple(x0.shape)}")
        if self.text_embedding.device != x0.device:
            self.to(x0.device)
        images = ((x0 + 1) / 2).to(next(self.model.parameters()).dtype)
        cuts = torch.cat([self.augment(images) for _ in range(self.n_cuts)])        # (n_cuts * B, 3, S, S)
        u = F.normalize(self.model.encode_image(cuts).float(), dim=-1)
        u = u.view(self.n_cuts, x0.shape[0], -1)                                   # (n_cuts, B, D)
        chord = (u - self.text_embedding).norm(dim=-1)                             # (n_cuts, B), in [0, 2]
        return (2 * torch.arcsin((chord / 2).clamp(max=1.0)) ** 2).mean(dim=0).to(x0.dtype)

    def to(self, device: torch.device | str) -> "CLIPGuidance":
        """Move the CLIP model and the text embedding to ``device`` (``loss`` does it on demand)."""
        self.model.to(device)
        self.text_embedding = self.text_embedding.to(device)
        return self

    def _describe(self) -> str:
        return f"prompt={self.prompt!r}, n_cuts={self.n_cuts}"

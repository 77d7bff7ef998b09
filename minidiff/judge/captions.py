"""The caption judge of text-to-image samples of captioned shapes: the shape by a classifier judge, the colour by
the hue of the bright pixels, the size by their area."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..data import COLOURS, SHAPES, SIZES
from ..data.captioned import RADIUS_RANGE
from .classifier import Judge


def _bright_pixels(images: Tensor, min_value: float = 0.5, min_saturation: float = 0.4) -> tuple[Tensor, Tensor]:
    """(RGB in [0, 1], the 0/1 mask of bright, saturated pixels) of (B, 3, H, W) images in [-1, 1]."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"expected RGB images of shape (B, 3, H, W), got {got}")
    rgb = (images.float().clamp(-1, 1) + 1) / 2
    high, low = rgb.amax(1), rgb.amin(1)
    return rgb, ((high >= min_value) & (high - low >= min_saturation * high)).float()


# area of each shape over its radius squared, as minidiff.data.embedded draws them
SHAPE_AREA = {"circle": math.pi, "square": 1.7**2, "triangle": 3 * math.sqrt(3) * 0.65**2}


def size_names(images: Tensor, shapes: list[str]) -> list[str]:
    """"small" or "large" (SIZES) of each image's shape: its radius from the bright pixels' area and the
    shape's area factor, against the middle of the drawn range."""
    _, bright = _bright_pixels(images)
    radius = torch.tensor([area / SHAPE_AREA[s] for area, s in zip(bright.sum((1, 2)).tolist(), shapes)]).sqrt()
    middle = sum(RADIUS_RANGE) / 2 * images.shape[-1]
    return [SIZES[int(r >= middle)] for r in radius.tolist()]


def colour_names(images: Tensor) -> list[str | None]:
    """The colour (one of COLOURS, hue bins centred on 0, 60, ..., 300 degrees) of each image's bright,
    saturated pixels (B, 3, H, W in [-1, 1]): the circular mean of their hues, atan2(sqrt(3) (G - B),
    2R - G - B); None for an image without such pixels."""
    rgb, weight = _bright_pixels(images)
    r, g, b = rgb.unbind(1)
    angle = torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b)
    x, y = (weight * angle.cos()).sum((1, 2)), (weight * angle.sin()).sum((1, 2))
    bins = torch.round(torch.atan2(y, x) / (math.pi / 3)).long() % len(COLOURS)
    return [COLOURS[k] if any_ else None for k, any_ in zip(bins.tolist(), (weight.sum((1, 2)) > 0).tolist())]


@dataclass(frozen=True)
class CaptionReport:
    shape: float      # share of images whose shape the judge reads as the prompt's
    colour: float     # share whose bright pixels have the prompt's colour
    both: float       # share with both right
    count: int

    def to_dict(self) -> dict:
        return asdict(self)


class CaptionJudge:
    """Reads ``"a {colour} {shape}"`` images: the shape by a Judge trained on captioned shapes of every
    colour (``Judge.for_dataset("captioned_shapes")``), the colour by ``colour_names``."""

    def __init__(self, shape_judge: Judge):
        if shape_judge.classes != list(SHAPES):
            raise ValueError(f"the shape judge must tell {list(SHAPES)}, it tells {shape_judge.classes}")
        self.shape_judge = shape_judge

    @classmethod
    def for_image_size(cls, image_size: int = 32, cache_dir: str | os.PathLike | None = None) -> CaptionJudge:
        return cls(Judge.for_dataset("captioned_shapes", image_size, cache_dir))

    def read(self, images: Tensor) -> tuple[list[str | None], list[str]]:
        """(colours, shapes) of (B, 3, H, W) images in [-1, 1]."""
        shapes = [SHAPES[k] for k in self.shape_judge.predict(images).tolist()]
        return colour_names(images), shapes

    def score(self, images: Tensor, prompts: list[str]) -> CaptionReport:
        """How many images show their prompt's colour and shape (each prompt names one of each)."""
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        wanted = [_colour_and_shape(p) for p in prompts]
        colours, shapes = self.read(images)
        colour_ok = torch.tensor([c == w[0] for c, w in zip(colours, wanted)])
        shape_ok = torch.tensor([s == w[1] for s, w in zip(shapes, wanted)])
        return CaptionReport(shape_ok.float().mean().item(), colour_ok.float().mean().item(),
                             (colour_ok & shape_ok).float().mean().item(), len(prompts))


def _colour_and_shape(prompt: str) -> tuple[str, str]:
    words = prompt.lower().split()
    colours, shapes = [w for w in words if w in COLOURS], [w for w in words if w in SHAPES]
    if len(colours) != 1 or len(shapes) != 1:
        raise ValueError(f"prompt {prompt!r}: the caption judge needs exactly one colour of {list(COLOURS)} and one "
                         f"shape of {list(SHAPES)}")
    return colours[0], shapes[0]

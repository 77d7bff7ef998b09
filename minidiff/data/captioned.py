"""Captioned shapes for text-to-image: a bright, saturated circle, square or triangle on a dark background with
the caption ``"a {colour} {shape}"``. Three colour-shape pairs are held out of training, to test whether a
model composes words into pictures it never saw."""
from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .embedded import _check_size, _hsv, _shape_mask

COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")  # hue bins centred on 0, 60, ..., 300 degrees
SHAPES = ("circle", "square", "triangle")
HELD_OUT_PAIRS = (("green", "triangle"), ("blue", "circle"), ("yellow", "square"))
ALL_PAIRS = tuple(itertools.product(COLOURS, SHAPES))
PAIR_SPLITS = {"train": tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS), "held_out": HELD_OUT_PAIRS,
               "all": ALL_PAIRS}
HUE_SPREAD = 15.0  # degrees either side of the colour's bin centre
SIZES = ("small", "large")  # the shape's radius in the lower or upper half of its range (a class label)
# of the image size, and +-15 degrees of rotation: shapes a small model trained for minutes draws legibly at 32x32
RADIUS_RANGE, CENTRE_RANGE, MAX_ROTATION = (0.2, 0.35), (0.35, 0.65), math.radians(15)


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


class CaptionedShapes(Dataset):
    """``(image (3, H, W) in [-1, 1], caption)``; item ``index`` shows pair ``pairs[index % len(pairs)]`` of the
    split (``"train"``: the 15 seen pairs, ``"held_out"``: the 3 others, ``"all"``) at a random position, size
    (radius 0.2-0.35 of the image) and rotation (up to +-15 degrees), with hue within +-15 degrees of the
    colour's centre, saturation >= 0.75, value >= 0.8, on a dark background: a pure function of
    ``(seed, split, index)``. With ``size_labels`` items are dicts ``{"image", "prompts": caption,
    "class_labels": size}`` (0 small, 1 large): two conditions at once."""

    def __init__(self, image_size: int = 32, split: str = "train", num_samples: int = 10_000, seed: int = 0,
                 size_labels: bool = False):
        if split not in PAIR_SPLITS:
            raise ValueError(f"split must be one of {tuple(PAIR_SPLITS)}, got {split!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 0 < num_samples < 2**31:
            raise ValueError(f"num_samples must be an int in [1, 2**31), got {num_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.image_size, self.split, self.num_samples, self.seed = _check_size(image_size), split, num_samples, seed
        self.pairs, self.size_labels = PAIR_SPLITS[split], bool(size_labels)
        self.captions = [caption(*pair) for pair in self.pairs]

    def __len__(self) -> int:
        return self.num_samples

    def pair(self, index: int) -> tuple[str, str]:
        """(colour, shape) of item ``index``."""
        return self.pairs[index % len(self.pairs)]

    def __getitem__(self, index: int) -> tuple[Tensor, str] | dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        item_seed = (index + 0x9E3779B9 * (self.seed * len(PAIR_SPLITS) + list(PAIR_SPLITS).index(self.split))) % 2**32
        u = torch.rand(11, generator=torch.Generator().manual_seed(item_seed))
        colour, shape = self.pair(index)
        hue = (COLOURS.index(colour) * 60 + (2 * u[8] - 1) * HUE_SPREAD) / 360 % 1
        foreground = _hsv(hue, 0.75 + 0.25 * u[9], 0.8 + 0.2 * u[10])
        background = _hsv(u[5], 0.2 + 0.4 * u[6], 0.05 + 0.15 * u[7])
        mask = _shape_mask(SHAPES.index(shape), self.image_size, u, RADIUS_RANGE, CENTRE_RANGE, MAX_ROTATION)
        image = torch.lerp(background[:, None, None], foreground[:, None, None], mask) * 2 - 1
        if self.size_labels:
            return {"image": image, "prompts": caption(colour, shape), "class_labels": int(u[2] >= 0.5)}
        return image, caption(colour, shape)


class ShapeLabels(Dataset):
    """The images of a CaptionedShapes labelled by their shape (0 circle, 1 square, 2 triangle): what a
    shape judge trains on."""

    classes = list(SHAPES)

    def __init__(self, captioned: CaptionedShapes):
        self.captioned = captioned

    def __len__(self) -> int:
        return len(self.captioned)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        item = self.captioned[index]
        return item["image"] if isinstance(item, dict) else item[0], SHAPES.index(self.captioned.pair(index)[1])

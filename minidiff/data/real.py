"""Real images that need no download: the photographs, textures and LFW face subset that ship inside
scikit-image's wheel (the ``data`` extra: ``pip install minidiff[data]``).

- ``faces``: scikit-image's LFW subset, 100 real 25x25 grayscale face crops (``Faces``); its other 100
  images are non-face patches (``Faces(kind="non-faces")``, what a face judge learns to reject).
- ``photos``: random square crops at random scales, randomly flipped, of twelve natural photographs
  (``PHOTOS``: a portrait, a cat, a cup of coffee, a rocket, a motorcycle, galaxies, a retina, a stained
  tissue section, a cameraman, coins, the moon, a clock); grayscale ones are repeated on 3 channels.
- ``textures``: the same crops of the brick, grass and gravel textures.

Splits, so that evaluations never see a training image: the held-out faces are a fixed 20 of the 100
(likewise 20 non-faces); for photos and textures the right-most ``HELD_OUT_FRACTION`` of every image's
columns is held out, training crops come only from the columns left of it and held-out crops only from
the columns right of it. Every item is a pure function of ``(seed, split, index)``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .embedded import LabeledDataset, _check_size, resize_center_crop

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "hubble_deep_field", "retina",
          "immunohistochemistry", "camera", "coins", "moon", "clock")
TEXTURES = ("brick", "grass", "gravel")
CROP_KINDS = {"photos": PHOTOS, "textures": TEXTURES}
REAL_DATASET_NAMES = ("faces", "photos", "textures")
SPLITS = ("train", "test", "all")
HELD_OUT_FRACTION = 0.3   # of every photo's and texture's columns (its right-hand side)
HELD_OUT_FACES = 20       # of the 100 faces (and of the 100 non-faces)
CROP_SCALE = (0.1, 0.3)   # crop side as a fraction of the image's shorter side (log-uniform)


def _skimage_data():
    try:
        import skimage.data
    except ImportError:
        raise ImportError("the faces, photos and textures datasets need scikit-image: "
                          "pip install minidiff[data]") from None
    return skimage.data


@functools.lru_cache(maxsize=None)
def source_image(name: str) -> Tensor:
    """One of scikit-image's images as (C, H, W) float in [-1, 1], C = 3 (colour) or 1 (grayscale)."""
    if name not in PHOTOS + TEXTURES:
        raise ValueError(f"unknown image {name!r}; allowed: {PHOTOS + TEXTURES}")
    data = _skimage_data()
    array = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    image = torch.from_numpy(array).float() / 127.5 - 1  # uint8 0..255
    return image.permute(2, 0, 1).contiguous() if image.ndim == 3 else image[None]


@functools.lru_cache(maxsize=1)
def lfw_subset() -> tuple[Tensor, Tensor]:
    """(faces, non-faces), each (100, 1, 25, 25) in [-1, 1], in scikit-image's order."""
    images = torch.from_numpy(_skimage_data().lfw_subset()).float()[:, None] * 2 - 1  # [0, 1] -> [-1, 1]
    return images[:100], images[100:]


def _held_out_mask(count: int, held_out: int, seed: int = 0) -> Tensor:
    """A fixed boolean mask of ``held_out`` of ``count`` items (a seeded permutation, not the last ones)."""
    mask = torch.zeros(count, dtype=torch.bool)
    mask[torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:held_out]] = True
    return mask


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def to_channels(images: Tensor, channels: int) -> Tensor:
    """(..., C, H, W) as 1 (ITU-R 601 luma) or 3 (gray repeated) channels."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if images.shape[-3] == channels:
        return images
    if channels == 3:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:])
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(3, 1, 1)
    return (images * weights).sum(-3, keepdim=True)


class Faces(LabeledDataset):
    """scikit-image's LFW subset resized to ``image_size``: 100 faces (``kind="faces"``, label 0) or its
    100 non-face patches (``kind="non-faces"``). ``split`` "train" (80), "test" (the 20 held-out) or
    "all"; ``augment`` mirrors an image at random (faces are left-right symmetric, a mirror is still a
    face of the same person)."""

    KINDS = ("faces", "non-faces")

    def __init__(self, image_size: int = 32, channels: int = 3, split: str = "train", kind: str = "faces",
                 augment: bool = False):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        faces, non_faces = lfw_subset()
        images = faces if kind == "faces" else non_faces
        held_out = _held_out_mask(len(images), HELD_OUT_FACES, seed=0 if kind == "faces" else 1)
        keep = {"train": ~held_out, "test": held_out, "all": torch.ones_like(held_out)}[_check_split(split)]
        self.indices = keep.nonzero().flatten()  # into scikit-image's order
        self.image_size, self.channels, self.split, self.kind = _check_size(image_size), channels, split, kind
        self.classes = [kind[:-1]]
        self.images = to_channels(resize_center_crop(images[self.indices], image_size), channels).contiguous()
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, 0


class Crops(LabeledDataset):
    """Random square crops of scikit-image's photographs (``kind="photos"``) or textures (``"textures"``),
    resized to ``image_size`` (antialiased) and mirrored half of the time; label = the source image.

    Item ``index`` picks a source image uniformly, a side of ``CROP_SCALE`` times its shorter side
    (log-uniform) and a position inside the split's columns (see the module docstring), all from a
    generator seeded by ``(seed, split, index)``: the same arguments always give the same images."""

    def __init__(self, image_size: int = 32, kind: str = "photos", split: str = "train", num_samples: int = 10_000,
                 seed: int = 0, channels: int = 3):
        if kind not in CROP_KINDS:
            raise ValueError(f"kind must be one of {tuple(CROP_KINDS)}, got {kind!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 0 < num_samples < 2**31:
            raise ValueError(f"num_samples must be an int in [1, 2**31), got {num_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        to_channels(torch.zeros(1, 1, 1), channels)  # validates channels
        self.image_size, self.channels, self.kind = _check_size(image_size), channels, kind
        self.split, self.num_samples, self.seed = _check_split(split), num_samples, seed
        self.classes = list(CROP_KINDS[kind])
        self.sources = [source_image(name) for name in self.classes]

    def __len__(self) -> int:
        return self.num_samples

    def _columns(self, width: int) -> tuple[int, int]:
        cut = round(width * (1 - HELD_OUT_FRACTION))
        return {"train": (0, cut), "test": (cut, width), "all": (0, width)}[self.split]

    def crop_box(self, index: int) -> tuple[int, int, int, int, bool]:
        """(label, top, left, side, mirrored) of item ``index``: which source image, where, and a flip."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        # torch's CPU generator keeps 32 seed bits: a golden-ratio stride keeps seeds' streams apart
        item_seed = (index + 0x9E3779B9 * (self.seed * len(SPLITS) + SPLITS.index(self.split))) % 2**32
        u = torch.rand(5, generator=torch.Generator().manual_seed(item_seed)).tolist()
        label = min(int(u[0] * len(self.sources)), len(self.sources) - 1)
        height, width = self.sources[label].shape[-2:]
        first, last = self._columns(width)
        low, high = CROP_SCALE
        side = round(min(height, width) * low * (high / low) ** u[1])
        side = max(1, min(side, height, last - first))
        top, left = int(u[2] * (height - side + 1)), first + int(u[3] * (last - first - side + 1))
        return label, top, left, side, u[4] < 0.5

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label, top, left, side, mirrored = self.crop_box(index)
        crop = self.sources[label][None, :, top : top + side, left : left + side]
        crop = F.interpolate(crop, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        image = to_channels(crop[0].clamp(-1, 1), self.channels)
        return (image.flip(-1) if mirrored else image).contiguous(), label


def real_dataset(name: str, image_size: int, **kwargs) -> LabeledDataset:
    """``"faces"`` (a ``Faces``), ``"photos"`` or ``"textures"`` (``Crops``); ``kwargs`` go to the class."""
    if name == "faces":
        return Faces(image_size, **kwargs)
    if name in CROP_KINDS:
        return Crops(image_size, kind=name, **kwargs)
    raise ValueError(f"unknown real dataset {name!r}; allowed: {REAL_DATASET_NAMES}")

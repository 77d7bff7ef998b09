"""Datasets that yield ``(image, label)`` with ``image`` a float tensor (C, H, W) in [-1, 1]:
scikit-learn's digits and procedurally drawn RGB shapes/stripes (embedded, nothing to download),
image folders, and torchvision datasets already on disk (scikit-image's real photographs and faces are in
``real.py``; ``catalog.load_dataset`` finds all of them by name)."""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

if TYPE_CHECKING:
    import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TORCHVISION_DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


class LabeledDataset(Dataset):
    """Base of minidiff's datasets: items are ``(image (C, H, W) in [-1, 1], label int)``."""

    classes: list[str]
    channels: int
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _check_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """Resize (B, C, H, W) so the shorter side is ``size`` (bilinear, antialiased), then crop the centre."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top : top + size, left : left + size].clamp(-1, 1)


def random_translate(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image of (B, C, H, W) by its own whole number of pixels in [-max_shift, max_shift],
    repeating the border (no flips: a mirrored digit is another symbol)."""
    batch, _, height, width = images.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (batch, 2), generator=generator).to(images)
    theta = torch.zeros(batch, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = 2 * shifts[:, 0] / width  # one pixel is 2/W in grid_sample's [-1, 1] coordinates
    theta[:, 1, 2] = 2 * shifts[:, 1] / height
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits dataset needs scikit-learn: pip install minidiff[digits]") from None
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float()[:, None] / 8 - 1  # (N, 1, 8, 8), 0..16 -> [-1, 1]
    return images, torch.from_numpy(bunch.target).long()


def _stratified_split(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Sorted train and test indices holding ``test_fraction`` of every class out for testing."""
    generator = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        is_test[members[: round(len(members) * test_fraction)]] = True
    return (~is_test).nonzero().flatten(), is_test.nonzero().flatten()


class Digits(LabeledDataset):
    """scikit-learn's 1797 handwritten digits (8x8, 10 classes) resized to ``image_size``, 1 channel.

    ``split`` "train" and "test" are a fixed, stratified 80/20 split; "all" is every image.
    ``augment`` shifts each image by up to ``image_size // 8`` pixels (never flips)."""

    SPLITS = ("all", "train", "test")

    def __init__(self, image_size: int = 16, split: str = "all", augment: bool = False):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        images, labels = _sklearn_digits()
        self.indices = torch.arange(len(labels))  # into scikit-learn's order
        if split != "all":
            train, test = _stratified_split(labels, test_fraction=0.2, seed=0)
            self.indices = train if split == "train" else test
        self.image_size, self.channels, self.split = _check_size(image_size), 1, split
        self.classes = [str(digit) for digit in range(10)]
        self.images = resize_center_crop(images[self.indices], image_size)
        self.labels = labels[self.indices]
        self.max_shift = image_size // 8 if augment else 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.max_shift:
            image = random_translate(image[None], self.max_shift)[0]
        return image, int(self.labels[index])


# ----------------------------------------------------------------------------- shapes and stripes


def _hsv(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """RGB (3,) in [0, 1] of an HSV colour (all components in [0, 1])."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + hue * 6) % 6
    return value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)


def _coverage(distance: Tensor) -> Tensor:
    """Antialiased mask from a signed distance in pixels (negative inside): a one-pixel soft edge."""
    return (0.5 - distance).clamp(0, 1)


def _shape_mask(label: int, size: int, u: Tensor, radius_range: tuple[float, float] = (0.15, 0.3),
                centre_range: tuple[float, float] = (0.3, 0.7), max_rotation: float | None = None) -> Tensor:
    """Circle, square or triangle at a random centre and radius (ranges as fractions of the image size),
    rotated by a random angle (up to +-``max_rotation`` radians if given); ``u`` holds uniforms."""
    pixels = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(pixels, pixels, indexing="ij")
    (c0, c1), (r0, r1) = centre_range, radius_range
    cx, cy = size * (c0 + (c1 - c0) * u[0]), size * (c0 + (c1 - c0) * u[1])
    radius = size * (r0 + (r1 - r0) * u[2])
    angle = 2 * math.pi * u[3] if max_rotation is None else max_rotation * (2 * u[3] - 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    dx, dy = cos * (x - cx) + sin * (y - cy), cos * (y - cy) - sin * (x - cx)
    if label == 0:
        distance = torch.sqrt(dx**2 + dy**2) - radius
    elif label == 1:
        distance = torch.maximum(dx.abs(), dy.abs()) - 0.85 * radius  # about the circle's area
    else:  # equilateral triangle of circumradius 1.3 r: three half-planes at the inradius R / 2
        normals = [(-math.pi / 2 + 2 * math.pi * k / 3) for k in range(3)]
        distance = torch.stack([math.cos(a) * dx + math.sin(a) * dy for a in normals]).amax(0) - 0.65 * radius
    return _coverage(distance)


def _stripes_mask(label: int, size: int, u: Tensor) -> Tensor:
    """Horizontal, vertical or diagonal stripes with a random period, duty, phase and small tilt."""
    pixels = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(pixels, pixels, indexing="ij")
    angle = (math.pi / 2, 0.0, math.pi / 4 + (u[4] > 0.5) * math.pi / 2)[label]  # of the stripes' normal
    angle = angle + (u[3] - 0.5) * math.radians(16)
    period, duty = size * (0.15 + 0.15 * u[0]), 0.35 + 0.3 * u[1]
    phase = (torch.cos(angle) * x + torch.sin(angle) * y) / period + u[2]
    distance = ((phase % 1 - 0.5).abs() - duty / 2) * period
    return _coverage(distance)


class Shapes(LabeledDataset):
    """Procedurally drawn RGB images, each a pure function of ``(seed, index)``; label ``index % 3``.

    kind "shapes": a bright circle, square or triangle on a dark background (for a base model).
    kind "stripes": warm red-orange horizontal, vertical or diagonal stripes on a light cream
    background, a visibly different domain to fine-tune onto."""

    KINDS = {"shapes": ("circle", "square", "triangle"), "stripes": ("horizontal", "vertical", "diagonal")}

    def __init__(self, image_size: int = 32, num_samples: int = 10_000, seed: int = 0, kind: str = "shapes"):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {tuple(self.KINDS)}, got {kind!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 0 < num_samples < 2**32:
            raise ValueError(f"num_samples must be an int in [1, 2**32), got {num_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.image_size, self.channels = _check_size(image_size), 3
        self.num_samples, self.seed, self.kind = num_samples, seed, kind
        self.classes = list(self.KINDS[kind])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        # torch's CPU generator keeps only 32 seed bits: a golden-ratio stride per seed keeps
        # seeds' streams apart and indices of one seed distinct
        item_seed = (index + self.seed * 0x9E3779B9) % 2**32
        u = torch.rand(11, generator=torch.Generator().manual_seed(item_seed))
        label = index % len(self.classes)
        if self.kind == "shapes":
            background = _hsv(u[5], 0.3 + 0.5 * u[6], 0.05 + 0.2 * u[7])
            foreground = _hsv(u[8], 0.6 + 0.4 * u[9], 0.75 + 0.25 * u[10])
            mask = _shape_mask(label, self.image_size, u)
        else:
            background = _hsv(0.08 + 0.08 * u[5], 0.05 + 0.15 * u[6], 0.9 + 0.1 * u[7])
            foreground = _hsv(0.1 * u[8], 0.7 + 0.3 * u[9], 0.75 + 0.2 * u[10])
            mask = _stripes_mask(label, self.image_size, u)
        image = torch.lerp(background[:, None, None], foreground[:, None, None], mask)  # (3, H, W)
        return image * 2 - 1, label


# ------------------------------------------------------------------------------- files on disk


def _pil_to_unit_array(image) -> "np.ndarray":
    """A PIL image as float32 (H, W) or (H, W, 3) in [0, 1]: 8-bit modes / 255, 16-bit ones / 65535, 32-bit
    integer ones by their bit depth's range, float ones as they are ([0, 1]) or / 255 ([0, 255]); any
    transparency composited over white. Raises ValueError for what has no defined range."""
    import numpy as np
    from PIL import Image

    if image.mode == "P" or image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image).convert("RGB")
    if image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / 65535
    if image.mode == "I":  # 16-bit PNGs open as "I" too
        array = np.asarray(image, dtype=np.float64)
        scale = 65535 if array.min() >= 0 and array.max() <= 65535 else None
        if scale is None:
            raise ValueError(f"32-bit integer pixels from {array.min():.0f} to {array.max():.0f}: no known range")
        return (array / scale).astype(np.float32)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        if not np.isfinite(array).all():
            raise ValueError("float pixels that are not finite")
        low, high = float(array.min()), float(array.max())
        if low >= 0 and high <= 1:
            return array
        if low >= 0 and high <= 255:
            return array / 255
        raise ValueError(f"float pixels from {low} to {high}: expected [0, 1] or [0, 255]")
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # CMYK, YCbCr, 1-bit, ...
    return np.asarray(image, dtype=np.float32) / 255


def _pil_to_tensor(image, channels: int, size: int) -> Tensor:
    """A PIL image as (C, size, size) in [-1, 1]: scaled by its real range, converted, resized, centre-cropped."""
    array = torch.from_numpy(_pil_to_unit_array(image).copy())
    tensor = array[None] if array.dim() == 2 else array.permute(2, 0, 1)  # (C, H, W)
    if channels == 1 and tensor.shape[0] == 3:  # ITU-R 601-2 luma, as PIL's convert("L")
        tensor = (tensor * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
    elif channels == 3 and tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return resize_center_crop((tensor * 2 - 1)[None], size)[0]


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith(".")
    )


def _find_samples(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, label) pairs: a class per sub-folder, else one class for ``root``."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [_image_files(folder) for folder in subfolders] if subfolders else [_image_files(root)]
    empty = [folder.name for folder, found in zip(subfolders, files) if not found]
    if empty:
        raise FileNotFoundError(f"{root}: class folders without image files: {empty}")
    if not files[0]:
        raise FileNotFoundError(f"{root}: no image files (allowed extensions: {', '.join(IMAGE_EXTENSIONS)})")
    classes = [folder.name for folder in subfolders] or [root.name]
    return classes, [(path, label) for label, found in enumerate(files) for path in found]


class ImageFolder(LabeledDataset):
    """Images under ``root``: one class a sub-folder (sorted names, as torchvision's ImageFolder),
    or images directly in ``root`` as a single class 0. Resized and centre-cropped to ``image_size``;
    ``augment`` flips horizontally at random."""

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int = 3, augment: bool = False):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.root, self.image_size, self.channels = Path(root), _check_size(image_size), channels
        self.augment = augment
        self.classes, self.samples = _find_samples(self.root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        if not -len(self.samples) <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for the {len(self.samples)} images of {self.root}")
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                tensor = _pil_to_tensor(image, self.channels, self.image_size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # corrupt, truncated, huge
            raise ValueError(f"{path}: cannot read image ({err})") from None
        if self.augment and torch.rand(()) < 0.5:
            tensor = tensor.flip(-1)
        return tensor, label


class TorchvisionImages(LabeledDataset):
    """A torchvision dataset of PIL images (MNIST, FashionMNIST, CIFAR10) in minidiff's format."""

    def __init__(self, base: Dataset, image_size: int, channels: int):
        self.base, self.image_size, self.channels = base, _check_size(image_size), channels
        self.classes = list(base.classes)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        return _pil_to_tensor(image, self.channels, self.image_size), int(label)


def torchvision_dataset(name: str, root: str | os.PathLike, image_size: int, train: bool = True) -> TorchvisionImages:
    """"mnist", "fashion_mnist" or "cifar10" from ``root``, where it must already be downloaded."""
    if name not in TORCHVISION_DATASETS:
        raise ValueError(f"unknown torchvision dataset {name!r}; allowed: {tuple(TORCHVISION_DATASETS)}")
    import torchvision.datasets

    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[name])
    try:
        base = cls(str(root), train=train, download=False)
    except RuntimeError as err:  # torchvision's "Dataset not found ..."
        raise FileNotFoundError(
            f"{name} not found under {root} ({err}); it must be downloaded beforehand, e.g. with "
            f"torchvision.datasets.{cls.__name__}({str(root)!r}, download=True)"
        ) from None
    return TorchvisionImages(base, image_size, channels=3 if name == "cifar10" else 1)

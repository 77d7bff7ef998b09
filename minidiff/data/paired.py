"""Image-conditioned data: each image with a degraded version of itself as the condition (super-resolution)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..checks import check_tensor


def _image(item: Tensor | tuple) -> Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


def _check(images: Tensor, factor: int) -> None:
    """``factor`` an int >= 1, ``images`` a floating-point (B, C, H, W) tensor."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor={factor!r} must be an int >= 1")
    check_tensor("images", images, floating=True)
    if images.ndim != 4:
        raise ValueError(f"images of shape {tuple(images.shape)}: expected (B, C, H, W)")


def downsample(images: Tensor, factor: int) -> Tensor:
    """(B, C, H, W) -> (B, C, H / factor, W / factor) by averaging factor x factor blocks (a box filter)."""
    _check(images, factor)
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise ValueError(f"images of shape {tuple(images.shape)}: expected (B, C, H, W) with H and W multiples "
                         f"of {factor}")
    return F.avg_pool2d(images, factor)


def upsample(images: Tensor, factor: int) -> Tensor:
    """Bicubic upsampling by ``factor`` (B, C, h, w) -> (B, C, factor h, factor w), clamped to [-1, 1]."""
    _check(images, factor)
    return F.interpolate(images, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)


class SuperResolutionPairs(Dataset):
    """``{"image": x, "conditioning_image": upsample(downsample(x))}`` for the images of ``base`` (items
    ``image`` or ``(image, label)``): what a ``factor``x super-resolution UNet with ``conditioning_channels``
    equal to the image channels trains on."""

    def __init__(self, base: Dataset, factor: int = 4):
        if len(base) == 0:
            raise ValueError("SuperResolutionPairs: the base dataset is empty")
        image = _image(base[0])
        downsample(image[None], factor)  # checks the factor and the size
        self.base, self.factor = base, factor

    def __len__(self) -> int:
        return len(self.base)

    def low_resolution(self, index: int) -> Tensor:
        """The (C, H / factor, W / factor) input of item ``index``."""
        return downsample(_image(self.base[index])[None], self.factor)[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image = _image(self.base[index])
        low = downsample(image[None], self.factor)
        return {"image": image, "conditioning_image": upsample(low, self.factor)[0]}

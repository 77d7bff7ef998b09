"""Measures of generated images against real ones: memorisation (nearest-neighbour distances to the training
images), super-resolution fidelity (PSNR, high-frequency energy) and the Fréchet distance of feature sets."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..checks import check_tensor


def _check_images(name: str, images: Tensor, channels: int | None = None) -> None:
    """``images`` must be a non-empty (B, C, H, W) tensor (with ``channels`` channels if given)."""
    check_tensor(name, images)
    if images.ndim != 4 or images.shape[0] == 0 or channels is not None and images.shape[1] != channels:
        raise ValueError(f"{name} must be (B, {channels or 'C'}, H, W) images with B >= 1, got {tuple(images.shape)}")


def nearest_neighbour_distances(images: Tensor, references: Tensor, mirrors: bool = True) -> Tensor:
    """Distance (B,) from each image (B, C, H, W) to its nearest reference (N, C, H, W) (with ``mirrors``
    also the references' mirror images: training with flips teaches those too).

    Images are compared by their deviation from the references' mean image, standardised per image (zero
    mean, unit variance), with the RMS difference: sqrt(2 (1 - r)) for r the Pearson correlation of two
    deviations. So what every face shares (the average face, overall brightness and contrast) does not make
    two images close; a faded or blurred copy of a reference stays close to it."""
    _check_images("images", images)
    _check_images("references", references)
    if images.shape[1:] != references.shape[1:]:
        raise ValueError(f"images {tuple(images.shape)} and references {tuple(references.shape)} differ in shape")
    if mirrors:
        references = torch.cat([references, references.flip(-1)])
    centre = references.double().mean(0)

    def standardised(x: Tensor) -> Tensor:
        x = (x.double() - centre).flatten(1)
        x = x - x.mean(1, keepdim=True)
        return x / (x.square().mean(1, keepdim=True).sqrt() + 1e-2)  # a flat deviation stays near 0

    a, b = standardised(images), standardised(references)
    return (torch.cdist(a, b) / math.sqrt(a.shape[1])).amin(1).float()


@dataclass(frozen=True)
class MemorizationReport:
    """Near-copies of training images among samples. ``threshold`` is the smallest distance from a
    held-out real image to its nearest training image: closer than that, a sample is nearer to a training
    image than any other real image of the distribution ever came ("near-copy")."""

    near_copy_share: float              # share of samples with a nearest-training distance < threshold
    threshold: float
    sample_distances: list[float]       # each sample's distance to its nearest training image
    held_out_distances: list[float]     # each held-out image's distance to its nearest training image

    def to_dict(self) -> dict:
        return asdict(self)


def memorization(samples: Tensor, train_images: Tensor, held_out_images: Tensor) -> MemorizationReport:
    """Nearest-neighbour distances of ``samples`` and of held-out real images to the training images (all
    (N, C, H, W) in [-1, 1], the same shape), and the share of samples that are near-copies."""
    for name, images in (("samples", samples), ("train_images", train_images), ("held_out_images", held_out_images)):
        _check_images(name, images)
    held_out = nearest_neighbour_distances(held_out_images, train_images)
    distances = nearest_neighbour_distances(samples, train_images)
    threshold = float(held_out.min())
    return MemorizationReport(float((distances < threshold).float().mean()), threshold,
                              [round(v, 4) for v in distances.tolist()], [round(v, 4) for v in held_out.tolist()])


# ---------------------------------------------------------------------------------- super-resolution
def psnr(images: Tensor, references: Tensor) -> Tensor:
    """Peak signal-to-noise ratio (dB) of each image (B, C, H, W) in [-1, 1] against its reference:
    10 log10(peak^2 / MSE) with peak 2 (the range of [-1, 1])."""
    _check_images("images", images)
    if references.shape != images.shape:
        got = tuple(references.shape) if torch.is_tensor(references) else type(references).__name__
        raise ValueError(f"references must have the images' shape {tuple(images.shape)}, got {got}")
    mse = (images.float().clamp(-1, 1) - references.float()).square().mean((1, 2, 3))
    return 10 * torch.log10(4 / mse.clamp_min(1e-12))


def high_frequency_energy(images: Tensor) -> Tensor:
    """Mean squared discrete Laplacian of each image (B, C, H, W) (inner pixels): the fine detail that
    upsampling blurs away; a sharp, realistic upsampling has about the real images' energy."""
    _check_images("images", images)
    x = images.float()
    laplacian = (x[..., 1:-1, :-2] + x[..., 1:-1, 2:] + x[..., :-2, 1:-1] + x[..., 2:, 1:-1] - 4 * x[..., 1:-1, 1:-1])
    return laplacian.square().mean((1, 2, 3))


# ----------------------------------------------------------------------------------- distributions
def image_statistics(images: Tensor) -> Tensor:
    """Per-image statistics of (B, 3, H, W) images in [0, 1]: mean and std of each colour channel, mean
    absolute horizontal and vertical differences (edges), saturation (max - min channel): (B, 9)."""
    _check_images("images", images, channels=3)
    gray = images.mean(1)
    dx = (gray[:, :, 1:] - gray[:, :, :-1]).abs().mean((1, 2))
    dy = (gray[:, 1:, :] - gray[:, :-1, :]).abs().mean((1, 2))
    saturation = (images.amax(1) - images.amin(1)).mean((1, 2))
    return torch.cat([images.mean((2, 3)), images.std((2, 3)), torch.stack([dx, dy, saturation], 1)], 1)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between Gaussian fits of two
    feature sets (N, D) (the FID formula of Heusel et al. 2017, on any features)."""
    for name, features in (("a", a), ("b", b)):
        check_tensor(name, features)
        if features.ndim != 2 or features.shape[0] < 2 or features.shape[1] != a.shape[-1]:
            raise ValueError(f"frechet_distance: {name} must be (N, D) features with N >= 2 and both D equal, got "
                             f"a {tuple(a.shape)} and b {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T  # symmetric PSD square root
    cross = torch.linalg.eigvalsh(root @ cov_b @ root).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)

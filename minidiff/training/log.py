"""What a training run shows: a metrics log (JSON lines), a loss-curve PNG and fixed-seed sample grids."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..files import atomic_path
from ..sampling import sample
from ..schedulers import DDIMScheduler, DDPMScheduler, Scheduler


class MetricsLog:
    """``metrics.jsonl``: one JSON object per optimizer step (step, loss, lr, grad_norm, ...)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        """The logged rows. A last line cut short (a crash while appending) is dropped with a warning; a broken
        line elsewhere raises ValueError naming the file and the line."""
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
            elif number == len(lines):
                warnings.warn(f"{self.path}: line {number} is cut short; dropping it", stacklevel=2)
            else:
                raise ValueError(f"{self.path}: line {number} is not a metrics row ({line[:80]!r})")
        return rows

    def truncate(self, step: int) -> None:
        """Drop the rows after ``step``: a resumed run rewrites them, so the log reads as one run."""
        kept = [row for row in self.rows() if row["step"] <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")

    def plot(self, path: str | os.PathLike) -> Path | None:
        """Write the loss curve (per step, and smoothed) as a PNG; None if matplotlib is missing."""
        return plot_loss(self.rows(), path)


def plot_loss(rows: list[dict[str, Any]], path: str | os.PathLike, smoothing: float = 0.9) -> Path | None:
    """Loss per step (faint) and its bias-corrected exponential moving average, log scale."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install minidiff[plot]): no loss-curve PNG", stacklevel=2)
        return None
    if not rows:
        return None
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    smooth, value = [], 0.0
    for n, loss in enumerate(losses, 1):
        value = smoothing * value + (1 - smoothing) * loss
        smooth.append(value / (1 - smoothing**n))  # bias-corrected, as Adam's moments
    figure = Figure(figsize=(6, 3.5), dpi=100)  # no pyplot: no global state, no display backend
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.plot(steps, losses, alpha=0.3, label="loss")
    ax.plot(steps, smooth, label=f"EMA {smoothing}")
    ax.set(xlabel="optimizer step", ylabel="loss", yscale="log", title="training loss")
    ax.legend()
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


@torch.no_grad()
def fixed_seed_samples(unet: nn.Module, scheduler: Scheduler, *, num_images: int = 8, num_inference_steps: int = 50,
                       seed: int = 0, **conditioning: Tensor | None) -> Tensor:
    """``num_images`` samples in [0, 1] at ``unet.config.sample_size``, from noise drawn on the CPU with
    ``seed``: the same seed gives the same starting noise on any device, so grids taken at different steps (or
    before and after fine-tuning) are comparable image by image. A DDPM scheduler samples with DDIM (eta 0) of
    its config, a DDIM or DPM-Solver scheduler as it is. ``conditioning`` (class_labels, conditioning_image,
    encoder_hidden_states) goes to ``minidiff.sample``."""
    solver = DDIMScheduler.from_config(scheduler.config) if isinstance(scheduler, DDPMScheduler) else scheduler
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    noise = torch.randn((num_images, unet.config.in_channels, height, width),
                        generator=torch.Generator().manual_seed(seed))
    was_training = unet.training
    unet.eval()
    try:
        x = sample(unet, solver, batch_size=num_images, num_inference_steps=num_inference_steps, noise=noise,
                   progress=False, **conditioning)
    finally:
        unet.train(was_training)
    return (x.float() / 2 + 0.5).clamp(0, 1)


def grid_labels(unet: nn.Module, n: int, null_class: bool) -> Tensor | None:
    """Labels 0, 1, 2, ... for the grid of a class-conditional UNet (never its null class), else None."""
    if not unet.takes_class_labels or unet.config.num_class_embeds is None:
        return None
    return torch.arange(n) % (unet.config.num_class_embeds - null_class)


def save_sample_grid(images: Tensor, path: str | os.PathLike, nrow: int = 4) -> Path:
    """Save (B, C, H, W) images in [0, 1] as one PNG grid, atomically."""
    from torchvision.utils import save_image

    path = Path(path)
    with atomic_path(path) as tmp:
        save_image(images, tmp, nrow=nrow, format="png")
    return path

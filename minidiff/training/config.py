"""TrainConfig: every setting of a training run besides the model, scheduler and data, validated; and the
learning-rate schedule it names."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from ..checks import check_device, check_type

LR_SCHEDULES = ("constant", "linear", "cosine")
MIXED_PRECISION = ("no", "bf16", "fp16")
# config fields that may change between a run and its resume without breaking exactness
RESUMABLE_CHANGES = {"output_dir", "resume", "overwrite", "progress", "num_workers", "log_samples_every",
                      "sample_steps", "save_model_every", "keep_checkpoints", "max_steps", "num_epochs",
                      "allow_resume_changes", "max_minutes", "device"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the model, scheduler and data. Validated on construction."""
    output_dir: str = "outputs/train"      # checkpoints/, samples/, metrics.jsonl, loss.png, final pipeline
    seed: int = 0                          # data order, timesteps, noise, label dropout, global RNGs
    batch_size: int = 16                   # images per micro-batch, all processes together
    grad_accumulation_steps: int = 1       # micro-batches per optimizer step; the loss is divided by it
    num_epochs: int = 1                    # passes over the data, unless max_steps is set
    max_steps: int | None = None           # optimizer steps; overrides num_epochs
    max_minutes: float | None = None       # a time budget: end (as at the last step) once training took this long
    lr: float = 1e-4                       # peak AdamW learning rate
    lr_schedule: str = "cosine"            # decay after warm-up: constant | linear | cosine (to 0)
    warmup_steps: int = 0                  # linear warm-up: lr * (step + 1) / warmup_steps
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0              # AdamW's decoupled weight decay
    max_grad_norm: float | None = 1.0      # clip the global gradient norm; None: no clipping
    snr_gamma: float | None = None         # Min-SNR-gamma loss weights (Hang et al. 2023), e.g. 5; None: plain MSE
    ema_decay: float = 0.999               # EMA of the weights; 0 disables it
    ema_warmup: bool = True                # decay min(ema_decay, (1 + n) / (10 + n)) at update n
    mixed_precision: str = "no"            # no | bf16 (CPU or CUDA autocast) | fp16 (CUDA, loss scaling)
    gradient_checkpointing: bool = False   # recompute each down/mid/up block in backward: less memory
    cond_drop_prob: float = 0.0            # class-conditional: use the null label (last row) this often
    log_samples_every: int = 250           # DDIM sample grid (8 images, fixed seed) every N steps; 0: never
    sample_steps: int = 50                 # DDIM steps of those grids
    save_model_every: int = 500            # checkpoint every N steps and at the end; 0: only on a signal
    keep_checkpoints: int = 3              # how many of the newest checkpoints to keep
    resume: bool = False                   # continue from the newest checkpoint in output_dir/checkpoints
    allow_resume_changes: bool = False     # resume even if the model, scheduler, data or settings changed
    overwrite: bool = False                # delete a previous run's checkpoints/samples/metrics first
    num_workers: int = 0                   # DataLoader worker processes
    device: str | None = None              # None: cuda if available, else cpu (cuda:LOCAL_RANK under torchrun)
    progress: bool = True                  # tqdm progress bar (rank 0)

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, os.PathLike):  # a Path is welcome too
            object.__setattr__(self, "output_dir", os.fspath(self.output_dir))
        if isinstance(self.adam_betas, list):
            object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        for field in dataclasses.fields(self):
            check_type(f"TrainConfig.{field.name}", getattr(self, field.name), field.type)
        minimum = dict(batch_size=1, grad_accumulation_steps=1, num_epochs=1, max_steps=1, sample_steps=1, seed=0,
                       warmup_steps=0, log_samples_every=0, save_model_every=0, keep_checkpoints=0, num_workers=0)
        for name, low in minimum.items():
            value = getattr(self, name)
            if (value is not None or name != "max_steps") and (type(value) is not int or value < low):
                raise ValueError(f"TrainConfig.{name}={value!r}: expected an int >= {low}")
        if not self.output_dir:
            raise ValueError("TrainConfig.output_dir='': expected a folder path")
        if self.seed >= 2 ** 32:
            raise ValueError(f"TrainConfig.seed={self.seed}: expected an int in [0, 2**32)")
        check_device("TrainConfig.device", self.device)
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("mixed_precision", MIXED_PRECISION)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}; allowed: {list(allowed)}")
        if not 0 < self.lr < math.inf or self.weight_decay < 0 or (self.max_grad_norm is not None and not self.max_grad_norm > 0):
            raise ValueError(f"TrainConfig: lr={self.lr} must be > 0 and finite, weight_decay={self.weight_decay} >= 0, "
                             f"max_grad_norm={self.max_grad_norm} None or > 0")
        if self.max_minutes is not None and (type(self.max_minutes) not in (int, float) or not self.max_minutes > 0):
            raise ValueError(f"TrainConfig.max_minutes={self.max_minutes!r}: expected None or a number > 0")
        if not 0 <= self.ema_decay < 1 or not 0 <= self.cond_drop_prob < 1:
            raise ValueError(f"TrainConfig: ema_decay={self.ema_decay} and cond_drop_prob={self.cond_drop_prob} "
                             "must be in [0, 1)")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"TrainConfig.snr_gamma={self.snr_gamma}: expected None or a number > 0")
        if not all(0 <= beta < 1 for beta in self.adam_betas):
            raise ValueError(f"TrainConfig.adam_betas={self.adam_betas}: both must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine") -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): (step + 1) / warmup_steps during
    warm-up, then with p = (step - warmup) / (total - warmup) in [0, 1): 1 (constant), 1 - p (linear) or
    (1 + cos(pi p)) / 2 (cosine, Loshchilov & Hutter 2017, without restarts)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r}; allowed: {list(LR_SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    return max(0.0, 1.0 - p) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))

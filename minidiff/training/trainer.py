"""The training loop: a small explicit loop, no framework (fine-tuning and training from scratch).

One optimizer step = ``grad_accumulation_steps`` micro-batches of ``batch_size`` images (over all processes
together). For each image: t ~ U{0..T-1}, eps ~ N(0, I), x_t = add_noise(x0, eps, t) and the loss is
||unet(x_t, t) - target||^2 with target eps, x0 or v after the scheduler's prediction_type (Ho et al. 2020,
Alg. 1; Salimans & Ho 2022). AdamW, linear warm-up then constant/linear/cosine decay, gradient clipping,
EMA weights, autocast mixed precision, gradient checkpointing, atomic checkpoints with exact resume,
torch.distributed DDP under torchrun. The randomness of a step (t, eps, label drop) is drawn for the
whole global step from one seeded generator, so the result does not depend on how the step is split into
micro-batches or processes.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .distributed import EpochBatches, barrier, data_loader, gather_objects, mean_and_any, setup_distributed
from .ema import EMA
from ..files import write_json
from ..io import save_pipeline, save_unet
from ..schedulers import DDIMScheduler, DDPMScheduler
from .config import RESUMABLE_CHANGES, TrainConfig, lr_factor
from .log import MetricsLog, fixed_seed_samples, grid_labels, save_sample_grid
from .conditions import ConditionedUNet, Conditions, check_conditions, drop_conditions, split_batch
from .setup import (autocast_dtype, check_arguments, check_image, enable_gradient_checkpointing, prepare_unet,
                    seed_everything, stop_on_signals)
from ..text import TextEncoder

@dataclass(frozen=True)
class TrainResult:
    step: int                    # optimizer steps done
    loss: float | None           # loss of the last step (None if no step ran)
    interrupted: bool            # stopped by SIGINT/SIGTERM (a checkpoint was saved)
    checkpoint: Path | None      # the newest checkpoint
    output_dir: Path


class Trainer:
    """Trains ``unet`` (in place) on ``dataset`` items: ``image``, ``(image, condition)`` or a dict of the image
    and its conditions (see ``minidiff.training.conditions``), image (C, H, W) in [-1, 1]. A condition is a
    class label, a conditioning image (C', H, W) for a UNet with ``conditioning_channels=C'``, or a prompt
    for ``text_encoder``, which trains jointly with the UNet. ``config.cond_drop_prob`` drops each condition
    to its null for classifier-free guidance. The unet's ``config.sample_size`` becomes the trained image
    size. ``run()`` trains to the end (or to a SIGINT/SIGTERM) and writes a diffusers pipeline folder to
    ``output_dir``: ``unet/`` with the EMA weights (the raw ones without EMA), ``unet_raw/`` with the trained
    weights, ``scheduler/``, and ``text_encoder/`` (EMA weights) when there is one."""

    def __init__(self, unet: nn.Module, scheduler: DDPMScheduler | DDIMScheduler, dataset: Dataset,
                 config: TrainConfig = TrainConfig(), text_encoder: TextEncoder | None = None):
        check_arguments(unet, scheduler, dataset, config)
        c, self.config, self.scheduler, self.dataset = config, config, scheduler, dataset
        self.rank, self.world_size, self.device, self._owns_group = setup_distributed(c.device)
        self.batches_per_epoch = EpochBatches(len(dataset), c.batch_size, c.seed, 0, self.rank,
                                              self.world_size).per_epoch  # also checks batch_size
        self.total_steps = c.max_steps or math.ceil(c.num_epochs * self.batches_per_epoch / c.grad_accumulation_steps)
        self.output_dir, self.checkpoints = Path(c.output_dir), Path(c.output_dir) / "checkpoints"
        if text_encoder is not None and not isinstance(text_encoder, TextEncoder):
            raise TypeError(f"text_encoder must be a minidiff.text.TextEncoder, got {type(text_encoder).__name__}")
        first_image, first_conditions = split_batch(dataset[0])
        check_image(first_image)
        self.image_shape = tuple(first_image.shape)
        self.unet = prepare_unet(unet, self.image_shape).to(self.device).train()
        self.net = ConditionedUNet(self.unet, text_encoder).to(self.device).train()
        check_conditions(self.net, first_conditions, c.cond_drop_prob)
        self._amp_dtype = autocast_dtype(c.mixed_precision, self.device)
        seed_everything(c.seed + self.rank)  # dropout and data augmentation draw from the global RNGs
        self.ema = EMA(self.net, c.ema_decay, c.ema_warmup) if c.ema_decay > 0 else None
        # fused: one kernel for all parameters (CPU and CUDA) instead of a loop over them, the same update to
        # float rounding (benchmarks/training.py times both)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=c.lr, betas=c.adam_betas,
                                           weight_decay=c.weight_decay, fused=self.device.type in ("cpu", "cuda"))
        self.scaler = torch.amp.GradScaler("cuda") if c.mixed_precision == "fp16" else None
        self.generator = torch.Generator(self.device).manual_seed(c.seed)  # same on every process
        self.step, self.last_checkpoint, self.stop_signal = 0, None, None
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl")
        self._lock = ckpt.lock_output_dir(self.output_dir) if self.rank == 0 else None
        self.fingerprint = {"model": self.unet.config.to_dict(),
                            "scheduler": {"class": type(scheduler).__name__, **scheduler.config.to_dict()},
                            "text_encoder": text_encoder.config if text_encoder is not None else None,
                            "dataset": ckpt.dataset_identity(dataset, first_image),
                            "settings": {k: v for k, v in c.to_dict().items() if k not in RESUMABLE_CHANGES}}
        self._resume() if c.resume else self._start_fresh()
        if c.gradient_checkpointing:
            enable_gradient_checkpointing(self.unet)
        self.model = self.net if self.world_size == 1 else DistributedDataParallel(
            self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------ one optimizer step
    def compute_gradients(self, batches: Iterator[tuple[Tensor, Conditions]]) -> Tensor:
        """Forward and backward over the step's micro-batches; returns this process's step loss."""
        c, g, dev = self.config, self.generator, self.device
        n, share = c.batch_size * c.grad_accumulation_steps, c.batch_size // self.world_size
        t = torch.randint(0, self.scheduler.num_train_timesteps, (n,), generator=g, device=dev)
        noise = torch.randn((n, *self.image_shape), generator=g, device=dev)
        # one column per condition; with none or one this draws what one column draws
        drop = torch.rand((n, max(1, len(self.net.condition_names()))), generator=g, device=dev) < c.cond_drop_prob
        total = torch.zeros((), device=dev)
        for i in range(c.grad_accumulation_steps):
            rows = slice(i * c.batch_size + self.rank * share, i * c.batch_size + (self.rank + 1) * share)
            x0, conditions = next(batches)
            last = i == c.grad_accumulation_steps - 1
            # DDP all-reduces the gradients only on the last micro-batch
            with self.model.no_sync() if self.world_size > 1 and not last else contextlib.nullcontext():
                loss = self._loss(x0.to(dev), conditions, t[rows], noise[rows], drop[rows]) / c.grad_accumulation_steps
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            total += loss.detach()
        return total

    def _loss(self, x0: Tensor, conditions: Conditions, t: Tensor, noise: Tensor, drop: Tensor) -> Tensor:
        x_t = self.scheduler.add_noise(x0, noise, t)
        target = self.scheduler.training_target(x0, noise, t)
        check_conditions(self.net, conditions, self.config.cond_drop_prob)
        conditioning = drop_conditions(self.net, conditions, drop if self.config.cond_drop_prob > 0 else None,
                                       self.device)
        with torch.autocast(self.device.type, dtype=self._amp_dtype or torch.float32,
                            enabled=self._amp_dtype is not None):
            prediction = self.model(x_t, t, **conditioning)
        if self.config.snr_gamma is None:
            return F.mse_loss(prediction.float(), target.float())
        weights = min_snr_weights(self.scheduler.alphas_cumprod.to(self.device)[t],
                                  self.scheduler.config.prediction_type, self.config.snr_gamma)
        return (weights * (prediction.float() - target.float()).square().flatten(1).mean(1)).mean()

    def optimizer_step(self) -> tuple[float, float]:
        """Set the lr, clip, step, clear the gradients, update the EMA; returns (lr, grad_norm)."""
        c = self.config
        lr = c.lr * lr_factor(self.step, self.total_steps, c.warmup_steps, c.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = float(nn.utils.clip_grad_norm_(self.net.parameters(), c.max_grad_norm or math.inf))
        if self.scaler is None and not math.isfinite(grad_norm):  # with fp16, the scaler skips such steps
            raise self._non_finite("gradient norm", grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.net)
        self.step += 1
        return lr, grad_norm

    def _non_finite(self, what: str, value: float) -> FloatingPointError:
        kept = self.last_checkpoint or "none (no checkpoint was saved yet)"
        return FloatingPointError(f"{what} is {value} at step {self.step + 1}: training stopped before that "
                                  f"update; the last good checkpoint is {kept}")

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        loss = None
        try:
            show = self.config.progress and self.rank == 0
            with stop_on_signals(self._request_stop), tqdm(total=self.total_steps, initial=self.step,
                                                           desc="training", unit="step", disable=not show) as bar:
                batches, deadline = self.batches(), self._deadline()
                while self.step < self.total_steps:
                    loss, (stop, out_of_time) = mean_and_any(
                        self.compute_gradients(batches), (self.stop_signal is not None, time.monotonic() > deadline),
                        self.world_size)
                    if not math.isfinite(loss):
                        raise self._non_finite("loss", loss)
                    lr, grad_norm = self.optimizer_step()
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                    self._after_step(loss, lr, grad_norm)
                    if stop:
                        self.save_checkpoint()
                        bar.write(f"stopped by signal {self.stop_signal} after step {self.step}; checkpoint saved "
                                  f"to {self.last_checkpoint}; continue with resume=True")
                        return TrainResult(self.step, loss, True, self.last_checkpoint, self.output_dir)
                    if out_of_time:
                        bar.write(f"time budget of {self.config.max_minutes} min reached after step {self.step}")
                        break
                self._finish()
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            if self._owns_group:
                dist.destroy_process_group()
        return TrainResult(self.step, loss, False, self.last_checkpoint, self.output_dir)

    def _deadline(self) -> float:
        """time.monotonic() at which the time budget of this (possibly resumed) run ends."""
        budget = self.config.max_minutes
        return math.inf if budget is None else time.monotonic() + 60 * budget

    def _request_stop(self, name: str) -> None:
        self.stop_signal = name
        if self.rank == 0:
            tqdm.write(f"{name}: finishing the step and saving a checkpoint (send it again to abort)")

    def batches(self) -> Iterator[tuple[Tensor, Conditions]]:
        """This process's endless stream of (images, conditions) micro-batches, from the current step on."""
        c = self.config
        loader = data_loader(self.dataset, c.batch_size, c.seed, self.step * c.grad_accumulation_steps, self.rank,
                             self.world_size, num_workers=c.num_workers, pin_memory=self.device.type == "cuda")
        return (split_batch(batch) for batch in loader)

    def _after_step(self, loss: float, lr: float, grad_norm: float) -> None:
        c = self.config
        if self.rank == 0:
            epoch = self.step * c.grad_accumulation_steps * c.batch_size / len(self.dataset)
            self.metrics.append({"step": self.step, "epoch": round(epoch, 4), "loss": loss, "lr": lr,
                                 "grad_norm": grad_norm})
        if c.save_model_every and self.step % c.save_model_every == 0:
            self.save_checkpoint()
        if c.log_samples_every and self.step % c.log_samples_every == 0:
            self.log_samples()

    def _finish(self) -> None:
        c = self.config
        self._check_weights_finite()
        if c.save_model_every and self.last_checkpoint != ckpt.step_dir(self.checkpoints, self.step):
            self.save_checkpoint()
        if self.rank != 0:
            return
        if c.log_samples_every and self.step % c.log_samples_every:
            self.log_samples()
        self.metrics.plot(self.output_dir / "loss.png")
        final = self.ema.model if self.ema else self.net
        save_pipeline(final.unet, self.scheduler, self.output_dir)
        if final.text_encoder is not None:
            final.text_encoder.save_pretrained(self.output_dir / "text_encoder")
        if self.ema is not None:
            save_unet(self.unet, self.output_dir / "unet_raw")
        write_json(self.output_dir / "training_config.json", c.to_dict())

    def log_samples(self) -> Path | None:
        """Rank 0: a grid of 8 fixed-seed DDIM samples from the EMA weights, and the loss curve. A class-conditional
        model draws classes 0, 1, 2, ...; other conditions are those of the first 8 dataset items."""
        if self.rank != 0:
            return None
        net, c = (self.ema.model if self.ema is not None else self.net), self.config
        conditioning = self._grid_conditioning(net)
        images = fixed_seed_samples(net.unet, self.scheduler, num_inference_steps=c.sample_steps, seed=c.seed,
                                    **conditioning)
        self.metrics.plot(self.output_dir / "loss.png")
        return save_sample_grid(images, self.output_dir / "samples" / f"step_{self.step:07d}.png")

    def _grid_conditioning(self, net: ConditionedUNet) -> dict[str, Tensor]:
        names = net.condition_names()
        first = [split_batch(self.dataset[i])[1] for i in range(min(8, len(self.dataset)))] if names else []
        first = first * (8 // len(first) + 1) if first else first
        conditioning = {}
        if "class_labels" in names:
            conditioning["class_labels"] = grid_labels(net.unet, 8, null_class=self.config.cond_drop_prob > 0)
        if "conditioning_image" in names:
            images = [f["conditioning_image"] for f in first[:8]]
            conditioning["conditioning_image"] = torch.stack(images).to(self.device)
        if "prompts" in names:
            with torch.no_grad():
                conditioning["encoder_hidden_states"] = net.text_encoder([f["prompts"][0] for f in first[:8]])
        return conditioning

    # ------------------------------------------------------------------ checkpoints
    def _check_weights_finite(self) -> None:
        """A NaN or inf weight must never be saved as a good checkpoint or as the result."""
        models = [self.net] + ([self.ema.model] if self.ema is not None else [])
        bad = [name for model in models for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise self._non_finite(f"weight {bad[0]} ({len(bad)} tensors in all)", "not finite")

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (rank 0 writes; every process contributes its RNG states)."""
        self._check_weights_finite()
        rng_states = gather_objects(ckpt.capture_rng(self.generator), self.world_size)
        folder = ckpt.step_dir(self.checkpoints, self.step)
        if self.rank == 0 and not folder.exists():
            micro_batches = self.step * self.config.grad_accumulation_steps
            epoch, position = divmod(micro_batches, self.batches_per_epoch)
            info = {"step": self.step, "epoch": epoch, "batches_into_epoch": position,
                    "micro_batches": micro_batches, "ema_num_updates": self.ema.num_updates if self.ema else 0,
                    "total_steps": self.total_steps, "world_size": self.world_size, "config": self.config.to_dict(),
                    "fingerprint": self.fingerprint}
            ckpt.save_checkpoint(folder, net=self.net, ema_net=self.ema and self.ema.model,
                                 optimizer=self.optimizer, scaler=self.scaler, rng_states=rng_states, info=info)
            ckpt.prune_checkpoints(self.checkpoints, self.config.keep_checkpoints)
        barrier(self.world_size)
        self.last_checkpoint = folder
        return folder

    def _resume(self) -> None:
        folder = ckpt.latest_checkpoint(self.checkpoints)
        if folder is None:
            raise FileNotFoundError(f"resume=True but {self.checkpoints} holds no checkpoint (step_XXXXXXX/)")
        info, rng_states = ckpt.load_checkpoint(folder, net=self.net, ema_net=self.ema and self.ema.model,
                                                optimizer=self.optimizer, scaler=self.scaler)
        changed = ckpt.fingerprint_changes(info.get("fingerprint", {}), self.fingerprint)
        if info["total_steps"] != self.total_steps and self.config.lr_schedule != "constant":
            changed.append(f"total_steps (the lr schedule): {info['total_steps']} -> {self.total_steps}")
        if changed and not self.config.allow_resume_changes:
            raise ValueError(f"resume: {folder} was written by a different run; what changed:\n  "
                             + "\n  ".join(changed) + "\npass allow_resume_changes=True to resume anyway (the "
                             "result will not match an uninterrupted run), or use another output_dir")
        if changed or len(rng_states) != self.world_size:
            warnings.warn(f"resuming {folder} with changes ({len(changed)} fingerprint entries, "
                          f"{len(rng_states)} -> {self.world_size} processes): the run will not match an "
                          "uninterrupted one", stacklevel=3)
        ckpt.restore_rng(rng_states[self.rank % len(rng_states)], self.generator)
        self.step, self.last_checkpoint = int(info["step"]), folder
        if self.ema is not None:
            self.ema.num_updates = int(info["ema_num_updates"])
        if self.rank == 0:
            self.metrics.truncate(self.step)
            ckpt.remove_partial(self.checkpoints)

    def _start_fresh(self) -> None:
        previous = ckpt.list_checkpoints(self.checkpoints)
        if not (previous or self.metrics.path.exists()):
            return
        if not self.config.overwrite:
            raise FileExistsError(f"{self.output_dir} already holds a run ({len(previous)} checkpoints); pass "
                                  "resume=True to continue it, overwrite=True to start over, or another output_dir")
        barrier(self.world_size)  # every process has looked before rank 0 deletes
        if self.rank == 0:
            for old in (self.checkpoints, self.output_dir / "samples"):
                shutil.rmtree(old, ignore_errors=True)
            self.metrics.path.unlink(missing_ok=True)
        barrier(self.world_size)


def train(unet: nn.Module, scheduler: DDPMScheduler | DDIMScheduler, dataset: Dataset,
          config: TrainConfig = TrainConfig(), text_encoder: TextEncoder | None = None) -> TrainResult:
    """Train ``unet`` (and ``text_encoder``) on ``dataset`` with ``config`` (see ``Trainer``); returns the
    TrainResult."""
    return Trainer(unet, scheduler, dataset, config, text_encoder).run()


def min_snr_weights(alpha_bar: Tensor, prediction_type: str, gamma: float) -> Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, eq. 9): each timestep's x0-error weight is
    min(SNR_t, gamma), SNR_t = alpha_bar_t / (1 - alpha_bar_t); the MSE of eps already weights it by SNR_t
    and that of v by SNR_t + 1, so those are divided out (an SNR of 0 keeps eps's weight at its limit, 1)."""
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped

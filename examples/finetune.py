"""Fine-tune a diffusers-format DDPM onto new images: the course's finetune_model.py, done right.

With no flags (``make demo``) it fine-tunes the shipped base model "photos-32" (crops of natural photographs)
onto the 80 training faces of scikit-image's LFW subset (20 faces held out) in a few minutes on a CPU, and
shows what changed, measured on 64 fixed-seed samples (DPM-Solver++, 20 steps) before and after:

- the share a face/non-face judge calls faces (the judge is trained on the LFW faces against its non-face
  patches and crops of the photographs; its held-out accuracy is printed beside it);
- memorisation: the share of samples that are near-copies of a training face, i.e. nearer to one than any
  held-out face is (``minidiff.judge.memorization``), with the held-out faces' distances as the reference;
- the Fréchet distance of simple image statistics to the training images.

It trains at 24x24: the LFW faces are 25x25, so 24 keeps their detail instead of blurring them up to 32, and a
step costs about half as much, so twice the steps fit in the budget (the UNet is convolutional: the 32x32
base model runs at 24x24 unchanged). The faces are grayscale, repeated on the model's three channels. The loss
weights timesteps by Min-SNR-gamma (gamma 5, Hang et al. 2023), which spends fewer of the few steps on the
nearly clean timesteps.

    python examples/finetune.py --overwrite                      # the demo (make demo)
    python examples/finetune.py --resume                         # continue an interrupted run
    python examples/finetune.py --start_model path/to/pipeline --dataset path/to/images --image_size 64
    torchrun --nproc_per_node 2 examples/finetune.py ...         # DDP; the global batch stays --batch_size

Writes to --output_dir: before.png, after.png (8x8 grids of the same seeds), samples/ (grids during
training), metrics.jsonl, loss.png, results.json, checkpoints/, and the fine-tuned pipeline (unet/ = EMA
weights, unet_raw/, scheduler/).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning threads on a busy machine

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

import minidiff
from minidiff import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, load_scheduler, load_unet
from minidiff.data import load_dataset, to_channels
from minidiff.files import write_json
from minidiff.io import list_pretrained, pretrained
from minidiff.judge import Judge, frechet_distance, image_statistics, memorization
from minidiff.training.log import fixed_seed_samples, save_sample_grid
from minidiff.training import LR_SCHEDULES, MIXED_PRECISION, TrainConfig, Trainer


EVAL_SAMPLERS = {
    "dpmsolver++": lambda scheduler: DPMSolverMultistepScheduler.from_config({**scheduler.config.to_dict(),
                                                                              "solver_order": 3}),
    "ddim": lambda scheduler: DDIMScheduler.from_config(scheduler.config)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--start_model", default="photos-32",
                   help=f"a diffusers pipeline or model folder, or a shipped model: {list_pretrained()}")
    p.add_argument("--dataset", default="faces", help="an embedded dataset (faces, photos, textures, digits, "
                                                      "shapes, stripes) or an image folder")
    p.add_argument("--image_size", type=int, default=24, help="LFW's faces are 25x25: 24 keeps their detail")
    p.add_argument("--batch_size", type=int, default=16, help="global batch per micro-step, all processes")
    p.add_argument("--grad_accumulation_steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="cosine")
    p.add_argument("--warmup_steps", type=int, default=20)
    p.add_argument("--num_epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=800, help="optimizer steps; 0: --num_epochs instead")
    p.add_argument("--ema_decay", type=float, default=0.99, help="0 disables EMA")
    p.add_argument("--mixed_precision", choices=MIXED_PRECISION, default="no")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=True,
                   help="train through minidiff.optimize's fused kernels (the same steps, ~20%% faster on a CPU)")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--snr_gamma", type=float, default=5.0, help="Min-SNR-gamma loss weights; 0: plain MSE")
    p.add_argument("--log_samples_every", type=int, default=400)
    p.add_argument("--save_model_every", type=int, default=400)
    p.add_argument("--output_dir", default="outputs/finetune")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output_dir")
    p.add_argument("--allow_resume_changes", action="store_true",
                   help="--resume even if settings changed (e.g. --max_steps; the run then differs from an "
                        "uninterrupted one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; None: cuda if available")
    p.add_argument("--eval_samples", type=int, default=64, help="samples measured before and after")
    p.add_argument("--eval_sampler", choices=EVAL_SAMPLERS, default="dpmsolver++",
                   help="sampler of those samples: DPM-Solver++ of order 3 (for unconditional models) or DDIM")
    p.add_argument("--eval_steps", type=int, default=20, help="sampling steps of those samples")
    args = p.parse_args(argv)
    # checked before training, not after it: a bad value must not cost the run
    if not 1 <= args.eval_steps <= 1000 or args.eval_samples < 1:
        p.error(f"--eval_steps must be in [1, 1000] and --eval_samples >= 1, got {args.eval_steps} and "
                f"{args.eval_samples}")
    if not 0 <= args.snr_gamma < math.inf:
        p.error(f"--snr_gamma must be a finite number >= 0 (0: plain MSE), got {args.snr_gamma}")
    return args


def load_start_model(name_or_path: str):
    """(unet, scheduler) of a shipped model name, a pipeline folder, or a model folder (default scheduler)."""
    if name_or_path in list_pretrained():
        return pretrained(name_or_path)
    if not Path(name_or_path).is_dir():
        raise SystemExit(f"--start_model {name_or_path!r}: not a folder nor a shipped model {list_pretrained()}")
    unet = load_unet(name_or_path)
    try:
        return unet, load_scheduler(name_or_path)
    except FileNotFoundError:
        print(f"{name_or_path}: no scheduler config; using DDPMScheduler() (1000 linear-beta steps)")
        return unet, DDPMScheduler()


def load_images(name: str, image_size: int, channels: int, split: str = "train", augment: bool = False):
    """The images to fine-tune on (``split="train"``) or to compare with (``"test"``): a named dataset in
    ``channels`` channels (``augment``: faces mirrored at random) or an image folder."""
    if name == "faces":
        return load_dataset(name, image_size, channels=channels, split=split, augment=augment)
    if name in ("photos", "textures"):
        return load_dataset(name, image_size, channels=channels, split=split)
    return load_dataset(name, image_size)


def stack(dataset, n: int | None = None) -> Tensor:
    """The first ``n`` (every, if None) images of a dataset, evenly spaced, as one (N, C, H, W) tensor."""
    step = 1 if n is None else max(1, len(dataset) // n)
    images = [dataset[i][0] for i in range(0, len(dataset), step)]
    return torch.stack(images[:n] if n else images)


# ------------------------------------------------------------------------------------------ measures
class Measures:
    """What ``before`` and ``after`` report: the judge's face share and memorisation (faces only), and the
    Fréchet distance of image statistics to the training images."""

    def __init__(self, args: argparse.Namespace, channels: int):
        self.args, self.faces = args, args.dataset == "faces"
        train = load_images(args.dataset, args.image_size, channels)
        self.train_images = stack(train, None if self.faces else 512)
        self.statistics = image_statistics(to_channels(self.train_images / 2 + 0.5, 3))
        if self.faces:
            self.held_out = stack(load_images(args.dataset, args.image_size, channels, split="test"))
            self.judge = Judge.for_dataset("faces", args.image_size, seed=args.seed)

    def __call__(self, unet, scheduler, name: str) -> dict:
        """Fixed-seed DDIM samples as ``<name>.png`` (8 a row) and their measures."""
        a = self.args
        solver = EVAL_SAMPLERS[a.eval_sampler](scheduler)
        samples = fixed_seed_samples(unet, solver, num_images=a.eval_samples, num_inference_steps=a.eval_steps,
                                     seed=a.seed)  # (B, C, H, W) in [0, 1]
        save_sample_grid(samples, Path(a.output_dir) / f"{name}.png", nrow=8)
        out = {"samples": len(samples), "channel_means": [round(v, 3) for v in samples.mean((0, 2, 3)).tolist()]}
        out["frechet_statistics_to_train"] = frechet_distance(image_statistics(to_channels(samples, 3)), self.statistics)
        if self.faces:
            gray = to_channels(samples * 2 - 1, 1)
            out["face_share"] = self.judge.predict(gray).float().mean().item()  # class 1 is "face"
            report = memorization(gray, to_channels(self.train_images, 1), to_channels(self.held_out, 1))
            out["memorization"] = {"near_copy_share": report.near_copy_share, "threshold": report.threshold,
                                   "median_sample_distance": median(report.sample_distances),
                                   "median_held_out_distance": median(report.held_out_distances)}
        return out


def median(values: list[float]) -> float:
    return float(torch.tensor(values).median())


def summary(results: dict) -> str:
    before, after = results["before"], results["after"]
    rows = [f"{'':<20}{'before':>10}{'after':>10}"]
    if "face_share" in before:
        rows.append(f"{'face share (judge)':<20}{before['face_share']:>10.1%}{after['face_share']:>10.1%}   "
                    f"of {after['samples']} samples ({results['eval_sampler']}, {results['eval_steps']} steps); "
                    f"judge held-out accuracy {results['judge_held_out_accuracy']:.1%}")
        mem_b, mem_a = before["memorization"], after["memorization"]
        rows.append(f"{'near-copy share':<20}{mem_b['near_copy_share']:>10.1%}{mem_a['near_copy_share']:>10.1%}   "
                    f"near-copy: nearer a training face than {mem_a['threshold']:.3f}, the nearest any held-out "
                    f"face comes (median held-out {mem_a['median_held_out_distance']:.3f}, "
                    f"median sample after {mem_a['median_sample_distance']:.3f})")
    rows.append(f"{'Fréchet (statistics)':<20}{before['frechet_statistics_to_train']:>10.4f}"
                f"{after['frechet_statistics_to_train']:>10.4f}   to the training images, lower is closer")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    unet, scheduler = load_start_model(args.start_model)
    unet.config = unet.config.replace(sample_size=args.image_size)  # sample "before" at the trained size
    start_unet = copy.deepcopy(unet)  # resuming loads the checkpoint into ``unet``
    if args.optimize:
        minidiff.optimize(unet)  # in place; parameter names and state_dict unchanged
    channels = unet.config.in_channels
    dataset = load_images(args.dataset, args.image_size, channels, augment=True)
    config = TrainConfig(
        output_dir=args.output_dir, seed=args.seed, batch_size=args.batch_size,
        grad_accumulation_steps=args.grad_accumulation_steps, num_epochs=args.num_epochs,
        max_steps=args.max_steps or None, lr=args.lr, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, max_grad_norm=args.max_grad_norm or None,
        snr_gamma=args.snr_gamma or None,
        log_samples_every=args.log_samples_every, save_model_every=args.save_model_every, resume=args.resume,
        overwrite=args.overwrite, allow_resume_changes=args.allow_resume_changes, device=args.device)
    try:
        trainer = Trainer(unet, scheduler, dataset, config)
    except (FileExistsError, ValueError) as err:  # a previous run in the way, or one that does not match
        print(f"error: {err} (flags: --resume, --overwrite, --allow_resume_changes, --output_dir)", file=sys.stderr)
        return 2
    if trainer.rank == 0:
        measures = Measures(args, channels)
        before = measures(start_unet, scheduler, "before")
    del start_unet

    train_start = time.perf_counter()
    result = trainer.run()
    if result.interrupted or trainer.rank != 0:
        return 0
    train_seconds = time.perf_counter() - train_start
    last_loss = "no step left to run" if result.loss is None else f"final loss {result.loss:.4f}"
    print(f"trained to step {result.step} in {train_seconds:.0f} s; {last_loss}")
    after = measures(load_unet(args.output_dir), scheduler, "after")
    results = {"start_model": args.start_model, "dataset": args.dataset, "train_images": len(dataset),
               "steps": result.step, "train_seconds": round(train_seconds, 1), "eval_sampler": args.eval_sampler,
               "eval_steps": args.eval_steps, "before": before, "after": after,
               "seconds": round(time.perf_counter() - started, 1)}
    if measures.faces:
        results["judge_held_out_accuracy"] = measures.judge.test_accuracy
        results["held_out_images"] = len(measures.held_out)
    write_json(Path(args.output_dir) / "results.json", results)
    print(summary(results))
    print(f"{results['seconds']:.0f} s in all; pipeline folder: {args.output_dir} "
          "(diffusers.DDPMPipeline.from_pretrained loads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tune a diffusers-format DDPM onto new images: the course's finetune_model.py, done right.

With no flags it fine-tunes the shipped base model "shapes-32" (bright shapes on dark backgrounds) onto
the embedded "stripes" dataset (red-orange stripes on cream) in a few minutes on a CPU, and shows that
the samples moved to the new domain: sample grids before and after, and distances of the samples'
image statistics to the source and to the target dataset.

    python examples/finetune.py                                  # the demo (make demo)
    python examples/finetune.py --start_model path/to/pipeline --dataset path/to/images --image_size 64
    torchrun --nproc_per_node 2 examples/finetune.py ...         # DDP; the global batch stays --batch_size
    python examples/finetune.py --resume                         # continue an interrupted run

Writes to --output_dir: before.png, after.png, samples/ (grids during training), metrics.jsonl, loss.png,
domain_shift.json, checkpoints/, and the fine-tuned pipeline (unet/ = EMA weights, unet_raw/, scheduler/).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from minidiff import DDPMScheduler, load_scheduler, load_unet
from minidiff.data import load_dataset
from minidiff.io import list_pretrained, pretrained
from minidiff.training.log import fixed_seed_samples, save_sample_grid
from minidiff.training.trainer import LR_SCHEDULES, MIXED_PRECISION, TrainConfig, Trainer

EMBEDDED = ("digits", "shapes", "stripes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--start_model", default="shapes-32",
                   help=f"a diffusers pipeline or model folder, or a shipped model: {list_pretrained()}")
    p.add_argument("--dataset", default="stripes", help=f"an embedded dataset {EMBEDDED} or an image folder")
    p.add_argument("--source_dataset", default="shapes", help="what the start model was trained on (for the "
                                                              "domain-shift measure); 'none' to skip it")
    p.add_argument("--num_samples", type=int, default=3200, help="images drawn from an embedded shapes/stripes set")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=16, help="global batch per micro-step, all processes")
    p.add_argument("--grad_accumulation_steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="cosine")
    p.add_argument("--warmup_steps", type=int, default=20)
    p.add_argument("--num_epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps; overrides --num_epochs")
    p.add_argument("--ema_decay", type=float, default=0.99, help="0 disables EMA")
    p.add_argument("--mixed_precision", choices=MIXED_PRECISION, default="no")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--log_samples_every", type=int, default=100)
    p.add_argument("--save_model_every", type=int, default=100)
    p.add_argument("--output_dir", default="outputs/finetune")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; None: cuda if available")
    p.add_argument("--eval_samples", type=int, default=32, help="samples for the domain-shift measure")
    return p.parse_args(argv)


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


def load_images(name: str, image_size: int, num_samples: int):
    """An embedded dataset (shapes/stripes generated with ``num_samples`` images) or an image folder."""
    extra = {"num_samples": num_samples} if name in ("shapes", "stripes") else {}
    return load_dataset(name, image_size, **extra)


# ------------------------------------------------------------------------- the domain-shift measure
def image_features(images: Tensor) -> Tensor:
    """Per-image statistics of (B, 3, H, W) images in [0, 1]: mean and std of each colour channel, mean
    absolute horizontal and vertical differences (edges), saturation (max - min channel): (B, 9)."""
    gray = images.mean(1)
    dx = (gray[:, :, 1:] - gray[:, :, :-1]).abs().mean((1, 2))
    dy = (gray[:, 1:, :] - gray[:, :-1, :]).abs().mean((1, 2))
    saturation = (images.amax(1) - images.amin(1)).mean((1, 2))
    return torch.cat([images.mean((2, 3)), images.std((2, 3)), torch.stack([dx, dy, saturation], 1)], 1)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between Gaussian fits of two
    feature sets (the FID formula of Heusel et al. 2017, here on simple image statistics)."""
    a, b = a.double(), b.double()
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)

    def sqrtm(m: Tensor) -> Tensor:  # symmetric PSD square root
        values, vectors = torch.linalg.eigh(m)
        return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    root = sqrtm(cov_a)
    cross = torch.linalg.eigvalsh(root @ cov_b @ root).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def dataset_features(dataset, n: int = 512) -> Tensor:
    step = max(1, len(dataset) // n)
    images = torch.stack([dataset[i][0] for i in range(0, len(dataset), step)][:n])
    return image_features(images.float() / 2 + 0.5)


def measure(samples: Tensor, references: dict[str, Tensor]) -> dict[str, float]:
    """Fréchet distance of the samples' statistics to each reference dataset, and their mean colour."""
    features = image_features(samples)
    out = {f"distance_to_{name}": frechet_distance(features, ref) for name, ref in references.items()}
    out["mean_rgb"] = [round(v, 3) for v in samples.mean((0, 2, 3)).tolist()]
    return out


def sample_and_measure(unet, scheduler, args, references, name: str) -> dict[str, float]:
    """Fixed-seed DDIM samples: the first 16 as ``<name>.png``, all of them for the measure."""
    samples = fixed_seed_samples(unet, scheduler, num_images=args.eval_samples, num_inference_steps=25,
                                 seed=args.seed)
    save_sample_grid(samples[:16], Path(args.output_dir) / f"{name}.png")
    return measure(samples, references)


def report(before: dict, after: dict, references: dict) -> str:
    rows = [f"{'':<18}" + "".join(f"{'to ' + name:>16}" for name in references) + f"{'mean RGB':>24}"]
    for label, result in (("before fine-tuning", before), ("after fine-tuning", after)):
        distances = "".join(f"{result[f'distance_to_{name}']:>16.4f}" for name in references)
        rows.append(f"{label:<18}{distances}{str(result['mean_rgb']):>24}")
    means = {name: [round(v, 3) for v in ref[:, :3].mean(0).tolist()] for name, ref in references.items()}
    rows.append("dataset mean RGB: " + ", ".join(f"{name} {rgb}" for name, rgb in means.items()))
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    unet, scheduler = load_start_model(args.start_model)
    unet.config = unet.config.replace(sample_size=args.image_size)  # sample "before" at the trained size
    dataset = load_images(args.dataset, args.image_size, args.num_samples)
    config = TrainConfig(
        output_dir=args.output_dir, seed=args.seed, batch_size=args.batch_size,
        grad_accumulation_steps=args.grad_accumulation_steps, num_epochs=args.num_epochs, max_steps=args.max_steps,
        lr=args.lr, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        max_grad_norm=args.max_grad_norm or None, log_samples_every=args.log_samples_every,
        save_model_every=args.save_model_every, resume=args.resume, overwrite=args.overwrite, device=args.device)
    start_unet = copy.deepcopy(unet)  # resuming loads the checkpoint into ``unet``
    try:
        trainer = Trainer(unet, scheduler, dataset, config)
    except FileExistsError as err:
        print(f"error: {err} (flags: --resume, --overwrite, --output_dir)", file=sys.stderr)
        return 2
    measured = trainer.rank == 0 and unet.config.in_channels == 3  # the measure reads RGB statistics
    if measured:
        references = {"target": dataset_features(dataset)}
        if args.source_dataset != "none":
            source = load_images(args.source_dataset, args.image_size, 512)
            references = {"source": dataset_features(source), **references}
        before = sample_and_measure(start_unet, scheduler, args, references, "before")
    del start_unet

    start = time.perf_counter()
    result = trainer.run()
    if result.interrupted or trainer.rank != 0:
        return 0
    print(f"trained {result.step} steps in {time.perf_counter() - start:.0f} s; final loss {result.loss:.4f}")
    if measured:
        ema_unet = load_unet(args.output_dir)
        after = sample_and_measure(ema_unet, scheduler, args, references, "after")
        summary = {"source": args.source_dataset, "target": args.dataset, "before": before, "after": after}
        (Path(args.output_dir) / "domain_shift.json").write_text(json.dumps(summary, indent=2) + "\n")
        print("Fréchet distance of sample statistics (colour mean/std, edges, saturation), lower is closer:")
        print(report(before, after, references))
    print(f"pipeline folder: {args.output_dir} (diffusers.DDPMPipeline.from_pretrained loads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

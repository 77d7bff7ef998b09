"""Train the small base models shipped with minidiff: ``photos-32`` and ``shapes-32``.

An unconditional 32x32 RGB UNet trained from scratch, reproducible from ``--seed``, on one of two recipes:

- ``--dataset photos`` (``photos-32``): random crops of scikit-image's natural photographs (minidiff's
  "photos" dataset, training columns only; needs ``pip install minidiff[data]``);
- ``--dataset shapes`` (``shapes-32``): the embedded "shapes" dataset (bright circles, squares and
  triangles on dark backgrounds).

The run (checkpoints, sample grids, metrics) goes to ``--work_dir``; the final EMA pipeline folder, a
sample grid and a model card go to ``--output_dir`` (by default the package's ``minidiff/shipped/<name>/``).
Interrupt it at any time (Ctrl-C saves a checkpoint) and continue with ``--resume``.

    nohup nice python examples/pretrain.py --dataset photos &     # 2500 steps, 1-1.5 hours on 2 CPU cores
    nohup nice python examples/pretrain.py --dataset shapes &     # 3500 steps, about 30 minutes
    python examples/pretrain.py --dataset photos --resume         # continue an interrupted run
    python examples/pretrain.py --max_steps 20 --output_dir /tmp/try   # a quick try
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning threads on a busy machine

import argparse
import shutil
import time
from pathlib import Path

import torch

from minidiff import DDPMScheduler, UNet, UNetConfig, load_pipeline, save_pipeline
from minidiff.data import load_dataset
from minidiff.training import TrainConfig, train
from minidiff.training.log import MetricsLog, fixed_seed_samples, save_sample_grid

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "minidiff" / "shipped"
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def architecture(block_out_channels: tuple[int, ...]) -> UNetConfig:
    """32x32 RGB, one resnet per level, self-attention at the 8x8 level only."""
    return UNetConfig(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=block_out_channels, layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=16)


# the defaults of each recipe; every one can be overridden on the command line
RECIPES = {
    "photos": dict(name="photos-32", channels=(32, 64, 128), max_steps=2500, batch_size=32, lr=2e-3,
                   warmup_steps=100, ema_decay=0.998, snr_gamma=0.0, num_samples=200_000,
                   data="random crops (scale 0.1-0.3 of the shorter side, mirrored half of the time) of the "
                        "training columns (the left 70%) of scikit-image's 12 natural photographs"),
    "shapes": dict(name="shapes-32", channels=(32, 64, 64), max_steps=3500, batch_size=32, lr=2e-3,
                   warmup_steps=50, ema_decay=0.998, snr_gamma=5.0, num_samples=20_000,
                   data="procedurally drawn images: a bright circle, square or triangle on a dark background"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=tuple(RECIPES), default="photos", help="which recipe")
    p.add_argument("--output_dir", default=None, help="the shipped pipeline folder (default minidiff/shipped/<name>)")
    p.add_argument("--work_dir", default=None, help="checkpoints, grids, metrics (default outputs/pretrain-<name>)")
    for name in ("max_steps", "batch_size", "num_samples", "warmup_steps"):
        p.add_argument(f"--{name}", type=int, default=None, help="default: the recipe's")
    for name in ("lr", "ema_decay", "snr_gamma"):
        p.add_argument(f"--{name}", type=float, default=None, help="default: the recipe's (snr_gamma 0: plain MSE)")
    p.add_argument("--save_model_every", type=int, default=250)
    p.add_argument("--max_minutes", type=float, default=None, help="a time budget: stop (as at the end) after it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --work_dir")
    args = p.parse_args(argv)
    recipe = RECIPES[args.dataset]
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.output_dir = args.output_dir or str(SHIPPED_DIR / recipe["name"])
    args.work_dir = args.work_dir or f"outputs/pretrain-{recipe['name']}"
    return args


def loss_weights(snr_gamma: float) -> str:
    return f"Min-SNR-gamma loss weights with gamma {snr_gamma:g}" if snr_gamma else "plain MSE loss"


def model_card(args: argparse.Namespace, steps: int, seconds: float, final_loss: float) -> str:
    config = architecture(args.channels)
    params = sum(p.numel() for p in UNet(config).parameters())
    return f"""# {args.name}

A small unconditional diffusion model (minidiff / diffusers `UNet2DModel` + `DDPMScheduler`), shipped with
minidiff as a base model to fine-tune. Load it with `unet, scheduler = minidiff.pretrained("{args.name}")` or
`diffusers.DDPMPipeline.from_pretrained(<this folder>)`.

- **Data**: minidiff's `{args.dataset}` dataset: {args.data}; 32x32 RGB, images in [-1, 1].
- **Architecture**: block_out_channels {list(config.block_out_channels)}, layers_per_block
  {config.layers_per_block}, self-attention at 8x8, {params:,} parameters (see `unet/config.json`).
- **Noise schedule**: 1000 steps, squaredcos_cap_v2 betas, epsilon prediction.
- **Training**: `python examples/pretrain.py --dataset {args.dataset} --seed {args.seed}`: {steps}
  AdamW steps of batch {args.batch_size}, lr {args.lr} with {args.warmup_steps} warm-up steps then cosine decay,
  gradient clipping at 1.0, EMA decay {args.ema_decay} (with warm-up), {loss_weights(args.snr_gamma)}; these are the
  EMA weights. Mean loss of the last 50 steps {final_loss:.4f}; {seconds / 60:.1f} minutes of wall time in the last
  (possibly resumed) session on 2 CPU cores shared with other jobs (load average {os.getloadavg()[0]:.1f} at the end).
- **Samples**: `samples.png` (16 images, 50 DDIM steps, seed 0).
- **Measured**: `python benchmarks/base_models.py` prints the Fréchet distance of its samples to held-out real
  images next to real-vs-real (`benchmarks/results/base_models.json`).
"""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # the initial weights
    unet, scheduler = UNet(architecture(args.channels)), DDPMScheduler(**SCHEDULER)
    extra = {"split": "train"} if args.dataset == "photos" else {}
    dataset = load_dataset(args.dataset, 32, num_samples=args.num_samples, seed=args.seed, **extra)
    config = TrainConfig(output_dir=args.work_dir, seed=args.seed, batch_size=args.batch_size,
                         max_steps=args.max_steps, lr=args.lr, warmup_steps=args.warmup_steps,
                         lr_schedule="cosine", ema_decay=args.ema_decay, snr_gamma=args.snr_gamma or None,
                         log_samples_every=250, max_minutes=args.max_minutes,
                         save_model_every=args.save_model_every, keep_checkpoints=2, resume=args.resume,
                         overwrite=not args.resume)
    start = time.perf_counter()
    result = train(unet, scheduler, dataset, config)
    seconds = time.perf_counter() - start
    if result.interrupted:
        print(f"interrupted at step {result.step}; continue with --resume")
        return
    out = Path(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    save_pipeline(*load_pipeline(args.work_dir), out)  # the EMA pipeline only, no checkpoints
    ema_unet, _ = load_pipeline(out)
    save_sample_grid(fixed_seed_samples(ema_unet, scheduler, num_images=16), out / "samples.png")
    last = [row["loss"] for row in MetricsLog(Path(args.work_dir) / "metrics.jsonl").rows()[-50:]]
    (out / "README.md").write_text(model_card(args, result.step, seconds, sum(last) / len(last)), encoding="utf-8")
    print(f"trained {result.step} steps in {seconds / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()

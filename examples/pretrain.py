"""Train the small base model shipped as ``minidiff.pretrained("shapes-32")``.

An unconditional 32x32 RGB UNet trained from scratch on the embedded "shapes" dataset (bright circles,
squares and triangles on dark backgrounds), reproducible from ``--seed``. The run (checkpoints, sample
grids, metrics) goes to ``--work_dir``; the final EMA pipeline folder, a sample grid and a model card are
written to ``--output_dir`` (by default the package's ``minidiff/pretrained/shapes-32/``).

    nice -n 10 python examples/pretrain.py            # 900 steps: ~12 minutes on 2 idle CPU cores
    python examples/pretrain.py --max_steps 20 --output_dir /tmp/shapes-test   # a quick try
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

from minidiff import DDPMScheduler, UNet, UNetConfig, load_pipeline, save_pipeline
from minidiff.data import load_dataset
from minidiff.training.log import MetricsLog, fixed_seed_samples, save_sample_grid
from minidiff.training import TrainConfig, train

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "minidiff" / "pretrained" / "shapes-32"
ARCHITECTURE = UNetConfig(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=16)
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default=str(PACKAGE_DIR), help="where the shipped pipeline folder goes")
    p.add_argument("--work_dir", default="outputs/pretrain-shapes-32", help="checkpoints, grids, metrics")
    p.add_argument("--max_steps", type=int, default=900)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup_steps", type=int, default=50)
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--num_samples", type=int, default=20_000, help="size of the generated shapes dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --work_dir")
    return p.parse_args()


def model_card(args: argparse.Namespace, seconds: float, final_loss: float) -> str:
    return f"""# shapes-32

A small unconditional diffusion model (minidiff / diffusers `UNet2DModel` + `DDPMScheduler`), shipped with
minidiff as the default base model to fine-tune (`python examples/finetune.py`). Load it with
`unet, scheduler = minidiff.pretrained("shapes-32")` or `diffusers.DDPMPipeline.from_pretrained(<this folder>)`.

- **Data**: minidiff's embedded "shapes" dataset ({args.num_samples} procedurally drawn 32x32 RGB images:
  a bright circle, square or triangle on a dark background), images in [-1, 1].
- **Architecture**: block_out_channels {list(ARCHITECTURE.block_out_channels)}, layers_per_block
  {ARCHITECTURE.layers_per_block}, self-attention at 8x8, {sum(p.numel() for p in UNet(ARCHITECTURE).parameters()):,}
  parameters (see `unet/config.json`).
- **Noise schedule**: 1000 steps, squaredcos_cap_v2 betas, epsilon prediction.
- **Training**: `examples/pretrain.py --seed {args.seed}`: {args.max_steps} AdamW steps of batch {args.batch_size},
  lr {args.lr} with {args.warmup_steps} warm-up steps then cosine decay, gradient clipping at 1.0, EMA decay
  {args.ema_decay} (with warm-up); these are the EMA weights. Mean loss of the last 50 steps {final_loss:.4f};
  {seconds / 60:.1f} minutes of wall time on 2 CPU cores shared with other jobs (load average
  {os.getloadavg()[0]:.1f} at the end).
- **Samples**: `samples.png` (50 DDIM steps, seed 0): bright single-coloured objects on darker plain
  backgrounds, some clear triangles, most outlines rough rather than crisp circles and squares, a few noisy
  images; that is what a ~12 CPU-minute budget buys, and enough to see a fine-tuned model leave the domain.
"""


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)  # the initial weights
    unet, scheduler = UNet(ARCHITECTURE), DDPMScheduler(**SCHEDULER)
    dataset = load_dataset("shapes", 32, num_samples=args.num_samples, seed=args.seed)
    config = TrainConfig(output_dir=args.work_dir, seed=args.seed, batch_size=args.batch_size,
                         max_steps=args.max_steps, lr=args.lr, warmup_steps=args.warmup_steps,
                         lr_schedule="cosine", ema_decay=args.ema_decay, log_samples_every=250,
                         save_model_every=250, resume=args.resume, overwrite=not args.resume)
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
    (out / "README.md").write_text(model_card(args, seconds, sum(last) / len(last)), encoding="utf-8")
    print(f"trained {result.step} steps in {seconds / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()

"""Train a class-conditioned UNet on the embedded handwritten digits and judge its samples.

The course's notebook 02, done so that it can be measured: any of the three conditioning modes
(--conditioning concat|additive|cross-attention), classifier-free guidance training (label dropout to a
learned null class), EMA, a step budget, and at the end an independent classifier (minidiff.judge) scores
how many generated digits show the requested class.

    python examples/class_conditioned.py                       # defaults: additive, v-prediction
    python examples/class_conditioned.py --conditioning cross-attention --guidance_scale 2
    python examples/class_conditioned.py --max_steps 5000 --max_minutes 3   # whichever comes first

Writes to --output_dir: the model (a pipeline folder: minidiff.load_unet(output_dir) loads it),
samples.png (one row per class), metrics.json, and the training log of minidiff.training.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning threads on a busy machine

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

import minidiff
from minidiff.models.architectures import CONDITIONING_MODES, class_conditional_config
from minidiff.data import Digits
from minidiff.judge import Judge, judge_samples
from minidiff.schedulers import PREDICTION_TYPES
from minidiff.training import TrainConfig, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conditioning", choices=CONDITIONING_MODES, default="additive")
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64], help="UNet block_out_channels")
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--prediction_type", choices=PREDICTION_TYPES, default="v_prediction",
                   help="what the UNet predicts (v: Salimans & Ho 2022, better class fidelity here than epsilon)")
    p.add_argument("--max_steps", type=int, default=800, help="optimizer steps (the training budget)")
    p.add_argument("--max_minutes", type=float, default=None,
                   help="a time budget: stop training after this many minutes, even before --max_steps")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup_steps", type=int, default=50)
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--cond_drop_prob", type=float, default=0.1,
                   help="label dropout to the null class, for classifier-free guidance (0 disables)")
    p.add_argument("--guidance_scale", type=float, default=2.0, help="classifier-free guidance scale for samples")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps for the judged samples")
    p.add_argument("--samples_per_class", type=int, default=10)
    p.add_argument("--output_dir", default="outputs/class_conditioned")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    # checked before training, not after it: a bad value must not cost the run
    if min(args.num_inference_steps, args.samples_per_class) < 1 or args.num_inference_steps > 1000:
        p.error("--num_inference_steps must be in [1, 1000] and --samples_per_class >= 1")
    if not math.isfinite(args.guidance_scale):
        p.error(f"--guidance_scale must be a finite number, got {args.guidance_scale}")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dataset = Digits(args.image_size, split="train", augment=False)
    config = class_conditional_config(args.conditioning, dataset.num_classes, args.image_size, dataset.channels,
                                      null_class=args.cond_drop_prob > 0, widths=tuple(args.widths),
                                      layers_per_block=args.layers_per_block)
    unet = minidiff.UNet.from_config(config)
    scheduler = minidiff.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=args.prediction_type)
    print(f"{args.conditioning} conditioning: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")

    start = time.perf_counter()
    result = train(unet, scheduler, dataset, TrainConfig(
        output_dir=args.output_dir, seed=args.seed, batch_size=args.batch_size, max_steps=args.max_steps,
        max_minutes=args.max_minutes, lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
        cond_drop_prob=args.cond_drop_prob,
        log_samples_every=0, save_model_every=max(args.max_steps // 3, 1), resume=args.resume,
        overwrite=not args.resume))
    train_seconds = time.perf_counter() - start
    if result.interrupted:  # a checkpoint was saved; the pipeline is written when training completes
        print(f"training stopped after step {result.step}; run again with --resume to finish it")
        return None

    ema_unet, _ = minidiff.load_pipeline(args.output_dir)  # the EMA weights, as saved
    ddim = minidiff.DDIMScheduler.from_config(scheduler.config)
    judge = Judge.for_dataset("digits", image_size=args.image_size)
    start = time.perf_counter()
    images, _, report = judge_samples(ema_unet, ddim, judge, samples_per_class=args.samples_per_class,
                                      num_inference_steps=args.num_inference_steps,
                                      guidance_scale=args.guidance_scale, seed=args.seed)
    sample_seconds = time.perf_counter() - start

    out = Path(args.output_dir)
    save_image(images / 2 + 0.5, out / "samples.png", nrow=args.samples_per_class, padding=1)
    metrics = dict(conditioning=args.conditioning, guidance_scale=args.guidance_scale,
                   num_inference_steps=args.num_inference_steps, train_steps=result.step,
                   train_seconds=round(train_seconds, 1), sample_seconds=round(sample_seconds, 1),
                   judge_test_accuracy=judge.test_accuracy, **report.to_dict())
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"judged accuracy {report.accuracy:.1%} on {report.count} samples "
          f"(judge: {judge.test_accuracy:.1%} on real test digits); trained {train_seconds:.0f} s, "
          f"sampled {sample_seconds:.0f} s -> {out}")
    return metrics


if __name__ == "__main__":
    main()

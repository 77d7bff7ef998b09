"""How close the shipped base models' samples are to their held-out data: Fréchet distances on two feature
sets, each model next to real-vs-real (its own training images against the same held-out images, what a
perfect model would score).

- photos-32 against held-out crops (the right 30% of every photograph's columns, never trained on);
- shapes-32 against shapes drawn with another seed.

Features: (1) "statistics", 9 per image: mean and std of each colour channel, mean absolute horizontal and
vertical differences, saturation (``minidiff.judge.image_statistics``); (2) "judge", 64 per image: the
faces judge's last convolutional features of the luma (``Judge.for_dataset("faces", 32).features``), a
small CNN trained on real photographs, faces and textures. Samples: --num_samples DDIM samples (eta 0,
--steps steps, seed --seed). Prints a table and writes JSON to --out.

    python benchmarks/base_models.py [--num_samples 256] [--steps 50]
"""
from __future__ import annotations

import common  # noqa: F401  (sets OMP_WAIT_POLICY before torch)

import argparse
import os
import time
from pathlib import Path

import torch

from minidiff.data import load_dataset, to_channels
from minidiff.files import write_json
from minidiff.io import pretrained
from minidiff.judge import Judge, frechet_distance, image_statistics
from minidiff.training.log import fixed_seed_samples

# the model, its training data and the held-out data, as load_dataset arguments
MODELS = {"photos-32": (("photos", dict(split="train", seed=1)), ("photos", dict(split="test", seed=2))),
          "shapes-32": (("shapes", dict(seed=0)), ("shapes", dict(seed=7)))}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--num_samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "base_models.json"))
    return p.parse_args()


def real_images(name: str, kwargs: dict, n: int) -> torch.Tensor:
    """``n`` images of a dataset in [0, 1], (n, 3, 32, 32)."""
    dataset = load_dataset(name, 32, num_samples=n, **kwargs)
    return torch.stack([dataset[i][0] for i in range(n)]) / 2 + 0.5


def features(images: torch.Tensor, judge: Judge) -> dict[str, torch.Tensor]:
    return {"statistics": image_statistics(images), "judge": judge.features(to_channels(images * 2 - 1, 1))}


def main() -> None:
    args = parse_args()
    judge = Judge.for_dataset("faces", 32)
    rows = []
    for model in args.models:
        (train_name, train_kwargs), (test_name, test_kwargs) = MODELS[model]
        held_out = features(real_images(test_name, test_kwargs, args.num_samples), judge)
        train = features(real_images(train_name, train_kwargs, args.num_samples), judge)
        unet, scheduler = pretrained(model)
        start = time.perf_counter()
        samples = torch.cat([fixed_seed_samples(unet, scheduler, num_images=64, num_inference_steps=args.steps,
                                                seed=args.seed + k) for k in range(-(-args.num_samples // 64))])
        samples = features(samples[: args.num_samples], judge)
        seconds = time.perf_counter() - start
        for kind in held_out:
            model_fd, real_fd = frechet_distance(samples[kind], held_out[kind]), frechet_distance(train[kind], held_out[kind])
            rows.append({"model": model, "features": kind, "samples_vs_held_out": model_fd,
                         "real_vs_held_out": real_fd, "ratio": model_fd / real_fd, "sampling_seconds": seconds})
    print(f"Fréchet distance to held-out real images ({args.num_samples} images each, DDIM {args.steps} steps)")
    print(f"{'model':<11}{'features':<12}{'samples':>10}{'real':>10}{'ratio':>8}")
    for r in rows:
        print(f"{r['model']:<11}{r['features']:<12}{r['samples_vs_held_out']:>10.4f}{r['real_vs_held_out']:>10.4f}"
              f"{r['ratio']:>8.1f}")
    write_json(args.out, {"num_samples": args.num_samples, "steps": args.steps, "seed": args.seed, "rows": rows,
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

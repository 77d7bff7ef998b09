"""DDPM with 1000 steps vs DDIM with 10/20/50/100 steps on the same model: wall time, speed-up, sampler
overhead and sample quality.

    python benchmarks/ddpm_vs_ddim.py [--model shapes-32 | <pipeline folder>] [--dataset shapes]
        [--num_samples 128] [--ddim_steps 10 20 50 100] [--repeats 3] [--quick]

Every sampler starts from the same x_T (same seed); DDIM is deterministic (eta = 0). Time: wall clock
of ``minidiff.sample`` for all ``--num_samples`` images in one batch, the median of ``--repeats`` runs
taken in turns; "overhead" is the time outside the UNet forward (schedule, noise, update, loop), as a
% of the total. A shared machine's load can change between a long DDPM run and a short DDIM one, so
next to the wall-clock speed-up the table gives the speed-up "per UNet call": each run's time counted
in UNet forwards of that same run (steps / (1 - overhead)), which a change of load does not move.

Quality, on the features of the dataset's judge (minidiff.judge: a small CNN trained on the real
images; features = its last conv stage, average-pooled, 64 values):
  - FD: the Frechet distance (as FID, Heusel et al. 2017) between the samples' features and those of
    --num_reference real images. "real" in the table is a second set of real images of the same size
    as the samples: the FD a perfect sampler gets with this many samples (small sets are biased up).
  - confidence: the judge's mean top-class probability (clear shapes score near 1, mush near 1/K).
  - balance: entropy of the judge's class histogram / log K (1 = all classes equally often).
Prints a table, writes JSON and a PNG plot (time and FD vs steps).
"""
from __future__ import annotations

import common  # noqa: I001  (first: it configures OpenMP before torch loads)

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import minidiff
from minidiff.data import Shapes, load_dataset
from minidiff.judge import Judge

TARGET_SPEEDUP, TARGET_OVERHEAD = 19.5, 2.5  # DDIM-50 vs DDPM-1000; % of DDIM-50's time


class TimedUNet(nn.Module):
    """``unet`` that adds the seconds spent in its forward to ``seconds``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet, self.config, self.seconds = unet, unet.config, 0.0

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.perf_counter()
        out = self.unet(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out


def load_model(name: str) -> tuple[nn.Module, minidiff.DDPMScheduler | minidiff.DDIMScheduler]:
    from minidiff.io import list_pretrained, pretrained

    if name in list_pretrained():
        return pretrained(name)
    if Path(name).is_dir():
        return minidiff.load_pipeline(name)
    raise FileNotFoundError(f"--model {name!r} is neither a shipped model {list_pretrained()} nor a pipeline "
                            "folder (train one with examples/pretrain.py)")


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of two feature sets (N, D), in
    float64; the trace term through eigenvalues of symmetric matrices (no scipy)."""
    a, b = a.double(), b.double()
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    eigenvalues, vectors = torch.linalg.eigh(s_a)
    root_a = vectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross)


class Quality:
    """The judge's view of a set of images: features for FD, confidence and class balance."""

    def __init__(self, judge: Judge, reference: torch.Tensor):
        self.judge = judge
        self.reference = self.features(reference)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.model.features(images.clamp(-1, 1)).mean(dim=(2, 3))  # (N, 4w)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        probs = self.judge.model(images.clamp(-1, 1)).softmax(dim=1)
        counts = torch.bincount(probs.argmax(1), minlength=self.judge.num_classes).double()
        p = counts / counts.sum()
        entropy = abs((p[p > 0] * p[p > 0].log()).sum().item())  # abs: one class gives -0.0
        return {"fd": frechet_distance(self.features(images), self.reference),
                "confidence": probs.max(1).values.mean().item(),
                "balance": entropy / math.log(self.judge.num_classes)}


def real_images(dataset: str, size: int, n: int, seed: int) -> torch.Tensor:
    """``n`` real images: drawn with ``seed`` (shapes, stripes) or a random subset of a fixed dataset."""
    if dataset in Shapes.KINDS:
        data, indices = Shapes(size, n, seed=seed, kind=dataset), range(n)
    else:
        data = load_dataset(dataset, size)
        if n > len(data):
            raise ValueError(f"{dataset} has {len(data)} images, fewer than the {n} asked for")
        indices = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return torch.stack([data[i][0] for i in indices])


def run_sampler(unet: TimedUNet, scheduler: Any, steps: int, x_t: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(samples, total seconds, seconds in the UNet) of one sampling run from ``x_t``."""
    unet.seconds = 0.0
    generator = torch.Generator().manual_seed(1)  # DDPM's step noise
    start = time.perf_counter()
    x = minidiff.sample(unet, scheduler, batch_size=len(x_t), num_inference_steps=steps, noise=x_t,
                        generator=generator, progress=False)
    return x, time.perf_counter() - start, unet.seconds


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-32", help="shipped model name or pipeline folder")
    p.add_argument("--dataset", default="shapes", help="the model's training data (its judge measures quality)")
    p.add_argument("--num_samples", type=int, default=128)
    p.add_argument("--num_reference", type=int, default=2000, help="real images the FD compares with")
    p.add_argument("--ddpm_steps", type=int, default=1000)
    p.add_argument("--ddim_steps", type=int, nargs="+", default=[10, 20, 50, 100])
    p.add_argument("--repeats", type=int, default=3, help="timed runs of every sampler (median reported)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="32 samples, 1 repeat, 500 reference images")
    p.add_argument("--out", default="benchmarks/results/ddpm_vs_ddim.json")
    p.add_argument("--plot", default="benchmarks/results/ddpm_vs_ddim.png")
    args = p.parse_args()
    if args.quick:
        args.num_samples, args.repeats, args.num_reference = 32, 1, 500
    return args


def measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    unet, scheduler = load_model(args.model)
    unet = TimedUNet(unet.eval())
    size = unet.config.sample_size
    samplers = {f"DDPM-{args.ddpm_steps}": (minidiff.DDPMScheduler.from_config(scheduler.config), args.ddpm_steps)}
    samplers.update({f"DDIM-{n}": (minidiff.DDIMScheduler.from_config(scheduler.config), n) for n in args.ddim_steps})
    x_t = torch.randn(args.num_samples, unet.config.in_channels, size, size,
                      generator=torch.Generator().manual_seed(args.seed))
    judge = Judge.for_dataset(args.dataset, image_size=size)
    quality = Quality(judge, real_images(args.dataset, size, args.num_reference, seed=2))
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in samplers}
    scores = {}
    for _ in range(args.repeats):
        for name, (sched, steps) in samplers.items():
            print(f"{name} ...", flush=True)
            images, total, in_unet = run_sampler(unet, sched, steps, x_t)
            runs[name].append((total, in_unet))
            scores.setdefault(name, quality(images))  # the same images every repeat: score once
    def in_unet_calls(name: str, steps: int) -> float:  # a run's time in units of its own UNet forwards
        return common.median([steps * t / u for t, u in runs[name]])

    ddpm_name = f"DDPM-{args.ddpm_steps}"
    ddpm, ddpm_calls = common.median([t for t, _ in runs[ddpm_name]]), in_unet_calls(ddpm_name, args.ddpm_steps)
    rows = []
    for name, (_, steps) in samplers.items():
        total = common.median([t for t, _ in runs[name]])
        rows.append({"sampler": name, "steps": steps, "seconds": total, "speedup": ddpm / total,
                     "speedup_per_unet_call": ddpm_calls / in_unet_calls(name, steps),
                     "unet_ms_per_call": common.median([1e3 * u / steps for _, u in runs[name]]),
                     "overhead_pct": common.median([100 * (t - u) / t for t, u in runs[name]]),
                     **scores[name], "runs_s": runs[name]})
    real = quality(real_images(args.dataset, size, args.num_samples, seed=3))
    return rows, {"real": real, "judge_test_accuracy": judge.test_accuracy, "model": args.model}


def plot(rows: list[dict[str, Any]], real_fd: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ddim = [r for r in rows if r["sampler"].startswith("DDIM")]
    ddpm = rows[0]
    fig, (ax_time, ax_fd) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax_time, "seconds", "wall time (s)"), (ax_fd, "fd", "FD to real data (judge features)")):
        ax.plot([r["steps"] for r in ddim], [r[key] for r in ddim], "o-", label="DDIM")
        ax.plot([ddpm["steps"]], [ddpm[key]], "s", color="C3", label=ddpm["sampler"])
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
    ax_time.set_yscale("log")
    ax_fd.axhline(real_fd, color="grey", ls="--", label="real images (same count)")
    ax_fd.legend()
    fig.suptitle(f"DDPM vs DDIM, {len(rows)} samplers, same model and x_T")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's DDIM-50 targets with the measured values, met or missed (none without a DDIM-50 row)."""
    ddim50 = next((r for r in rows if r["sampler"] == "DDIM-50"), None)
    if ddim50 is None:
        return []
    speedups = {"wall-clock speed-up": ddim50["speedup"], "speed-up per UNet call": ddim50["speedup_per_unet_call"]}
    lines = [f"DDIM-50 {label} = {value:.2f} (>= {TARGET_SPEEDUP}: {'met' if value >= TARGET_SPEEDUP else 'MISSED'})"
             for label, value in speedups.items()]
    overhead = ddim50["overhead_pct"]
    return lines + [f"DDIM-50 sampler overhead = {overhead:.2f}% (< {TARGET_OVERHEAD}%: "
                    f"{'met' if overhead < TARGET_OVERHEAD else 'MISSED'})"]


def main() -> None:
    args = parse_args()
    common.set_threads(args.threads)
    rows, extra = measure(args)
    table = [[r["sampler"], r["seconds"], r["unet_ms_per_call"], r["speedup"], r["speedup_per_unet_call"],
              r["overhead_pct"], r["fd"], r["confidence"], r["balance"]] for r in rows]
    real = extra["real"]
    table.append(["real images", None, None, None, None, None, real["fd"], real["confidence"], real["balance"]])
    print(f"\n{args.num_samples} samples of {args.model}, {common.environment()['threads']} threads, "
          f"median of {args.repeats}:\n")
    print(common.markdown_table(["sampler", "seconds", "ms / UNet call", "speed-up", "speed-up per UNet call",
                                 "overhead %", "FD", "confidence", "balance"], table))
    targets = target_lines(rows)
    print("\nTargets:\n" + "\n".join(targets))
    common.save_results(args.out, {"args": vars(args), "rows": rows, **extra, "targets": targets})
    plot(rows, real["fd"], args.plot)


if __name__ == "__main__":
    main()

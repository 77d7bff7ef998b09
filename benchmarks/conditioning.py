"""Class conditioning three ways x classifier-free guidance scales x DDIM steps, judged.

Trains one model per conditioning mode with the defaults of examples/class_conditioned.py (run as a
script, so the benchmark measures exactly what users run), then samples every model at each guidance
scale and DDIM step count from the same seeds and lets the digits judge score the samples.

    python benchmarks/conditioning.py                  # 3 trainings (~4-5 min each) + sampling
    python benchmarks/conditioning.py --modes concat --scales 1 2 --steps 50 --samples_per_class 10

Prints a markdown table, writes benchmarks/results/conditioning.json and conditioning.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import minidiff
from minidiff.models.architectures import CONDITIONING_MODES
from minidiff.files import write_json
from minidiff.judge import Judge, judge_samples

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", choices=CONDITIONING_MODES, default=list(CONDITIONING_MODES))
    p.add_argument("--scales", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    p.add_argument("--steps", nargs="+", type=int, default=[20, 50])
    p.add_argument("--samples_per_class", type=int, default=20)
    p.add_argument("--work_dir", default="outputs/bench_conditioning")
    p.add_argument("--retrain", action="store_true", help="train again even if a model exists in --work_dir")
    p.add_argument("--train_args", default="", help="extra flags for examples/class_conditioned.py")
    return p.parse_args()


def train_mode(mode: str, out: Path, retrain: bool, extra: str) -> dict:
    """Run the example for one conditioning mode; returns its metrics.json (with training time)."""
    if retrain or not (out / "metrics.json").is_file():
        cmd = [sys.executable, str(ROOT / "examples" / "class_conditioned.py"), "--conditioning", mode,
               "--output_dir", str(out), "--samples_per_class", "1", *extra.split()]
        subprocess.run(cmd, check=True)
    return json.loads((out / "metrics.json").read_text())


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install minidiff[plot]): no chart")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for steps in dict.fromkeys(r["steps"] for r in rows):
            sel = [r for r in rows if r["mode"] == mode and r["steps"] == steps]
            ax.plot([r["guidance_scale"] for r in sel], [100 * r["accuracy"] for r in sel], marker="o",
                    label=f"{mode}, DDIM-{steps}")
    ax.set_xlabel("classifier-free guidance scale")
    ax.set_ylabel("judged accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    judge = Judge.for_dataset("digits", image_size=16)
    rows = []
    for mode in args.modes:
        out = Path(args.work_dir) / mode
        trained = train_mode(mode, out, args.retrain, args.train_args)
        unet, scheduler = minidiff.load_pipeline(out)
        ddim = minidiff.DDIMScheduler.from_config(scheduler.config)
        for steps in args.steps:
            for scale in args.scales:
                start = time.perf_counter()
                _, _, report = judge_samples(unet, ddim, judge, samples_per_class=args.samples_per_class,
                                             num_inference_steps=steps, guidance_scale=scale, progress=False)
                seconds = time.perf_counter() - start
                rows.append(dict(mode=mode, guidance_scale=scale, steps=steps, accuracy=report.accuracy,
                                 worst_class=min(a for a in report.per_class if a is not None),
                                 samples=report.count, train_seconds=trained["train_seconds"],
                                 sample_seconds=round(seconds, 1),
                                 params_m=round(sum(p.numel() for p in unet.parameters()) / 1e6, 2)))
                print(f"{mode:16s} w={scale:<4} DDIM-{steps:<3d} accuracy {report.accuracy:.1%}", flush=True)
    lines = ["| conditioning | params (M) | train (s) | guidance scale | DDIM steps | judged accuracy | worst class "
             "| sampling (s) |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['params_m']} | {r['train_seconds']:.0f} | {r['guidance_scale']:g} | {r['steps']} "
              f"| {r['accuracy']:.1%} | {r['worst_class']:.0%} | {r['sample_seconds']:.1f} |" for r in rows]
    print("\n".join(lines))
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), samples_per_class=args.samples_per_class,
                judge_test_accuracy=judge.test_accuracy)
    write_json(RESULTS / "conditioning.json", {"meta": meta, "results": rows})
    plot(rows, RESULTS / "conditioning.png")


if __name__ == "__main__":
    main()

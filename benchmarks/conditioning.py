"""Conditioning, judged: class labels three ways, text-to-image, text with a size class, super-resolution.

Every model is trained by its example with the example's defaults (run as a script, so the benchmark measures
exactly what users run; an existing trained model in --work_dir is reused unless --retrain):

- class: one model per conditioning mode (examples/class_conditioned.py), sampled at each guidance scale and
  DDIM step count from the same seeds, scored by the digits judge;
- text: examples/text_to_image.py, its guidance scales scanned with few samples per pair, then the best one
  with --text_samples per pair: both-correct (shape and colour) on seen and held-out pairs;
- text_size: the scan of the same with --size_classes (text and a size class at once), the size judged too;
- sr: examples/super_resolution.py: consistency, realism and PSNR against bicubic upsampling.

    python benchmarks/conditioning.py                           # everything (about an hour on 2 CPU cores)
    python benchmarks/conditioning.py --tasks text sr --text_samples 100
    python benchmarks/conditioning.py --tasks class --modes concat --scales 1 2 --steps 50 --samples_per_class 10

Prints markdown tables, writes benchmarks/results/conditioning.json (one entry per task) and conditioning.png.
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
TASKS = ("class", "text", "text_size", "sr")
RESULTS = ROOT / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--modes", nargs="+", choices=CONDITIONING_MODES, default=list(CONDITIONING_MODES))
    p.add_argument("--scales", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    p.add_argument("--steps", nargs="+", type=int, default=[20, 50])
    p.add_argument("--samples_per_class", type=int, default=20)
    p.add_argument("--text_samples", type=int, default=100, help="samples per pair at the best guidance scale")
    p.add_argument("--work_dir", default="outputs", help="where the examples write (and the models are reused from)")
    p.add_argument("--retrain", action="store_true", help="train again even if a model exists in --work_dir")
    p.add_argument("--train_args", default="", help="extra flags for examples/class_conditioned.py")
    return p.parse_args()


def run_example(script: str, out: Path, result_file: str, retrain: bool, *flags: str) -> dict:
    """Run ``examples/<script>`` into ``out`` unless it already wrote ``result_file`` there; returns that JSON."""
    if retrain or not (out / result_file).is_file():
        cmd = [sys.executable, str(ROOT / "examples" / script), "--output_dir", str(out), *flags]
        subprocess.run(cmd + (["--retrain"] if retrain and script != "class_conditioned.py" else []), check=True)
    return json.loads((out / result_file).read_text())


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


def class_rows(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    judge = Judge.for_dataset("digits", image_size=16)
    rows = []
    for mode in args.modes:
        out = Path(args.work_dir) / "bench_conditioning" / mode
        trained = run_example("class_conditioned.py", out, "metrics.json", args.retrain, "--conditioning", mode,
                              "--samples_per_class", "1", *args.train_args.split())
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
    plot(rows, RESULTS / "conditioning.png")
    return rows, lines


def text_rows(args: argparse.Namespace, size_classes: bool) -> tuple[dict, list[str]]:
    """The example's scan of guidance scales; for the text-only model (the one with targets) also its best
    scale again with ``--text_samples`` per pair."""
    out = Path(args.work_dir) / ("text_and_size" if size_classes else "text_to_image")
    extra = ["--size_classes"] if size_classes else []
    scan = run_example("text_to_image.py", out, "results.json", args.retrain, *extra)
    rows = [(w, r, scan["samples_per_prompt"]) for w, r in scan["scales"].items()]
    results = {"train_seconds": scan["train_seconds"], "scan": scan}
    if not size_classes:
        best = scan["best_guidance_scale"]
        results["final"] = run_example("text_to_image.py", out, f"results_{args.text_samples}.json", False,
                                       "--guidance_scales", str(best), "--samples_per_prompt", str(args.text_samples),
                                       "--results_file", f"results_{args.text_samples}.json")
        rows.append((f"{best:g} (final)", results["final"]["scales"][str(best)], args.text_samples))
    size_column = " size right |" if size_classes else ""
    lines = ["| guidance scale | samples per pair | both right, seen pairs | both right, held-out pairs |"
             + size_column, "|---|---|---|---|" + ("---|" if size_classes else "")]
    lines += [f"| {w} | {n} | {r['both_seen']:.1%} | {r['both_held_out']:.1%} |"
              + (f" {r['size']:.1%} |" if size_classes else "") for w, r, n in rows]
    return results, lines


def sr_rows(args: argparse.Namespace) -> tuple[dict, list[str]]:
    results = run_example("super_resolution.py", Path(args.work_dir) / "super_resolution", "results.json",
                          args.retrain)
    lines = ["| 8x8 -> 32x32 | consistency RMSE (lower: faithful) | HF energy / real (1: as sharp) | Fréchet distance "
             "| PSNR (dB) |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['consistency_rmse']:.4f} | {r['hf_energy_ratio']:.2f} | {r['frechet_distance']:.4f} "
              f"| {r['psnr_db']:.2f} |" for name, r in results.items() if isinstance(r, dict)]
    return results, lines


def main() -> None:
    args = parse_args()
    path = RESULTS / "conditioning.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved = saved if "tasks" in saved else {"tasks": {}}
    for task in args.tasks:
        if task == "class":
            results, lines = class_rows(args)
        elif task in ("text", "text_size"):
            results, lines = text_rows(args, size_classes=task == "text_size")
        else:
            results, lines = sr_rows(args)
        print(f"\n{task}:\n" + "\n".join(lines), flush=True)
        saved["tasks"][task] = {"results": results, "table": lines}
        saved["meta"] = dict(torch=torch.__version__, threads=torch.get_num_threads())
        write_json(path, saved)


if __name__ == "__main__":
    main()

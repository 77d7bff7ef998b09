"""Cost of guidance per sampling step: no guidance, cheap colour guidance, colour guidance through the
UNet, and CLIP guidance, on the same model, batch and DDIM schedule.

    python benchmarks/guidance.py [--model shapes-32] [--batch_size 8] [--steps 12]
    python benchmarks/guidance.py --clip_checkpoint ViT-B-32.openai.bin    # a real CLIP

Each mode runs in a fresh process (so peak-memory figures do not leak between modes), --rounds times in
alternation; the table gives the median over runs of the median step time (a run's first step is not
timed) and of the peak memory above what the loaded models hold: torch.cuda.max_memory_allocated on
CUDA; on the CPU the growth of the process's peak RSS (coarser: it includes the allocator's caching).
Without CLIP weights (no network here) the CLIP mode uses the --clip_model architecture with random
weights, which costs the same as the trained model; the table says which. Prints a table with ratios
to no guidance and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import minidiff
from minidiff.files import write_json
from minidiff.guidance import ColorGuidance
from minidiff.pretrained import pretrained

MODES = ("none", "colour cheap", "colour through UNet", "CLIP cheap")
TARGET = (0.1, 0.9, 0.5)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-32", help="shipped model name or pipeline folder")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="DDIM steps (the first is not timed)")
    p.add_argument("--n_cuts", type=int, default=4)
    p.add_argument("--clip_model", default="ViT-B-32", help="open_clip architecture of the CLIP mode")
    p.add_argument("--clip_checkpoint", default=None, help="trained open_clip weights for --clip_model")
    p.add_argument("--rounds", type=int, default=2, help="runs of every mode; medians are reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/guidance.json")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)   # internal: run one mode, print JSON
    return p.parse_args()


def _clip_guide(args: argparse.Namespace) -> tuple[object, str]:
    import open_clip

    from minidiff.clip import CLIPGuidance

    if args.clip_checkpoint:
        guide = CLIPGuidance("a red circle", n_cuts=args.n_cuts, model_name=args.clip_model,
                             checkpoint_path=args.clip_checkpoint)
        return guide, f"{args.clip_model}, trained weights from {args.clip_checkpoint}"
    model = open_clip.create_model(args.clip_model)
    guide = CLIPGuidance("a red circle", n_cuts=args.n_cuts, model=model,
                         tokenizer=open_clip.get_tokenizer(args.clip_model))
    return guide, f"{args.clip_model}, random weights (same cost as trained ones)"


def _memory_baseline(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0   # Linux reports KiB


def _memory_peak(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def run_one(args: argparse.Namespace) -> dict:
    """Time and peak memory of one mode, measured in this process."""
    unet, scheduler = minidiff.load_pipeline(args.model) if Path(args.model).is_dir() else pretrained(args.model)
    device = torch.device(args.device)
    unet = unet.to(device).eval()
    scheduler = minidiff.DDIMScheduler.from_config(scheduler.config)
    guides, note = [], ""
    if args.one.startswith("colour"):
        guides = [ColorGuidance(TARGET)]
    elif args.one.startswith("CLIP"):
        guide, note = _clip_guide(args)
        guides = [guide.to(device)]    # before the baseline: the CLIP weights are not activations
    stamps = []

    def tick(*_) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    base = _memory_baseline(device)
    tick()
    minidiff.sample(unet, scheduler, batch_size=args.batch_size, num_inference_steps=args.steps, progress=False,
                    generator=torch.Generator().manual_seed(0), guides=guides,
                    guide_through_unet="through" in args.one, callback=tick)
    step_times = [b - a for a, b in zip(stamps[1:], stamps[2:])]     # the first step warms up
    return {"mode": args.one, "step_ms": 1e3 * statistics.median(step_times),
            "peak_mib": (_memory_peak(device) - base) / 2 ** 20, "note": note}


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):   # modes alternate, so load changes on a shared machine hit all alike
        for mode in MODES:
            command = [sys.executable, __file__, *sys.argv[1:], "--one", mode]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {mode}: {runs[mode][-1]['step_ms']:.1f} ms/step, "
                  f"peak +{runs[mode][-1]['peak_mib']:.1f} MiB", flush=True)
    rows = [{"mode": mode, "note": r[0]["note"], "step_ms": statistics.median(x["step_ms"] for x in r),
             "peak_mib": statistics.median(x["peak_mib"] for x in r)} for mode, r in runs.items()]
    none = rows[0]
    for row in rows:
        row["time_ratio"] = row["step_ms"] / none["step_ms"]
        row["memory_ratio"] = row["peak_mib"] / none["peak_mib"] if none["peak_mib"] > 0 else None
    memory = "peak CUDA memory above the models" if args.device.startswith("cuda") else "peak RSS growth"
    print(f"\n{args.model}, batch {args.batch_size}, DDIM, {args.device}; memory = {memory}\n")
    print(f"| mode | ms / step | x none | {memory} (MiB) | x none |\n|---|---:|---:|---:|---:|")
    for r in rows:
        mem_ratio = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
        print(f"| {r['mode']} | {r['step_ms']:.1f} | {r['time_ratio']:.2f} | {r['peak_mib']:.1f} | {mem_ratio} |")
    print(f"\nCLIP: {rows[-1]['note']}")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    write_json(Path(args.out), {"settings": {k: v for k, v in vars(args).items() if k != "one"},
                                "device": device_name or platform.machine(), "memory": memory,
                                "torch": torch.__version__, "results": rows})


if __name__ == "__main__":
    main()

"""Cost of guidance per sampling step: no guidance, cheap colour guidance, colour guidance through the
UNet, and CLIP guidance, on the same model, batch and DDIM schedule.

    python benchmarks/guidance.py [--model shapes-32] [--batch_size 8] [--steps 4] [--rounds 2]
    python benchmarks/guidance.py --clip_checkpoint ViT-B-32.openai.bin    # a real CLIP

Time: in one process, after a warm-up run of each mode, the modes alternate for --rounds sampling
runs each (so load changes on a shared machine hit all alike); the median step time is reported (a
run's first step is not timed). Peak memory above what the loaded models hold, during a run (see
PeakMemory): the CUDA allocator's on CUDA, the RSS on a Linux CPU (coarser). Without CLIP weights (no
network here) the CLIP mode uses the --clip_model architecture with random weights, which costs the
same as the trained model; the table says which. Prints a table with ratios to no guidance and writes
JSON to --out.
"""
from __future__ import annotations

import argparse
import ctypes
import platform
import statistics
import time
from pathlib import Path

import torch

import minidiff
from minidiff.files import write_json
from minidiff.sampling.guidance import ColorGuidance
from minidiff.io import pretrained


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-32", help="shipped model name or pipeline folder")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="DDIM steps of a run (the first is not timed)")
    p.add_argument("--rounds", type=int, default=2, help="runs of every mode")
    p.add_argument("--n_cuts", type=int, default=4)
    p.add_argument("--clip_model", default="ViT-B-32", help="open_clip architecture of the CLIP mode")
    p.add_argument("--clip_checkpoint", default=None, help="trained open_clip weights for --clip_model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/guidance.json")
    return p.parse_args()


def _clip_guide(args: argparse.Namespace, device: torch.device) -> tuple[object, str]:
    import open_clip

    from minidiff.sampling.clip import CLIPGuidance

    if args.clip_checkpoint:
        guide = CLIPGuidance("a red circle", n_cuts=args.n_cuts, model_name=args.clip_model,
                             checkpoint_path=args.clip_checkpoint)
        note = f"{args.clip_model}, trained weights from {args.clip_checkpoint}"
    else:
        guide = CLIPGuidance("a red circle", n_cuts=args.n_cuts, model=open_clip.create_model(args.clip_model),
                             tokenizer=open_clip.get_tokenizer(args.clip_model))
        note = f"{args.clip_model}, random weights (same cost as trained ones)"
    return guide.to(device), note


def setup(args: argparse.Namespace) -> tuple:
    """(unet, DDIM scheduler, {mode: (guides, through_unet)} in table order, CLIP note), all on the device."""
    device = torch.device(args.device)
    unet, scheduler = minidiff.load_pipeline(args.model) if Path(args.model).is_dir() else pretrained(args.model)
    colour = [ColorGuidance((0.1, 0.9, 0.5))]
    clip, note = _clip_guide(args, device)
    cases = {"none": ([], False), "colour cheap": (colour, False), "colour through UNet": (colour, True),
             "CLIP cheap": ([clip], False)}
    return unet.to(device).eval(), minidiff.DDIMScheduler.from_config(scheduler.config), cases, note


def timed_run(unet, scheduler, guides, through_unet: bool, args: argparse.Namespace) -> list[float]:
    """Seconds of each step of one sampling run but the first."""
    stamps = []

    def tick(*_) -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    tick()
    minidiff.sample(unet, scheduler, batch_size=args.batch_size, num_inference_steps=args.steps, progress=False,
                    generator=torch.Generator().manual_seed(0), guides=guides, guide_through_unet=through_unet,
                    callback=tick)
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def _rss_kib(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


class PeakMemory:
    """Peak memory above the start of each ``with`` block, in MiB: the CUDA allocator's peak, or on a
    Linux CPU the peak RSS (glibc set to give large freed blocks back to the OS, so RSS follows live
    tensors; the kernel's peak-RSS mark reset at the start)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if not self.cuda:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(-3, 64 * 1024)           # M_MMAP_THRESHOLD: blocks >= 64 KiB are mmapped
        self.mib = 0.0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2 ** 20
        else:
            self.libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
            self.start = _rss_kib("VmRSS") / 1024
        return self

    def __exit__(self, *exc) -> None:
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if self.cuda else _rss_kib("VmHWM") / 1024
        self.mib = peak - self.start


def measure(args: argparse.Namespace) -> list[dict]:
    memory = PeakMemory(args.device)
    unet, scheduler, cases, note = setup(args)
    for guides, through_unet in cases.values():   # warm-up: lazy initialisations, kernel caches
        timed_run(unet, scheduler, guides, through_unet, args)
    steps = {mode: [] for mode in cases}
    peaks = {mode: 0.0 for mode in cases}
    for round_ in range(args.rounds):
        for mode, (guides, through_unet) in cases.items():
            with memory:
                steps[mode] += timed_run(unet, scheduler, guides, through_unet, args)
            peaks[mode] = max(peaks[mode], memory.mib)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    return [{"mode": mode, "step_ms": 1e3 * statistics.median(steps[mode]), "peak_mib": peaks[mode],
             "step_ms_all": [1e3 * s for s in steps[mode]], "note": note if mode.startswith("CLIP") else ""}
            for mode in cases]


def main() -> None:
    args = parse_args()
    rows = measure(args)
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
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine()
    write_json(Path(args.out), {"settings": vars(args),
                                "device": device_name, "threads": torch.get_num_threads(), "memory": memory,
                                "torch": torch.__version__, "results": rows})


if __name__ == "__main__":
    main()

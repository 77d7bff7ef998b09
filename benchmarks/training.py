"""Training step: minidiff's UNet vs diffusers' UNet2DModel, same architecture and weights, with and
without gradient checkpointing, side by side in one run.

    python benchmarks/training.py [--arch ddpm-butterflies-32] [--batch_size 8] [--steps 10] [--device cpu]

A step is what minidiff.training does: t, eps, add_noise, MSE against eps, backward, AdamW. Reported per
case: images/s (median of the timed steps after warm-up, the cases taking turns so load changes on a
shared machine hit all alike), the first step's loss (the same weights and batch: it must agree), and the
memory forward + backward need above the resting state (activations saved for backward, and the
gradients): on CUDA the peak allocated; on CPU the peak resident-set growth (/proc VmHWM, reset before
the step) with glibc told to mmap every allocation over 64 KiB, so the resident set follows the live
tensors. Writes benchmarks/results/training.json.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minidiff import DDPMScheduler, UNet
from minidiff.models.architectures import ARCHITECTURES
from minidiff.files import write_json
from minidiff.training.setup import enable_gradient_checkpointing

MB = 2**20


def build(arch: str, library: str, checkpointing: bool, device: str) -> torch.nn.Module:
    """The architecture with weights from seed 0 (diffusers' copy gets minidiff's state dict)."""
    torch.manual_seed(0)
    unet = UNet.from_config(ARCHITECTURES[arch])
    if library == "diffusers":
        import diffusers

        config = {k: v for k, v in unet.config.to_dict().items() if not k.startswith("_")}
        model = diffusers.UNet2DModel(**config)
        model.load_state_dict(unet.state_dict(), strict=True)
        if checkpointing:
            model.enable_gradient_checkpointing()
        unet = model
    elif checkpointing:
        enable_gradient_checkpointing(unet)
    return unet.to(device).train()


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], scheduler: DDPMScheduler) -> torch.Tensor:
    x0, noise, t = batch
    out = model(scheduler.add_noise(x0, noise, t), t)
    return F.mse_loss(getattr(out, "sample", out), noise)  # diffusers returns an output dataclass


def make_batch(arch: str, batch_size: int, step: int, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(step)
    size = ARCHITECTURES[arch]["sample_size"]
    x0 = torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (batch_size,), generator=g)
    return tuple(v.to(device) for v in (x0, noise, t))


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6")


def _map_large_allocations() -> None:
    """Make glibc serve every allocation over 64 KiB with its own mmap, returned to the OS on free, so the
    resident set follows the live tensors instead of what the allocator keeps cached."""
    M_MMAP_THRESHOLD = -3
    if not _libc().mallopt(M_MMAP_THRESHOLD, 64 * 1024):
        raise OSError("mallopt(M_MMAP_THRESHOLD) failed")


def forward_backward(case: dict, batch: tuple[torch.Tensor, ...], scheduler: DDPMScheduler) -> float:
    loss = loss_fn(case["model"], batch, scheduler)
    loss.backward()
    return float(loss.detach())


def optimizer_step(case: dict) -> None:
    case["optimizer"].step()
    case["optimizer"].zero_grad(set_to_none=True)


def timed_step(case: dict, batch: tuple[torch.Tensor, ...], scheduler: DDPMScheduler, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    case.setdefault("losses", []).append(forward_backward(case, batch, scheduler))
    optimizer_step(case)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory_mb(case: dict, batch: tuple[torch.Tensor, ...], scheduler: DDPMScheduler, device: str) -> float:
    """Memory the forward and backward need above the resting state (weights and optimizer state, no
    gradients): activations kept for backward plus the gradients; checkpointing acts on the former. CUDA:
    peak allocated; CPU: peak resident set (VmHWM, reset through /proc/self/clear_refs)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rest = torch.cuda.memory_allocated()
        forward_backward(case, batch, scheduler)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - rest) / MB
    else:
        _libc().malloc_trim(0)  # give back the free heap, which would otherwise serve new allocations unseen
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        rest = _rss_mb("VmRSS")
        forward_backward(case, batch, scheduler)
        peak = _rss_mb("VmHWM") - rest
    optimizer_step(case)
    return peak


def run(args: argparse.Namespace) -> list[dict]:
    scheduler = DDPMScheduler()
    cases = []
    for checkpointing in (False, True):
        for library in ("minidiff", "diffusers"):
            model = build(args.arch, library, checkpointing, args.device)
            cases.append({"library": library, "checkpointing": checkpointing, "model": model,
                          "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-4)})
    for step in range(args.warmup + args.steps):  # the cases take turns, step by step
        batch = make_batch(args.arch, args.batch_size, step, args.device)
        for case in cases:
            seconds = timed_step(case, batch, scheduler, args.device)
            if step >= args.warmup:
                case.setdefault("seconds", []).append(seconds)
    if args.device != "cuda":
        _map_large_allocations()  # after the timing: per-allocation mmaps are slower
    batch = make_batch(args.arch, args.batch_size, 0, args.device)
    return [{"library": c["library"], "gradient_checkpointing": c["checkpointing"],
             "images_per_s": args.batch_size / statistics.median(c["seconds"]),
             "step_s_median": statistics.median(c["seconds"]),
             "peak_mb": peak_memory_mb(c, batch, scheduler, args.device), "first_loss": c["losses"][0]}
            for c in cases]


def table(rows: list[dict]) -> str:
    lines = [f"{'library':<10}{'grad ckpt':>10}{'images/s':>10}{'step s':>9}{'fwd+bwd MB':>15}{'first loss':>12}"]
    for r in rows:
        lines.append(f"{r['library']:<10}{str(r['gradient_checkpointing']):>10}{r['images_per_s']:>10.2f}"
                     f"{r['step_s_median']:>9.3f}{r['peak_mb']:>15.1f}{r['first_loss']:>12.6f}")
    by = {(r["library"], r["gradient_checkpointing"]): r for r in rows}
    for ckpt in (False, True):
        m, d = by["minidiff", ckpt], by["diffusers", ckpt]
        lines.append(f"minidiff / diffusers, checkpointing {ckpt}: "
                     f"throughput x{m['images_per_s'] / d['images_per_s']:.2f}, "
                     f"fwd+bwd memory x{m['peak_mb'] / d['peak_mb']:.2f}")
    for lib in ("minidiff", "diffusers"):
        on, off = by[lib, True], by[lib, False]
        lines.append(f"{lib}: gradient checkpointing -> fwd+bwd memory x{on['peak_mb'] / off['peak_mb']:.2f}, "
                     f"throughput x{on['images_per_s'] / off['images_per_s']:.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ddpm-butterflies-32", choices=sorted(ARCHITECTURES))
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "training.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    gradients_mb = sum(p.numel() for p in UNet.from_config(ARCHITECTURES[args.arch]).parameters()) * 4 / MB
    print(f"training step, {args.arch}, batch {args.batch_size}, {args.device}, {torch.get_num_threads()} threads; "
          f"fwd+bwd memory includes {gradients_mb:.0f} MB of float32 gradients")
    print(table(rows))
    write_json(args.out, {"arch": args.arch, "batch_size": args.batch_size, "device": args.device,
                          "steps": args.steps, "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "machine": platform.processor() or platform.machine(), "gradients_mb": gradients_mb,
                          "results": rows})


if __name__ == "__main__":
    main()

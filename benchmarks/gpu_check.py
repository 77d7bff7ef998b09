"""The checks that need a CUDA GPU, in one run of a few minutes, printed as one table.

    python benchmarks/gpu_check.py [--quick] [--out benchmarks/results/gpu_check.json]

1. The Triton GroupNorm(+add, scale/shift)+activation kernel against the pure-torch op on CUDA tensors: float32,
   bfloat16, float16; contiguous and channels_last; silu, relu, none.
2. Whole UNets on CUDA: the pure-torch model against ``optimize(unet, kernels="triton")`` and against the same
   weights on the CPU (max relative difference).
3. Training steps with the Trainer in bf16 autocast and in fp16 with loss scaling: the losses stay finite and
   the weights change.
4. Timings, side by side (interleaved, medians): the Triton kernel against the pure-torch GroupNorm+SiLU (the
   target is >= 3x), and the UNet forward, pure PyTorch against ``optimize(unet, kernels="triton")``.
5. The kernel test files under pytest with the GPU visible.
Exits with status 1 when a check fails, 2 when there is no CUDA device.
"""
from __future__ import annotations

import common  # noqa: I001  (first: it configures OpenMP before torch loads)

import argparse
import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import minidiff
from minidiff.data import Shapes
from minidiff.models import functional
from minidiff.models.architectures import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # relative to max |reference|


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12)).item()


def kernel_rows(device: torch.device) -> list[list]:
    from minidiff.kernels import triton_kernels

    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for dtype in TOLERANCE:
        for layout in (torch.contiguous_format, torch.channels_last):
            for act in ("silu", "relu", "none"):
                x = torch.randn(4, 64, 16, 16, device=device, generator=g).to(dtype).contiguous(memory_format=layout)
                w, b = torch.randn(64, device=device, generator=g), torch.randn(64, device=device, generator=g)
                add = torch.randn(4, 64, device=device, generator=g)
                ref = functional.group_norm_act(x, w, b, 32, 1e-5, add=add, act=act)
                out = triton_kernels.group_norm_act(x, w, b, 32, 1e-5, None, None, add, act)
                err = relative_error(out, ref)
                rows.append([f"triton group_norm_act {str(dtype)[6:]} {'NHWC' if layout != torch.contiguous_format else 'NCHW'} {act}",
                             f"{err:.2e}", err <= TOLERANCE[dtype]])
    return rows


def unet_rows(device: torch.device, arch: str) -> list[list]:
    torch.manual_seed(0)
    cpu_unet = minidiff.UNet.from_config(ARCHITECTURES[arch]).eval()
    unet = copy.deepcopy(cpu_unet).to(device)
    fast = minidiff.optimize(copy.deepcopy(unet), kernels="triton", winograd=False)
    size = unet.config.sample_size
    x = torch.randn(4, unet.config.in_channels, size, size)
    t = torch.tensor([10, 200, 500, 900])
    with torch.no_grad():
        ref_cpu = cpu_unet(x, t)
        ref = unet(x.to(device), t.to(device))
        out = fast(x.to(device), t.to(device))
    cuda_vs_cpu, fast_vs_plain = relative_error(ref.cpu(), ref_cpu), relative_error(out, ref)
    return [[f"{arch} forward: CUDA vs CPU", f"{cuda_vs_cpu:.2e}", cuda_vs_cpu < 1e-3],
            [f"{arch} forward: optimize(kernels='triton') vs pure PyTorch", f"{fast_vs_plain:.2e}",
             fast_vs_plain < 1e-4]]


def training_rows(device: torch.device) -> list[list]:
    rows = []
    for precision in ("bf16", "fp16"):
        torch.manual_seed(0)
        unet = minidiff.UNet.from_config(ARCHITECTURES["ddpm-cifar10-32"])
        before = [p.detach().clone() for p in unet.parameters()]
        with tempfile.TemporaryDirectory() as out:
            config = minidiff.TrainConfig(output_dir=out, max_steps=3, batch_size=8, mixed_precision=precision,
                                          device=str(device), log_samples_every=0, save_model_every=0,
                                          progress=False)
            result = minidiff.train(unet, minidiff.DDPMScheduler(), Shapes(32, 64, seed=0), config)
        changed = any(not torch.equal(a, p.detach().cpu()) for a, p in zip(before, unet.parameters()))
        finite = all(torch.isfinite(p).all() for p in unet.parameters())
        ok = changed and bool(finite) and result.loss is not None and result.loss == result.loss
        rows.append([f"training 3 steps, {precision}: last loss {result.loss}",
                     "weights changed" if changed else "weights unchanged", ok])
    return rows


def timing_rows(device: torch.device, runs: int) -> list[list]:
    from minidiff.kernels import triton_kernels

    def synced(fn):
        def run():
            fn()
            torch.cuda.synchronize()
        return run

    x = torch.randn(8, 128, 32, 32, device=device)
    w, b = torch.randn(128, device=device), torch.randn(128, device=device)
    cases = {"group_norm_act reference": synced(lambda: functional.group_norm_act(x, w, b, 32)),
             "group_norm_act triton": synced(lambda: triton_kernels.group_norm_act(x, w, b, 32, 1e-5, None, None,
                                                                                   None, "silu"))}
    torch.manual_seed(0)
    unet = minidiff.UNet.from_config(ARCHITECTURES["ddpm-butterflies-32"]).to(device).eval()
    fast = minidiff.optimize(copy.deepcopy(unet), kernels="triton", winograd=False)
    xs, ts = torch.randn(8, 3, 32, 32, device=device), torch.full((8,), 500, device=device)
    with torch.no_grad():
        cases["UNet forward pure PyTorch"] = synced(lambda: unet(xs, ts))
        cases["UNet forward optimize(triton)"] = synced(lambda: fast(xs, ts))
        times = common.time_interleaved(cases, runs, warmup=2)
    ms = {name: common.median(v) * 1e3 for name, v in times.items()}
    gn = ms["group_norm_act reference"] / ms["group_norm_act triton"]
    fwd = ms["UNet forward pure PyTorch"] / ms["UNet forward optimize(triton)"]
    return [[f"GroupNorm+SiLU (8, 128, 32, 32): reference {ms['group_norm_act reference']:.3f} ms, "
             f"triton {ms['group_norm_act triton']:.3f} ms", f"{gn:.2f}x", gn >= 3.0],
            [f"butterflies-32 forward: pure {ms['UNet forward pure PyTorch']:.2f} ms, optimize(triton) "
             f"{ms['UNet forward optimize(triton)']:.2f} ms", f"{fwd:.2f}x", fwd >= 1.0]]


def pytest_row() -> list:
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/kernels/test_kernels.py", "-q", "-x"], cwd=ROOT,
                            capture_output=True, text=True)
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
    return ["pytest tests/kernels/test_kernels.py", summary, result.returncode == 0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer timed runs, no pytest")
    p.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing was run")
        sys.exit(2)
    device = torch.device("cuda")
    print(f"gpu_check on {torch.cuda.get_device_name(device)}", flush=True)
    rows = kernel_rows(device)
    for arch in ("ddpm-cifar10-32", "ddpm-butterflies-32"):
        rows += unet_rows(device, arch)
    rows += training_rows(device)
    rows += timing_rows(device, 10 if args.quick else 50)
    if not args.quick:
        rows.append(pytest_row())
    table = [[name, value, "ok" if ok else "FAILED"] for name, value, ok in rows]
    print(common.markdown_table(["check", "value", "result"], table))
    common.save_results(args.out, {"device": torch.cuda.get_device_name(device), "rows": table})
    sys.exit(0 if all(ok for *_, ok in rows) else 1)


if __name__ == "__main__":
    main()

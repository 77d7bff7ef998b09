"""Fused ops vs their pure-torch references, one op at a time, on realistic UNet shapes.

    python benchmarks/ops.py [--runs 30] [--threads N] [--backends auto compile] [--out benchmarks/results/ops.json]

Each case runs the reference and each backend alternately (so load changes on a shared machine hit both
alike), reports the median time of ``--runs`` runs after warm-up and the ratio reference / fused, prints
a table and writes JSON. Threads: torch's setting unless ``--threads``. A CUDA section follows when CUDA
is present. On the CPU, the Winograd 3x3 convolution (``minidiff.kernels.winograd``, what
``minidiff.optimize(unet, winograd=True)`` picks per shape) is timed against oneDNN's (``F.conv2d``), the
baseline it must beat, rather than against its pure-torch reference: inference with the filter transform
cached, and training (forward and backward), on channels_last tensors as ``optimize`` runs them.
"""
from __future__ import annotations

import common  # noqa: F401, I001  (first: it configures OpenMP before torch loads)

import argparse
import contextlib
import functools
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from minidiff import ops
from minidiff.files import write_json
from minidiff.kernels import winograd
from minidiff.kernels.optimize import WINOGRAD_KERNELS

GN_SHAPES = [(8, 128, 32, 32), (8, 256, 16, 16), (8, 64, 64, 64)]
# (B, tokens, channels), heads: cifar10's one wide head, heads of 32, and of 8 (the course UNet at 14x14,
# butterflies at 16x16)
ATTENTION_CASES = [((8, 256, 256), 1), ((8, 256, 256), 8), ((8, 1024, 128), 1), ((8, 196, 64), 8),
                   ((8, 256, 256), 32)]
UPDATE_SHAPES = [(16, 3, 64, 64), (8, 4, 64, 64)]
# (B, C, K, H, W): 3x3 convolutions of butterflies-32, from 64 channels on 32x32 maps to 512 -> 256 on 4x4
WINOGRAD_SHAPES = [(8, 64, 64, 32, 32), (8, 128, 128, 16, 16), (8, 256, 128, 8, 8), (8, 256, 256, 4, 4),
                   (8, 512, 256, 4, 4)]


def _group_norm_cases(device: str) -> list[tuple[str, str, Callable[[], object]]]:
    cases = []
    for shape in GN_SHAPES:
        x = torch.randn(shape, device=device)
        c = shape[1]
        w, b = torch.randn(c, device=device), torch.randn(c, device=device)
        t, s = torch.randn(shape[0], c, device=device), torch.randn(shape[0], c, device=device)
        variants = {"silu": {}, "silu+add": dict(add=t), "silu+scale_shift": dict(scale=s, shift=t)}
        for name, kwargs in variants.items():
            cases.append((f"group_norm_act {name}", str(shape),
                          lambda x=x, w=w, b=b, kwargs=kwargs: ops.group_norm_act(x, w, b, 32, 1e-5, **kwargs)))
    x = torch.randn(GN_SHAPES[0], device=device)
    w, b = torch.randn(x.shape[1], device=device), torch.randn(x.shape[1], device=device)
    for label, xv in (("channels_last", x.to(memory_format=torch.channels_last)), ("bf16", x.bfloat16())):
        cases.append((f"group_norm_act silu {label}", str(tuple(x.shape)),
                      lambda xv=xv, w=w, b=b: ops.group_norm_act(xv, w, b, 32, 1e-5)))
    if device == "cpu":  # training: forward and backward (the C++ backward vs autograd through the reference)
        for label, xv in (("", x), (" channels_last", x.to(memory_format=torch.channels_last))):
            cases.append((f"group_norm_act silu+add fwd+bwd{label}", str(tuple(x.shape)), _training_case(xv, w, b)))
    return cases


def _training_case(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> Callable[[], object]:
    """group_norm_act(x + t) with gradients for x, weight, bias and t (the ResnetBlock2D timestep add)."""
    leaves = [t.clone().requires_grad_() for t in (x, w, b, torch.randn(x.shape[0], x.shape[1]))]
    dy = torch.randn_like(x)

    def run() -> None:
        with torch.enable_grad():
            out = ops.group_norm_act(leaves[0], leaves[1], leaves[2], 32, 1e-5, add=leaves[3])
            torch.autograd.grad(out, leaves, dy)
    return run


def _other_cases(device: str) -> list[tuple[str, str, Callable[[], object]]]:
    cases = []
    for shape, heads in ATTENTION_CASES:
        q, k, v = (torch.randn(shape, device=device) for _ in range(3))
        cases.append((f"attention heads={heads}", str(shape), lambda q=q, k=k, v=v, h=heads: ops.attention(q, k, v, h)))
    if device == "cpu":  # training, heads of 8: the C++ backward vs autograd through the reference
        shape, heads = ATTENTION_CASES[3]
        leaves = [torch.randn(shape).requires_grad_() for _ in range(3)]
        dout = torch.randn(shape)

        def attention_fwd_bwd() -> None:
            with torch.enable_grad():
                torch.autograd.grad(ops.attention(*leaves, heads), leaves, dout)
        cases.append((f"attention heads={heads} fwd+bwd", str(shape), attention_fwd_bwd))
    for shape in UPDATE_SHAPES:
        x, m, n = (torch.randn(shape, device=device) for _ in range(3))
        cases.append(("ddim_update eps clip eta=1", str(shape),
                      lambda x=x, m=m, n=n: ops.ddim_update(x, m, 0.5, 0.6, 0.2, n, "epsilon", 1.0)))
        cases.append(("ddpm_update eps clip", str(shape),
                      lambda x=x, m=m, n=n: ops.ddpm_update(x, m, 0.5, 0.6, 0.1, n, "epsilon", 1.0)))
    return cases


def _winograd_cases() -> list[tuple[str, str, dict[str, Callable[[], object]]]]:
    """For each shape, inference and training: oneDNN's convolution and each Winograd kernel that
    ``optimize`` chooses from (tile, tiles per chunk)."""
    return [case for shape in WINOGRAD_SHAPES for case in _winograd_shape_cases(*shape)]


def _winograd_shape_cases(b: int, c: int, k: int, h: int, w: int
                          ) -> list[tuple[str, str, dict[str, Callable[[], object]]]]:
    x = torch.randn(b, c, h, w).to(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 3, 3).to(memory_format=torch.channels_last) / (3 * c ** 0.5)
    bias, dy = torch.randn(k), torch.randn(b, k, h, w).to(memory_format=torch.channels_last)
    u = {tile: winograd.prepare_weight(weight, tile) for tile in winograd.TILES}
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    kernels = {f"F({m}x{m}) {chunk}": (m, chunk) for m, chunk in WINOGRAD_KERNELS}

    def train(conv: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> None:
            with torch.enable_grad():
                torch.autograd.grad(conv(*leaves), leaves, dy)
        return run

    def infer(m: int, chunk: int) -> torch.Tensor:
        return winograd.winograd_conv3x3(x, weight, bias, tile=m, chunk_tiles=chunk, transformed_weight=u[m])

    shape = str((b, c, k, h, w))
    return [("conv3x3 winograd", shape, {
                "oneDNN": lambda: F.conv2d(x, weight, bias, padding=1),
                **{name: functools.partial(infer, *kernel) for name, kernel in kernels.items()}}),
            ("conv3x3 winograd fwd+bwd", shape, {
                "oneDNN": train(lambda *t: F.conv2d(*t, padding=1)),
                **{name: train(lambda *t, m=m, chunk=chunk: winograd.winograd_conv3x3(*t, tile=m, chunk_tiles=chunk))
                   for name, (m, chunk) in kernels.items()}})]


def _time_alternately(fns: dict[str, Callable[[], object]], runs: int, device: str,
                      backends: bool = True) -> dict[str, float]:
    """Median milliseconds of each call, taking turns on every run; the names are ops backends to select, or
    (``backends=False``) only labels."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(runs + 3):  # the first 3 rounds warm up (and build or compile the kernels)
        for name, fn in fns.items():
            with ops.backend(name) if backends else contextlib.nullcontext():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                if i >= 3:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _row(device: str, op: str, shape: str, backend: str, baseline: str, baseline_ms: float, ms: float) -> dict:
    print(f"{device:5} {op:46} {shape:22} {backend:11} {baseline_ms:9.3f} {ms:9.3f} {baseline_ms / ms:6.2f}x",
          flush=True)
    return dict(device=device, op=op, shape=shape, backend=backend, baseline=baseline, reference_ms=baseline_ms,
                fused_ms=ms, ratio=baseline_ms / ms)


def run(device: str, backends: list[str], runs: int) -> list[dict]:
    rows = []
    backends = [b for b in backends if b != {"cpu": "triton", "cuda": "cpu"}[device]]
    torch.manual_seed(0)
    for op, shape, fn in _group_norm_cases(device) + _other_cases(device):
        medians = _time_alternately({name: fn for name in ["reference", *backends]}, runs, device)
        rows += [_row(device, op, shape, name, "reference", medians["reference"], medians[name]) for name in backends]
    if device == "cpu" and winograd._library() is not None:
        for op, shape, fns in _winograd_cases():
            medians = _time_alternately(fns, runs, device, backends=False)
            rows += [_row(device, op, shape, name, "oneDNN", medians["oneDNN"], medians[name])
                     for name in fns if name != "oneDNN"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--backends", nargs="+", default=["auto"],
                        choices=[b for b in ops.BACKENDS if b != "reference"])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ops.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'dev':5} {'op':46} {'shape':22} {'backend':11} {'ref ms':>9} {'fused ms':>9} {'ratio':>7}  "
          "(Winograd: ref = oneDNN)")
    with torch.no_grad():  # not inference_mode: the training cases re-enable autograd
        rows = run("cpu", args.backends, args.runs)
        if torch.cuda.is_available():
            rows += run("cuda", args.backends, args.runs)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=platform.processor(),
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None, runs=args.runs)
    write_json(args.out, dict(meta=meta, results=rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

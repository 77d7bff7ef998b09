"""Fused kernels vs their pure-torch references, one op at a time, on realistic UNet shapes.

    python benchmarks/ops.py [--runs 30] [--threads N] [--kernels auto cpu triton] [--quick]
                             [--out benchmarks/results/ops.json]

Each case calls the reference ops (``minidiff.models.functional``, what every model runs by default) and the
``Ops`` set of each ``--kernels`` name (``minidiff.kernels.fused``, what ``minidiff.optimize`` gives a model's
layers) alternately, so that load changes on a shared machine hit both alike; it reports the median time of
``--runs`` runs after warm-up and the ratio reference / fused, prints a table and writes JSON. Threads: torch's
setting unless ``--threads``. A CUDA section follows when CUDA is present. On the CPU, the Winograd 3x3
convolution (``minidiff.kernels.winograd``, which ``minidiff.optimize`` picks per shape when it wins) is timed
against oneDNN's (``F.conv2d``), the baseline it must beat, rather than against its pure-torch reference:
inference with the filter transform cached, and training (forward and backward), on channels_last tensors as
``optimize`` runs them. ``--quick``: batch 1, the first shape of each list, 3 runs, no JSON unless ``--out``:
a check that every case runs.
"""
from __future__ import annotations

import common  # noqa: F401, I001  (first: it configures OpenMP before torch loads)

import argparse
import functools
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from minidiff.kernels import fused, winograd
from minidiff.kernels.fast_path import WINOGRAD_KERNELS
from minidiff.models.functional import Ops

GN_SHAPES = [(8, 128, 32, 32), (8, 256, 16, 16), (8, 64, 64, 64)]
# (B, tokens, channels), heads: cifar10's one wide head, heads of 32, and of 8 (the course UNet at 14x14,
# butterflies at 16x16)
ATTENTION_CASES = [((8, 256, 256), 1), ((8, 256, 256), 8), ((8, 1024, 128), 1), ((8, 196, 64), 8),
                   ((8, 256, 256), 32)]
# (B, C, K, H, W): 3x3 convolutions of butterflies-32, from 64 channels on 32x32 maps to 512 -> 256 on 4x4
WINOGRAD_SHAPES = [(8, 64, 64, 32, 32), (8, 128, 128, 16, 16), (8, 256, 128, 8, 8), (8, 256, 256, 4, 4),
                   (8, 512, 256, 4, 4)]
# a case: (op, shape, a function of the Ops set under test that returns the call to time)
Case = tuple[str, str, Callable[[Ops], Callable[[], object]]]


def _group_norm_cases(device: str, shapes: list[tuple[int, ...]]) -> list[Case]:
    cases = []
    for shape in shapes:
        x = torch.randn(shape, device=device)
        c = shape[1]
        w, b = torch.randn(c, device=device), torch.randn(c, device=device)
        t, s = torch.randn(shape[0], c, device=device), torch.randn(shape[0], c, device=device)
        variants = {"silu": {}, "silu+add": dict(add=t), "silu+scale_shift": dict(scale=s, shift=t)}
        for name, kwargs in variants.items():
            cases.append((f"group_norm_act {name}", str(shape), lambda ops, x=x, w=w, b=b, kwargs=kwargs:
                          functools.partial(ops.group_norm_act, x, w, b, 32, 1e-5, **kwargs)))
    x = torch.randn(shapes[0], device=device)
    w, b = torch.randn(x.shape[1], device=device), torch.randn(x.shape[1], device=device)
    for label, xv in (("channels_last", x.to(memory_format=torch.channels_last)), ("bf16", x.bfloat16())):
        cases.append((f"group_norm_act silu {label}", str(tuple(x.shape)),
                      lambda ops, xv=xv, w=w, b=b: functools.partial(ops.group_norm_act, xv, w, b, 32, 1e-5)))
    if device == "cpu":  # training: forward and backward (the C++ backward vs autograd through the reference)
        for label, xv in (("", x), (" channels_last", x.to(memory_format=torch.channels_last))):
            cases.append((f"group_norm_act silu+add fwd+bwd{label}", str(tuple(x.shape)),
                          functools.partial(_group_norm_training, xv, w, b)))
    return cases


def _group_norm_training(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, ops: Ops) -> Callable[[], object]:
    """group_norm_act(x + t) with gradients for x, weight, bias and t (the ResnetBlock2D timestep add)."""
    leaves = [t.clone().requires_grad_() for t in (x, w, b, torch.randn(x.shape[0], x.shape[1]))]
    dy = torch.randn_like(x)

    def run() -> None:
        with torch.enable_grad():
            out = ops.group_norm_act(leaves[0], leaves[1], leaves[2], 32, 1e-5, add=leaves[3])
            torch.autograd.grad(out, leaves, dy)
    return run


def _attention_cases(device: str, cases: list[tuple[tuple[int, int, int], int]]) -> list[Case]:
    result = []
    for shape, heads in cases:
        q, k, v = (torch.randn(shape, device=device) for _ in range(3))
        result.append((f"attention heads={heads}", str(shape),
                       lambda ops, q=q, k=k, v=v, h=heads: functools.partial(ops.attention, q, k, v, h)))
    narrow = [(shape, heads) for shape, heads in cases if shape[2] // heads == 8]
    if device == "cpu" and narrow:  # training, heads of 8: the C++ backward vs autograd through the reference
        shape, heads = narrow[0]
        result.append((f"attention heads={heads} fwd+bwd", str(shape),
                       functools.partial(_attention_training, shape, heads)))
    return result


def _attention_training(shape: tuple[int, int, int], heads: int, ops: Ops) -> Callable[[], object]:
    leaves = [torch.randn(shape).requires_grad_() for _ in range(3)]
    dout = torch.randn(shape)

    def run() -> None:
        with torch.enable_grad():
            torch.autograd.grad(ops.attention(*leaves, heads), leaves, dout)
    return run


def _winograd_cases(b: int, c: int, k: int, h: int, w: int) -> list[tuple[str, str, dict[str, Callable[[], object]]]]:
    """For one shape, inference and training: oneDNN's convolution and each Winograd kernel that ``optimize``
    chooses from (tile, tiles per chunk)."""
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


def _medians(fns: dict[str, Callable[[], object]], runs: int, device: str) -> dict[str, float]:
    """Median milliseconds of each call, taking turns on every run (the first 3 rounds warm up, and build
    the kernels); CUDA calls are synchronised."""
    if device == "cuda":
        def synced(fn: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                torch.cuda.synchronize()
                fn()
                torch.cuda.synchronize()
            return run
        fns = {name: synced(fn) for name, fn in fns.items()}
    times = common.time_interleaved(fns, runs, warmup=3)
    return {name: common.median(t) * 1e3 for name, t in times.items()}


def _row(device: str, op: str, shape: str, kernels: str, baseline: str, baseline_ms: float, ms: float) -> dict:
    print(f"{device:5} {op:46} {shape:22} {kernels:11} {baseline_ms:9.3f} {ms:9.3f} {baseline_ms / ms:6.2f}x",
          flush=True)
    return dict(device=device, op=op, shape=shape, kernels=kernels, baseline=baseline, reference_ms=baseline_ms,
                fused_ms=ms, ratio=baseline_ms / ms)


def run(device: str, kernels: list[str], runs: int, quick: bool) -> list[dict]:
    """Every case on ``device``: the reference ops against each of the ``kernels`` Ops sets (those that run
    there: no C++ kernels on CUDA, no Triton on the CPU), then the Winograd convolutions against oneDNN."""
    kernels = [name for name in kernels if name != {"cpu": "triton", "cuda": "cpu"}[device]]
    shrink = (lambda shapes: [(1, *shapes[0][1:])]) if quick else (lambda shapes: shapes)
    torch.manual_seed(0)
    cases = _group_norm_cases(device, shrink(GN_SHAPES))
    cases += _attention_cases(device, [((1, *shape[1:]), heads) for shape, heads in ATTENTION_CASES[3:4]]
                              if quick else ATTENTION_CASES)
    rows = []
    for op, shape, make in cases:
        medians = _medians({name: make(fused.ops_for(name)) for name in ["reference", *kernels]}, runs, device)
        rows += [_row(device, op, shape, name, "reference", medians["reference"], medians[name]) for name in kernels]
    if device == "cpu" and winograd.load() is not None:
        for op, shape, fns in (case for s in shrink(WINOGRAD_SHAPES) for case in _winograd_cases(*s)):
            medians = _medians(fns, runs, device)
            rows += [_row(device, op, shape, name, "oneDNN", medians["oneDNN"], medians[name])
                     for name in fns if name != "oneDNN"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--kernels", nargs="+", default=["auto"],
                        choices=[name for name in fused.KERNELS if name != "reference"],
                        help="the fused Ops sets to time against the reference (default: auto)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--quick", action="store_true", help="batch 1, one shape per op, 3 runs; no JSON unless --out")
    parser.add_argument("--out", type=Path, help="the JSON to write (default: benchmarks/results/ops.json)")
    args = parser.parse_args()
    common.set_threads(args.threads)
    runs = 3 if args.quick else args.runs
    out = args.out or (None if args.quick else Path(__file__).parent / "results" / "ops.json")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'dev':5} {'op':46} {'shape':22} {'kernels':11} {'ref ms':>9} {'fused ms':>9} {'ratio':>7}  "
          "(Winograd: ref = oneDNN)")
    with torch.no_grad():  # not inference_mode: the training cases re-enable autograd
        rows = run("cpu", args.kernels, runs, args.quick)
        if torch.cuda.is_available():
            rows += run("cuda", args.kernels, runs, args.quick)
    if out is not None:
        common.save_results(out, dict(runs=runs, kernels=args.kernels,
                                      cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                      results=rows))


if __name__ == "__main__":
    main()

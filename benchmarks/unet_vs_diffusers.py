"""UNet forward and training-step latency: minidiff (its pure-PyTorch default, and its fast path
``minidiff.optimize``) vs diffusers (eager, and torch.compile), on the same weights, for the real checkpoints'
architectures.

    python benchmarks/unet_vs_diffusers.py [--arch ddpm-butterflies-32 ...] [--runs 10] [--batch_size 8]
        [--threads N] [--no-compile | --compile-arch ARCH ...] [--compile-train] [--no-train]

Cases take turns (A, B, C, A, B, C, ...) so load changes on a shared machine hit all alike; the table
gives the median of ``--runs`` timed calls after one warm-up round (compiled cases compile during their
first call, reported as "first call s"). Forward: float32, no_grad, batch ``--batch_size``. Training step:
MSE to the noise, backward, AdamW step, each case on its own copy of the weights: torch's default AdamW
(as in the course) for all, plus one more case with the fused AdamW that minidiff's Trainer uses. FLOPs come from
torch's FlopCounterMode; GFLOP/s are compared with two references timed in the same rounds: a 2048^3
float32 matmul (torch.mm, MKL) and a 3x3 channels_last convolution (oneDNN) of a typical UNet layer.
"minidiff eager" is a UNet as built or loaded (pure PyTorch); "minidiff optimize" is ``minidiff.optimize(unet)``
with its defaults (C++ kernels, channels_last, Winograd where it wins); "minidiff optimize, no winograd" is
``optimize(unet, winograd=False)``; "diffusers compile" is ``torch.compile(model)`` with default settings;
"minidiff optimize+compile" is ``minidiff.optimize(unet, compile=True)`` (inductor; frozen weights for inference).
"max rel diff" is
each case's max |output - minidiff eager output| / max |minidiff eager output|: same weights, same math.
The targets compare medians; each ratio of two cases also gives the quartiles of its per-round ratios.
Writes benchmarks/results/unet_vs_diffusers.json (--out).
"""
from __future__ import annotations

import common  # noqa: I001  (first: it configures OpenMP before torch loads)

import argparse
import copy
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import minidiff
from minidiff.models.architectures import ARCHITECTURES

ARCHS = ["ddpm-butterflies-32", "ddpm-cifar10-32", "course-mnist-28"]
TARGET_EAGER, TARGET_FAST = 1.0, 0.6  # forward, x diffusers eager: minidiff's default, minidiff.optimize(unet)
TARGET_VS_COMPILED, TARGET_TRAIN, TARGET_PEAK = 0.85, 0.7, 0.8
OPTIMIZED = "minidiff optimize"  # what users call: optimize(unet) with its defaults
FUSED_CASE = "minidiff optimize, fused AdamW"  # the training step as minidiff's Trainer runs it


class CourseClassConditioned(nn.Module):
    """The course's ClassConditionedUnet around a diffusers model: the label embedding broadcast and
    concatenated as extra input channels (minidiff does this inside its UNet, class_embed_type="concat")."""

    def __init__(self, model: nn.Module, class_embedding: nn.Embedding):
        super().__init__()
        self.model, self.class_emb = model, class_embedding

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        y = self.class_emb(class_labels)[:, :, None, None].expand(-1, -1, *x.shape[2:])  # (B, E, H, W)
        return self.model(torch.cat([x, y], dim=1), t).sample


class Sample(nn.Module):
    """A diffusers model returning the output tensor, like minidiff's UNet."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t).sample


def diffusers_twin(unet: minidiff.UNet) -> nn.Module:
    """diffusers' UNet2DModel with ``unet``'s weights (concat label embeddings stay outside, as in the course)."""
    import diffusers

    config = {k: v for k, v in unet.config.to_dict().items()
              if not k.startswith("_") and k not in ("class_embed_dim", "conditioning_channels")}
    concat = config.get("class_embed_type") == "concat"
    if concat:
        config.update(class_embed_type=None, num_class_embeds=None, in_channels=unet.config.in_channels
                      + unet.config.extra_input_channels)
    model = diffusers.UNet2DModel(**config)
    state = {k: v for k, v in unet.state_dict().items() if not (concat and k.startswith("class_embedding"))}
    model.load_state_dict(state, strict=True)
    model.eval()
    return CourseClassConditioned(model, copy.deepcopy(unet.class_embedding)) if concat else Sample(model)


def make_inputs(arch: str, batch: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    c = ARCHITECTURES[arch]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c["in_channels"], c["sample_size"], c["sample_size"], generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    labels = {"class_labels": torch.randint(0, c["num_class_embeds"], (batch,), generator=g)} \
        if c.get("num_class_embeds") else {}
    return x, t, labels


def build_models(arch: str, compile_: bool) -> dict[str, nn.Module]:
    """The cases' models, all with the weights of one seeded minidiff UNet."""
    torch.manual_seed(0)
    unet = minidiff.UNet.from_config(ARCHITECTURES[arch]).eval()
    twin = diffusers_twin(unet)
    models = {"minidiff eager": unet, OPTIMIZED: minidiff.optimize(copy.deepcopy(unet)),
              "minidiff optimize, no winograd": minidiff.optimize(copy.deepcopy(unet), winograd=False),
              "diffusers eager": twin}
    if compile_:
        models["minidiff optimize+compile"] = minidiff.optimize(copy.deepcopy(unet), compile=True)
        models["diffusers compile"] = torch.compile(copy.deepcopy(twin))
    return models


def reference_cases() -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
    """The peak references: a 2048^3 matmul and a (8, 128, 32, 32) 3x3 channels_last convolution."""
    matmul, matmul_flops = common.matmul_case(2048)
    x = torch.randn(8, 128, 32, 32).to(memory_format=torch.channels_last)
    w = torch.randn(128, 128, 3, 3).to(memory_format=torch.channels_last)
    conv_flops = 2 * 8 * 128 * 128 * 9 * 32 * 32
    return ({"matmul 2048^3": matmul, "conv 3x3 (oneDNN)": lambda: F.conv2d(x, w, padding=1)},
            {"matmul 2048^3": matmul_flops, "conv 3x3 (oneDNN)": conv_flops})


def first_calls(fns: dict[str, Callable[[], Any]]) -> tuple[dict[str, float], dict[str, Any]]:
    """Seconds (compiling, for compiled cases) and results of each function's first call."""
    seconds, results = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        results[name] = fn()
        seconds[name] = time.perf_counter() - start
    return seconds, results


def forward_results(arch: str, models: dict[str, nn.Module], args: argparse.Namespace) -> dict[str, Any]:
    x, t, labels = make_inputs(arch, args.batch_size)
    refs, ref_flops = reference_cases()
    fns = {name: (lambda m=m: m(x, t, **labels)) for name, m in models.items()}
    with torch.no_grad():
        flops = common.count_flops(fns["minidiff eager"])
        first, outputs = first_calls(fns)
        times = common.time_interleaved({**fns, **refs}, args.runs)
    peaks = {name: ref_flops[name] / common.median(times[name]) / 1e9 for name in refs}
    ref = outputs["minidiff eager"]
    error = {name: ((out - ref).abs().max() / ref.abs().max()).item() for name, out in outputs.items()}
    return {"flops": flops, "first_call_s": first, "peak_gflops": peaks, "max_rel_diff": error,
            "median_ms": {name: common.median(v) * 1e3 for name, v in times.items() if name in fns},
            "times_s": times}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor,
               noise: torch.Tensor, labels: dict[str, torch.Tensor]) -> None:
    loss = F.mse_loss(model(x, t, **labels), noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_results(arch: str, models: dict[str, nn.Module], args: argparse.Namespace) -> dict[str, Any]:
    x, t, labels = make_inputs(arch, args.batch_size)
    noise = torch.randn_like(x)
    names = [n for n in models if args.compile_train or "compile" not in n]
    fns = {}
    cases = [(name, name, False) for name in names] + [(FUSED_CASE, OPTIMIZED, True)]
    for case, name, fused in cases:  # fused: the AdamW of minidiff's Trainer, one kernel for all parameters
        model = copy.deepcopy(models[name]).train() if "compile" not in name else models[name].train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        fns[case] = lambda m=model, o=optimizer: train_step(m, o, x, t, noise, labels)
    flops = common.count_flops(lambda: models["minidiff eager"](x, t, **labels).square().mean().backward())
    first, _ = first_calls(fns)
    times = common.time_interleaved(fns, args.runs)
    for model in models.values():
        model.eval()
    return {"flops": flops, "first_call_s": first,
            "median_ms": {name: common.median(v) * 1e3 for name, v in times.items()}, "times_s": times}


def forward_rows(arch: str, r: dict[str, Any]) -> list[list[Any]]:
    ms = r["median_ms"]
    rows = []
    for name, value in ms.items():
        gflops = r["flops"] / value / 1e6
        rows.append([arch, name, value, value / ms["diffusers eager"],
                     value / ms["diffusers compile"] if "diffusers compile" in ms else None, gflops,
                     100 * gflops / r["peak_gflops"]["matmul 2048^3"],
                     100 * gflops / r["peak_gflops"]["conv 3x3 (oneDNN)"], r["first_call_s"][name],
                     r["max_rel_diff"][name]])
    return rows


def target_lines(arch: str, fwd: dict[str, Any], train: dict[str, Any] | None) -> list[str]:
    """Each target of the issue with the measured value (a ratio of medians), met or missed; ratios of two
    cases also give the quartiles of their per-round ratios (the cases ran back to back in each round), which
    show how far the VM's drift moves the verdict."""
    lines = []

    def check(label: str, value: float, limit: float, at_least: bool = False, spread: str = "") -> None:
        met = value >= limit if at_least else value <= limit
        lines.append(f"{arch}: {label} = {value:.3f} ({'>=' if at_least else '<='} {limit}: "
                     f"{'met' if met else 'MISSED'}{spread})")

    def ratio(result: dict[str, Any], label: str, a: str, b: str, limit: float) -> None:
        ms, times = result["median_ms"], result["times_s"]
        per_round = [ta / tb for ta, tb in zip(times[a], times[b])]
        spread = ""
        if len(per_round) > 1:  # quartiles need two rounds
            q1, _, q3 = statistics.quantiles(per_round, n=4)
            spread = f", per-round quartiles {q1:.3f}-{q3:.3f}"
        check(label, ms[a] / ms[b], limit, spread=spread)

    ms = fwd["median_ms"]
    ratio(fwd, "minidiff default (pure PyTorch) / diffusers eager", "minidiff eager", "diffusers eager", TARGET_EAGER)
    ratio(fwd, "minidiff optimize(unet) / diffusers eager", OPTIMIZED, "diffusers eager", TARGET_FAST)
    fastest = min((k for k in ms if k.startswith("minidiff optimize")), key=ms.get)
    if "diffusers compile" in ms:
        ratio(fwd, "fastest minidiff / diffusers compile", fastest, "diffusers compile", TARGET_VS_COMPILED)
    check("fastest minidiff forward / matmul peak", fwd["flops"] / ms[fastest] / 1e6
          / fwd["peak_gflops"]["matmul 2048^3"], TARGET_PEAK, at_least=True)
    if train is not None:
        tms = train["median_ms"]
        ratio(train, "minidiff optimize(unet) training step / diffusers eager, same AdamW", OPTIMIZED,
              "diffusers eager", TARGET_TRAIN)
        ratio(train, "minidiff training step with its Trainer's fused AdamW / diffusers eager", FUSED_CASE,
              "diffusers eager", TARGET_TRAIN)
    return lines


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=ARCHS, choices=sorted(ARCHITECTURES))
    p.add_argument("--runs", type=int, default=10, help="timed calls per case (after one warm-up round)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile-arch", nargs="*", default=None, metavar="ARCH",
                   help="archs that get the torch.compile cases (default: all of --arch; each compile takes "
                        "minutes on a small CPU)")
    p.add_argument("--no-compile", dest="compile_arch", action="store_const", const=[],
                   help="no torch.compile cases")
    p.add_argument("--compile-train", action="store_true", help="also time compiled training steps")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the training-step cases")
    p.add_argument("--out", default="benchmarks/results/unet_vs_diffusers.json")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    common.set_threads(args.threads)
    results, fwd_rows, train_rows, targets = {}, [], [], []
    for arch in args.arch:
        print(f"{arch}: building and timing ...", flush=True)
        models = build_models(arch, args.compile_arch is None or arch in args.compile_arch)
        fwd = forward_results(arch, models, args)
        train = train_results(arch, models, args) if args.train else None
        results[arch] = {"forward": fwd, "train_step": train}
        fwd_rows += forward_rows(arch, fwd)
        if train is not None:
            tms = train["median_ms"]
            train_rows += [[arch, n, v, v / tms["diffusers eager"], train["flops"] / v / 1e6, train["first_call_s"][n]]
                           for n, v in tms.items()]
        targets += target_lines(arch, fwd, train)
    print(f"\nForward, batch {args.batch_size}, float32, {common.environment()['threads']} threads "
          f"(median of {args.runs}):\n")
    print(common.markdown_table(["arch", "case", "ms", "x diffusers eager", "x diffusers compile", "GFLOP/s",
                                 "% matmul peak", "% conv peak", "first call s", "max rel diff"], fwd_rows))
    if train_rows:
        print("\nTraining step (forward, backward, AdamW):\n")
        print(common.markdown_table(["arch", "case", "ms", "x diffusers eager", "GFLOP/s", "first call s"],
                                    train_rows))
    print("\nTargets:\n" + "\n".join(targets))
    common.save_results(args.out, {"args": vars(args), "results": results, "targets": targets})


if __name__ == "__main__":
    main()

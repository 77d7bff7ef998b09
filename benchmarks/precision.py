"""Reduced precision (bfloat16, float16) against float32: speed of the UNet forward, of a sampling run and of a
training step, minidiff vs diffusers under the same ``torch.autocast``; the Trainer's loss curve; sample quality.

    python benchmarks/precision.py [--sections forward sampling train curve quality digits] [--runs 7]
        [--threads N] [--digits_model outputs/class_conditioned]

Every timed section runs its cases in turns (A, B, C, A, B, C, ...) and reports medians, since the machine may be
shared. The CPU's instruction sets decide what reduced precision is worth there, so the table and the JSON start
with its flags (avx2, avx512_bf16, avx512_fp16, amx): oneDNN computes bf16 convolutions and matmuls with AMX tiles
where the CPU has them, with avx512_bf16's dot products (one bf16 pair per fp32 lane) where it has only those.
Sections (each updates its own key of the JSON, so they can run separately):
  forward   butterflies-32 architecture, batch 8, no_grad: diffusers and minidiff eager, each in float32 and
            under autocast; ``minidiff.optimize(unet)`` under autocast (the reduced-precision path itself) and
            ``minidiff.optimize(unet, dtype=...)`` (what optimize picks: it keeps float32 where that is faster).
  sampling  the same models, DDIM 10 steps, batch 8, driven by ``minidiff.sample`` (the sampler's arithmetic is
            float32 in every case; only the model runs under autocast).
  train     one training step (MSE to the noise, backward, fused AdamW) of each library in float32 and under
            autocast, as the Trainer's ``mixed_precision`` runs it.
  curve     the Trainer with mixed_precision "no" and "bf16" (and "fp16" on CUDA), same seed and data
            (shapes-32's architecture trained from scratch on "stripes"), plus "no" with another seed (the curve's
            own noise), the runs' steps interleaved: seconds per step and the loss.
  quality   the shipped shapes-32 model, DDIM, the same initial noise sampled in float32 and under autocast
            (forced, so that the numbers exist on a CPU where optimize would keep float32), scored as
            benchmarks/samplers.py scores it (the Frechet distance on the shapes judge's features) and by the
            judge's confidence, next to the run-to-run noise of each measure: a second float32 run, other seeds.
  digits    judged accuracy of a class-conditional digits model (--digits_model, trained by
            examples/class_conditioned.py) under classifier-free guidance, the same way: two float32 seeds and
            each reduced precision.
Writes benchmarks/results/precision.json (--out).
"""
from __future__ import annotations

import common  # noqa: I001  (first: it configures OpenMP before torch loads)

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import minidiff
from minidiff.models.architectures import ARCHITECTURES

ARCH = "ddpm-butterflies-32"
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# on a CPU with native bf16: minidiff's reduced-precision forward vs diffusers fp32 eager, vs diffusers under autocast
TARGET_VS_FP32, TARGET_VS_AUTOCAST = 0.5, 0.8
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def cpu_flags() -> dict[str, bool]:
    """The CPU's instruction sets that matter for reduced precision (/proc/cpuinfo; torch's probes elsewhere)."""
    try:
        line = next(li for li in Path("/proc/cpuinfo").read_text().splitlines() if li.startswith("flags"))
        present = set(line.split(":", 1)[1].split())
        return {flag: flag in present for flag in CPU_FLAGS}
    except (OSError, StopIteration):
        probes = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
                  "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported",
                  "amx_fp16": "_is_amx_fp16_supported"}
        return {flag: bool(getattr(torch.cpu, probe, lambda: False)()) for flag, probe in probes.items()}


def reduced_dtypes(device: str) -> list[torch.dtype]:
    """The reduced precisions autocast offers on ``device``: bf16, and fp16 where the hardware has it."""
    if device == "cuda":
        return [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
    return [torch.bfloat16] + ([torch.float16] if torch.ops.mkldnn._is_mkldnn_fp16_supported() else [])


def autocast(device: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    return torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


class Wrapped(nn.Module):
    """A model under a fixed autocast (or none) with minidiff's ``config``, returning a float32 tensor: what
    ``minidiff.sample`` drives for every case (a diffusers model included)."""

    def __init__(self, model: nn.Module, config: Any, device: str, dtype: torch.dtype):
        super().__init__()
        self.model, self.config, self.device_type, self.dtype_ = model, config, device, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with autocast(self.device_type, self.dtype_):
            out = self.model(x, t, **kwargs)
        return getattr(out, "sample", out).float()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_cases(fns: dict[str, Callable[[], Any]], runs: int, device: str, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each case (cases taking turns)."""
    timed = {name: (lambda fn=fn: (fn(), sync(device))) for name, fn in fns.items()}
    return {name: common.median(ts) for name, ts in common.time_interleaved(timed, runs, warmup).items()}


# ---------------------------------------------------------------------------------------------- models
def build_models(device: str) -> tuple[minidiff.UNet, nn.Module]:
    """A seeded butterflies-32 minidiff UNet and diffusers' UNet2DModel with its weights."""
    import diffusers

    torch.manual_seed(0)
    unet = minidiff.UNet.from_config(ARCHITECTURES[ARCH]).to(device).eval()
    config = {k: v for k, v in unet.config.to_dict().items() if not k.startswith("_")}
    twin = diffusers.UNet2DModel(**config)
    twin.load_state_dict(unet.state_dict(), strict=True)
    return unet, twin.to(device).eval()


def model_cases(unet: minidiff.UNet, twin: nn.Module, device: str, eager_reduced: bool) -> dict[str, nn.Module]:
    """Case name -> a float32-returning model: each library in each precision (minidiff's eager model under
    autocast only with ``eager_reduced``), minidiff's optimize paths."""
    dtypes = [torch.float32, *reduced_dtypes(device)]
    cases = {f"diffusers {NAMES[dtype]}": Wrapped(twin, unet.config, device, dtype) for dtype in dtypes}
    for dtype in dtypes if eager_reduced else dtypes[:1]:
        cases[f"minidiff {NAMES[dtype]}"] = Wrapped(unet, unet.config, device, dtype)
    optimized = minidiff.optimize(copy.deepcopy(unet))
    for dtype in dtypes:
        cases[f"minidiff optimize {NAMES[dtype]}"] = Wrapped(optimized, unet.config, device, dtype)
    for dtype in dtypes[1:]:
        picked = minidiff.optimize(copy.deepcopy(unet), dtype=dtype)
        cases[f"minidiff optimize(dtype={NAMES[dtype]})"] = Wrapped(picked, unet.config, device, torch.float32)
    return cases


def precision_of(name: str) -> str:
    return next(p for p in ("bf16", "fp16", "fp32") if p in name)


def ratio_columns(name: str, times: dict[str, float]) -> list[float]:
    """x diffusers fp32, x diffusers in the same precision."""
    return [times[name] / times["diffusers fp32"], times[name] / times[f"diffusers {precision_of(name)}"]]


# ---------------------------------------------------------------------------------------------- sections
def forward_section(args: argparse.Namespace) -> dict[str, Any]:
    unet, twin = build_models(args.device)
    cases = model_cases(unet, twin, args.device, eager_reduced=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(args.device)
    t = torch.randint(0, 1000, (args.batch_size,), generator=g).to(args.device)
    with torch.no_grad():
        reference = cases["minidiff fp32"](x, t)
        outputs = {name: model(x, t) for name, model in cases.items()}  # the warm-up; optimize(dtype=) decides
        times = time_cases({name: (lambda m=model: m(x, t)) for name, model in cases.items()}, args.runs, args.device,
                           warmup=0)
    scale = reference.abs().max()
    rows = {name: {"ms": 1e3 * times[name], "vs_diffusers_fp32": ratio_columns(name, times)[0],
                   "vs_diffusers_same_precision": ratio_columns(name, times)[1],
                   "max_rel_diff_vs_fp32": float((outputs[name] - reference).abs().max() / scale)}
            for name in cases}
    return {"batch_size": args.batch_size, "arch": ARCH, "rows": rows}


def sampling_section(args: argparse.Namespace) -> dict[str, Any]:
    unet, twin = build_models(args.device)
    cases = model_cases(unet, twin, args.device, eager_reduced=False)
    scheduler = minidiff.DDIMScheduler()
    noise = torch.randn(args.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(args.device)

    def run(model: nn.Module) -> torch.Tensor:
        return minidiff.sample(model, scheduler, batch_size=args.batch_size, num_inference_steps=args.sample_steps,
                               noise=noise, progress=False)

    outputs = {name: run(model) for name, model in cases.items()}  # the warm-up
    times = time_cases({name: (lambda m=model: run(m)) for name, model in cases.items()}, args.sample_runs,
                       args.device, warmup=0)
    reference = outputs["minidiff fp32"]
    rows = {name: {"s": times[name], "vs_diffusers_fp32": ratio_columns(name, times)[0],
                   "vs_diffusers_same_precision": ratio_columns(name, times)[1],
                   "max_abs_diff_vs_fp32": float((outputs[name] - reference).abs().max()),
                   "samples_dtype": str(outputs[name].dtype)} for name in cases}
    return {"batch_size": args.batch_size, "steps": args.sample_steps, "sampler": "DDIM", "rows": rows}


def train_section(args: argparse.Namespace) -> dict[str, Any]:
    unet, twin = build_models(args.device)
    # the precisions the Trainer's mixed_precision offers on this device (fp16 needs CUDA's loss scaling)
    dtypes = [torch.float32, *(d for d in reduced_dtypes(args.device) if args.device == "cuda" or d != torch.float16)]
    models = {f"{lib} {NAMES[d]}": (copy.deepcopy(m).train(), d) for d in dtypes for lib, m in
              (("diffusers", twin), ("minidiff", unet))}
    models.update({f"minidiff optimize {NAMES[d]}": (minidiff.optimize(copy.deepcopy(unet).train()), d)
                   for d in dtypes})
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for name, (m, _) in models.items()}
    scheduler = minidiff.DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(args.batch_size, 3, 32, 32, generator=g) * 2 - 1).to(args.device)
    noise = torch.randn(x0.shape, generator=g).to(args.device)
    t = torch.randint(0, 1000, (args.batch_size,), generator=g).to(args.device)
    losses: dict[str, float] = {}

    def step(name: str) -> None:
        model, dtype = models[name]
        with autocast(args.device, dtype):
            out = model(scheduler.add_noise(x0, noise, t), t)
        loss = F.mse_loss(getattr(out, "sample", out).float(), noise)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        losses.setdefault(name, float(loss.detach()))  # the first step: same weights and batch for all

    times = time_cases({name: (lambda n=name: step(n)) for name in models}, args.runs, args.device)
    rows = {name: {"ms": 1e3 * times[name], "vs_diffusers_fp32": ratio_columns(name, times)[0],
                   "vs_diffusers_same_precision": ratio_columns(name, times)[1], "first_loss": losses[name]}
            for name in models}
    return {"batch_size": args.batch_size, "arch": ARCH, "rows": rows}


def curve_section(args: argparse.Namespace) -> dict[str, Any]:
    """The Trainer in float32 and bf16 mixed precision from the same weights, seed and data, plus a float32
    run with another seed (how much the curve moves with the draw of t and noise alone); steps interleaved."""
    import tempfile

    from minidiff.data import Shapes

    base = minidiff.UNet.from_config(minidiff.pretrained("shapes-32")[0].config.to_dict())
    scheduler = minidiff.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    data = Shapes(32, 4096, seed=0, kind="stripes")
    runs = {"fp32": ("no", 0), "bf16": ("bf16", 0), "fp32, seed 1": ("no", 1)}
    if args.device == "cuda":
        runs["fp16"] = ("fp16", 0)  # with the Trainer's gradient scaler
    trainers, streams = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (precision, seed) in runs.items():
            torch.manual_seed(0)
            unet = copy.deepcopy(base)
            config = minidiff.TrainConfig(output_dir=f"{tmp}/{name}", seed=seed, batch_size=args.curve_batch,
                                          max_steps=args.curve_steps, lr=3e-4, warmup_steps=10, ema_decay=0.0,
                                          mixed_precision=precision, log_samples_every=0, save_model_every=0,
                                          progress=False, device=args.device)
            trainers[name] = minidiff.Trainer(unet, scheduler, data, config)
            streams[name] = trainers[name].batches()
        losses: dict[str, list[float]] = {name: [] for name in runs}
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.curve_steps):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                loss = float(trainer.compute_gradients(streams[name]))
                trainer.optimizer_step()
                sync(args.device)
                seconds[name].append(time.perf_counter() - start)
                losses[name].append(loss)
    window = args.curve_window
    means = {name: [sum(v[i:i + window]) / len(v[i:i + window]) for i in range(0, len(v), window)]
             for name, v in losses.items()}
    return {"model": "shapes-32 architecture, from scratch", "data": "stripes", "batch_size": args.curve_batch,
            "steps": args.curve_steps, "window": window, "loss": losses, "window_means": means,
            "median_step_s": {name: common.median(v[1:]) for name, v in seconds.items()},
            "step_time_ratio_bf16_vs_fp32": common.median([b / a for a, b in zip(seconds["fp32"][1:],
                                                                                 seconds["bf16"][1:])])}


class Quality:
    """benchmarks/samplers.py's quality measure for shapes-32: the Frechet distance between the shapes judge's
    features of the images and of --num_reference held-out real images; and the judge's mean confidence."""

    def __init__(self, num_reference: int):
        from samplers import MODELS, judge_features, real_images

        from minidiff.judge import Judge

        (ref_name, ref_kwargs), self.real, judge_name = MODELS["shapes-32"]
        self.judge, self.judge_features = Judge.for_dataset(judge_name, image_size=32), judge_features
        self.reference = judge_features(self.judge, real_images(ref_name, ref_kwargs, num_reference))
        self.real_images = lambda n: real_images(*self.real, n)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        from minidiff.judge import frechet_distance

        probabilities = self.judge.model(images.clamp(-1, 1)).softmax(1)
        return {"fd": frechet_distance(self.judge_features(self.judge, images), self.reference),
                "confidence": float(probabilities.max(1).values.mean())}


def quality_section(args: argparse.Namespace) -> dict[str, Any]:
    unet, scheduler = minidiff.pretrained("shapes-32")
    unet = minidiff.optimize(unet.to(args.device).eval())
    ddim = minidiff.DDIMScheduler.from_config(scheduler.config)
    quality = Quality(args.num_reference)
    shape = (args.num_samples, 3, 32, 32)
    noises = {seed: torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in (10, 11)}
    runs = {"fp32, seeds A": (torch.float32, 10), "fp32, seeds B": (torch.float32, 11)}
    runs.update({f"{NAMES[d]}, seeds A": (d, 10) for d in reduced_dtypes(args.device)})
    scores, images = {}, {}
    for name, (dtype, seed) in runs.items():
        model = Wrapped(unet, unet.config, args.device, dtype)
        images[name] = minidiff.sample(model, ddim, batch_size=args.num_samples, noise=noises[seed].to(args.device),
                                       num_inference_steps=args.quality_steps, progress=False).cpu()
        scores[name] = quality(images[name])
        print(name, scores[name], flush=True)
    reference = images["fp32, seeds A"]
    for name in runs:
        scores[name]["max_abs_diff_vs_fp32_A"] = float((images[name] - reference).abs().max())
        scores[name]["mean_abs_diff_vs_fp32_A"] = float((images[name] - reference).abs().mean())
    real = quality(quality.real_images(args.num_samples))
    return {"model": "shapes-32", "sampler": f"DDIM-{args.quality_steps}", "num_samples": args.num_samples,
            "scores": scores, "real": real}


def digits_section(args: argparse.Namespace) -> dict[str, Any]:
    """Judged accuracy of a class-conditional digits model (examples/class_conditioned.py trains one) under
    classifier-free guidance: float32 from two seeds (the measure's noise) and each reduced precision."""
    from minidiff.judge import Judge, judge_samples

    if not Path(args.digits_model).is_dir():
        raise FileNotFoundError(f"--digits_model {args.digits_model} is not a pipeline folder; train one with "
                                f"python examples/class_conditioned.py --output_dir {args.digits_model}")
    unet, scheduler = minidiff.load_pipeline(args.digits_model)
    unet = minidiff.optimize(unet.to(args.device).eval())
    ddim = minidiff.DDIMScheduler.from_config(scheduler.config)
    judge = Judge.for_dataset("digits", image_size=unet.config.sample_size)
    runs = {"fp32, seed 0": (torch.float32, 0), "fp32, seed 1": (torch.float32, 1)}
    runs.update({f"{NAMES[d]}, seed 0": (d, 0) for d in reduced_dtypes(args.device)})
    scores, images = {}, {}
    for name, (dtype, seed) in runs.items():
        images[name], _, report = judge_samples(Wrapped(unet, unet.config, args.device, dtype), ddim, judge,
                                                samples_per_class=args.digits_per_class, seed=seed,
                                                guidance_scale=args.guidance_scale, progress=False)
        scores[name] = {"judged_accuracy": report.accuracy,
                        "mean_abs_diff_vs_fp32_seed0": float((images[name] - images["fp32, seed 0"]).abs().mean())}
        print(name, scores[name], flush=True)
    return {"model": args.digits_model, "sampler": "DDIM-50", "guidance_scale": args.guidance_scale,
            "samples": args.digits_per_class * judge.num_classes, "scores": scores}


SECTIONS = {"forward": forward_section, "sampling": sampling_section, "train": train_section,
            "curve": curve_section, "quality": quality_section, "digits": digits_section}


# ---------------------------------------------------------------------------------------------- report
def timing_table(title: str, section: dict[str, Any], unit: str) -> str:
    rows = [[name, r[unit], r["vs_diffusers_fp32"], r["vs_diffusers_same_precision"],
             r.get("max_rel_diff_vs_fp32", r.get("max_abs_diff_vs_fp32", r.get("first_loss")))]
            for name, r in section["rows"].items()]
    last = {"forward": "max rel diff vs fp32", "sampling": "max abs diff vs fp32", "train": "first loss"}[title]
    return f"{title}\n" + common.markdown_table(
        ["case", unit, "x diffusers fp32", "x diffusers same precision", last], rows)


def curve_table(section: dict[str, Any]) -> str:
    names = list(section["window_means"])
    w = section["window"]
    rows = [[f"{i * w + 1}-{min((i + 1) * w, section['steps'])}", *(section["window_means"][n][i] for n in names)]
            for i in range(len(section["window_means"][names[0]]))]
    rows.append(["median s/step", *(section["median_step_s"][n] for n in names)])
    return "curve (mean loss per window of steps)\n" + common.markdown_table(["steps", *names], rows)


def quality_table(section: dict[str, Any]) -> str:
    rows = [[name, s["fd"], s["confidence"], s["mean_abs_diff_vs_fp32_A"], s["max_abs_diff_vs_fp32_A"]]
            for name, s in section["scores"].items()]
    rows.append(["real images", section["real"]["fd"], section["real"]["confidence"], None, None])
    return f"quality ({section['model']}, {section['sampler']}, {section['num_samples']} samples)\n" + \
        common.markdown_table(["run", "FD", "confidence", "mean |x - x(fp32, A)|", "max |x - x(fp32, A)|"], rows)


def target_lines(results: dict[str, Any]) -> list[str]:
    """The issue's targets where this run has the rows."""
    lines = []
    forward = results.get("forward", {}).get("rows")
    if forward:
        flags = results["cpu_flags"]
        native = "AMX" if flags.get("amx_bf16") else "avx512_bf16, no AMX" if flags.get("avx512_bf16") else None
        bf16 = forward["minidiff optimize bf16"]
        lines.append(f"bf16 forward (optimize under autocast): {bf16['vs_diffusers_fp32']:.2f}x diffusers fp32 "
                     f"(target <= {TARGET_VS_FP32}), {bf16['vs_diffusers_same_precision']:.2f}x diffusers bf16 "
                     f"(target <= {TARGET_VS_AUTOCAST}) [native bf16: {native or 'none, target n/a'}]")
        default = forward["minidiff fp32"]["ms"]
        for name, r in forward.items():
            if name.startswith("minidiff optimize("):
                reduced = forward[f"minidiff optimize {precision_of(name)}"]["ms"]
                lines.append(f"{name}: {r['ms'] / default:.2f}x minidiff's pure-PyTorch default (target <= 1; "
                             f"optimize in fp32 {forward['minidiff optimize fp32']['ms'] / default:.2f}x, "
                             f"in {precision_of(name)} {reduced / default:.2f}x)")
    return lines


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--runs", type=int, default=7, help="timed rounds of the forward and training-step cases")
    p.add_argument("--sample_steps", type=int, default=10)
    p.add_argument("--sample_runs", type=int, default=3)
    p.add_argument("--curve_steps", type=int, default=150)
    p.add_argument("--curve_batch", type=int, default=16)
    p.add_argument("--curve_window", type=int, default=25)
    p.add_argument("--num_samples", type=int, default=256, help="quality: samples per run")
    p.add_argument("--quality_steps", type=int, default=50)
    p.add_argument("--num_reference", type=int, default=2000, help="quality: real images the FD compares with")
    p.add_argument("--digits_model", default="outputs/class_conditioned", help="digits: a class_conditioned.py run")
    p.add_argument("--digits_per_class", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=2.0, help="digits: classifier-free guidance scale")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/precision.json")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    common.set_threads(args.threads)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.pop("environment", None)
    results["cpu_flags"] = cpu_flags()
    results["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print("CPU flags:", ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in results["cpu_flags"].items()),
          f"| device: {results['device']}", flush=True)
    for name in args.sections:
        print(f"--- {name}", flush=True)
        results[name] = SECTIONS[name](args)
        common.save_results(out, results)  # each section as soon as it is measured
    for name in ("forward", "sampling", "train"):
        if name in results:
            print(timing_table(name, results[name], "ms" if name != "sampling" else "s"), "\n")
    if "curve" in results:
        print(curve_table(results["curve"]), "\n")
    if "quality" in results:
        print(quality_table(results["quality"]), "\n")
    if "digits" in results:
        d = results["digits"]
        print(f"digits (judged accuracy, {d['samples']} samples, {d['sampler']}, guidance {d['guidance_scale']})\n"
              + common.markdown_table(["run", "judged accuracy", "mean |x - x(fp32, seed 0)|"],
                                      [[n, s["judged_accuracy"], s["mean_abs_diff_vs_fp32_seed0"]]
                                       for n, s in d["scores"].items()]), "\n")
    for line in target_lines(results):
        print(line)


if __name__ == "__main__":
    main()

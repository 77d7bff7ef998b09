"""Samplers side by side on the shipped models: quality against model calls for DDPM, DDIM and DPM-Solver++
(orders 2 and 3), UniPC, wall time and sampler overhead; and DDIM inversion's reconstruction error next to diffusers'.

    python benchmarks/samplers.py [--models shapes-32] [--num_samples 512] [--quick]
    python benchmarks/samplers.py --only "UniPC-2 (bh2)"   # rerun some samplers into the existing results

Every sampler starts from the same x_T (same seed); DDIM is deterministic (eta = 0), DDPM draws its step noise
from a second seeded generator. Each sampler is built from the model's own scheduler config
(``from_config``, as diffusers builds them): DPM-Solver++ with ``solver_order`` 2 or 3 and the config's
timestep spacing; and "trailing clip": "trailing" spacing (the first step at the last training timestep, where
x_T is pure noise) with x0 clamped to [-1, 1] (thresholding at sample_max_value 1: DDPM/DDIM's clip_sample,
which DPM-Solver lacks; without it the x0 estimates of an eps-model near alpha_bar = 0 blow up); and
SDE-DPM-Solver++ 2M (Lu et al. 2022b sec. 5: fresh noise at every step, as DDPM).

- Quality: the Fréchet distance (FID's formula, Heusel et al. 2017) between judge features of the samples
  and of --num_reference held-out real images; "real" is as many other real images as samples (what a
  perfect sampler scores at this sample count). Judge features: the last conv stage, average-pooled, of a
  small CNN trained on the model's data (``minidiff.judge``).
- For each sampler family: the smallest step count whose distance is within 10% of DDPM-1000's (the DDPM run
  with the most steps).
- Time: wall clock of ``minidiff.sample`` for all samples in one batch. Overhead: everything but the
  UNet forward (schedule, noise, solver update, loop) as a share of the time, in total and as the median
  over steps (robust to load changes on a shared machine). Speed-up against DDPM-1000: in total wall time,
  in median step time times steps (what the targets use: one UNet forward varies by +-10% from
  call to call on a shared 2-core machine, which moves a 20-step run's total but not a median), and per UNet
  call (each run's time counted in its own UNet forwards).
- Inversion: --num_inversion held-out images, ``minidiff.invert`` then ``minidiff.sample(noise=latents)``
  with DDIM at 10/20/50 steps; the same with diffusers' UNet2DModel, DDIMInverseScheduler and DDIMScheduler
  on the same weights; with the model's DDIM config, and with clip_sample off (clipping x0 makes the inverse
  steps lossy). Error: RMSE in [-1, 1] and PSNR of the [0, 1] images.
Prints tables, writes JSON and a PNG plot.
"""
from __future__ import annotations

import common  # noqa: I001  (first: it configures OpenMP before torch loads)

import argparse
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import minidiff
from minidiff.data import load_dataset
from minidiff.files import read_json
from minidiff.io import list_pretrained, pretrained, pretrained_path
from minidiff.judge import Judge, frechet_distance
from minidiff.schedulers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, Scheduler,
                                 UniPCMultistepScheduler)

RESULTS = Path(__file__).parent / "results"
# held-out real images (load_dataset arguments) and the judge whose features measure quality, per model
MODELS = {"shapes-32": (("shapes", dict(seed=7)), ("shapes", dict(seed=8)), "shapes"),
          "photos-32": (("photos", dict(split="test", seed=2)), ("photos", dict(split="test", seed=3)), "faces")}
TARGET_CALLS, TARGET_SPEEDUP, TARGET_OVERHEAD = 20, 50.0, 2.0   # DPM-Solver++ at DDPM-1000's FD; % of time
QUALITY_MARGIN = 1.10                                            # "within 10%" of DDPM-1000's distance


def samplers(config: Any, quick: bool) -> dict[str, tuple[Callable[[], Scheduler], list[int]]]:
    """family -> (scheduler factory, step counts); built from the model's scheduler config."""
    clipped = {"timestep_spacing": "trailing", "thresholding": True, "sample_max_value": 1.0}

    def dpm(order: int, **extra: Any) -> Callable[[], Scheduler]:
        return lambda: DPMSolverMultistepScheduler.from_config({**config.to_dict(), "solver_order": order, **extra})

    def unipc(order: int) -> Callable[[], Scheduler]:
        return lambda: UniPCMultistepScheduler.from_config({**config.to_dict(), "solver_order": order})
    return {"DDPM": (lambda: DDPMScheduler.from_config(config), [1000] if quick else [100, 1000]),
            "DDIM": (lambda: DDIMScheduler.from_config(config), [10, 20, 50] if quick else [10, 20, 50, 100]),
            "DPM-Solver++ 2M": (dpm(2), [5, 10, 20] if quick else [5, 10, 15, 20, 30]),
            "DPM-Solver++ 3M": (dpm(3), [5, 10, 20] if quick else [5, 10, 15, 20, 30]),
            "DPM-Solver++ 2M trailing clip": (dpm(2, **clipped), [5, 10, 20]),
            "DPM-Solver++ 3M trailing clip": (dpm(3, **clipped), [5, 10, 20]),
            "SDE-DPM-Solver++ 2M": (dpm(2, algorithm_type="sde-dpmsolver++"),
                                    [10, 20] if quick else [10, 12, 15, 20, 30, 50]),
            **{f"UniPC-{order} (bh2)": (unipc(order), [5, 10, 20] if quick else [5, 10, 15, 20, 30])
               for order in (2, 3)}}


class TimedUNet(nn.Module):
    """``unet`` that records the seconds of each forward."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet, self.config, self.calls = unet, unet.config, []

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.perf_counter()
        out = self.unet(*args, **kwargs)
        self.calls.append(time.perf_counter() - start)
        return out


def real_images(name: str, kwargs: dict, n: int) -> torch.Tensor:
    """``n`` images of a dataset, (n, 3, 32, 32) in [-1, 1]."""
    data = load_dataset(name, 32, num_samples=n, **kwargs) if name == "shapes" else load_dataset(name, 32, **kwargs)
    return torch.stack([data[i][0] for i in range(n)])


def judge_features(judge: Judge, images: torch.Tensor) -> torch.Tensor:
    if judge.channels == 1:  # a grayscale judge sees the luma
        images = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return judge.features(images)


def run_sampler(unet: TimedUNet, scheduler: Scheduler, steps: int, x_t: torch.Tensor) -> dict[str, Any]:
    """One sampling run from ``x_t``: samples, total seconds, UNet seconds and the per-step overhead shares."""
    unet.calls, ends = [], []
    start = time.perf_counter()
    x = minidiff.sample(unet, scheduler, batch_size=len(x_t), num_inference_steps=steps, noise=x_t,
                        generator=torch.Generator().manual_seed(1), progress=False,
                        callback=lambda *_: ends.append(time.perf_counter()))
    total = time.perf_counter() - start
    step_times = [b - a for a, b in zip([start] + ends[:-1], ends)]
    shares = [100 * (s - u) / s for s, u in zip(step_times, unet.calls)]
    return {"images": x, "seconds": total, "unet_seconds": sum(unet.calls),
            "median_step_seconds": common.median(step_times),
            "overhead_pct": 100 * (total - sum(unet.calls)) / total, "overhead_pct_median_step": common.median(shares)}


def measure_quality(model: str, args: argparse.Namespace,
                    earlier: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of every sampler (or of ``args.only``, added to the ``earlier`` rows of the other samplers)."""
    (ref_name, ref_kwargs), (real_name, real_kwargs), judge_name = MODELS[model]
    unet, scheduler = pretrained(model)
    unet = TimedUNet(unet.eval())
    judge = Judge.for_dataset(judge_name, image_size=32)
    reference = judge_features(judge, real_images(ref_name, ref_kwargs, args.num_reference))
    real_fd = frechet_distance(judge_features(judge, real_images(real_name, real_kwargs, args.num_samples)), reference)
    x_t = torch.randn(args.num_samples, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    rows = [r for r in earlier if r["model"] == model and r["sampler"] not in (args.only or ())]
    for family, (make, step_counts) in samplers(scheduler.config, args.quick).items():
        if args.only and family not in args.only:
            continue
        run_sampler(unet, make(), 2, x_t)  # untimed warm-up: first-call costs are not the sampler's
        for steps in step_counts:
            run = run_sampler(unet, make(), steps, x_t)
            fd = frechet_distance(judge_features(judge, run.pop("images")), reference)
            rows.append({"model": model, "sampler": family, "steps": steps, "fd": fd, **run})
            print(f"  {family}-{steps}: FD {fd:.3f}, {run['seconds']:.1f} s, overhead {run['overhead_pct']:.2f}%",
                  flush=True)
    ddpm = reference_row(rows)
    for r in rows:
        r["speedup"] = ddpm["seconds"] / r["seconds"]
        r["speedup_median_step"] = ddpm["median_step_seconds"] * ddpm["steps"] / (r["median_step_seconds"] * r["steps"])
        r["speedup_per_unet_call"] = (ddpm["steps"] * ddpm["seconds"] / ddpm["unet_seconds"]) / (
            r["steps"] * r["seconds"] / r["unet_seconds"])
    return rows, {"model": model, "real_fd": real_fd, "judge": judge_name, "judge_test_accuracy": judge.test_accuracy}


def reference_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The DDPM run with the most steps (DDPM-1000)."""
    return max((r for r in rows if r["sampler"] == "DDPM"), key=lambda r: r["steps"])


def smallest_steps(rows: list[dict[str, Any]]) -> dict[str, int | None]:
    """Per family: the fewest steps whose FD is within QUALITY_MARGIN of DDPM-1000's (None if none)."""
    goal = QUALITY_MARGIN * reference_row(rows)["fd"]
    best: dict[str, int | None] = {}
    for r in rows:
        hit = r["steps"] if r["fd"] <= goal else None
        old = best.get(r["sampler"])
        best[r["sampler"]] = hit if old is None else old if hit is None else min(old, hit)
    return best


def measure_inversion(model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Reconstruction error of invert-then-sample with DDIM, minidiff and diffusers on the same weights."""
    import diffusers

    (name, kwargs), _, _ = MODELS[model]
    images = real_images(name, {**kwargs, "seed": kwargs.get("seed", 0) + 100}, args.num_inversion)
    unet, scheduler = pretrained(model)
    reference = diffusers.UNet2DModel.from_pretrained(pretrained_path(model), subfolder="unet").eval()

    @torch.no_grad()
    def diffusers_roundtrip(config: dict[str, Any], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, latents = images, None
        for scheduler_class in (diffusers.DDIMInverseScheduler, diffusers.DDIMScheduler):
            sched = scheduler_class.from_config(config)
            sched.set_timesteps(steps)
            for t in sched.timesteps:
                x = sched.step(reference(x, t).sample, t, x).prev_sample
            latents = x if latents is None else latents
        return latents, x

    rows = []
    for variant, overrides in (("model config", {}), ("clip_sample off", {"clip_sample": False})):
        ddim = DDIMScheduler.from_config({**scheduler.config.to_dict(), **overrides})
        for steps in args.inversion_steps:
            start = time.perf_counter()
            latents = minidiff.invert(unet, ddim, images, num_inference_steps=steps, progress=False)
            recon = minidiff.sample(unet, ddim, noise=latents, batch_size=len(images), num_inference_steps=steps,
                                    progress=False)
            seconds = time.perf_counter() - start
            their_latents, their_recon = diffusers_roundtrip(ddim.config.to_dict(), steps)
            rows.append({"model": model, "ddim": variant, "steps": steps, "seconds": seconds,
                         **errors("minidiff", recon, images), **errors("diffusers", their_recon, images),
                         "latents_max_abs_diff": float((latents - their_latents).abs().max()),
                         "latents_std": float(latents.std())})
            print(f"  inversion ({variant}) {steps} steps: RMSE minidiff {rows[-1]['minidiff_rmse']:.4f}, "
                  f"diffusers {rows[-1]['diffusers_rmse']:.4f}", flush=True)
    return rows


def errors(name: str, recon: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    mse_01 = ((recon.clamp(-1, 1) - images) / 2).square().mean().item()
    return {f"{name}_rmse": (recon - images).square().mean().sqrt().item(),
            f"{name}_psnr_db": 10 * math.log10(1 / max(mse_01, 1e-12))}


def plot(rows: list[dict[str, Any]], extras: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [e["model"] for e in extras]
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for (ax_fd, ax_time), extra in zip(axes, extras):
        mine = [r for r in rows if r["model"] == extra["model"]]
        ddpm = reference_row(mine)
        families = sorted({r["sampler"] for r in mine}, key=[r["sampler"] for r in mine].index)
        for i, family in enumerate(families):
            pts = [r for r in mine if r["sampler"] == family]
            style = "--" if "trailing" in family else "-"
            for ax, key in ((ax_fd, "fd"), (ax_time, "seconds")):
                ax.plot([r["steps"] for r in pts], [r[key] for r in pts], "o" + style, color=f"C{i}", label=family)
        for ax, key in ((ax_fd, "fd"), (ax_time, "seconds")):
            ax.plot([ddpm["steps"]], [ddpm[key]], "s", color="k", label="DDPM-1000")
            ax.set_xscale("log")
            ax.set_xlabel("model calls (steps)")
        ax_fd.axhline(QUALITY_MARGIN * ddpm["fd"], color="k", ls=":", label="DDPM-1000 FD + 10%")
        ax_fd.axhline(extra["real_fd"], color="grey", ls="--", label="real images (same count)")
        ax_fd.set_ylabel("Fréchet distance to held-out images")
        ax_fd.set_title(extra["model"])
        ax_time.set_yscale("log")
        ax_time.set_ylabel("wall time (s)")
        ax_fd.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def target_lines(rows: list[dict[str, Any]], inversion: list[dict[str, Any]]) -> list[str]:
    """The issue's targets with the measured values, met or missed."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        best = smallest_steps(mine)
        reached = {f: n for f, n in best.items() if "DPM-Solver" in f and n is not None}
        family = min(reached, key=reached.get) if reached else None
        lines.append(f"{model}: smallest steps within 10% of DDPM-1000's FD: "
                     + ", ".join(f"{f} {n if n is not None else 'none measured'}" for f, n in best.items()))
        if family is None:
            lines.append(f"{model}: DPM-Solver++ within 10% of DDPM-1000's FD in <= {TARGET_CALLS} calls: MISSED")
        else:
            run = next(r for r in mine if r["sampler"] == family and r["steps"] == reached[family])
            lines.append(f"{model}: {family} reaches it in {reached[family]} calls (<= {TARGET_CALLS}: "
                         f"{verdict(reached[family] <= TARGET_CALLS)}), {run['speedup_median_step']:.0f}x faster "
                         f"than DDPM-1000 in median step time x steps (>= {TARGET_SPEEDUP:.0f}x: "
                         f"{verdict(run['speedup_median_step'] >= TARGET_SPEEDUP)}); {run['speedup']:.0f}x in total "
                         f"wall time, {run['speedup_per_unet_call']:.0f}x per UNet call")
        for key, label in (("overhead_pct", "total"), ("overhead_pct_median_step", "median step")):
            worst = max(mine, key=lambda r: r[key])
            lines.append(f"{model}: worst sampler overhead ({label}) {worst[key]:.2f}% ({worst['sampler']}-"
                         f"{worst['steps']}) (< {TARGET_OVERHEAD}%: {verdict(worst[key] < TARGET_OVERHEAD)})")
    for r in inversion:
        no_worse = r["minidiff_rmse"] <= 1.001 * r["diffusers_rmse"]
        lines.append(f"{r['model']}: inversion ({r['ddim']}) {r['steps']} steps RMSE {r['minidiff_rmse']:.4f} vs diffusers "
                     f"{r['diffusers_rmse']:.4f} (no worse: {verdict(no_worse)})")
    return lines


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shipped = [m for m in list_pretrained() if m in MODELS]
    p.add_argument("--models", nargs="+", default=shipped, choices=list(MODELS))
    p.add_argument("--num_samples", type=int, default=512,
                   help="samples per sampler (at 128 two seed sets of SDE-DPM-Solver++ 2M-15 score 0.59 and 0.80)")
    p.add_argument("--num_reference", type=int, default=2000, help="held-out real images the FD compares with")
    p.add_argument("--num_inversion", type=int, default=8, help="held-out images to invert and reconstruct")
    p.add_argument("--inversion_steps", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="16 samples, 500 reference images, fewer step counts")
    p.add_argument("--only", nargs="+", metavar="SAMPLER",
                   help=f"rerun these samplers into --out's earlier results; one of {list(samplers_names())}")
    p.add_argument("--out", default=str(RESULTS / "samplers.json"))
    p.add_argument("--plot", default=str(RESULTS / "samplers.png"))
    args = p.parse_args()
    if args.quick:
        args.num_samples, args.num_reference, args.num_inversion = 16, 500, 4
    unknown = set(args.only or ()) - set(samplers_names()) | ({"DDPM"} & set(args.only or ()))
    if unknown:
        p.error(f"--only {sorted(unknown)}: expected samplers of {list(samplers_names())[1:]} (DDPM-1000 is the "
                "reference: rerun everything to change it)")
    return args


def samplers_names() -> list[str]:
    return list(samplers(DDPMScheduler().config, quick=False))


def earlier_results(args: argparse.Namespace) -> dict[str, Any]:
    """The results file ``--only`` adds to; it must come from a run with the same settings."""
    if not args.only:
        return {"rows": [], "inversion": []}
    data = read_json(args.out)
    before = data["args"]
    differ = [f"{k}={before[k]}" for k in ("models", "num_samples", "num_reference", "seed", "quick")
              if before[k] != vars(args)[k]]
    if differ:
        raise SystemExit(f"--only: {args.out} was measured with other settings ({', '.join(differ)}); use the same "
                         "ones or rerun every sampler")
    return data


def main() -> None:
    args = parse_args()
    common.set_threads(args.threads)
    earlier = earlier_results(args)
    rows, extras, inversion = [], [], [] if not args.only else earlier["inversion"]
    for model in args.models:
        print(f"{model}:", flush=True)
        model_rows, extra = measure_quality(model, args, earlier["rows"])
        rows += model_rows
        extras.append({**extra, "smallest_steps_within_10pct": smallest_steps(model_rows)})
        if not args.only:
            inversion += measure_inversion(model, args)
    table = [[r["model"], r["sampler"], r["steps"], r["fd"], r["seconds"], r["speedup"], r["speedup_median_step"],
              r["speedup_per_unet_call"], r["overhead_pct"], r["overhead_pct_median_step"]] for r in rows]
    table += [[e["model"], "real images", None, e["real_fd"], None, None, None, None, None, None] for e in extras]
    print(f"\n{args.num_samples} samples per sampler, {common.environment()['threads']} threads:\n")
    print(common.markdown_table(["model", "sampler", "steps", "FD", "seconds", "speed-up", "speed-up (median step)",
                                 "speed-up per UNet call",
                                 "overhead %", "overhead % (median step)"], table))
    print("\nDDIM inversion then DDIM sampling (reconstruction of held-out images):\n")
    print(common.markdown_table(["model", "DDIM", "steps", "RMSE minidiff", "RMSE diffusers", "PSNR minidiff (dB)",
                                 "PSNR diffusers (dB)", "max |latents diff|"],
                                [[r["model"], r["ddim"], r["steps"], r["minidiff_rmse"], r["diffusers_rmse"],
                                  r["minidiff_psnr_db"], r["diffusers_psnr_db"], r["latents_max_abs_diff"]]
                                 for r in inversion]))
    targets = target_lines(rows, inversion)
    print("\nTargets:\n" + "\n".join(targets))
    runs = earlier.get("runs", [{"environment": earlier["environment"], "args": earlier["args"]}]) \
        if args.only else []
    common.save_results(args.out, {"args": vars(args), "rows": rows, "models": extras, "inversion": inversion,
                                   "targets": targets, "runs": runs + [{"environment": common.environment(),
                                                                        "args": vars(args)}]})
    plot(rows, extras, Path(args.plot))


if __name__ == "__main__":
    main()

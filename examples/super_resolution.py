"""Train a 4x super-resolution model on real photographs: 8x8 crops in, 32x32 out.

An image-conditioned UNet (SR3, Saharia et al. 2021): the low-resolution crop, upsampled bicubically to 32x32,
is concatenated to the noisy image as three extra input channels. The training crops come from the left 70%
of scikit-image's photographs, the judged ones from the held-out right 30%. The low-resolution images are
4x4 block averages. Conditions are dropped to an all-zero image 10% of the time, so classifier-free guidance
works as for class labels and text. Sampling also passes ``low_resolution=``, which projects every step's
predicted image onto those that average down to the input (DDNM); the plain conditional model is measured
too. At the end, on held-out crops, against bicubic upsampling:

- consistency: RMSE between the output averaged back to 8x8 and the input (how faithful it is);
- realism: the high-frequency (Laplacian) energy relative to the real crops' (1 = as sharp as real), and the
  Fréchet distance of image statistics to the real crops;
- PSNR against the real crops (a blurry average wins on PSNR: a sharp guess of detail that is not in the
  input is penalised twice).

    python examples/super_resolution.py                  # train (about 10 min on 2 CPU cores), judge
    python examples/super_resolution.py --resume         # continue an interrupted run

Writes to --output_dir: the pipeline (unet/, scheduler/: minidiff.load_pipeline reads it), grid.png
(low-res | bicubic | minidiff | minidiff with consistency | real), results.json and the training log.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning threads on a busy machine

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import minidiff
from minidiff.data import Crops, SuperResolutionPairs, downsample, upsample
from minidiff.files import atomic_path, read_json, write_json
from minidiff.judge import frechet_distance, high_frequency_energy, image_statistics, psnr
from minidiff.models.architectures import image_conditional_config
from minidiff.training import TrainConfig, train

FACTOR, SIZE = 4, 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="outputs/super_resolution")
    p.add_argument("--max_steps", type=int, default=1200, help="optimizer steps (the training budget)")
    p.add_argument("--max_minutes", type=float, default=10.0, help="stop training after this many minutes")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--cond_drop_prob", type=float, default=0.1, help="condition dropout to the all-zero image")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 64], help="UNet block_out_channels")
    p.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--num_test", type=int, default=256, help="held-out crops judged")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --output_dir")
    p.add_argument("--retrain", action="store_true", help="train again even if --output_dir holds a model")
    args = p.parse_args(argv)
    # checked before training, not after it: a bad value must not cost the run
    if min(args.num_inference_steps, args.num_test) < 1 or args.num_inference_steps > 1000:
        p.error("--num_inference_steps must be in [1, 1000] and --num_test >= 1")
    if not all(math.isfinite(w) for w in args.guidance_scales):
        p.error(f"--guidance_scales must be finite numbers, got {args.guidance_scales}")
    return args


def train_model(args: argparse.Namespace) -> float:
    dataset = SuperResolutionPairs(Crops(SIZE, "photos", split="train", num_samples=100_000, seed=args.seed), FACTOR)
    unet = minidiff.UNet.from_config(image_conditional_config(3, SIZE, 3, widths=tuple(args.widths)))
    scheduler = minidiff.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    print(f"super-resolution UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")
    start = time.perf_counter()
    result = train(unet, scheduler, dataset, TrainConfig(
        output_dir=args.output_dir, seed=args.seed, batch_size=args.batch_size, max_steps=args.max_steps,
        max_minutes=args.max_minutes, lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
        cond_drop_prob=args.cond_drop_prob, log_samples_every=400, save_model_every=200, resume=args.resume,
        overwrite=not args.resume))
    if result.interrupted:
        raise SystemExit(f"training stopped after step {result.step}; run again with --resume to finish it")
    return time.perf_counter() - start


def measure(outputs: Tensor, low: Tensor, real: Tensor) -> dict:
    """Consistency, realism and fidelity of upsampled ``outputs`` (B, 3, 32, 32) of ``low`` against ``real``."""
    real_energy = high_frequency_energy(real).mean()
    return {"consistency_rmse": float((downsample(outputs.clamp(-1, 1), FACTOR) - low).square().mean().sqrt()),
            "hf_energy_ratio": float(high_frequency_energy(outputs.clamp(-1, 1)).mean() / real_energy),
            "frechet_distance": frechet_distance(image_statistics(outputs.clamp(-1, 1) / 2 + 0.5),
                                                 image_statistics(real / 2 + 0.5)),
            "psnr_db": float(psnr(outputs, real).mean())}


def save_grid(columns: dict[str, Tensor], path: Path, rows: int = 8) -> None:
    """One column per method (images in [-1, 1]), ``rows`` crops, labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(rows, len(columns), figsize=(1.3 * len(columns), 1.3 * rows), squeeze=False)
    for col, (name, images) in enumerate(columns.items()):
        axes[0, col].set_title(name, fontsize=8)
        for row in range(rows):
            axes[row, col].imshow((images[row] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[row, col].axis("off")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    folder = Path(args.output_dir)
    previous = folder / "results.json"  # a reused model keeps the training time measured when it trained
    train_seconds = read_json(previous).get("train_seconds") if previous.is_file() else None
    if args.retrain or args.resume or not (folder / "model_index.json").is_file():
        train_seconds = train_model(args)
    unet, scheduler = minidiff.load_pipeline(folder)
    ddim = minidiff.DDIMScheduler.from_config(scheduler.config)

    test = Crops(SIZE, "photos", split="test", num_samples=args.num_test, seed=args.seed + 1)
    real = torch.stack([test[i][0] for i in range(len(test))])
    low = downsample(real, FACTOR)
    bicubic = upsample(low, FACTOR)
    results = {"train_seconds": train_seconds and round(train_seconds, 1), "num_test": len(real),
               "bicubic": measure(bicubic, low, real)}
    outputs = {}
    runs = [(args.guidance_scales[0], False)] + [(w, True) for w in args.guidance_scales]
    for w, consistent in runs:
        start = time.perf_counter()
        name = f"minidiff_w{w:g}" + ("_consistent" if consistent else "")
        outputs[name] = torch.cat([
            minidiff.sample(unet, ddim, conditioning_image=upsample(chunk, FACTOR), guidance_scale=w, progress=False,
                            low_resolution=chunk if consistent else None, num_inference_steps=args.num_inference_steps,
                            generator=torch.Generator().manual_seed(args.seed + i))
            for i, chunk in enumerate(low.split(128))])
        results[name] = {**measure(outputs[name], low, real), "sample_seconds": round(time.perf_counter() - start, 1)}
    for name, row in results.items():
        if isinstance(row, dict):
            print(f"{name:>24}: consistency RMSE {row['consistency_rmse']:.4f}, HF energy {row['hf_energy_ratio']:.2f}"
                  f" of real, FD {row['frechet_distance']:.4f}, PSNR {row['psnr_db']:.2f} dB")
    w = args.guidance_scales[0]
    save_grid({"8x8 input": F.interpolate(low, scale_factor=FACTOR, mode="nearest"), "bicubic": bicubic,
               f"minidiff (w={w:g})": outputs[f"minidiff_w{w:g}"],
               "+ consistency": outputs[f"minidiff_w{w:g}_consistent"], "real": real}, folder / "grid.png")
    write_json(folder / "results.json", results)
    print(f"wrote {folder / 'grid.png'} and {folder / 'results.json'}")
    return results


if __name__ == "__main__":
    main()

"""Colour guidance on the shipped base model: a grid over guidance scales and both gradient modes, and a
table of the mean absolute distance of the final images to the target colour (same seeds everywhere).

    python examples/guidance.py                                   # shapes-32, scales 0 10 20 40 80
    python examples/guidance.py --target "#55FFAA" --model path/to/pipeline --steps 40

Writes to --output_dir: grid_cheap.png and grid_through_unet.png (one row per scale, the same starting
noise in every row), results.json and results.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning threads on a busy machine

import argparse
import time
from pathlib import Path

import torch

import minidiff
from minidiff.files import write_json
from minidiff.sampling.guidance import ColorGuidance, color_loss, parse_color
from minidiff.io import pretrained
from minidiff.training.log import save_sample_grid

MODES = {"cheap": False, "through_unet": True}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-32", help="shipped model name or pipeline folder")
    p.add_argument("--target", default="0.1,0.9,0.5", help="'R,G,B' in [0, 1] or a hex colour")
    p.add_argument("--scales", type=float, nargs="+", default=[0, 10, 20, 40, 80])
    p.add_argument("--schedule", default="none", help="gradient schedule (minidiff.sampling.guidance.SCHEDULES)")
    p.add_argument("--steps", type=int, default=40, help="DDIM steps (the course's 40)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output_dir", default="outputs/guidance")
    return p.parse_args()


def run(unet, scheduler, guide: ColorGuidance | None, through_unet: bool, args) -> tuple[torch.Tensor, float]:
    """(images in [0, 1], seconds) from the same seed."""
    start = time.perf_counter()
    x = minidiff.sample(unet, scheduler, batch_size=args.batch_size, num_inference_steps=args.steps,
                        generator=torch.Generator().manual_seed(args.seed), progress=False,
                        guides=[guide] if guide else [], guide_through_unet=through_unet)
    return (x.float().cpu() / 2 + 0.5).clamp(0, 1), time.perf_counter() - start


def markdown(rows: list[dict]) -> str:
    lines = ["| mode | scale | mean abs. distance to target | ratio to unguided | seconds |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['scale']:g} | {r['distance']:.4f} | {r['ratio']:.3f} | {r['seconds']:.1f} |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    color = parse_color([float(v) for v in args.target.split(",")] if "," in args.target else args.target)
    unet, scheduler = minidiff.load_pipeline(args.model) if Path(args.model).is_dir() else pretrained(args.model)
    unet = unet.to(args.device).eval()
    scheduler = minidiff.DDIMScheduler.from_config(scheduler.config)
    out = Path(args.output_dir)

    baseline, seconds = run(unet, scheduler, None, False, args)
    unguided = (color_loss(baseline * 2 - 1, color) / 2).mean().item()   # in [0, 1] pixel units
    rows = []
    for mode, through_unet in MODES.items():
        grid = []
        for scale in args.scales:
            if scale == 0:   # exactly the unguided images (tested), no need to sample again
                images, took = baseline, seconds
            else:
                guide = ColorGuidance(color, scale=scale, schedule=args.schedule)
                images, took = run(unet, scheduler, guide, through_unet, args)
            distance = (color_loss(images * 2 - 1, color) / 2).mean().item()
            rows.append({"mode": mode, "scale": scale, "distance": distance, "ratio": distance / unguided,
                         "seconds": took})
            grid.append(images)
            print(f"{mode:>12} scale {scale:>5g}: distance {distance:.4f} ({distance / unguided:.3f} of unguided)")
        save_sample_grid(torch.cat(grid), out / f"grid_{mode}.png", nrow=args.batch_size)

    settings = {k: v for k, v in vars(args).items() if k != "output_dir"} | {"target_rgb": color}
    write_json(out / "results.json", {"settings": settings, "results": rows})
    table = markdown(rows)
    (out / "results.md").write_text(f"Colour guidance towards {color} on {args.model}, {args.steps} DDIM steps, "
                                    f"{args.batch_size} images, seed {args.seed}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()

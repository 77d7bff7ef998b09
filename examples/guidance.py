"""Colour guidance on a shipped base model: a grid over guidance scales and both gradient modes, and a
table of what guidance does to the images (same seeds everywhere):

- colour: the mean absolute distance of the final images to the target colour (lower: more of the colour);
- content: the Pearson correlation of each guided image's luminance with the unguided image's from the
  same seed, averaged (1: the same picture, recoloured; near 0: the content is gone).

The recommended scale is the largest one whose content correlation stays >= --min_content: the most colour
that keeps the picture.

    python examples/guidance.py                                   # photos-32, scales 0 2 5 10 20 40
    python examples/guidance.py --target "#55FFAA" --model path/to/pipeline --steps 40

Writes to --output_dir: grid_cheap.png and grid_through_unet.png (one labelled row per scale, the same
starting noise in every row), results.json and results.md.
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

MODES = {"cheap": False, "through_unet": True}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="photos-32", help="shipped model name or pipeline folder")
    p.add_argument("--target", default="0.1,0.9,0.5", help="'R,G,B' in [0, 1] or a hex colour")
    p.add_argument("--scales", type=float, nargs="+", default=[0, 2, 5, 10, 20, 40])
    p.add_argument("--min_content", type=float, default=0.8, help="content correlation the recommended scale keeps")
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


def content_correlation(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of the Pearson correlation of the luminance of (B, 3, H, W) ``images`` with ``reference``."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    a, b = ((x * weights).sum(1).flatten(1) for x in (images, reference))
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-8)).mean().item()


def labelled_grid(rows: list[torch.Tensor], labels: list[str], path: Path, zoom: int = 2) -> None:
    """Save rows of (N, 3, H, W) images in [0, 1] as one PNG, each row's label written on its left."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.v2.functional import to_pil_image
    from torchvision.utils import make_grid

    grid = make_grid(torch.cat(rows), nrow=len(rows[0]), padding=2, pad_value=1.0)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=zoom, mode="nearest")[0]
    image, margin = to_pil_image(grid), 130
    canvas = Image.new("RGB", (image.width + margin, image.height), "white")
    canvas.paste(image, (margin, 0))
    draw, row_height = ImageDraw.Draw(canvas), image.height / len(rows)
    for i, label in enumerate(labels):
        draw.text((6, int((i + 0.5) * row_height) - 6), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def markdown(rows: list[dict]) -> str:
    lines = ["| mode | scale | mean abs. distance to target | ratio to unguided | content (luminance corr.) | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['scale']:g} | {r['distance']:.4f} | {r['ratio']:.3f} | {r['content']:.3f} "
              f"| {r['seconds']:.1f} |" for r in rows]
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
            content = content_correlation(images, baseline)
            rows.append({"mode": mode, "scale": scale, "distance": distance, "ratio": distance / unguided,
                         "content": content, "seconds": took})
            grid.append(images)
            print(f"{mode:>12} scale {scale:>5g}: distance {distance:.4f} ({distance / unguided:.3f} of unguided), "
                  f"content {content:.3f}")
        labelled_grid(grid, [f"{mode}, scale {scale:g}" for scale in args.scales], out / f"grid_{mode}.png")

    kept = [r["scale"] for r in rows if r["mode"] == "cheap" and r["content"] >= args.min_content]
    recommended = max(kept, default=0.0)
    settings = {k: v for k, v in vars(args).items() if k != "output_dir"} | {"target_rgb": color}
    write_json(out / "results.json", {"settings": settings, "results": rows, "recommended_scale": recommended})
    table = markdown(rows)
    (out / "results.md").write_text(f"Colour guidance towards {color} on {args.model}, {args.steps} DDIM steps, "
                                    f"{args.batch_size} images, seed {args.seed}\n\n{table}\n\nRecommended scale "
                                    f"(cheap mode, content >= {args.min_content}): {recommended:g}\n")
    print(table)
    print(f"recommended scale (the largest whose content correlation is >= {args.min_content}): {recommended:g}")


if __name__ == "__main__":
    main()

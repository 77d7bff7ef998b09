"""Edit real photographs with a shipped model: DDIM inversion and reconstruction, img2img (SDEdit) at three
strengths, and inpainting, on held-out crops of scikit-image's photos (needs the ``data`` extra).

    python examples/editing.py [--model photos-32] [--num_images 6] [--output_dir outputs/editing]

Writes ``editing.png`` (one labelled row per edit, one column per image) and ``editing.json`` (the
reconstruction error of inversion and how far each edit moved the images), and prints them.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning threads on a busy machine

import argparse
from pathlib import Path

import torch
from torchvision.utils import make_grid

import minidiff
from minidiff.data.real import Crops
from minidiff.files import atomic_path, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = "photos-32" if "photos-32" in minidiff.list_pretrained() else "shapes-32"
    p.add_argument("--model", default=default, help="a shipped model (minidiff.list_pretrained()) or pipeline folder")
    p.add_argument("--num_images", type=int, default=6)
    p.add_argument("--inversion_steps", type=int, default=50)
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps of img2img and inpainting")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/editing")
    args = p.parse_args(argv)
    if args.num_images < 1 or args.inversion_steps < 1 or args.steps < 1:
        p.error("--num_images, --inversion_steps and --steps must be >= 1")
    if not all(0 <= s <= 1 for s in args.strengths):
        p.error("--strengths must be in [0, 1]")
    return args


def labelled_rows(rows: dict[str, torch.Tensor], path: Path, scale: int = 3) -> None:
    """One row per entry, its name written on the left; images in [-1, 1]."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.v2.functional import to_pil_image

    grids = [make_grid((images.float().cpu() / 2 + 0.5).clamp(0, 1), nrow=len(images), padding=2, pad_value=1.0)
             for images in rows.values()]
    label_width, height = 150, grids[0].shape[1] * scale
    canvas = Image.new("RGB", (label_width + grids[0].shape[2] * scale, height * len(grids)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, grid) in enumerate(zip(rows, grids)):
        canvas.paste(to_pil_image(grid).resize((grid.shape[2] * scale, height), Image.NEAREST), (label_width, i * height))
        draw.text((6, i * height + height // 2 - 6), name, fill="black")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    unet, scheduler = (minidiff.load_pipeline(args.model) if Path(args.model).is_dir()
                       else minidiff.pretrained(args.model))
    size = unet.config.sample_size
    crops = Crops(size, kind="photos", split="test", seed=args.seed, channels=unet.config.in_channels)
    images = torch.stack([crops[i][0] for i in range(args.num_images)])
    g = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731  (the same noise for every edit)

    # inversion: deterministic DDIM, without clipping x0 (clipping makes the inverse steps lossy)
    ddim = minidiff.DDIMScheduler.from_config({**scheduler.config.to_dict(), "clip_sample": False})
    latents = minidiff.invert(unet, ddim, images, num_inference_steps=args.inversion_steps)
    recon = minidiff.sample(unet, ddim, noise=latents, num_inference_steps=args.inversion_steps)
    rows = {"held-out photos": images, f"inverted + resampled ({args.inversion_steps} DDIM)": recon}
    result = {"model": args.model, "num_images": args.num_images,
              "inversion_rmse": (recon - images).pow(2).mean().sqrt().item()}

    dpm = minidiff.DPMSolverMultistepScheduler.from_config(scheduler.config)
    for strength in args.strengths:
        edited = minidiff.sample(unet, dpm, init_images=images, strength=strength, num_inference_steps=args.steps,
                                 generator=g())
        rows[f"img2img strength {strength:g}"] = edited
        result[f"img2img_{strength:g}_rmse_to_input"] = (edited - images).pow(2).mean().sqrt().item()

    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1  # generate the centre, keep the rest
    filled = minidiff.sample(unet, dpm, init_images=images, mask=mask.expand(len(images), -1, -1, -1),
                             num_inference_steps=args.steps, generator=g())
    rows["masked input"] = images * (1 - mask) + mask * 1.0  # the hole shown white
    rows[f"inpainted ({args.steps} DPM++)"] = filled
    result["inpainting_kept_pixels_max_error"] = ((filled - images) * (1 - mask)).abs().max().item()

    out = Path(args.output_dir)
    labelled_rows(rows, out / "editing.png")
    write_json(out / "editing.json", result)
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"wrote {out / 'editing.png'}")
    return result


if __name__ == "__main__":
    main()

"""CLIP guidance: steer the base model towards a text prompt (the course's unit 2, with open_clip).

Needs CLIP weights: a local open_clip checkpoint file (--checkpoint_path, for --model_name) or a
pretrained tag already in the Hugging Face cache or downloadable (--pretrained, default "openai" for
ViT-B-32). Without them it stops with a message saying how to provide them.

    python examples/clip_guidance.py --prompt "a red circle" --checkpoint_path ViT-B-32.openai.bin
    python examples/clip_guidance.py --prompt "a blue triangle" --pretrained openai --through_unet

Writes to --output_dir: grid.png (first row unguided, second row guided, same starting noise) and
results.json with the CLIP loss of both (lower is closer to the prompt).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning threads on a busy machine

import argparse
from pathlib import Path

import torch

import minidiff
from minidiff.sampling.clip import CLIPGuidance
from minidiff.files import write_json
from minidiff.io import pretrained
from minidiff.training.log import save_sample_grid


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", default="shapes-32", help="shipped model name or pipeline folder")
    p.add_argument("--model_name", default="ViT-B-32", help="open_clip architecture")
    p.add_argument("--pretrained", default="openai", help="open_clip pretrained tag")
    p.add_argument("--checkpoint_path", default=None, help="local open_clip weights (.bin/.pt/.safetensors)")
    p.add_argument("--scale", type=float, default=8.0, help="the course's guidance_scale")
    p.add_argument("--n_cuts", type=int, default=4)
    p.add_argument("--schedule", default="sqrt_alpha_bar")
    p.add_argument("--through_unet", action="store_true", help="backpropagate through the UNet too")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output_dir", default="outputs/clip_guidance")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    try:
        guide = CLIPGuidance(args.prompt, scale=args.scale, n_cuts=args.n_cuts, model_name=args.model_name,
                             pretrained=args.pretrained, checkpoint_path=args.checkpoint_path,
                             schedule=args.schedule)
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    unet, scheduler = minidiff.load_pipeline(args.model) if Path(args.model).is_dir() else pretrained(args.model)
    unet = unet.to(args.device).eval()
    scheduler = minidiff.DDIMScheduler.from_config(scheduler.config)

    rows, losses = [], {}
    for name, guides in (("unguided", []), ("guided", [guide])):
        torch.manual_seed(args.seed)   # the cut-outs draw from the global RNG
        x = minidiff.sample(unet, scheduler, batch_size=args.batch_size, num_inference_steps=args.steps,
                            generator=torch.Generator().manual_seed(args.seed), guides=guides,
                            guide_through_unet=args.through_unet)
        torch.manual_seed(args.seed)   # the same cut-outs score both rows
        with torch.no_grad():
            losses[name] = guide.loss(x.clamp(-1, 1)).mean().item()
        rows.append((x.float().cpu() / 2 + 0.5).clamp(0, 1))
        print(f"{name}: CLIP loss {losses[name]:.4f}")
    out = Path(args.output_dir)
    save_sample_grid(torch.cat(rows), out / "grid.png", nrow=args.batch_size)
    write_json(out / "results.json", {"settings": vars(args), "clip_loss": losses})
    print(f"wrote {out / 'grid.png'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()

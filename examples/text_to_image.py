"""Train a text-to-image model from scratch: a small text encoder and a UNet that attends to its tokens.

The data are embedded captioned shapes ("a red circle", ... six colours x three shapes); three pairs never
appear in training ("a green triangle", "a blue circle", "a yellow square"), so the grid shows whether the
model composes words into pictures it never saw. The text encoder (a word tokenizer over the captions'
vocabulary and a 2-layer transformer) trains jointly with the UNet; captions are dropped to the empty prompt
10% of the time, so classifier-free guidance contrasts a prompt with "". At the end a caption judge (a shape
classifier and the hue of the bright pixels) scores samples of every pair, seen and held out.

    python examples/text_to_image.py                               # train (about 15 min on 2 CPU cores), judge
    python examples/text_to_image.py --prompt "a blue circle" --prompt "a red square"   # sample a trained model
    python examples/text_to_image.py --resume                      # continue an interrupted run
    python examples/text_to_image.py --size_classes --output_dir outputs/text_and_size   # two conditions

With --size_classes the UNet takes a second condition, a class label (0 small, 1 large shape) added to its
timestep embedding, beside the prompt's cross-attention; each condition drops to its null on its own, and the
judge also reads the size: the grid's left half asks for small shapes, the right half for large ones.

Writes to --output_dir: the pipeline (unet/, scheduler/, text_encoder/; minidiff.text.load_text_pipeline reads
it), grid.png (one row per prompt, held-out rows marked), results.json, and the training log.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning threads on a busy machine

import argparse
import math
import time
from pathlib import Path

import torch
from torch import Tensor

import minidiff
from minidiff.data import HELD_OUT_PAIRS, SIZES, CaptionedShapes
from minidiff.data.captioned import ALL_PAIRS, caption
from minidiff.files import read_json, write_json
from minidiff.judge import CaptionJudge, size_names
from minidiff.models.architectures import text_conditional_config
from minidiff.text import TextEncoder, load_text_pipeline
from minidiff.training import TrainConfig, train

HELD_OUT_PROMPTS = [caption(*pair) for pair in HELD_OUT_PAIRS]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="outputs/text_to_image")
    p.add_argument("--prompt", action="append", help="sample these prompts from the trained model (repeatable), at "
                                                     "one --guidance_scales value or the judged best; without it: "
                                                     "every pair, judged")
    p.add_argument("--max_steps", type=int, default=1400, help="optimizer steps (the training budget)")
    p.add_argument("--max_minutes", type=float, default=15.0, help="stop training after this many minutes")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--cond_drop_prob", type=float, default=0.1, help="caption dropout to the empty prompt")
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64], help="UNet block_out_channels")
    p.add_argument("--text_width", type=int, default=64, help="text encoder width = cross-attention dim")
    p.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 3.0, 5.0, 7.5],
                   help="classifier-free guidance scales judged; the grid uses the best")
    p.add_argument("--samples_per_prompt", type=int, default=20, help="judged samples per pair and scale")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results_file", default="results.json", help="file name of the judged results")
    p.add_argument("--size_classes", action="store_true", help="also condition on a size class (small/large)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --output_dir")
    p.add_argument("--retrain", action="store_true", help="train again even if --output_dir holds a model")
    args = p.parse_args(argv)
    # checked before training, not after it: a bad value must not cost the run
    if min(args.num_inference_steps, args.samples_per_prompt) < 1 or args.num_inference_steps > 1000:
        p.error("--num_inference_steps must be in [1, 1000] and --samples_per_prompt >= 1")
    if not all(math.isfinite(w) for w in args.guidance_scales):
        p.error(f"--guidance_scales must be finite numbers, got {args.guidance_scales}")
    return args


def trained(folder: Path) -> bool:
    return (folder / "text_encoder" / "model.safetensors").is_file() and (folder / "model_index.json").is_file()


def train_model(args: argparse.Namespace) -> float:
    """Train the text encoder and the UNet; returns the training seconds (None if interrupted)."""
    dataset = CaptionedShapes(32, split="train", num_samples=100_000, seed=args.seed, size_labels=args.size_classes)
    encoder = TextEncoder.from_vocabulary_of(dataset.captions, width=args.text_width)
    sizes = len(SIZES) + 1 if args.size_classes else None  # and the null class
    unet = minidiff.UNet.from_config(text_conditional_config(args.text_width, widths=tuple(args.widths),
                                                             num_class_embeds=sizes))
    scheduler = minidiff.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    count = sum(p.numel() for p in [*unet.parameters(), *encoder.parameters()])
    print(f"UNet + text encoder: {count / 1e6:.2f}M parameters; vocabulary {encoder.tokenizer.vocabulary}")
    start = time.perf_counter()
    result = train(unet, scheduler, dataset, TrainConfig(
        output_dir=args.output_dir, seed=args.seed, batch_size=args.batch_size, max_steps=args.max_steps,
        max_minutes=args.max_minutes, lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
        cond_drop_prob=args.cond_drop_prob, log_samples_every=500, save_model_every=250, resume=args.resume,
        overwrite=not args.resume), text_encoder=encoder)
    if result.interrupted:
        raise SystemExit(f"training stopped after step {result.step}; run again with --resume to finish it")
    return time.perf_counter() - start


def size_requests(unet: minidiff.UNet, count: int) -> Tensor | None:
    """Size classes for ``count`` samples of one prompt, the first half small, or None without --size_classes."""
    return (torch.arange(count) >= count // 2).long() if unet.takes_class_labels else None


def generate(folder: Path, prompts: list[str], guidance_scale: float, num_inference_steps: int,
             seed: int, sizes: Tensor | None = None) -> Tensor:
    """Samples in [-1, 1] of ``prompts`` (one image each; of ``sizes`` if the model takes size classes),
    classifier-free guided against the empty prompt (and the null size)."""
    unet, scheduler, encode = load_text_pipeline(folder)
    ddim = minidiff.DDIMScheduler.from_config(scheduler.config)
    return minidiff.sample(unet, ddim, batch_size=len(prompts), encoder_hidden_states=encode(prompts),
                           class_labels=sizes,
                           uncond_encoder_hidden_states=encode([""]), guidance_scale=guidance_scale,
                           num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed),
                           progress=False)


def judge_pairs(args: argparse.Namespace, folder: Path) -> dict:
    """Both-correct, shape and colour shares per pair and guidance scale; the best scale's grid."""
    judge = CaptionJudge.for_image_size(32)
    prompts = [caption(*pair) for pair in ALL_PAIRS]
    n, results = args.samples_per_prompt, {}
    sizes = size_requests(load_text_pipeline(folder)[0], n)
    for w in args.guidance_scales:
        start = time.perf_counter()
        batch = [p for p in prompts for _ in range(n)]
        all_sizes = None if sizes is None else sizes.repeat(len(prompts))
        images = torch.cat([generate(folder, batch[i:i + 180], w, args.num_inference_steps, args.seed + i,
                                     None if all_sizes is None else all_sizes[i:i + 180])
                            for i in range(0, len(batch), 180)])
        per_prompt = {p: judge.score(images[i * n:(i + 1) * n], [p] * n).to_dict() for i, p in enumerate(prompts)}
        if sizes is not None:  # the size condition acts: the judged size is the requested one
            for i, p in enumerate(prompts):
                read = size_names(images[i * n:(i + 1) * n], [p.split()[-1]] * n)
                per_prompt[p]["size"] = sum(r == SIZES[k] for r, k in zip(read, sizes.tolist())) / n
        seen = [v["both"] for p, v in per_prompt.items() if p not in HELD_OUT_PROMPTS]
        held = [v["both"] for p, v in per_prompt.items() if p in HELD_OUT_PROMPTS]
        size = [v["size"] for v in per_prompt.values() if "size" in v]
        results[str(w)] = {"both_seen": sum(seen) / len(seen), "both_held_out": sum(held) / len(held),
                           **({"size": sum(size) / len(size)} if size else {}),
                           "per_prompt": per_prompt, "seconds": round(time.perf_counter() - start, 1),
                           "images": images}
        print(f"guidance {w}: both right {results[str(w)]['both_seen']:.1%} on seen pairs, "
              f"{results[str(w)]['both_held_out']:.1%} on held-out pairs ({n} samples per pair)"
              + (f"; size right {results[str(w)]['size']:.1%}" if size else ""))
    best = max(results, key=lambda k: results[k]["both_seen"] + results[k]["both_held_out"])
    images = results[best]["images"].view(len(prompts), n, *results[best]["images"].shape[1:])
    k = min(4, n // 2)  # the first half of a prompt's samples asked for small shapes, the second for large ones
    images = images[:, torch.cat([torch.arange(k), n // 2 + torch.arange(k)])] if sizes is not None else images[:, :8]
    save_grid(images, prompts, folder / "grid.png",
              f"DDIM-{args.num_inference_steps}, guidance {best}"
              + ("; left small, right large" if sizes is not None else ""))
    for r in results.values():
        del r["images"]
    return {"best_guidance_scale": float(best), "samples_per_prompt": n, "scales": results}


def save_grid(images: Tensor, prompts: list[str], path: Path, title: str) -> None:
    """(P, K, 3, H, W) images in [-1, 1] as one grid, a row per prompt labelled on the left (held out: red *)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    rows, k, _, size = images.shape[:4]
    grid = make_grid((images.flatten(0, 1) / 2 + 0.5).clamp(0, 1), nrow=k, padding=2, pad_value=1)
    figure, ax = plt.subplots(figsize=(1.6 + 0.42 * k, 0.42 * rows + 0.5))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_yticks([2 + (size + 2) * r + size / 2 for r in range(rows)])
    ax.set_yticklabels([p + (" *" if p in HELD_OUT_PROMPTS else "") for p in prompts], fontsize=8)
    for label, prompt in zip(ax.get_yticklabels(), prompts):
        label.set_color("tab:red" if prompt in HELD_OUT_PROMPTS else "black")
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"{title}; * never seen in training", fontsize=8)
    figure.tight_layout()
    with minidiff.files.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    folder = Path(args.output_dir)
    if args.prompt:
        if not trained(folder):
            raise SystemExit(f"{folder} holds no trained text-to-image model; run without --prompt first")
        previous = folder / "results.json"  # by default the scale the judged scan found best
        best = read_json(previous).get("best_guidance_scale", 3.0) if previous.is_file() else 3.0
        w = args.guidance_scales[0] if len(args.guidance_scales) == 1 else best
        sizes = size_requests(load_text_pipeline(folder)[0], 8)
        images = generate(folder, [p for p in args.prompt for _ in range(8)], w, args.num_inference_steps, args.seed,
                          None if sizes is None else sizes.repeat(len(args.prompt)))
        save_grid(images.view(len(args.prompt), 8, *images.shape[1:]), args.prompt, folder / "prompts.png",
                  f"guidance {w}")
        print(f"wrote {folder / 'prompts.png'}")
        return None
    previous = folder / "results.json"  # a reused model keeps the training time measured when it trained
    train_seconds = read_json(previous).get("train_seconds") if previous.is_file() else None
    if args.retrain or args.resume or not trained(folder):
        train_seconds = train_model(args)
    results = {"train_seconds": train_seconds and round(train_seconds, 1), **judge_pairs(args, folder)}
    write_json(folder / args.results_file, results)
    print(f"wrote {folder / 'grid.png'} and {folder / args.results_file}")
    return results


if __name__ == "__main__":
    main()

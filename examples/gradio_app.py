"""Colour-guided sampling in the browser: the course's Gradio demo on minidiff.

Pick a colour, a guidance scale, a number of DDIM steps and a seed; the app samples a small grid from the
base model with ``ColorGuidance`` (the notebook's cheap variant: gradient with respect to x_t only) and
shows it with a progress bar. The default scale is 2, not the notebook's 40: examples/guidance.py measures
on photos-32 that 2 keeps the picture (luminance correlation 0.88 with the unguided image, same seed) while
halving its distance to the colour, and that 5 or more turns crops into flat colour (0.68 and below). Needs
the ``demo`` extra (``pip install -e '.[demo]'``).

    python examples/gradio_app.py                       # the shipped models, on 127.0.0.1:7860
    python examples/gradio_app.py --model path/to/pipeline --port 8000

The app offers every shipped model and, once ``make demo`` has written it, the fine-tuned faces model
(``outputs/finetune``); ``--model`` chooses the one selected at the start.

``build_demo(unet, scheduler)`` returns the ``gr.Blocks`` (tests drive it in a headless browser;
``examples/space/app.py`` serves it as a Hugging Face Space).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning threads on a busy machine

import argparse
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import minidiff
from minidiff.sampling.guidance import ColorGuidance, color_loss
from minidiff.io import list_pretrained, pretrained

DEFAULT_COLOR = "#55FFAA"
FINETUNED_FACES = "outputs/finetune"  # where `make demo` (examples/finetune.py) writes its pipeline
EXAMPLES = [["#BB2266", 2], ["#44CCAA", 5]]


def load_model(model: str, device: str | None = None) -> tuple[nn.Module, minidiff.DDIMScheduler]:
    """(unet, DDIM scheduler) of a shipped model name or a pipeline folder, on ``device`` (CUDA if any)."""
    unet, scheduler = minidiff.load_pipeline(model) if Path(model).is_dir() else pretrained(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return unet.to(device).eval(), minidiff.DDIMScheduler.from_config(scheduler.config)


def available_models(finetuned: str = FINETUNED_FACES) -> list[str]:
    """The shipped models, and the fine-tuned faces model once ``make demo`` has written it."""
    return list_pretrained() + ([finetuned] if (Path(finetuned) / "model_index.json").is_file() else [])


def generate(unet: nn.Module, scheduler: minidiff.DDIMScheduler, color: str, scale: float, steps: int,
             seed: int, batch_size: int = 4, on_step: Callable[[int], None] | None = None) -> tuple[Any, float]:
    """(PIL grid upscaled 4x, mean |image - colour|) of ``batch_size`` colour-guided samples (of a
    grayscale model: unguided, shown as gray)."""
    from torchvision.transforms.v2.functional import to_pil_image
    from torchvision.utils import make_grid

    guide = ColorGuidance(color, scale=float(scale))
    rgb = unet.config.in_channels == 3  # a grayscale model (the fine-tuned faces) samples unguided
    x = minidiff.sample(unet, scheduler, batch_size=batch_size, num_inference_steps=int(steps),
                        generator=torch.Generator().manual_seed(int(seed)), guides=[guide] if rgb else [],
                        progress=False, callback=None if on_step is None else lambda i, t, x, out: on_step(i + 1))
    images = (x.float().cpu() / 2 + 0.5).clamp(0, 1).expand(-1, 3, -1, -1)
    distance = color_loss(images * 2 - 1, guide.target).mean().item() / 2   # in [0, 1] pixel units
    grid = make_grid(images, nrow=min(batch_size, 4), padding=1, pad_value=1.0)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0]
    return to_pil_image(grid), distance


def build_demo(unet: nn.Module, scheduler: minidiff.DDIMScheduler, *, batch_size: int = 4,
               default_steps: int = 40, max_steps: int = 100, default_scale: float = 2.0,
               models: dict[str, tuple[nn.Module, minidiff.DDIMScheduler]] | None = None) -> Any:
    """The app: colour picker, guidance scale, steps, seed -> image grid and its distance to the colour.
    With ``models`` (name -> (unet, scheduler)) a menu picks one, the one holding ``unet`` selected first."""
    import gradio as gr

    models = dict(models or {}) or {"model": (unet, scheduler)}
    names = list(models)
    first = next((name for name, (candidate, _) in models.items() if candidate is unet), names[0])

    def run(model: str, color: str, scale: float, steps: int, seed: int, progress: gr.Progress = gr.Progress()):
        progress(0, desc="sampling")
        image, distance = generate(*models[model], color, scale, steps, seed, batch_size,
                                   on_step=lambda i: progress((i, int(steps)), desc="sampling", unit="steps"))
        return image, f"{color} · scale {scale:g} · {int(steps)} steps · mean |image − colour| = {distance:.3f}"

    with gr.Blocks(title="minidiff colour guidance", analytics_enabled=False) as demo:
        gr.Markdown("# minidiff: colour guidance\nSteer an unconditional diffusion model towards a colour "
                    "with the gradient of a colour loss on the predicted clean image.")
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(names, value=first, label="model", elem_id="model", visible=len(names) > 1)
                color = gr.ColorPicker(DEFAULT_COLOR, label="target colour", elem_id="color")
                scale = gr.Slider(0, 100, value=default_scale, step=1, label="guidance scale", elem_id="scale")
                steps = gr.Slider(1, max_steps, value=default_steps, step=1, label="DDIM steps", elem_id="steps")
                seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                image = gr.Image(label="samples", type="pil", elem_id="output")
                summary = gr.Textbox(label="result", interactive=False, elem_id="summary")
        gr.Examples(EXAMPLES, inputs=[color, scale])
        button.click(run, inputs=[model, color, scale, steps, seed], outputs=[image, summary])
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="photos-32", help="shipped model name or pipeline folder, selected first")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args()
    names = available_models()
    models = {name: load_model(name) for name in dict.fromkeys([args.model, *names])}
    demo = build_demo(*models[args.model], batch_size=args.batch_size, models=models)
    demo.launch(server_name="127.0.0.1", server_port=args.port)


if __name__ == "__main__":
    main()

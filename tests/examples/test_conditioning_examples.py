"""The text-to-image and super-resolution examples end to end on tiny budgets: they write what their
docstrings promise, and a trained folder is reused (sampled from --prompt, judged again) without training."""
from __future__ import annotations

import json

import pytest
import torch
from test_examples import load_example

import minidiff
from minidiff.data import CaptionedShapes, ShapeLabels
from minidiff.judge import CaptionJudge, Judge
from minidiff.text import load_text_pipeline

TINY_TEXT = ["--max_steps", "2", "--batch_size", "4", "--warmup_steps", "1", "--widths", "8", "16",
             "--text_width", "16", "--samples_per_prompt", "2", "--num_inference_steps", "2"]


@pytest.fixture
def quick_caption_judge(monkeypatch):
    """A shape judge trained in seconds (the real one trains for a minute): the examples' plumbing, not its
    accuracy, is under test here."""
    judge = CaptionJudge(Judge.train(ShapeLabels(CaptionedShapes(32, "all", 90)), epochs=1))
    monkeypatch.setattr(CaptionJudge, "for_image_size", classmethod(lambda cls, size=32, cache_dir=None: judge))


@pytest.mark.parametrize("size_classes", [False, True])
def test_text_to_image_example_trains_judges_and_samples_prompts(tmp_path, quick_caption_judge, size_classes):
    example = load_example("text_to_image")
    flags = TINY_TEXT + ["--output_dir", str(tmp_path), "--guidance_scales", "1", "3"] + \
        (["--size_classes"] if size_classes else [])
    results = example.main(flags)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert set(results["scales"]) == {"1.0", "3.0"} and results["best_guidance_scale"] in (1.0, 3.0)
    scale = results["scales"]["3.0"]
    assert len(scale["per_prompt"]) == 18 and 0 <= scale["both_held_out"] <= 1
    assert ("size" in scale) == size_classes
    assert (tmp_path / "grid.png").read_bytes().startswith(b"\x89PNG")
    unet, _, encode = load_text_pipeline(tmp_path)
    assert unet.takes_class_labels == size_classes and encode(["a blue circle"]).shape == (1, 4, 16)
    before = (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert example.main(["--output_dir", str(tmp_path), "--prompt", "a blue circle", "--prompt", "a red square",
                         "--num_inference_steps", "2"]) is None
    assert (tmp_path / "prompts.png").is_file()
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before  # not retrained
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        example.main(["--output_dir", str(tmp_path), "--prompt", "a purple circle", "--num_inference_steps", "1"])


def test_super_resolution_example_measures_against_bicubic(tmp_path):
    results = load_example("super_resolution").main([
        "--output_dir", str(tmp_path), "--max_steps", "2", "--batch_size", "4", "--warmup_steps", "1",
        "--widths", "8", "16", "--num_test", "8", "--num_inference_steps", "2", "--guidance_scales", "1", "2"])
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert set(results) == {"train_seconds", "num_test", "bicubic", "minidiff_w1", "minidiff_w1_consistent",
                            "minidiff_w2_consistent"}
    for name in ("bicubic", "minidiff_w1"):
        assert {"consistency_rmse", "hf_energy_ratio", "frechet_distance", "psnr_db"} <= set(results[name])
    assert (tmp_path / "grid.png").read_bytes().startswith(b"\x89PNG")
    unet, _ = minidiff.load_pipeline(tmp_path)
    assert unet.config.conditioning_channels == 3
    with torch.no_grad():
        assert unet(torch.zeros(1, 3, 32, 32), 10, conditioning_image=torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)

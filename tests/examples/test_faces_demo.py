"""The main job (examples/finetune.py, ``make demo``) end to end on a tiny budget: a tiny base model, a few
steps on the LFW faces, and everything its docstring promises is written and printed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import minidiff

pytest.importorskip("skimage")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_finetune():
    spec = importlib.util.spec_from_file_location("finetune", EXAMPLES / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_base(tmp_path):
    torch.manual_seed(0)
    config = minidiff.UNetConfig(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    folder = tmp_path / "base"
    minidiff.save_pipeline(minidiff.UNet(config), minidiff.DDPMScheduler(num_train_timesteps=50), folder)
    return folder


def test_faces_demo_end_to_end(tmp_path, tiny_base, monkeypatch, minidiff_cache, capsys):
    monkeypatch.setenv("MINIDIFF_CACHE", str(minidiff_cache))  # the session's faces judge, trained once
    out = tmp_path / "run"
    argv = ["--start_model", str(tiny_base), "--image_size", "16", "--max_steps", "3", "--batch_size", "4",
            "--warmup_steps", "1", "--eval_samples", "6", "--eval_steps", "2", "--log_samples_every", "2",
            "--save_model_every", "2", "--output_dir", str(out)]
    finetune = load_finetune()
    assert finetune.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "faces" and results["steps"] == 3
    assert results["train_images"] == 80 and results["held_out_images"] == 20
    assert 0.5 < results["judge_held_out_accuracy"] <= 1
    for when in ("before", "after"):
        measured = results[when]
        assert measured["samples"] == 6 and 0 <= measured["face_share"] <= 1
        assert 0 <= measured["memorization"]["near_copy_share"] <= 1 and measured["memorization"]["threshold"] > 0
        assert measured["frechet_statistics_to_train"] >= 0
    for name in ("before.png", "after.png", "loss.png", "metrics.jsonl", "unet/config.json", "scheduler"):
        assert (out / name).exists(), name
    printed = capsys.readouterr().out
    assert "face share (judge)" in printed and "near-copy share" in printed and "held-out accuracy" in printed

    assert finetune.main(argv) == 2  # a second run neither overwrites nor resumes by accident
    assert finetune.main([*argv, "--max_steps", "4", "--resume"]) == 2  # 3 -> 4 steps changes the lr schedule
    assert "total_steps" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="will not match"):
        assert finetune.main([*argv, "--max_steps", "4", "--resume", "--allow_resume_changes"]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 4
    assert finetune.main([*argv, "--max_steps", "4", "--resume"]) == 0  # a finished run: nothing to train, ends well
    assert "no step left to run" in capsys.readouterr().out
    unet = minidiff.load_unet(out)
    assert unet.config.sample_size == 16


def test_faces_demo_defaults_are_the_main_job():
    args = load_finetune().parse_args([])
    assert (args.start_model, args.dataset, args.image_size, args.eval_samples) == ("photos-32", "faces", 24, 64)
    for bad in (["--eval_steps", "0"], ["--eval_samples", "0"], ["--snr_gamma", "nan"], ["--snr_gamma", "-1"]):
        with pytest.raises(SystemExit):
            load_finetune().parse_args(bad)


def test_gradio_app_offers_the_finetuned_faces_model(tmp_path, tiny_base):
    pytest.importorskip("gradio")
    spec = importlib.util.spec_from_file_location("gradio_app", EXAMPLES / "gradio_app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    assert app.available_models(str(tmp_path / "not-yet")) == minidiff.list_pretrained()
    assert app.available_models(str(tiny_base)) == [*minidiff.list_pretrained(), str(tiny_base)]
    unet, scheduler = app.load_model(str(tiny_base), device="cpu")
    image, distance = app.generate(unet, scheduler, "#BB2266", 5, steps=2, seed=0, batch_size=2)
    assert image.size == (4 * (2 * 16 + 3), 4 * (16 + 2)) and 0 <= distance <= 1
    demo = app.build_demo(unet, scheduler, models={"shipped": app.load_model(minidiff.list_pretrained()[0], "cpu"),
                                                   "faces": (unet, scheduler)})
    assert type(demo).__name__ == "Blocks"

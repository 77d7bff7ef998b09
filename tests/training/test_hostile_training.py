"""Hostile training runs: bad learning rates, weights that turn non-finite, resuming another run, two runs in
one folder, damaged checkpoint files. Each is refused by minidiff with a message naming the culprit."""
from __future__ import annotations

import json
import math
import stat

import pytest
import torch
from torch.utils.data import TensorDataset

import minidiff
from conftest import TINY
from minidiff.training import TrainConfig, Trainer, train
from minidiff.training import checkpoint as ckpt

FAST = dict(batch_size=4, log_samples_every=0, save_model_every=0, progress=False, lr=1e-3, max_steps=2)


def tiny_unet() -> minidiff.UNet:
    torch.manual_seed(0)
    return minidiff.UNet.from_config(TINY)


def images(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(8, 3, 8, 8, generator=g) * 2 - 1)


def scheduler(**changes) -> minidiff.DDPMScheduler:
    return minidiff.DDPMScheduler(num_train_timesteps=50, **changes)


@pytest.mark.parametrize("lr", [math.inf, math.nan, 0.0, -1e-4])
def test_non_finite_or_non_positive_lr_is_refused(lr):
    with pytest.raises(ValueError, match=r"lr=.* must be (> 0 and )?finite"):
        TrainConfig(lr=lr)


@pytest.mark.parametrize("field, value, error, message", [
    ("lr", "1e-4", TypeError, r"TrainConfig.lr='1e-4': expected float"),
    ("resume", "false", TypeError, r"TrainConfig.resume='false': expected bool"),
    ("batch_size", 8.0, TypeError, r"TrainConfig.batch_size=8.0: expected int"),
    ("adam_betas", (0.9, 1.5), ValueError, r"adam_betas=\(0.9, 1.5\): both must be in \[0, 1\)"),
    ("max_minutes", math.inf, ValueError, r"max_minutes=inf: must be finite"),
])
def test_bad_train_config_values(field, value, error, message):
    with pytest.raises(error, match=message):
        TrainConfig(**{field: value})


def test_weights_that_turn_non_finite_are_never_checkpointed(tmp_path, monkeypatch):
    def overflowing_step(self):  # as a huge lr leaves them, while the step's loss was still finite
        result = original(self)
        with torch.no_grad():
            self.unet.conv_out.weight[0, 0, 0, 0] = math.inf
        return result

    original = Trainer.optimizer_step
    monkeypatch.setattr(Trainer, "optimizer_step", overflowing_step)
    config = TrainConfig(output_dir=str(tmp_path), **{**FAST, "save_model_every": 1, "ema_decay": 0.0})
    with pytest.raises(FloatingPointError, match=r"conv_out\.weight.*not finite.*last good checkpoint is none"):
        train(tiny_unet(), scheduler(), images(), config)
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == []
    assert not (tmp_path / "unet").exists()


@pytest.mark.parametrize("change, what", [
    (dict(scheduler=dict(beta_schedule="squaredcos_cap_v2")), "scheduler.beta_schedule"),
    (dict(data_seed=1), "dataset.first_item_sha256"),
    (dict(config=dict(batch_size=8)), "settings.batch_size"),
    (dict(config=dict(seed=3)), "settings.seed"),
])
def test_resuming_a_different_run_is_refused_listing_what_changed(tmp_path, change, what):
    train(tiny_unet(), scheduler(), images(), TrainConfig(output_dir=str(tmp_path), **{**FAST, "save_model_every": 1}))
    config = {**FAST, "max_steps": 3, **change.get("config", {})}
    other = (tiny_unet(), scheduler(**change.get("scheduler", {})), images(change.get("data_seed", 0)))
    with pytest.raises(ValueError, match=rf"written by a different run; what changed:\n  (.*\n  )*{what}"):
        Trainer(*other, TrainConfig(output_dir=str(tmp_path), resume=True, **config))
    with pytest.warns(UserWarning, match="will not match an uninterrupted one"):
        result = train(*other, TrainConfig(output_dir=str(tmp_path), resume=True, allow_resume_changes=True, **config))
    assert result.step == 3


def test_extending_max_steps_resumes_without_complaint(tmp_path):
    train(tiny_unet(), scheduler(), images(), TrainConfig(output_dir=str(tmp_path), **{**FAST, "save_model_every": 1,
                                                                                      "lr_schedule": "constant"}))
    result = train(tiny_unet(), scheduler(), images(), TrainConfig(
        output_dir=str(tmp_path), resume=True, **{**FAST, "max_steps": 4, "lr_schedule": "constant"}))
    assert result.step == 4


def test_two_runs_cannot_write_into_one_folder(tmp_path):
    first = Trainer(tiny_unet(), scheduler(), images(), TrainConfig(output_dir=str(tmp_path), **FAST))
    with pytest.raises(RuntimeError, match="another training run is writing to this folder"):
        Trainer(tiny_unet(), scheduler(), images(), TrainConfig(output_dir=str(tmp_path), overwrite=True, **FAST))
    first.run()  # releases the folder
    train(tiny_unet(), scheduler(), images(), TrainConfig(output_dir=str(tmp_path), overwrite=True, **FAST))


def _checkpoint(tmp_path):
    train(tiny_unet(), scheduler(), images(), TrainConfig(output_dir=str(tmp_path), **{**FAST, "save_model_every": 1}))
    return ckpt.latest_checkpoint(tmp_path / "checkpoints")


def test_checkpoint_files_are_readable_by_others(tmp_path):
    folder = _checkpoint(tmp_path)
    for path in [folder, *folder.rglob("*")]:
        assert path.stat().st_mode & stat.S_IROTH, path


def test_a_truncated_training_state_is_named(tmp_path):
    folder = _checkpoint(tmp_path)
    state = folder / ckpt.TRAINING_STATE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{ckpt.TRAINING_STATE}: cannot restore the optimizer state"):
        Trainer(tiny_unet(), scheduler(), images(), TrainConfig(output_dir=str(tmp_path), resume=True, **FAST))


def test_a_trainer_state_missing_a_key_is_named(tmp_path):
    folder = _checkpoint(tmp_path)
    info_path = folder / ckpt.TRAINER_STATE
    info = json.loads(info_path.read_text())
    del info["ema_num_updates"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=rf"{ckpt.TRAINER_STATE}: missing keys \['ema_num_updates'\]"):
        Trainer(tiny_unet(), scheduler(), images(), TrainConfig(output_dir=str(tmp_path), resume=True, **FAST))


# ------------------------------------------------------------------------------------ found by the issue-19 attack
@pytest.mark.parametrize("field, value, message", [
    ("output_dir", "", r"TrainConfig.output_dir='': expected a folder path"),
    ("device", "gpu", r"TrainConfig.device='gpu' is not a torch device"),
    ("device", "", r"TrainConfig.device='' is not a torch device"),
    ("seed", 2 ** 70, r"TrainConfig.seed=\d+: expected an int in \[0, 2\*\*32\)"),
])
def test_bad_paths_devices_and_seeds_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("data, error, message", [
    ([], ValueError, r"dataset must be a non-empty map-style dataset"),
    ([torch.zeros(3, 8, 8, dtype=torch.uint8)] * 4, TypeError, r"dataset images must be floating-point images"),
    ([torch.full((3, 8, 8), 200.0)] * 4, ValueError, r"dataset images must hold images in \[-1, 1\]"),
    ([torch.zeros(1, 3, 8, 8)] * 4, ValueError, r"dataset images must be \(C, H, W\) tensors"),
    ([torch.zeros(3, 7, 8)] * 4, ValueError, r"the images are 7x8 but .* multiples of 2"),
])
def test_bad_datasets_are_named_before_training(tmp_path, data, error, message):
    with pytest.raises(error, match=message):
        Trainer(tiny_unet(), scheduler(), data, TrainConfig(output_dir=str(tmp_path), **FAST))


def test_items_that_cannot_form_a_batch_are_named(tmp_path):
    data = [torch.zeros(3, 8, 8), torch.zeros(3, 16, 16)]
    config = TrainConfig(output_dir=str(tmp_path), **{**FAST, "batch_size": 2})
    trainer = Trainer(tiny_unet(), scheduler(), data, config)
    with pytest.raises(ValueError, match=r"dataset items cannot be stacked into a batch"):
        trainer.run()


def test_arguments_of_the_wrong_kind_are_named(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), **FAST)
    with pytest.raises(TypeError, match=r"scheduler must be a minidiff Scheduler, got str"):
        Trainer(tiny_unet(), "ddpm", images(), config)
    with pytest.raises(TypeError, match=r"unet must be a minidiff UNet, got Linear"):
        Trainer(torch.nn.Linear(2, 2), scheduler(), images(), config)
    with pytest.raises(TypeError, match=r"config must be a minidiff TrainConfig, got dict"):
        Trainer(tiny_unet(), scheduler(), images(), dict(FAST))


def test_sample_steps_past_the_schedule_and_a_file_as_output_dir_are_refused_before_training(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), **{**FAST, "log_samples_every": 1, "sample_steps": 100})
    with pytest.raises(ValueError, match=r"TrainConfig.sample_steps=100 must be <= the scheduler's "
                                         r"num_train_timesteps=50"):
        Trainer(tiny_unet(), scheduler(), images(), config)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match=r"TrainConfig.output_dir=.*a_file' exists and is not a folder"):
        Trainer(tiny_unet(), scheduler(), images(), TrainConfig(output_dir=str(tmp_path / "a_file"), **FAST))

"""The training loop: accumulation, exact resume, atomic checkpoints, EMA, NaN, LR schedules, signals,
diffusers loading the output, DDP on 2 gloo processes, the shipped base model."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file
from torch.utils.data import Dataset, TensorDataset

import minidiff
from minidiff.training import checkpoint as ckpt
from minidiff.training.ema import EMA, ema_decay_at
from minidiff.io import list_pretrained, pretrained
from minidiff.training.conditions import drop_conditions
from minidiff.training.setup import enable_gradient_checkpointing, stop_on_signals
from minidiff.training import TrainConfig, Trainer, lr_factor, train
from minidiff.training.trainer import min_snr_weights

FAST = dict(batch_size=4, log_samples_every=0, save_model_every=0, progress=False, lr=1e-3)


def tiny_unet(seed: int = 0, **changes) -> minidiff.UNet:
    torch.manual_seed(seed)
    return minidiff.UNet(minidiff.UNetConfig.from_dict({**TINY, **changes}))


def images(n: int = 16, seed: int = 0, size: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.arange(n) % 3)


def scheduler() -> minidiff.DDPMScheduler:
    return minidiff.DDPMScheduler(num_train_timesteps=50)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


class Hook(Dataset):
    """Wraps a dataset; calls ``hook(item)`` on the ``at``-th item fetched (0-based) and returns its result.
    A Trainer fetches one item first (to learn the image shape), then ``batch_size`` items per micro-batch."""

    def __init__(self, base: Dataset, at: int, hook):
        self.base, self.at, self.hook, self.fetched = base, at, hook, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        item = self.base[index]
        self.fetched += 1
        return self.hook(item) if self.fetched - 1 == self.at else item


# ------------------------------------------------------------------------------------ pure math
def test_lr_schedule_values():
    assert [lr_factor(s, 10, 4, "constant") for s in (0, 1, 3, 4, 9)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 10, 0, "linear") for s in (0, 5, 9)] == [1.0, 0.5, pytest.approx(0.1)]
    assert lr_factor(0, 12, 2, "cosine") == 0.5 and lr_factor(2, 12, 2, "cosine") == 1.0
    assert lr_factor(7, 12, 2, "cosine") == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(11, 12, 2, "cosine") == pytest.approx((1 + math.cos(math.pi * 0.9)) / 2)
    with pytest.raises(ValueError, match="allowed"):
        lr_factor(0, 10, 0, "exponential")


def test_ema_math():
    assert [ema_decay_at(n, 0.999) for n in (0, 1, 90)] == [0.1, 2 / 11, 0.91]
    assert ema_decay_at(10_000, 0.999) == 0.999 and ema_decay_at(0, 0.9, warmup=False) == 0.9
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, 0.9, warmup=False)
    expected = model.weight.detach().clone()
    for value in (1.0, -2.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        expected = 0.9 * expected + 0.1 * value
    torch.testing.assert_close(ema.model.weight, expected)
    assert torch.equal(model.weight, torch.full_like(model.weight, 3.0))  # the trained weights are untouched
    assert not ema.model.weight.requires_grad and ema.num_updates == 3
    with pytest.raises(ValueError, match="decay"):
        EMA(model, 1.0)


def test_config_validation():
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="max_minutes"):
            TrainConfig(max_minutes=bad)
    for bad in ("5", True):
        with pytest.raises(TypeError, match="max_minutes"):
            TrainConfig(max_minutes=bad)
    with pytest.raises(ValueError, match="fp16"):
        Trainer(tiny_unet(), scheduler(), images(), TrainConfig(mixed_precision="fp16", device="cpu", **FAST))


def test_min_snr_weights():
    """Min-SNR-gamma: x0-error weight min(SNR, gamma); eps and v losses carry SNR and SNR + 1 already."""
    alpha_bar = torch.tensor([0.99, 0.8, 0.5, 0.1, 0.0])
    snr = alpha_bar / (1 - alpha_bar)  # 99, 4, 1, 1/9, 0
    eps = min_snr_weights(alpha_bar, "epsilon", 5.0)
    torch.testing.assert_close(eps, torch.tensor([5 / 99, 1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(min_snr_weights(alpha_bar, "v_prediction", 5.0), snr.clamp(max=5) / (snr + 1))
    torch.testing.assert_close(min_snr_weights(alpha_bar, "sample", 5.0), snr.clamp(max=5))
    with pytest.raises(ValueError, match="snr_gamma"):
        TrainConfig(snr_gamma=0.0)


def test_min_snr_loss_weights_each_sample(tmp_path):
    """With snr_gamma the loss is the weights' mean over the per-sample MSEs (computed here by hand);
    gamma above every SNR gives plain MSE."""
    x0, _ = next(iter(torch.utils.data.DataLoader(images(), batch_size=4)))
    t, noise = torch.tensor([1, 10, 25, 49]), torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))

    def loss(**options):
        config = TrainConfig(output_dir=str(tmp_path / str(options)), max_steps=1, **FAST, **options)
        trainer = Trainer(tiny_unet(), scheduler(), images(), config)
        with torch.no_grad():
            value = trainer._loss(x0, {}, t, noise, torch.zeros(4, 1, dtype=torch.bool))
            per_sample = (trainer.model(trainer.scheduler.add_noise(x0, noise, t), t) - noise).square().mean((1, 2, 3))
        return float(value), per_sample, trainer

    plain, per_sample, trainer = loss()
    assert plain == pytest.approx(float(per_sample.mean()), rel=1e-5)
    weighted, per_sample, _ = loss(snr_gamma=2.0)
    w = min_snr_weights(trainer.scheduler.alphas_cumprod[t], "epsilon", 2.0)
    assert w.min() < 0.5 and w.max() == 1.0  # the early timesteps are down-weighted, the late ones not
    assert weighted == pytest.approx(float((w * per_sample).mean()), rel=1e-5)
    assert loss(snr_gamma=1e9)[0] == pytest.approx(plain, rel=1e-6)


# ------------------------------------------------------------------------------------ one step
def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """2 micro-batches of 4 with accumulation == 1 batch of 8: same loss, gradients and updated weights."""
    def one_step(batch_size, accumulation, **options):
        config = TrainConfig(output_dir=str(tmp_path / f"{batch_size}-{options}"), max_steps=1,
                             **{**FAST, "batch_size": batch_size, "grad_accumulation_steps": accumulation, **options})
        trainer = Trainer(tiny_unet(), scheduler(), images(), config)
        loss = trainer.compute_gradients(trainer.batches())
        grads = [p.grad.clone() for p in trainer.unet.parameters()]
        trainer.optimizer_step()
        return float(loss), grads, [p.detach().clone() for p in trainer.unet.parameters()]

    big, small = one_step(8, 1), one_step(4, 2)
    assert big[0] == pytest.approx(small[0], rel=1e-6)
    for a, b in zip(big[1] + big[2], small[1] + small[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    checkpointed = one_step(4, 2, gradient_checkpointing=True)  # recomputation gives the same gradients
    for a, b in zip(small[1], checkpointed[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_keeps_fewer_activations():
    def saved_for_backward(unet):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            unet(torch.randn(2, 3, 8, 8), torch.tensor([3, 7])).sum().backward()
        return len(saved)
    unet = tiny_unet()
    plain = saved_for_backward(unet)
    enable_gradient_checkpointing(unet)
    assert saved_for_backward(unet) < plain / 3
    with pytest.raises(TypeError, match="minidiff UNet"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_label_dropout_uses_the_null_class(tmp_path):
    unet = tiny_unet(num_class_embeds=4)  # 3 classes + the null row
    config = TrainConfig(output_dir=str(tmp_path), cond_drop_prob=0.5, **FAST)
    trainer = Trainer(unet, scheduler(), images(), config)
    drop = torch.tensor([[True], [False], [True], [False]])
    labels = drop_conditions(trainer.net, {"class_labels": torch.tensor([0, 1, 2, 1])}, drop, trainer.device)
    assert labels["class_labels"].tolist() == [3, 1, 3, 1]
    with pytest.raises(ValueError, match="null class"):
        drop_conditions(trainer.net, {"class_labels": torch.tensor([3, 0, 0, 0])}, ~drop | drop, trainer.device)
    assert trainer.run().step == 4  # trains through the class-conditional path


def test_bf16_autocast_on_cpu(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, mixed_precision="bf16", device="cpu", **FAST)
    assert math.isfinite(train(tiny_unet(), scheduler(), images(), config).loss)


def test_time_budget_ends_the_run_like_its_last_step(tmp_path, monkeypatch):
    """The budget is checked after each step's gradients; the run then finishes as at max_steps (final
    pipeline and checkpoint written), here after 3 of 100 steps on a fake clock advancing 1 min per call."""
    clock = iter(range(0, 10**6, 60))
    monkeypatch.setattr(minidiff.training.trainer, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    config = TrainConfig(output_dir=str(tmp_path), max_steps=100, max_minutes=2.5, device="cpu",
                         **{**FAST, "save_model_every": 50})
    result = train(tiny_unet(), scheduler(), images(), config)
    assert result.step == 3 and not result.interrupted
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert result.checkpoint == ckpt.step_dir(tmp_path / "checkpoints", 3)


# ------------------------------------------------------------------------------------ checkpoints
def test_resume_after_sigint_is_bit_identical(tmp_path):
    """Interrupt with SIGINT during step 3, resume in a 'new process' (fresh model, other global RNG
    state): weights, EMA, optimizer and the metrics log equal an uninterrupted run bit for bit."""
    def config(name, **changes):
        return TrainConfig(output_dir=str(tmp_path / name), max_steps=6, ema_decay=0.9,
                           warmup_steps=2, **{**FAST, "grad_accumulation_steps": 2, "save_model_every": 4, **changes})
    dropout = dict(dropout=0.1)  # dropout draws from the global RNG, which must be restored too
    reference = train(tiny_unet(**dropout), scheduler(), images(), config("whole"))

    def interrupt(item):
        os.kill(os.getpid(), signal.SIGINT)
        return item
    interrupted = Hook(images(), at=17, hook=interrupt)  # the first item of step 3
    stopped = train(tiny_unet(**dropout), scheduler(), interrupted, config("split"))
    assert stopped.interrupted and stopped.step == 3 and stopped.checkpoint.name == "step_0000003"
    assert not (tmp_path / "split" / "model_index.json").exists()
    torch.manual_seed(1234)
    resumed = train(tiny_unet(seed=7, **dropout), scheduler(), images(), config("split", resume=True))
    assert resumed.step == 6 and not resumed.interrupted and resumed.loss == reference.loss

    whole, split = tmp_path / "whole", tmp_path / "split"
    for sub in ("unet", "unet_raw", "checkpoints/step_0000006/ema", "checkpoints/step_0000006/unet"):
        a, b = weights(whole / sub), weights(split / sub)
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    load = lambda p: torch.load(p / "checkpoints/step_0000006/training_state.pt", weights_only=True)  # noqa: E731
    a, b = load(whole)["optimizer"]["state"], load(split)["optimizer"]["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    assert (whole / "metrics.jsonl").read_text() == (split / "metrics.jsonl").read_text()


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = TrainConfig(output_dir=str(tmp_path), max_steps=4, **{**FAST, "save_model_every": 2})
    real_save = torch.save

    def crash_at_step_4(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if "step_0000004" in str(path):
            raise OSError("disk full")  # the state file is written, the folder is not complete
    monkeypatch.setattr(torch, "save", crash_at_step_4)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_unet(), scheduler(), images(), config)
    monkeypatch.setattr(torch, "save", real_save)
    checkpoints = tmp_path / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step_0000002"]  # no partial step_0000004, no temp
    (checkpoints / ".step_0000004.killed.tmp").mkdir()  # what a kill -9 mid-write leaves behind
    assert ckpt.latest_checkpoint(checkpoints).name == "step_0000002"
    trainer = Trainer(tiny_unet(seed=3), scheduler(), images(), dataclasses.replace(config, resume=True))
    assert trainer.step == 2 and not (checkpoints / ".step_0000004.killed.tmp").exists()
    assert trainer.run().step == 4 and (checkpoints / "step_0000004" / "training_state.pt").is_file()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), max_steps=5, **{**FAST, "save_model_every": 1})
    poisoned = Hook(images(), at=9, hook=lambda item: (item[0] * float("nan"), item[1]))  # in step 3
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3.*step_0000002"):
        train(tiny_unet(), scheduler(), poisoned, config)
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step_0000002"
    assert not (tmp_path / "model_index.json").exists()


def test_fresh_run_refuses_a_used_output_dir(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, **{**FAST, "save_model_every": 1})
    train(tiny_unet(), scheduler(), images(), config)
    with pytest.raises(FileExistsError, match="resume=True"):
        Trainer(tiny_unet(), scheduler(), images(), config)
    assert train(tiny_unet(), scheduler(), images(), dataclasses.replace(config, overwrite=True)).step == 1


def test_signal_handlers():
    received, before = [], signal.getsignal(signal.SIGINT)
    with stop_on_signals(received.append):
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == ["SIGTERM"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------------------------ outputs
def test_diffusers_loads_the_output_and_matches(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    config = TrainConfig(output_dir=str(tmp_path), max_steps=2, ema_decay=0.5,
                         **{**FAST, "log_samples_every": 2, "sample_steps": 3})
    unet = tiny_unet()
    train(unet, scheduler(), images(size=16), config)  # 16x16 images: sample_size follows them
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    ours, sched = minidiff.load_pipeline(tmp_path)
    assert ours.config.sample_size == 16 and pipe.unet.config.sample_size == 16
    expected = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                    output_type="np").images
    x = minidiff.sample(ours, sched, batch_size=2, generator=torch.Generator().manual_seed(0),
                        num_inference_steps=5, progress=False)
    torch.testing.assert_close((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), torch.from_numpy(expected),
                               rtol=1e-4, atol=1e-4)
    raw = weights(tmp_path / "unet_raw")  # the trained weights; unet/ holds their EMA
    assert all(torch.equal(raw[k], v) for k, v in unet.state_dict().items())
    assert not torch.equal(raw["conv_in.weight"], weights(tmp_path / "unet")["conv_in.weight"])
    assert [row["step"] for row in metrics(tmp_path)] == [1, 2]
    assert (tmp_path / "samples" / "step_0000002.png").is_file()
    assert (tmp_path / "loss.png").is_file() or pytest.importorskip("matplotlib") is None


DDP_SCRIPT = """
import sys, torch
sys.path[:0] = [{tests!r}, {tests!r} + "/.."]  # the test module, conftest
from test_training import ddp_workload
ddp_workload(sys.argv[1])
"""


def ddp_workload(output_dir: str) -> None:
    config = TrainConfig(output_dir=output_dir, max_steps=3, ema_decay=0.5,
                         **{**FAST, "grad_accumulation_steps": 2, "save_model_every": 3})
    train(tiny_unet(), scheduler(), images(), config)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_two_gloo_processes_equal_one(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(Path(__file__).parent))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "two")], env=env, timeout=180, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp_workload(str(tmp_path / "one"))
    one, two = (metrics(tmp_path / name) for name in ("one", "two"))
    assert len(two) == 3  # rank 0 alone writes
    for a, b in zip(one, two):  # the same data and noise (loss), gradients averaged, not summed (norm)
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), rel=1e-5)
    for sub in ("unet", "unet_raw"):  # Adam turns float noise in near-zero gradients into ~1e-5 moves
        a, b = weights(tmp_path / "one" / sub), weights(tmp_path / "two" / sub)
        bad = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.allclose(a[k], b[k], rtol=0, atol=1e-4)}
        assert not bad, bad
    state = json.loads((tmp_path / "two" / "checkpoints/step_0000003/trainer_state.json").read_text())
    assert state["world_size"] == 2


def test_shipped_base_model():
    assert "shapes-32" in list_pretrained()
    unet, sched = pretrained("shapes-32")
    assert unet.config.sample_size == 32 and unet.config.in_channels == 3
    assert isinstance(sched, minidiff.DDPMScheduler)
    with pytest.raises(ValueError, match="shapes-32"):
        pretrained("no-such-model")

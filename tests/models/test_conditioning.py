"""Class conditioning three ways, classifier-free guidance, label dropout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import minidiff
from minidiff.models.architectures import CONDITIONING_MODES, class_conditional_config
from minidiff.data import Digits
from minidiff.training import TrainConfig, Trainer

NUM_CLASSES = 10


def tiny_conditional(mode: str, null_class: bool = True) -> minidiff.UNet:
    torch.manual_seed(0)
    return minidiff.UNet.from_config(class_conditional_config(mode, NUM_CLASSES, image_size=8, channels=1,
                                                              null_class=null_class, widths=(16, 32)))


@pytest.mark.parametrize("mode", CONDITIONING_MODES)
def test_each_mode_learns_and_uses_the_label(mode):
    """Fit one fixed batch: the loss falls, and the trained model's output depends on the label."""
    unet = tiny_conditional(mode)
    sched = minidiff.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    data = Digits(8, split="train")
    x0 = torch.stack([data[i][0] for i in range(32)])
    labels = torch.tensor([data[i][1] for i in range(32)])
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (32,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = sched.add_noise(x0, noise, t)
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = F.mse_loss(unet(x_t, t, class_labels=labels), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    with torch.no_grad():
        other = (labels + 1) % NUM_CLASSES
        assert not torch.allclose(unet(x_t, t, class_labels=labels), unet(x_t, t, class_labels=other))


def test_label_dropout_rate_in_training(tmp_path):
    unet = tiny_conditional("additive")
    seen = []
    unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["class_labels"].clone()),
                                   with_kwargs=True)
    config = TrainConfig(output_dir=str(tmp_path), batch_size=64, max_steps=12, cond_drop_prob=0.25, ema_decay=0,
                         log_samples_every=0, save_model_every=0, progress=False)
    trainer = Trainer(unet, minidiff.DDPMScheduler(), Digits(8, split="train"), config)
    trainer.run()
    labels = torch.cat(seen)
    rate = (labels == NUM_CLASSES).float().mean().item()
    assert len(labels) == 12 * 64 and 0.19 < rate < 0.31, rate


@pytest.fixture(scope="module")
def cfg_model():
    return tiny_conditional("concat").eval(), minidiff.DDIMScheduler()


def test_guidance_scale_one_is_plain_conditional_sampling(cfg_model):
    unet, sched = cfg_model
    y = torch.tensor([0, 3, 7])
    kwargs = dict(batch_size=3, num_inference_steps=4, class_labels=y, progress=False)
    plain = minidiff.sample(unet, sched, generator=torch.Generator().manual_seed(1), **kwargs)
    same = minidiff.sample(unet, sched, generator=torch.Generator().manual_seed(1), guidance_scale=1.0, **kwargs)
    guided = minidiff.sample(unet, sched, generator=torch.Generator().manual_seed(1), guidance_scale=3.0, **kwargs)
    assert torch.equal(plain, same)
    assert not torch.allclose(plain, guided)


def test_guidance_is_one_batched_forward_per_step(cfg_model):
    unet, sched = cfg_model
    batches = []
    handle = unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        minidiff.sample(unet, sched, batch_size=3, num_inference_steps=5, class_labels=torch.tensor([1, 2, 3]),
                        guidance_scale=2.0, progress=False)
    finally:
        handle.remove()
    assert batches == [6] * 5


def test_guidance_formula_matches_two_separate_forwards(cfg_model):
    unet, sched = cfg_model
    y, null = torch.tensor([4, 5]), torch.tensor([NUM_CLASSES] * 2)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = sched.timesteps(1)[0]
    with torch.no_grad():
        cond, uncond = unet(noise, t, class_labels=y), unet(noise, t, class_labels=null)
    expected = sched.step(uncond + 2.5 * (cond - uncond), t, noise, num_inference_steps=1,
                          use_clipped_model_output=True).prev_sample
    ours = minidiff.sample(unet, sched, batch_size=2, num_inference_steps=1, class_labels=y, guidance_scale=2.5,
                           noise=noise, progress=False)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_guided_ddim_recomputes_eps_from_the_clipped_x0_by_default(cfg_model):
    """Regression: with guidance DDIM kept the unclipped, w-amplified eps in its x_t direction term, which
    turned samples into noise textures from w ~ 3 on; now eps is recomputed from the clipped x0."""
    unet, sched = cfg_model
    kwargs = dict(batch_size=2, num_inference_steps=3, class_labels=torch.tensor([2, 8]), progress=False,
                  guidance_scale=6.0)
    run = lambda **extra: minidiff.sample(unet, sched, generator=torch.Generator().manual_seed(0), **kwargs, **extra)
    default, consistent, unclipped_eps = run(), run(use_clipped_model_output=True), run(use_clipped_model_output=False)
    assert torch.equal(default, consistent)
    assert not torch.allclose(default, unclipped_eps)
    ddpm = minidiff.DDPMScheduler(num_train_timesteps=sched.config.num_train_timesteps)
    minidiff.sample(unet, ddpm, **kwargs)  # DDPM has no such option: the default must not reach it


def test_bad_labels_and_guidance_inputs(cfg_model):
    unet, sched = cfg_model
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        minidiff.sample(unet, sched, batch_size=2, num_inference_steps=2, class_labels=torch.tensor([1, 11]),
                        progress=False)
    with pytest.raises(ValueError, match=r"expected shape \(2,\)"):
        minidiff.sample(unet, sched, batch_size=2, num_inference_steps=2, class_labels=torch.tensor([1, 2, 3]),
                        progress=False)
    plain = minidiff.UNet.from_config(dict(class_conditional_config("concat", 10, 8, 1, widths=(16, 32)),
                                           class_embed_type=None, num_class_embeds=None))
    with pytest.raises(ValueError, match="guidance_scale != 1 needs class_labels"):
        minidiff.sample(plain, sched, batch_size=1, num_inference_steps=2, guidance_scale=2.0, progress=False)

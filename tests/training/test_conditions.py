"""Training on conditions beyond class labels: dataset items with a conditioning image, a prompt or several
conditions, condition dropout to each one's null, a text encoder trained jointly and resumed exactly."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY
from torch.utils.data import Dataset

import minidiff
from minidiff.data import SuperResolutionPairs
from minidiff.text import TextEncoder, load_text_pipeline
from minidiff.training import TrainConfig, Trainer, train
from minidiff.training.conditions import ConditionedUNet, drop_conditions, split_batch

FAST = dict(batch_size=4, log_samples_every=0, save_model_every=0, progress=False, lr=1e-3, device="cpu")
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a red square"]
TEXT_UNET = dict(_class_name="UNet2DConditionModel", sample_size=8, in_channels=3, out_channels=3,
                 block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, attention_head_dim=2,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                 mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=16)


class Captioned(Dataset):
    def __init__(self, n: int = 16, labels: bool = False):
        g = torch.Generator().manual_seed(0)
        self.images, self.labels = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if self.labels:
            return {"image": self.images[i], "prompts": CAPTIONS[i % 4], "class_labels": i % 2}
        return self.images[i], CAPTIONS[i % 4]


class Images(Dataset):
    def __init__(self, n: int = 16):
        self.images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i]


def text_model(seed: int = 0, **changes) -> tuple[minidiff.UNet, TextEncoder]:
    torch.manual_seed(seed)
    encoder = TextEncoder.from_vocabulary_of(CAPTIONS, width=16, layers=1, heads=2)
    return minidiff.UNet.from_config({**TEXT_UNET, **changes}), encoder


def sr_unet(seed: int = 0) -> minidiff.UNet:
    torch.manual_seed(seed)
    return minidiff.UNet.from_config({**TINY, "conditioning_channels": 3})


def scheduler() -> minidiff.DDPMScheduler:
    return minidiff.DDPMScheduler(num_train_timesteps=50)


# ------------------------------------------------------------------------------------------ dataset items
def test_split_batch_names_each_condition_by_its_type():
    image = torch.zeros(3, 8, 8)
    assert split_batch(image)[1] == {}
    assert split_batch((image, "a red circle"))[1] == {"prompts": ["a red circle"]}
    assert split_batch((image, 2))[1]["class_labels"].tolist() == 2
    assert split_batch((image, torch.ones(3, 8, 8)))[1]["conditioning_image"].shape == (3, 8, 8)
    batch = {"image": torch.zeros(2, 3, 8, 8), "prompts": ["a", "b"], "class_labels": torch.tensor([0, 1])}
    assert sorted(split_batch(batch)[1]) == ["class_labels", "prompts"]
    with pytest.raises(TypeError, match="'image' tensor and only the conditions"):
        split_batch({"image": image, "caption": "a"})
    with pytest.raises(TypeError, match="dataset items must be"):
        split_batch("a red circle")


def test_super_resolution_pairs_condition_on_the_upsampled_low_resolution_image():
    pairs = SuperResolutionPairs(Images(), factor=4)
    item = pairs[3]
    low = torch.nn.functional.avg_pool2d(item["image"][None], 4)
    assert torch.equal(pairs.low_resolution(3), low[0])
    want = torch.nn.functional.interpolate(low, scale_factor=4, mode="bicubic").clamp(-1, 1)[0]
    assert torch.allclose(item["conditioning_image"], want)
    with pytest.raises(ValueError, match="multiples of 3"):
        SuperResolutionPairs(Images(), factor=3)


# ------------------------------------------------------------------------------------------ dropout
def test_each_condition_drops_to_its_own_null():
    unet, encoder = text_model(num_class_embeds=3)
    net = ConditionedUNet(unet, encoder)
    drop = torch.tensor([[True, False], [False, True], [False, False]])
    conditions = {"class_labels": torch.tensor([0, 1, 1]), "prompts": ["a red circle"] * 3}
    out = drop_conditions(net, conditions, drop, torch.device("cpu"))
    assert out["class_labels"].tolist() == [2, 1, 1] and out["prompts"] == ["a red circle", "", "a red circle"]
    image_net = ConditionedUNet(sr_unet())
    images = torch.ones(2, 3, 8, 8)
    out = drop_conditions(image_net, {"conditioning_image": images}, torch.tensor([[True], [False]]), "cpu")
    assert out["conditioning_image"][0].abs().sum() == 0 and torch.equal(out["conditioning_image"][1], images[1])


def test_condition_dropout_rate_is_cond_drop_prob(tmp_path):
    unet, encoder = text_model()
    trainer = Trainer(unet, scheduler(), Captioned(64), TrainConfig(
        output_dir=tmp_path, cond_drop_prob=0.25, max_steps=8, **{**FAST, "batch_size": 64}), text_encoder=encoder)
    seen = []
    forward = encoder.forward
    encoder.forward = lambda prompts: (seen.extend(prompts), forward(prompts))[1]
    trainer.run()
    share = sum(p == "" for p in seen) / len(seen)
    assert len(seen) == 8 * 64 and abs(share - 0.25) < 0.05, share


# ------------------------------------------------------------------------------------------ training
def test_text_encoder_trains_jointly_and_is_saved_with_the_pipeline(tmp_path):
    unet, encoder = text_model()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    train(unet, scheduler(), Captioned(), TrainConfig(output_dir=tmp_path, max_steps=3, cond_drop_prob=0.1, **FAST),
          text_encoder=encoder)
    assert any(not torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    loaded_unet, _, encode = load_text_pipeline(tmp_path)
    context = encode(["a blue square", ""])
    assert context.shape == (2, encoder.tokenizer.max_length, 16)
    # the saved encoder is the EMA one; it differs from the raw trained weights but has their vocabulary
    assert encode.encoder.tokenizer.vocabulary == encoder.tokenizer.vocabulary
    x = minidiff.sample(loaded_unet, minidiff.DDIMScheduler.from_config(scheduler().config), batch_size=2,
                        encoder_hidden_states=context, uncond_encoder_hidden_states=encode([""]),
                        guidance_scale=3.0, num_inference_steps=2, progress=False)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()


def test_resume_with_a_text_encoder_is_bit_identical(tmp_path):
    config = dict(cond_drop_prob=0.2, lr_schedule="constant", **{**FAST, "save_model_every": 2})
    straight = text_model()
    train(straight[0], scheduler(), Captioned(), TrainConfig(output_dir=tmp_path / "a", max_steps=4, **config),
          text_encoder=straight[1])
    first = text_model()
    train(first[0], scheduler(), Captioned(), TrainConfig(output_dir=tmp_path / "b", max_steps=2, **config),
          text_encoder=first[1])
    resumed = text_model(seed=1)  # different starting weights: everything must come from the checkpoint
    result = train(resumed[0], scheduler(), Captioned(),
                   TrainConfig(output_dir=tmp_path / "b", max_steps=4, resume=True, **config), text_encoder=resumed[1])
    assert result.step == 4
    for a, b in zip([*straight[0].state_dict().values(), *straight[1].state_dict().values()],
                    [*resumed[0].state_dict().values(), *resumed[1].state_dict().values()]):
        assert torch.equal(a, b)
    assert (tmp_path / "b" / "checkpoints" / "step_0000004" / "ema_text_encoder" / "model.safetensors").is_file()


def test_two_conditions_at_once_train_and_sample(tmp_path):
    unet, encoder = text_model(num_class_embeds=3)
    train(unet, scheduler(), Captioned(labels=True),
          TrainConfig(output_dir=tmp_path, max_steps=2, cond_drop_prob=0.2, **FAST), text_encoder=encoder)
    loaded, _, encode = load_text_pipeline(tmp_path)
    x = minidiff.sample(loaded, minidiff.DDIMScheduler(num_train_timesteps=50), batch_size=2, num_inference_steps=2,
                        encoder_hidden_states=encode(["a red circle"] * 2), class_labels=torch.tensor([0, 1]),
                        uncond_encoder_hidden_states=encode([""]), guidance_scale=2.0, progress=False)
    assert torch.isfinite(x).all()


def test_image_conditioned_training_and_sampling(tmp_path):
    unet = sr_unet()
    train(unet, scheduler(), SuperResolutionPairs(Images(), 4),
          TrainConfig(output_dir=tmp_path, max_steps=2, cond_drop_prob=0.1, **{**FAST, "log_samples_every": 2}))
    assert (tmp_path / "samples" / "step_0000002.png").is_file()
    loaded, sched = minidiff.load_pipeline(tmp_path)
    assert loaded.config.conditioning_channels == 3
    condition = torch.zeros(2, 3, 16, 16)  # a convolutional UNet: the condition sets the output size
    x = minidiff.sample(loaded, sched, conditioning_image=condition, num_inference_steps=2, progress=False)
    assert x.shape == (2, 3, 16, 16)


# ------------------------------------------------------------------------------------------ clear errors
@pytest.mark.parametrize("make, match", [
    (lambda: (sr_unet(), Images(), None), "conditioned on conditioning_image but the dataset items give"),
    (lambda: (minidiff.UNet.from_config(TINY), SuperResolutionPairs(Images(), 4), None),
     "the dataset gives conditioning_image but the model does not take it"),
    (lambda: (text_model()[0], Captioned(), None), "the dataset gives prompts but no text encoder was given"),
    (lambda: (text_model()[0], Images(), None), "attends to a context: pass text_encoder"),
    (lambda: (text_model()[0], Images(), text_model()[1]), "conditioned on prompts but the dataset items give"),
    (lambda: (minidiff.UNet.from_config(TINY), Captioned(), text_model()[1]),
     "the text encoder's width 16 must be the UNet's cross_attention_dim"),
])
def test_a_condition_the_model_was_not_built_for_is_a_clear_error(tmp_path, make, match):
    unet, dataset, encoder = make()
    with pytest.raises(ValueError, match=match):
        Trainer(unet, scheduler(), dataset, TrainConfig(output_dir=tmp_path, max_steps=1, **FAST), text_encoder=encoder)


def test_condition_dropout_needs_a_condition_and_a_text_encoder_must_be_one(tmp_path):
    with pytest.raises(ValueError, match="cond_drop_prob > 0 needs a conditional model"):
        Trainer(minidiff.UNet.from_config(TINY), scheduler(), Images(),
                TrainConfig(output_dir=tmp_path, cond_drop_prob=0.1, **FAST))
    with pytest.raises(TypeError, match="text_encoder must be a minidiff.text.TextEncoder"):
        Trainer(text_model()[0], scheduler(), Captioned(), TrainConfig(output_dir=tmp_path, **FAST),
                text_encoder=torch.nn.Linear(2, 2))
    unet = sr_unet()
    bad = [{"image": torch.zeros(3, 8, 8), "conditioning_image": torch.zeros(1, 8, 8)}] * 4
    with pytest.raises(ValueError, match="conditioning images have 1 channels; the UNet's conditioning_channels is 3"):
        Trainer(unet, scheduler(), bad, TrainConfig(output_dir=tmp_path, **FAST))

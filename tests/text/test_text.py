"""The word tokenizer, the text encoder (save/load round trips, strict loading) and the text pipeline folder."""
from __future__ import annotations

import pytest
import torch

import minidiff
from minidiff.text import TextEncoder, WordTokenizer, load_text_pipeline, save_text_pipeline

CAPTIONS = ["a red circle", "a blue square", "A green triangle."]
TEXT_UNET = dict(_class_name="UNet2DConditionModel", sample_size=8, in_channels=3, out_channels=3,
                 block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, attention_head_dim=2,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                 mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=16)


def encoder(seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    return TextEncoder.from_vocabulary_of(CAPTIONS, width=16, layers=1, heads=2)


def test_tokenizer_round_trip_and_the_empty_prompt():
    tokenizer = WordTokenizer.from_captions(CAPTIONS)
    assert tokenizer.vocabulary == ["a", "blue", "circle", "green", "red", "square", "triangle"]
    assert tokenizer.max_length == 4  # <start> + three words
    ids = tokenizer(["a red circle", "  A  Blue, square!", ""])
    assert ids.shape == (3, 4) and ids.dtype == torch.long
    assert tokenizer.decode(ids) == ["a red circle", "a blue square", ""]
    assert ids[2].tolist() == [1, 0, 0, 0]  # the empty prompt: <start> and padding


def test_unknown_words_and_long_prompts_are_clear_errors():
    tokenizer = WordTokenizer.from_captions(CAPTIONS)
    with pytest.raises(ValueError, match=r"unknown word 'purple'.*\['a', 'blue', 'circle'"):
        tokenizer(["a purple circle"])
    with pytest.raises(ValueError, match="has 4 words; at most 3 fit"):
        tokenizer(["a red red circle"])
    with pytest.raises(ValueError, match="unknown word 'pad'"):  # special tokens are not words
        tokenizer(["<pad>"])
    with pytest.raises(TypeError, match="list of str"):
        tokenizer("a red circle")
    with pytest.raises(TypeError, match="a prompt must be a str"):
        tokenizer([3])
    with pytest.raises(ValueError, match="distinct lower-case words"):
        WordTokenizer(["a", "a"], 4)
    with pytest.raises(ValueError, match="max_length"):
        WordTokenizer(["a"], 1)


def test_encoder_save_load_gives_equal_outputs(tmp_path):
    enc = encoder()
    prompts = ["a red circle", "a green square", ""]
    before = enc(prompts)
    assert before.shape == (3, 4, 16)
    enc.save_pretrained(tmp_path)
    loaded = TextEncoder.from_pretrained(tmp_path)
    assert torch.equal(loaded(prompts), before)
    assert loaded.tokenizer.vocabulary == enc.tokenizer.vocabulary
    assert not torch.equal(encoder(seed=1)(prompts), before)  # the weights, not the seed, made it equal


def test_encoder_loading_is_strict(tmp_path):
    encoder().save_pretrained(tmp_path / "a")
    wider = TextEncoder.from_vocabulary_of(CAPTIONS, width=32, layers=1, heads=2)
    with pytest.raises(ValueError, match="weights do not match the config"):
        wider.load_weights(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read the text encoder weights"):
        TextEncoder.from_pretrained(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ValueError, match="not a TextEncoder config"):
        TextEncoder.from_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text('{"_class_name": "TextEncoder", "vocabulary": ["A!"], "max_length": 4}')
    with pytest.raises(ValueError, match="not a valid TextEncoder config.*distinct lower-case words"):
        TextEncoder.from_pretrained(tmp_path / "b")
    with pytest.raises(TypeError, match="vocabulary must be a list of words"):
        TextEncoder("red blue")
    with pytest.raises(ValueError, match="heads=3 must divide width=16"):
        TextEncoder(["a"], width=16, heads=3)


def test_text_pipeline_round_trip_and_guided_sampling(tmp_path):
    torch.manual_seed(0)
    unet, enc = minidiff.UNet.from_config(TEXT_UNET).eval(), encoder()
    save_text_pipeline(unet, minidiff.DDIMScheduler(num_train_timesteps=50), enc, tmp_path)
    loaded, scheduler, encode = load_text_pipeline(tmp_path)
    assert torch.equal(encode(["a red circle"]), enc(["a red circle"]).detach())
    calls = []
    loaded.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    prompts = ["a red circle", "a blue square"]
    kwargs = dict(batch_size=2, encoder_hidden_states=encode(prompts), num_inference_steps=3, progress=False)
    plain = minidiff.sample(loaded, scheduler, generator=torch.Generator().manual_seed(0), **kwargs)
    same = minidiff.sample(loaded, scheduler, generator=torch.Generator().manual_seed(0), guidance_scale=1.0,
                           uncond_encoder_hidden_states=encode([""]), **kwargs)
    assert torch.equal(plain, same)  # guidance scale 1 is plain conditional sampling
    calls.clear()
    minidiff.sample(loaded, scheduler, guidance_scale=3.0, uncond_encoder_hidden_states=encode([""]), **kwargs)
    assert calls == [4, 4, 4]  # one batched forward per step: both prompts and their unconditional twins
    with pytest.raises(ValueError, match=r"uncond_encoder_hidden_states: expected shape \(1 or 2, 4, 16\)"):
        minidiff.sample(loaded, scheduler, guidance_scale=3.0, uncond_encoder_hidden_states=torch.zeros(1, 3, 16),
                        **kwargs)


def test_text_pipeline_errors(tmp_path):
    unet = minidiff.UNet.from_config(TEXT_UNET)
    minidiff.save_pipeline(unet, minidiff.DDPMScheduler(), tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="no text_encoder/ folder"):
        load_text_pipeline(tmp_path / "plain")
    wide = TextEncoder.from_vocabulary_of(CAPTIONS, width=32, layers=1, heads=2)
    save_text_pipeline(unet, minidiff.DDPMScheduler(), wide, tmp_path / "wide")
    with pytest.raises(ValueError, match="width 32 does not match the UNet's cross_attention_dim 16"):
        load_text_pipeline(tmp_path / "wide")

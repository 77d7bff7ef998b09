"""UNet parity with diffusers on the architectures of real checkpoints, and its input checks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import minidiff
from minidiff.models.architectures import ARCHITECTURES
from minidiff.models.functional import memory_format as memory_format_of
from conftest import TINY, diffusers_twin, random_unet


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * max(ref.abs().max().item(), 1.0), f"max abs difference {err}"


def _perturb(unet: minidiff.UNet) -> None:
    """Random non-trivial norms/biases so that every parameter matters to the output."""
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("name,size", [("ddpm-cifar10-32", 32), ("ddpm-celebahq-256", 32),
                                       ("ddpm-butterflies-32", 32), ("cd-imagenet64-narrow", 16),
                                       ("small-cross-attention", 16), ("course-mnist-28", 28)])
def test_parity_with_diffusers_on_real_architectures(name, size, seeded):
    unet = random_unet(ARCHITECTURES[name])
    ref = diffusers_twin(unet)
    c = unet.config
    x = torch.randn(2, c.in_channels, size, size)
    t = torch.tensor([3, 871])
    kwargs, ref_x, ref_kwargs = {}, x, {}
    if c.is_conditional:
        ctx = torch.randn(2, 5, c.cross_attention_dims[0])
        kwargs = ref_kwargs = {"encoder_hidden_states": ctx}
    if c.class_embed_type == "concat":  # the course's ClassConditionedUnet: label embedding outside diffusers
        labels = torch.tensor([2, 9])
        kwargs = {"class_labels": labels}
        emb = unet.class_embedding(labels)[:, :, None, None].expand(-1, -1, size, size)
        ref_x = torch.cat([x, emb], dim=1)
    elif c.num_class_embeds:
        kwargs = ref_kwargs = {"class_labels": torch.tensor([2, 999])}
    with torch.no_grad():
        _close(unet(x, t, **kwargs), ref(ref_x, t, **ref_kwargs).sample)


@pytest.mark.parametrize("changes", [
    dict(time_embedding_type="fourier", center_input_sample=True),
    dict(time_embedding_type="learned", num_train_timesteps=1000),
    dict(resnet_time_scale_shift="scale_shift", add_attention=False, mid_block_scale_factor=1.414),
    dict(class_embed_type="timestep", act_fn="mish", dropout=0.1, time_embedding_dim=48),
    dict(class_embed_type="identity", time_embedding_dim=40, attention_head_dim=None, norm_eps=1e-6),
    dict(down_block_types=["DownBlock2D", "AttnDownBlock2D"], downsample_type="resnet", upsample_type="resnet",
         mid_block_type=None, layers_per_block=2, attn_norm_num_groups=4),
])
def test_parity_for_each_config_option(changes, seeded):
    unet = minidiff.UNet.from_config(dict(TINY, **changes)).eval()
    _perturb(unet)
    ref = diffusers_twin(unet)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 999])
    kwargs = {}
    if changes.get("class_embed_type") == "timestep":
        kwargs = {"class_labels": torch.tensor([4, 7])}
    if changes.get("class_embed_type") == "identity":
        kwargs = {"class_labels": torch.randn(2, 40)}
    with torch.no_grad():
        _close(unet(x, t, **kwargs), ref(x, t, **kwargs).sample)


def test_cross_attention_options_and_class_tokens(seeded):
    base = dict(ARCHITECTURES["small-cross-attention"], use_linear_projection=True, transformer_layers_per_block=2,
                attention_head_dim=[2, 4, 4], layers_per_block=[1, 2, 1], cross_attention_dim=[24, 24, 24])
    unet = minidiff.UNet.from_config(base).eval()
    ref = diffusers_twin(unet)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 24)
    with torch.no_grad():
        _close(unet(x, 10, encoder_hidden_states=ctx), ref(x, 10, encoder_hidden_states=ctx).sample)
    # class labels as a one-token sequence for cross-attention
    unet = minidiff.UNet.from_config(dict(base, class_embed_type="cross_attention", num_class_embeds=10)).eval()
    ref = diffusers_twin(unet)
    y = torch.tensor([1, 8])
    with torch.no_grad():
        _close(unet(x, 10, class_labels=y), ref(x, 10, encoder_hidden_states=unet.class_embedding(y)[:, None]).sample)


@pytest.mark.parametrize("name", ["ddpm-butterflies-32", "small-cross-attention"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("call", ["sampling", "guidance", "training"])
def test_every_convolution_sees_one_layout(name, memory_format, call, seeded):
    """On CPU every convolution runs channels_last, whatever the input's layout, except in training steps
    (train mode, autograd on), which keep the input's layout in every convolution (an attention residual
    summed in the tokens' layout once mixed the two, and oneDNN converted the weights at every later call).
    The output is contiguous either way, like a plain nn.Module's."""
    unet = random_unet(ARCHITECTURES[name]).train(call == "training")
    inputs = []
    for conv in (m for m in unet.modules() if isinstance(m, nn.Conv2d)):
        conv.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    c = unet.config
    x = torch.randn(1, c.in_channels, 16, 16).contiguous(memory_format=memory_format)
    context = {"encoder_hidden_states": torch.randn(1, 3, c.cross_attention_dim)} if c.is_conditional else {}
    with torch.set_grad_enabled(call != "sampling"):
        out = unet(x.requires_grad_(call == "guidance"), 10, **context)
    expected = memory_format if call == "training" else torch.channels_last
    assert inputs and all(memory_format_of(t) == expected for t in inputs)
    assert out.is_contiguous()


def test_timestep_forms_agree(seeded):
    unet = minidiff.UNet.from_config(TINY).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        a = unet(x, 5)
        b = unet(x, torch.tensor(5))
        c = unet(x, torch.tensor([5, 5, 5]))
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="timestep"):
        unet(x, torch.tensor([1, 2]))


def test_conditioning_image_channels(seeded):
    unet = minidiff.UNet.from_config(dict(TINY, conditioning_channels=2)).eval()
    assert unet.conv_in.weight.shape[1] == 5
    x, cond = torch.randn(2, 3, 8, 8), torch.randn(2, 2, 8, 8)
    assert unet(x, 3, conditioning_image=cond).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="conditioning_image"):
        unet(x, 3)
    with pytest.raises(ValueError, match=r"image-conditioned; expected shape \(2, 2, 8, 8\)"):
        unet(x, 3, conditioning_image=torch.randn(2, 1, 8, 8))
    plain = minidiff.UNet.from_config(TINY).eval()
    with pytest.raises(ValueError, match="conditioning_image was given but this UNet takes none"):
        plain(x, 3, conditioning_image=cond)
    with pytest.raises(ValueError, match="encoder_hidden_states were given but this UNet2DModel has no cross"):
        plain(x, 3, encoder_hidden_states=torch.randn(2, 1, 8))


def test_bad_inputs_raise_clear_errors(seeded):
    unet = minidiff.UNet.from_config(dict(TINY, num_class_embeds=10)).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        unet(x, 1, class_labels=torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"expected shape \(2,\)"):
        unet(x, 1, class_labels=torch.tensor([[3, 1]]))
    with pytest.raises(ValueError, match="class_labels are required"):
        unet(x, 1)
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\) with B >= 1, got \(2, 4, 8, 8\)"):
        unet(torch.randn(2, 4, 8, 8), 1, class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="multiples of 2"):
        unet(torch.randn(2, 3, 7, 7), 1, class_labels=torch.tensor([1, 2]))
    plain = minidiff.UNet.from_config(TINY)
    with pytest.raises(ValueError, match="no class embedding"):
        plain(x, 1, class_labels=torch.tensor([1, 2]))
    cond = minidiff.UNet.from_config(ARCHITECTURES["small-cross-attention"])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        cond(torch.randn(1, 4, 16, 16), 1)


@pytest.mark.parametrize("field,value,match", [
    ("down_block_types", ["DownBlock2D", "FancyDownBlock2D"], "unknown block type 'FancyDownBlock2D'"),
    ("act_fn", "tanh", "act_fn='tanh'"),
    ("resnet_time_scale_shift", "spatial", "resnet_time_scale_shift"),
    ("block_out_channels", [16, 30], "not divisible by norm_num_groups"),
    ("addition_embed_type", "text", "addition_embed_type='text' is not supported"),
    ("mystery_field", 1, "unknown config field 'mystery_field'"),
    ("up_block_types", ["UpBlock2D"], "1 blocks but block_out_channels has 2"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        minidiff.UNetConfig.from_dict(dict(TINY, **{field: value}))


def test_config_ignores_bookkeeping_and_strips_legacy_block_names():
    config = minidiff.UNetConfig.from_dict(dict(TINY, _diffusers_version="0.1.0", _name_or_path="x",
                                                down_block_types=["UNetResDownBlock2D", "AttnDownBlock2D"]))
    assert config.down_block_types == ("DownBlock2D", "AttnDownBlock2D")
    assert minidiff.UNetConfig.from_dict(config.to_dict()) == config

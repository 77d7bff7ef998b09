"""Shared test helpers: tiny configs and diffusers twins of minidiff UNets (diffusers is the oracle)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MINIDIFF_PROGRESS", "0")
torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to a busy machine

TINY = dict(_class_name="UNet2DModel", sample_size=8, in_channels=3, out_channels=3, block_out_channels=[16, 32],
            layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
            down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])


def diffusers_twin(unet):
    """A diffusers UNet2DModel/UNet2DConditionModel with minidiff ``unet``'s weights (the concat and
    cross-attention label embeddings stay outside, as in the course's ClassConditionedUnet)."""
    import diffusers

    config = {k: v for k, v in unet.config.to_dict().items() if k not in ("class_embed_dim", "conditioning_channels")}
    if config.get("class_embed_type") in ("concat", "cross_attention"):
        config.update(class_embed_type=None, num_class_embeds=None)
    config["in_channels"] = unet.config.in_channels + unet.config.extra_input_channels
    cls = getattr(diffusers, config.pop("_class_name"))
    config.pop("_diffusers_version")
    with torch.device("meta"):  # no random init: every tensor is loaded below
        ref = cls(**config).eval()
    state = {k: v for k, v in unet.state_dict().items()
             if not (k.startswith("class_embedding") and unet.config.class_embed_type in ("concat", "cross_attention"))}
    ref.load_state_dict(state, strict=True, assign=True)
    return ref


def random_unet(config):
    """A minidiff UNet with random weights, quickly: built on the meta device, then every tensor drawn
    from N(0, 1/fan_in) (norm weights around 1) instead of the slow default initialisers."""
    import minidiff
    with torch.device("meta"):
        unet = minidiff.UNet.from_config(config)
    unet.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.normal_(0, fan_in ** -0.5 if p.ndim > 1 else 0.1)
            if "norm" in name and name.endswith("weight"):
                p.add_(1)
    return unet.eval()


@pytest.fixture(scope="session")
def minidiff_cache(tmp_path_factory):
    """One MINIDIFF_CACHE for the whole session, so that a judge trained by one test is loaded by the others."""
    return tmp_path_factory.mktemp("minidiff_cache")


@pytest.fixture
def seeded():
    torch.manual_seed(0)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Spies on the C++ kernels' entry points (minidiff.kernels.cpu): a list of (kernel, thread name), one
    per call of the GroupNorm+activation forward ("group_norm_act") or of the attention kernel ("attention")."""
    import threading

    from minidiff.kernels import cpu

    calls = []

    def spy(name, fn):
        def counted(*args, **kwargs):
            calls.append((name, threading.current_thread().name))
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(cpu, "group_norm_act", spy("group_norm_act", cpu.group_norm_act))
    monkeypatch.setattr(cpu.Attention, "apply", spy("attention", cpu.Attention.apply))
    return calls

"""CLIP guidance on a tiny open_clip model with random weights (no network): the loss, the gradient
reaching x_t, loading by name + checkpoint file, and the errors that say how to provide weights."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import minidiff
from conftest import TINY
from minidiff.sampling.clip import CLIPGuidance, load_clip
from minidiff.sampling.guidance import guided_predictor

open_clip = pytest.importorskip("open_clip")
NAME = "minidiff-tiny-clip-test"
CONFIG = {"embed_dim": 16,
          "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A registered tiny config and a checkpoint file of random weights for it."""
    folder = tmp_path_factory.mktemp("clip")
    (folder / f"{NAME}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(folder / f"{NAME}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(NAME)
    torch.save(model.state_dict(), folder / "tiny.pt")
    return folder / "tiny.pt", model


def _guide(checkpoint, **kwargs):
    return CLIPGuidance("a red square", model=checkpoint[1], tokenizer=open_clip.get_tokenizer(NAME), **kwargs)


def test_loss_per_sample_in_range_and_text_encoded_once(checkpoint):
    calls = []

    def tokenizer(texts):
        calls.append(texts)
        return open_clip.get_tokenizer(NAME)(texts)
    guide = CLIPGuidance("a red square", n_cuts=3, model=checkpoint[1], tokenizer=tokenizer)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    for _ in range(2):
        loss = guide.loss(x0)
        assert loss.shape == (2,) and torch.all((loss >= 0) & (loss <= math.pi ** 2 / 2))
    assert calls == [["a red square"]]
    assert not any(p.requires_grad for p in guide.model.parameters())


def test_squared_great_circle_distance(checkpoint):
    guide = _guide(checkpoint, n_cuts=2)
    guide.augment = nn.Identity()          # so the image embedding is known
    x0 = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        u = torch.nn.functional.normalize(guide.model.encode_image((x0 + 1) / 2), dim=-1)
    guide.text_embedding = u
    torch.testing.assert_close(guide.loss(x0), torch.zeros(1), atol=1e-6, rtol=0)
    orthogonal = torch.zeros_like(u)
    orthogonal[0, u[0].abs().argmin()] = 1.0
    orthogonal = torch.nn.functional.normalize(orthogonal - (orthogonal @ u.T) * u, dim=-1)
    guide.text_embedding = orthogonal      # 2 arcsin(sqrt(2) / 2)^2 = pi^2 / 8
    torch.testing.assert_close(guide.loss(x0), torch.tensor([math.pi ** 2 / 8]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("through_unet", [False, True])
def test_gradient_reaches_x(checkpoint, through_unet):
    torch.manual_seed(0)
    unet = minidiff.UNet.from_config(TINY).eval()
    scheduler = minidiff.DDIMScheduler()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor(200)
    predict = guided_predictor(lambda x, t: unet(x, t), scheduler, [_guide(checkpoint, scale=50)],
                               through_unet=through_unet)
    with torch.no_grad():
        x_new, _ = predict(x, t)
    assert torch.isfinite(x_new).all() and (x_new - x).abs().max() > 0


def test_load_by_name_and_checkpoint_path(checkpoint):
    path, model = checkpoint
    guide = CLIPGuidance("a red square", model_name=NAME, checkpoint_path=path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(guide.model.state_dict()[name], tensor, msg=name)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.manual_seed(1)
    loaded = guide.loss(x0)
    torch.manual_seed(1)
    torch.testing.assert_close(loaded, _guide(checkpoint).loss(x0))


def test_no_weights_says_how_to_provide_them(checkpoint, monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)    # no network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(RuntimeError, match="checkpoint_path="):
        load_clip("ViT-B-32", "openai")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        CLIPGuidance("a cat", model_name=NAME, checkpoint_path=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="pretrained=TAG, checkpoint_path=FILE"):
        load_clip(NAME, pretrained=None)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"model_name": "ViT-X-99"}, ValueError, "ViT-X-99.*open_clip.list_models"),
    ({"pretrained": "not-a-tag"}, ValueError, "not-a-tag.*allowed.*openai"),
    ({"prompt": "  "}, ValueError, "prompt"),
    ({"n_cuts": 0}, ValueError, "n_cuts=0"),
    ({"scale": -8}, ValueError, "scale=-8"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CLIPGuidance(**{"prompt": "a cat", **kwargs})


def test_model_and_checkpoint_are_exclusive(checkpoint):
    with pytest.raises(ValueError, match="not both"):
        CLIPGuidance("a cat", model=checkpoint[1], checkpoint_path=checkpoint[0])

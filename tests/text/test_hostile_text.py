"""Hostile tokenizer and text-encoder inputs: each raises an error from minidiff naming the culprit, or gives
the correct result; nothing is silently read as something else."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from minidiff.text import TextEncoder, WordTokenizer


@pytest.fixture
def tokenizer():
    return WordTokenizer(["a", "red", "circle"], 4)


def test_decode_takes_lists_and_refuses_ids_outside_the_vocabulary(tokenizer):
    assert tokenizer.decode([[1, 2, 3]]) == ["a red"]
    for ids in ([[1, 99]], [[1, -1]], [1, 2], [[1.0, 2.0]]):
        with pytest.raises(ValueError, match=r"ids: expected \(B, L\) integer token ids in \[0, 4\]"):
            tokenizer.decode(ids)


def test_captions_must_be_a_list_and_max_length_is_checked():
    with pytest.raises(TypeError, match=r"captions must be a list of str, got str"):
        WordTokenizer.from_captions("a red circle")
    with pytest.raises(TypeError, match=r"captions must be a list of str, got str"):
        TextEncoder.from_vocabulary_of("a red circle")
    with pytest.raises(ValueError, match=r"max_length=0 must be an int >= 2"):
        WordTokenizer.from_captions(["a red"], max_length=0)


def test_non_finite_encoder_weights_are_refused(tmp_path):
    TextEncoder(["a", "red"], 4, width=8, layers=1, heads=2).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["position_embedding"] = torch.full_like(state["position_embedding"], math.nan)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: 1 tensors hold NaN or inf values: position_embedding"):
        TextEncoder.from_pretrained(tmp_path)

"""A word-level tokenizer over a fixed vocabulary: lower-cased words, a start token, padding to a fixed length."""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch
from torch import Tensor

PAD, START = "<pad>", "<start>"
WORD = re.compile(r"[a-z0-9]+")


def words(prompt: str) -> list[str]:
    """The lower-cased words of ``prompt`` (punctuation and extra spaces ignored)."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
    return WORD.findall(prompt.lower())


class WordTokenizer:
    """``tokenizer(prompts) -> (B, max_length)`` token ids: ``<start>``, one id per word, ``<pad>`` to the end.
    The empty prompt is ``<start>`` and padding only (the unconditional prompt). A word outside the
    vocabulary or a prompt longer than ``max_length - 1`` words raises ValueError naming it."""

    def __init__(self, vocabulary: Sequence[str], max_length: int):
        if isinstance(vocabulary, str) or not isinstance(vocabulary, Sequence):
            raise TypeError(f"vocabulary must be a list of words, got {type(vocabulary).__name__}")
        vocabulary = list(vocabulary)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={max_length!r} must be an int >= 2 (the start token and a word)")
        bad = [w for w in vocabulary if not isinstance(w, str) or WORD.fullmatch(w) is None]
        if bad or len(set(vocabulary)) != len(vocabulary) or not vocabulary:
            raise ValueError(f"vocabulary must be distinct lower-case words ([a-z0-9]+), at least one; bad: {bad[:5]}")
        self.vocabulary, self.max_length = vocabulary, max_length
        self.ids = {word: i for i, word in enumerate([PAD, START, *vocabulary])}

    @classmethod
    def from_captions(cls, captions: Iterable[str], max_length: int | None = None) -> WordTokenizer:
        """The vocabulary of ``captions`` (sorted), and by default room for the longest one."""
        if isinstance(captions, str) or not isinstance(captions, Iterable):
            raise TypeError(f"captions must be a list of str, got {type(captions).__name__}")
        split = [words(c) for c in captions]
        longest = max((len(w) for w in split), default=1)
        return cls(sorted({w for ws in split for w in ws}), longest + 1 if max_length is None else max_length)

    def __len__(self) -> int:
        """Number of token ids (the vocabulary and the two special tokens)."""
        return len(self.ids)

    def encode(self, prompt: str) -> list[int]:
        """The ids of one prompt, padded to ``max_length``."""
        tokens = words(prompt)
        unknown = [w for w in tokens if w not in self.ids or w in (PAD, START)]
        if unknown:
            raise ValueError(f"prompt {prompt!r}: unknown word {unknown[0]!r}; the vocabulary is "
                             f"{self.vocabulary}")
        if len(tokens) > self.max_length - 1:
            raise ValueError(f"prompt {prompt!r} has {len(tokens)} words; at most {self.max_length - 1} fit")
        ids = [self.ids[START]] + [self.ids[w] for w in tokens]
        return ids + [self.ids[PAD]] * (self.max_length - len(ids))

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise TypeError(f"prompts must be a non-empty list of str, got {prompts!r:.80}")
        return torch.tensor([self.encode(p) for p in prompts], dtype=torch.long)

    def decode(self, ids: Tensor) -> list[str]:
        """The prompts of (B, L) token ids (special tokens dropped)."""
        ids = torch.as_tensor(ids)
        if ids.ndim != 2 or ids.is_floating_point() or ids.dtype == torch.bool or \
                ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < len(self.ids):
            raise ValueError(f"ids: expected (B, L) integer token ids in [0, {len(self.ids) - 1}], got "
                             f"{ids.dtype} of shape {tuple(ids.shape)}")
        names = list(self.ids)
        return [" ".join(names[i] for i in row if i > 1) for row in ids.tolist()]

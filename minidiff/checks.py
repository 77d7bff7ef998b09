"""Checks shared by minidiff's public entry points: a value against the type its annotation names, tensors,
devices and checkpoints."""
from __future__ import annotations

import math
from typing import Any

import torch


def split_top(text: str, sep: str) -> list[str]:
    """``text`` split at the ``sep`` characters that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts + [text[start:].strip()]


def matches(value: Any, annotation: str) -> bool:
    """Whether ``value`` is of the type a field's annotation names (int, float, bool, str, None and tuples
    of these): no bool for an int, no string for a bool, finite floats."""
    for option in split_top(annotation, "|"):
        if option == "None" and value is None or option == "bool" and type(value) is bool \
                or option == "int" and type(value) is int or option == "str" and type(value) is str \
                or option == "float" and type(value) in (int, float) and math.isfinite(value):
            return True
        if option.startswith("tuple[") and isinstance(value, tuple):
            inner = split_top(option[6:-1], ",")
            if inner[-1] == "...":
                if all(matches(v, inner[0]) for v in value):
                    return True
            elif len(inner) == len(value) and all(matches(v, a) for v, a in zip(value, inner)):
                return True
    return False


def check_type(name: str, value: Any, annotation: str) -> None:
    """Raise a TypeError naming ``name`` unless ``value`` matches ``annotation`` (see ``matches``)."""
    if not matches(value, annotation):
        if type(value) is float and not math.isfinite(value) and "float" in annotation:
            raise ValueError(f"{name}={value!r}: must be finite")
        raise TypeError(f"{name}={value!r}: expected {annotation}")


def check_tensor(name: str, value: Any, *, floating: bool = False) -> None:
    """Raise a TypeError naming ``name`` unless ``value`` is a tensor (floating-point if ``floating``), or a
    ValueError if it is on the meta device (a tensor without values)."""
    if not torch.is_tensor(value) or floating and not value.is_floating_point():
        got = value.dtype if torch.is_tensor(value) else type(value).__name__
        raise TypeError(f"{name}: expected a {'floating-point ' if floating else ''}tensor, got {got}")
    if value.is_meta:
        raise ValueError(f"{name} is on the meta device: it holds no values")


def check_device(name: str, device: Any) -> torch.device | None:
    """``device`` (a str such as "cpu" or "cuda:1", or a torch.device) as a torch.device, None kept; a
    ValueError naming ``name`` if torch does not know it."""
    if device is None or isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"{name}={device!r}: expected None, a str such as 'cpu' or 'cuda:1', or a torch.device")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"{name}={device!r} is not a torch device; e.g. 'cpu', 'cuda' or 'cuda:1'") from None


def check_finite_tensors(state: dict[str, torch.Tensor], source: Any) -> None:
    """Raise a ValueError naming the tensors of ``state`` (a checkpoint read from ``source``) that hold NaN or inf."""
    bad = [key for key, tensor in state.items() if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
    if bad:
        raise ValueError(f"{source}: {len(bad)} tensors hold NaN or inf values: {', '.join(bad[:5])}"
                         f"{' and more' if len(bad) > 5 else ''}; the checkpoint is broken")

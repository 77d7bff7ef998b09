"""Checks shared by minidiff's public entry points: a value against the type its annotation names."""
from __future__ import annotations

import math
from typing import Any


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

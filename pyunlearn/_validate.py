"""Checks of scalar arguments, shared by every public function: each error names the argument,
what it got and what it needs, so the caller can fix the call without reading the code."""
from __future__ import annotations

import math
import numbers


def _is_int(value) -> bool:
    # bool is an int to Python, never to a caller who passed True for a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(arg: str, value) -> int:
    """`value` as an int ≥ 1, or ValueError naming `arg`."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{arg} must be a positive int, got {value!r}")
    return int(value)


def int_in_range(arg: str, value, low: int, high: int) -> int:
    """`value` as an int in [low, high], or ValueError naming `arg`."""
    if not _is_int(value) or not low <= value <= high:
        raise ValueError(f"{arg} must be an int in [{low}, {high}], got {value!r}")
    return int(value)


def positive_number(arg: str, value) -> float:
    """`value` as a finite float > 0, or ValueError naming `arg`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
        raise ValueError(f"{arg} must be a positive number, got {value!r}")
    return float(value)


def finite_number(arg: str, value) -> float:
    """`value` as a finite float (any sign), or ValueError naming `arg`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{arg} must be a finite number, got {value!r}")
    return float(value)


def ratio(arg: str, value) -> float:
    """`value` as a float in (0, 1], or ValueError naming `arg`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"{arg} must be a ratio in (0, 1], got {value!r}")
    return float(value)

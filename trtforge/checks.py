"""Numbers and names a user passes, checked at the boundary: a whole number in its range, a finite
duration, a device name. Each refusal says what the value is for and what to pass instead, so a
bad value never reaches a loop that would wait forever or an allocation that cannot succeed."""

from __future__ import annotations

import math
import re
from typing import Any

_CUDA = re.compile(r"cuda(?::(\d{1,4}))?")


def whole_number(name: str, value: Any, low: int, high: int, meaning: str) -> int:
    """`value` if it is an int (not a bool) in [low, high]; ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r}: {meaning}, a whole number from {low} to {high}")
    return value


def seconds(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """`value` as a finite, positive number of seconds (or zero where allowed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r}: a finite number of seconds {bound} (nan and inf would never time out)")
    return float(value)


def device_name(device: Any) -> str:
    """'cpu' or 'cuda:N' (a bare 'cuda' is 'cuda:0'); ValueError for anything else."""
    if isinstance(device, str):
        if device == "cpu":
            return device
        match = _CUDA.fullmatch(device)
        if match:
            return f"cuda:{int(match.group(1) or 0)}"
    raise ValueError(f"device={device!r} is not a device name; use 'cpu' or 'cuda:N' with N a GPU index (0, 1, ...)")

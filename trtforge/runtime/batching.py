"""How the runtime shapes requests: arrays from what callers send, rows' real lengths, the buckets
length-aware batches are cut to, and results put back together."""

from __future__ import annotations

import bisect
import functools
import math
from typing import Any

import numpy as np

# Length-aware batches are cut to their longest row rounded up to a bucket, so that the engine meets
# a few shapes (each warmed, or captured as a CUDA graph: at most 16 per engine) rather than one per
# length: multiples of 8 tokens, coarser for long profiles so that there are at most 16.
MAX_BUCKETS = 16


def buckets(lo: int, hi: int) -> list[int]:
    """The sequence lengths length-aware batches are cut to, within the profile [lo, hi]."""
    return list(_buckets(lo, hi))


@functools.lru_cache(maxsize=64)
def _buckets(lo: int, hi: int) -> tuple[int, ...]:
    step = max(8, math.ceil(math.ceil(hi / MAX_BUCKETS) / 8) * 8)
    return tuple(sorted({max(lo, min(hi, n)) for n in range(step, hi + step, step)}))


def bucket_for(length: int, profile: tuple[int, int, int]) -> int:
    """The bucket a chunk whose longest row has `length` tokens is cut to, for a sequence profile
    (min, opt, max)."""
    cuts = _buckets(profile[0], profile[2])
    return cuts[bisect.bisect_left(cuts, length)]


def concatenate_padded(parts: list[np.ndarray]) -> np.ndarray:
    if parts[0].ndim < 3 or len({p.shape[1] for p in parts}) == 1:
        return np.concatenate(parts)
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, [(0, 0), (0, width - p.shape[1])] + [(0, 0)] * (p.ndim - 2)) for p in parts])


def real_lengths(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """Each row's real length, where the attention mask pads on the right (ones, then zeros);
    None otherwise (left padding, or no mask): such requests keep their length."""
    mask = arrays.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return None
    if mask.all():  # no padding: one pass
        return np.full(mask.shape[0], max(mask.shape[1], 1))
    lengths = mask.sum(axis=1)
    if not np.array_equal(mask != 0, np.arange(mask.shape[1])[None, :] < lengths[:, None]):
        return None
    return np.maximum(lengths, 1)


def real_tokens(arrays: dict[str, Any]) -> int | None:
    """The real (unmasked) tokens of host inputs, where they have an attention mask: what an engine
    with a padding-free graph is told (engine(feed, real_tokens=...)) to choose its graph."""
    mask = arrays.get("attention_mask")
    return int(np.count_nonzero(mask)) if mask is not None else None


def as_array(value: Any, name: str = "input") -> np.ndarray:
    if hasattr(value, "detach"):
        if str(value.dtype) == "torch.bfloat16":
            raise TypeError(f"input {name!r} is a bfloat16 tensor; numpy has no bfloat16: convert it "
                            "(ids to int64, features to float32)")
        return value.detach().cpu().numpy()
    try:
        array = np.asarray(value)  # lists of lists too
    except ValueError:
        array = np.empty(0, dtype=object)
    if array.dtype == object:
        raise TypeError(f"input {name!r} is not a rectangular array of numbers; pad the rows to one length")
    return np.ascontiguousarray(array)

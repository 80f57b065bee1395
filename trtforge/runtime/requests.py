"""What the runtime checks at the call, before any work: a request's names, dtypes, token ids and
shapes, each refused with an error that says what to change."""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import numpy as np

from trtforge.errors import ShapeError
from trtforge.loader import check_shapes
from trtforge.runtime.batching import as_array


def request_arrays(batch: Mapping[str, Any], inputs: list[dict[str, Any]], vocab: int | None) -> dict[str, np.ndarray]:
    """The request as arrays of the engine's dtypes, or a clear error at the call: unknown or
    misspelled names, types that cannot be cast safely, token ids outside the vocabulary."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"a request is a dict of named inputs ({', '.join(s['name'] for s in inputs)}), "
                        f"got {type(batch).__name__}")
    specs = {s["name"]: s for s in inputs}
    for name in batch:
        if name not in specs:
            close = difflib.get_close_matches(name, specs, n=1)
            raise ShapeError(f"unknown input {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; this engine takes {', '.join(specs)}")
    arrays = {}
    for name, value in batch.items():
        array = as_array(value, name)
        want = np.dtype(specs[name]["dtype"])
        if array.dtype != want:
            if not np.can_cast(array.dtype, want, casting="same_kind") or array.dtype.kind == "f" and want.kind != "f":
                raise TypeError(f"input {name!r} is {array.dtype}, the engine takes {want}; convert it")
            array = array.astype(want)
        arrays[name] = array
    ids = arrays.get("input_ids")
    if vocab and ids is not None and ids.size:
        lowest, highest = int(ids.min()), int(ids.max())
        if lowest < 0 or highest >= vocab:
            bad = lowest if lowest < 0 else highest
            raise ShapeError(f"input_ids holds {bad}, outside the vocabulary [0, {vocab}); the model would "
                             "read past its embedding table")
    return arrays


def request_rows(arrays: dict[str, np.ndarray], inputs: list[dict[str, Any]],
                 profile: dict[str, tuple[int, int, int]], sequence_inputs: set[str]) -> int:
    """The request's row count, once its inputs agree with each other and each row fits the profile."""
    rows = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
    if len(rows) != 1:
        raise ShapeError(f"inputs disagree on the batch size: {sorted(rows)}")
    lengths = {k: a.shape[1] for k, a in arrays.items() if k in sequence_inputs and a.ndim > 1}
    if len(set(lengths.values())) > 1:
        raise ShapeError(f"inputs disagree on the sequence length: {lengths}")
    count = rows.pop()
    lo_batch, _, hi_batch = profile["batch"]
    if count < lo_batch:
        raise ShapeError(f"batch {count} is below the engine's profile min {lo_batch}; send at least "
                         f"{lo_batch} rows or rebuild with a smaller [shapes] batch min")
    # Each chunk must fit the profile: check one row against every other axis.
    check_shapes(inputs, {**profile, "batch": (1, 1, hi_batch)}, {k: v[:1] for k, v in arrays.items()})
    return count

"""A request in the runtime: what is checked at the call, before any work (names, dtypes, token ids
and shapes, each refused with an error that says what to change), and the records that follow it
through the workers."""

from __future__ import annotations

import difflib
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from trtforge.errors import ShapeError
from trtforge.loader import check_shapes
from trtforge.runtime.batching import as_array
from trtforge.runtime.shm import Layout


def request_arrays(batch: Mapping[str, Any], inputs: list[dict[str, Any]], vocab: int | None,
                   type_vocab: int | None = None) -> dict[str, np.ndarray]:
    """The request as arrays of the engine's dtypes, or a clear error at the call: unknown or
    misspelled names, types that cannot be cast safely, ids outside their embedding tables
    (input_ids and the vocabulary, token_type_ids and the type vocabulary), checked on the values
    as sent (a uint64 id is shown as it is, not as the int64 it would wrap to)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"a request is a dict of named inputs ({', '.join(s['name'] for s in inputs)}), "
                        f"got {type(batch).__name__}")
    if not batch:
        raise ShapeError(f"the request is empty; send a dict with {', '.join(s['name'] for s in inputs)}")
    tables = {"input_ids": (vocab, "the vocabulary"), "token_type_ids": (type_vocab, "the token type vocabulary")}
    specs = {s["name"]: s for s in inputs}
    for name in batch:
        if name not in specs:
            close = difflib.get_close_matches(name, specs, n=1)
            raise ShapeError(f"unknown input {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; this engine takes {', '.join(specs)}")
    arrays = {}
    for name, value in batch.items():
        array = as_array(value, name)
        if name in tables and array.size and array.dtype.kind in "iu":
            _check_ids(name, array, *tables[name])
        want = np.dtype(specs[name]["dtype"])
        if array.dtype != want:
            if not np.can_cast(array.dtype, want, casting="same_kind") or array.dtype.kind == "f" and want.kind != "f":
                raise TypeError(f"input {name!r} is {array.dtype}, the engine takes {want}; convert it")
            array = array.astype(want)
        arrays[name] = array
    return arrays


def _check_ids(name: str, array: np.ndarray, size: int | None, table: str) -> None:
    lowest, highest = int(array.min()), int(array.max())  # Python ints: exact for every integer dtype
    if lowest < 0 or (size and highest >= size):
        bad = lowest if lowest < 0 else highest
        limit = f"[0, {size})" if size else "[0, ...)"
        raise ShapeError(f"{name} holds {bad}, outside {table} {limit}; the model would read past its embedding table")


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


@dataclass
class Chunk:
    request_id: int
    index: int
    rows: Any  # a slice or an index array of the request's rows (texts, for a text request)
    length: int | None = None  # the sequence length it is cut to (length-aware batches)
    block: int | None = None  # device outputs: its block in its worker's device heap, until tensors own it


@dataclass
class Request:
    future: Future
    arrays: dict[str, np.ndarray] | list[str]  # the inputs (token ids), or the texts
    chunks: list[Chunk]
    deadline: float
    submitted: float  # time.monotonic() when submit was called
    text: bool = False
    length: int = 0  # the request's sequence length (the shape results come back in)
    length_aware: bool = False  # rows grouped by their real length (the attention mask's)
    results: dict[str, np.ndarray] | None = None  # host outputs, filled in as chunks come back
    parts: dict[int, Any] = field(default_factory=dict)  # per chunk: device outputs, or text results
    done: int = 0
    workers: dict[int, int] = field(default_factory=dict)  # chunk -> worker index
    queued: dict[int, float] = field(default_factory=dict)  # chunk -> time.monotonic() just before its send
    lock: threading.Lock = field(default_factory=threading.Lock)
    reserved: bool = False  # a heap block was sought (when its first chunk was dispatched)
    block: int | None = None  # the request's result block in the heap (host outputs)
    layout: Layout | None = None  # the results in that block: (name, dtype, shape, offset in the block)
    in_flight: int = 0  # chunks sent to workers and not answered: the block is theirs meanwhile
    failed: bool = False


def span(rows: Any) -> tuple[int, int] | None:
    """Rows as (start, stop) where they are contiguous and ascending, else None."""
    if isinstance(rows, slice):
        return rows.start, rows.stop
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (len(rows) < 2 or np.all(np.diff(rows) == 1)):
        return int(rows[0]), int(rows[-1]) + 1
    return None

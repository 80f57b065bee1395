"""Results: where a request's outputs go, and how the caller gets them.

For host outputs each request gets a block of one shared results heap when its first chunk is
dispatched (requests waiting for a free slot hold none); the workers write their rows straight
into it (in input order, padding zeroed) and the caller gets numpy arrays over the block, which goes
back to the heap when those arrays die. Where a request does not fit what is left, its chunks'
outputs are copied out of the workers' slots into arrays of its own. Device outputs come back as
per-chunk tensors over blocks of each worker's device heap; text requests as per-chunk parts put
back in text order.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from trtforge.runtime.requests import Request
from trtforge.runtime.shm import ALIGN, Heap, layout_bytes, max_bytes

HEAP_ROUNDS = 2  # the results heap holds this many rounds of every worker's slots at the largest shape
HOST_HEAP_SHARE = 0.25  # of the machine's memory at most, for the results heap


class Results:
    """Reserves, fills and hands out a request's results (see the module's docstring)."""

    def __init__(self, manifest: dict[str, Any], *, outputs_on: str) -> None:
        self.output_specs = {o["name"]: o for o in manifest["io"]["outputs"]}
        profile = {k: tuple(v) for k, v in manifest["shapes"].items()}
        self.largest = {name: hi for name, (_, _, hi) in profile.items()}  # every axis at its maximum
        self.outputs_on = outputs_on
        # Sizes of results: at least 4 bytes an element (FP16 engines may return FP32).
        self.dtypes = {name: np.dtype("float32") if np.dtype(s["dtype"]).itemsize < 4 else s["dtype"]
                       for name, s in self.output_specs.items()}
        self.heap: Heap | None = None  # made by open_heap(), once the slots' sizes are known
        self._output_bytes: dict[tuple[int, int], int] = {}  # (rows, length) -> bytes: see chunk_output_bytes
        self._layouts: dict[tuple[int, int], Any] = {}  # (rows, length) -> layout: see _layout

    def open_heap(self, chunk_output_bytes: int, chunks_in_flight: int) -> None:
        """Host outputs: room for every slot's results twice over (those in flight, those the caller
        still holds), capped by host_heap_bytes; past that, copies."""
        if self.outputs_on == "host":
            self.heap = Heap(host_heap_bytes(HEAP_ROUNDS * chunks_in_flight * chunk_output_bytes, _physical_memory()))

    def close(self) -> None:
        if self.heap is not None:
            self.heap.close()

    def chunk_output_bytes(self, rows: int, length: int) -> int:
        """A chunk's outputs at (rows, length), other axes at their largest (see dtypes)."""
        key = (rows, length)
        if key not in self._output_bytes:
            self._output_bytes[key] = max_bytes(list(self.output_specs.values()),
                                                {**self.largest, "batch": rows, "sequence": length}, self.dtypes)
        return self._output_bytes[key]

    def reserve(self, request: Request) -> None:
        """A block of the heap for the request's host outputs, where the output shapes are known and
        there is room (else the workers' results are copied out of their slots). Sought once, when
        its first chunk is dispatched: requests still waiting for a slot hold no memory."""
        request.reserved = True
        if self.heap is None or request.text:
            return
        layout = self._layout(len(next(iter(request.arrays.values()))), request.length)
        block = self.heap.allocate(layout_bytes(layout)) if layout is not None else None
        if block is not None:
            request.block, request.layout = block, layout

    def _layout(self, rows: int, length: int) -> Any:
        """Where a request's results go in a heap block (None where an output's shape is not known
        ahead, or they would not fit the heap): made once per (rows, length)."""
        key = (rows, length)
        if key not in self._layouts:
            shapes = {}
            for name, spec in self.output_specs.items():
                shape = tuple(rows if d == "batch" else length if d == "sequence" else d for d in spec["shape"])
                if not all(isinstance(d, int) for d in shape):
                    shapes = None
                    break
                shapes[name] = (shape, spec["dtype"])
            self._layouts[key] = self.heap.layout(shapes) if shapes is not None else None
        return self._layouts[key]

    def take(self, request: Request, chunk: int, worker: Any, slot: int | None, payload: tuple) -> None:
        """One chunk's outputs into the request's results: nothing to do where the worker wrote its
        rows into the request's heap block; else copied out of the worker's slot (or taken as sent)."""
        where, data = payload
        outputs = worker.outputs.views(slot, data) if where == "shm" else data
        if where == "heap":
            return
        if where == "device-heap":  # tensors over the chunk's block, which is theirs from now on
            block, request.chunks[chunk].block = request.chunks[chunk].block, None
            request.parts[chunk] = worker.device_heap.tensors(block, data)
        elif request.text or self.outputs_on == "device":
            request.parts[chunk] = {k: v.copy() for k, v in outputs.items()} if where == "shm" else outputs
        else:
            with request.lock:
                if request.results is None:
                    request.results = self._allocate(request, outputs)
            rows = request.chunks[chunk].rows
            for name, part in outputs.items():
                full = request.results[name]
                within = tuple(slice(0, min(n, m)) for n, m in zip(part.shape[1:], full.shape[1:]))
                full[(rows, *within)] = part[(slice(None), *within)]

    def _allocate(self, request: Request, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each output for the whole request: the request's rows, its sequence axis at the request's length."""
        rows = len(next(iter(request.arrays.values())))
        results = {}
        for name, part in outputs.items():
            axes = self.output_specs.get(name, {}).get("shape", [])
            shape = [rows] + [request.length if i + 1 < len(axes) and axes[i + 1] == "sequence" else n
                              for i, n in enumerate(part.shape[1:])]
            results[name] = np.zeros(shape, dtype=part.dtype)
        return results

    def assemble(self, request: Request) -> Any:
        """The request's results as the caller gets them, once every chunk is in."""
        if request.text:  # parts in text order; per-token outputs padded with zeros to the longest
            parts = [request.parts[i] for i in range(len(request.chunks))]
            results = {}
            for name in parts[0]:
                pieces = [p[name] for p in parts]
                shape = (len(request.arrays), *np.max([p.shape[1:] for p in pieces], axis=0).tolist())
                results[name] = np.zeros(shape, dtype=pieces[0].dtype)
                for chunk, piece in zip(request.chunks, pieces):
                    results[name][(chunk.rows, *(slice(0, n) for n in piece.shape[1:]))] = piece
            return results
        if self.outputs_on == "device":
            return [request.parts[i] for i in range(len(request.chunks))]
        if request.block is not None:  # arrays over the block, which is theirs from now on
            block, request.block = request.block, None
            return self.heap.arrays(block, request.layout)
        if request.length_aware:  # padded positions: the same (meaningless) zeros whatever the cut
            padded = request.arrays["attention_mask"] == 0
            for name, full in request.results.items():
                if "sequence" in self.output_specs.get(name, {}).get("shape", []):
                    full[padded] = 0
        return request.results

    def settle(self, request: Request) -> None:
        """A failed request's block goes back once no worker still writes into it."""
        with request.lock:
            block = request.block if request.failed and request.in_flight == 0 else None
            if block is not None:
                request.block = None
        if block is not None:
            self.heap.release(block)


def host_heap_bytes(wanted: int, memory: int) -> int:
    """The results heap's size: rounds of every slot's largest results, capped at HOST_HEAP_SHARE
    of the machine's memory (GPU workers page-lock all of it), so that a model with large outputs (a
    decoder's logits over its vocabulary) does not ask for more than the host has; requests whose
    results do not fit what is left of it get copies instead."""
    return max(ALIGN, min(wanted, int(memory * HOST_HEAP_SHARE)))


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

"""Shared memory between the caller and a worker: the runtime's data path.

Each worker gets two arenas that the caller creates and owns, one for inputs and one for host
outputs, each cut into SLOTS equal slots sized for the engine's largest chunk. A chunk holds one
slot of each from the moment the caller writes its inputs until the caller has copied its outputs
out, so only a small descriptor (slot, names, dtypes, shapes, offsets) crosses the process
boundary, whatever the size of the tensors, and at most SLOTS chunks are in flight per worker: a
bound on the caller's memory and on what sits in a pipe.

An arena is an anonymous memfd mapped by both sides (the worker receives the descriptor at spawn):
it has no name, so nothing is left in /dev/shm whatever happens, and its memory goes back to the
system when the last process that maps it exits. A GPU worker registers its arenas with CUDA
(cudaHostRegister), so copies to and from the device run straight from and into them.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import pickle
import threading
import weakref
from typing import Any

import numpy as np

SLOTS = 4  # chunks in flight per worker: one being written, one running, one being read, one spare
MAX_SLOTS = 64  # past this the shared memory grows with no gain (8 slots measured no better than 4 at batch 128)
ALIGN = 64


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return math.prod(shape) * _itemsize(dtype)  # (np.prod: 20x slower on a tuple)


@functools.lru_cache(maxsize=None)
def _itemsize(dtype: Any) -> int:
    return np.dtype(dtype).itemsize


Layout = tuple[tuple[str, str, tuple[int, ...], int], ...]  # (name, dtype, shape, offset in the slot)


class Arena:
    """SLOTS equal slots of shared memory. Create in the caller with Arena(slot_bytes); pass
    `arena.handle()` to the worker (as a spawn argument) and map it there with Arena.attach."""

    def __init__(self, slot_bytes: int, slots: int = SLOTS, *, name: str = "trtforge", fd: int | None = None) -> None:
        self.slot_bytes = _aligned(max(slot_bytes, ALIGN))
        self.slots = slots
        size = self.slot_bytes * slots
        if fd is None:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self.map = mmap.mmap(fd, size)
        self.memory = np.frombuffer(self.map, dtype=np.uint8)

    def handle(self) -> tuple[Any, int, int]:
        """What a spawned worker needs to map this arena (the fd travels with the spawn)."""
        from multiprocessing.reduction import DupFd

        return DupFd(self.fd), self.slot_bytes, self.slots

    @classmethod
    def attach(cls, handle: tuple[Any, int, int]) -> Arena:
        fd, slot_bytes, slots = handle
        return cls(slot_bytes, slots, fd=fd.detach())

    @property
    def address(self) -> int:
        return self.memory.ctypes.data

    @property
    def size(self) -> int:
        return self.slot_bytes * self.slots

    def layout(self, arrays: dict[str, tuple[tuple[int, ...], Any]]) -> Layout | None:
        """Where tensors of these shapes and dtypes go in a slot; None if they do not fit."""
        return place(arrays, self.slot_bytes)

    def views(self, slot: int, layout: Layout, *, offset: int = 0) -> dict[str, np.ndarray]:
        """numpy arrays over a slot's memory (from `offset` in it), as the layout places them (no copy)."""
        base = slot * self.slot_bytes + offset
        memory = self.memory
        return {name: memory[base + start:base + stop].view(dtype).reshape(shape)
                for name, dtype, shape, start, stop in _spans(layout)}

    def write(self, slot: int, arrays: dict[str, np.ndarray]) -> Layout | None:
        layout = self.layout({k: (v.shape, v.dtype) for k, v in arrays.items()})
        if layout is not None:
            for name, view in self.views(slot, layout).items():
                np.copyto(view, arrays[name])
        return layout

    def write_texts(self, slot: int, texts: list[str]) -> Layout | None:
        """Strings as one UTF-8 block and their end offsets."""
        encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        return self.write(slot, {"ends": ends, "utf8": blob})

    def read_texts(self, slot: int, layout: Layout) -> list[str]:
        views = self.views(slot, layout)
        blob, ends = views["utf8"].tobytes(), views["ends"]
        starts = np.concatenate([[0], ends[:-1]])
        return [blob[s:e].decode("utf-8", "surrogatepass") for s, e in zip(starts.tolist(), ends.tolist())]

    def close(self) -> None:
        self.memory = None
        try:
            self.map.close()
        except BufferError:  # arrays over it are still referenced (results): it is unmapped when they die
            pass
        self.map = None
        try:
            os.close(self.fd)
        except OSError:
            pass


def send_plain(connection: Any, message: Any) -> None:
    """A message of plain values (numbers, strings, tuples: no tensor to share) down a
    multiprocessing connection, pickled by the plain pickler: the connection's own copies its
    reducer tables for every message, which costs more than the rest of a descriptor's trip.
    The other end reads it with connection.recv() as usual."""
    connection.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))


def place(arrays: dict[str, tuple[tuple[int, ...], Any]], capacity: int) -> Layout | None:
    """Where tensors of these shapes and dtypes go, one after another (aligned), in `capacity` bytes;
    None if they do not fit. Layouts are computed once per set of shapes (a runtime meets a few:
    its buckets and batch sizes) and shared: do not change one."""
    return _place(tuple((name, tuple(shape), dtype) for name, (shape, dtype) in arrays.items()), capacity)


@functools.lru_cache(maxsize=4096)
def _place(arrays: tuple[tuple[str, tuple[int, ...], Any], ...], capacity: int) -> Layout | None:
    layout, offset = [], 0
    for name, shape, dtype in arrays:
        layout.append((name, np.dtype(dtype).str, tuple(map(int, shape)), offset))
        offset += _aligned(nbytes(shape, dtype))
    return tuple(layout) if offset <= capacity else None


@functools.lru_cache(maxsize=4096)
def _spans(layout: Layout) -> tuple[tuple[str, np.dtype, tuple[int, ...], int, int], ...]:
    """A layout as (name, dtype, shape, start, stop), its dtypes parsed: made once per layout."""
    return tuple((name, np.dtype(dtype), shape, start, start + nbytes(shape, dtype)) for name, dtype, shape, start in layout)


def layout_bytes(layout: Layout) -> int:
    """The bytes a layout spans."""
    return max((start + _aligned(nbytes(shape, dtype)) for _, dtype, shape, start in layout), default=0)


def max_bytes(specs: list[dict[str, Any]], dims: dict[str, int], dtypes: dict[str, Any] | None = None) -> int:
    """The bytes of one slot holding every tensor of `specs` at the largest size `dims` allows
    (named axes, e.g. batch and sequence, at their profile maximum)."""
    total = 0
    for spec in specs:
        shape = tuple(dims.get(d, 1) if isinstance(d, str) else int(d) for d in spec["shape"])
        dtype = (dtypes or {}).get(spec["name"], spec["dtype"])
        total += _aligned(nbytes(shape, dtype))
    return total


class Blocks:
    """First-fit allocation of aligned blocks in [0, size): offsets only, the memory is elsewhere."""

    def __init__(self, size: int) -> None:
        self.lock = threading.Lock()
        self.free_blocks: list[tuple[int, int]] = [(0, size)]  # (offset, size), sorted
        self.used: dict[int, int] = {}

    def allocate(self, size: int) -> int | None:
        size = _aligned(max(size, 1))
        with self.lock:
            for i, (offset, room) in enumerate(self.free_blocks):
                if room >= size:
                    self.free_blocks[i:i + 1] = [(offset + size, room - size)] if room > size else []
                    self.used[offset] = size
                    return offset
        return None

    def release(self, offset: int) -> None:
        with self.lock:
            size = self.used.pop(offset, None)
            if size is None:
                return
            blocks = sorted([*self.free_blocks, (offset, size)])
            merged: list[tuple[int, int]] = []
            for start, room in blocks:
                if merged and merged[-1][0] + merged[-1][1] == start:
                    merged[-1] = (merged[-1][0], merged[-1][1] + room)
                else:
                    merged.append((start, room))
            self.free_blocks = merged


class Heap(Arena):
    """Shared memory for whole results: a block per request, allocated here (first fit), written by
    the workers in place (each its own rows) and handed to the caller as numpy arrays over it, no
    copy. The block goes back when the last array over it dies (or at once, if the request failed,
    once no worker still writes into it). Workers map it as a plain Arena (Arena.attach): they only
    write into blocks the caller allocated."""

    def __init__(self, size: int, *, name: str = "trtforge-results") -> None:
        super().__init__(size, 1, name=name)
        self.blocks = Blocks(self.slot_bytes)
        self.owners: dict[int, tuple[weakref.ref, int]] = {}  # id(weak reference to a block's root) -> it, offset

    def allocate(self, size: int) -> int | None:
        return self.blocks.allocate(size)

    def release(self, offset: int) -> None:
        if self.memory is not None:
            self.blocks.release(offset)

    def arrays(self, offset: int, layout: Layout) -> dict[str, np.ndarray]:
        """The block's arrays, all views of one root array that owns the block: the block is released
        when the root dies, that is when the caller has dropped every array (and view) of it."""
        size = self.blocks.used[offset]
        root = np.frombuffer(memoryview(self.map)[offset:offset + size], dtype=np.uint8)
        owner = weakref.ref(root, self._dropped)  # (lighter than weakref.finalize, on every request)
        self.owners[id(owner)] = owner, offset
        return {name: root[start:stop].view(dtype).reshape(shape) for name, dtype, shape, start, stop in _spans(layout)}

    def _dropped(self, owner: weakref.ref) -> None:
        _, offset = self.owners.pop(id(owner))
        self.release(offset)


class DeviceHeap:
    """A worker's results on its GPU (device outputs): one allocation the worker makes at start and
    shares once (CUDA IPC, in its ready message), cut into blocks by the caller (one per chunk, when
    it is dispatched), written by the worker (its copy finished before it answers) and handed to the
    caller as tensors over the block, no copy and no IPC per chunk. The block goes back when the
    last tensor (or view) over it dies: they all hold one owner object, whose death releases it."""

    def __init__(self, memory: Any) -> None:
        self.memory = memory  # a uint8 CUDA tensor: the worker's allocation, mapped here
        self.blocks = Blocks(memory.numel())

    def allocate(self, size: int) -> int | None:
        return self.blocks.allocate(size)

    def release(self, offset: int) -> None:
        self.blocks.release(offset)

    def tensors(self, offset: int, layout: Layout) -> dict[str, Any]:
        import torch

        owner = _DeviceBlock(self.memory, offset, self.blocks.used[offset])
        root = torch.as_tensor(owner, device=self.memory.device)  # holds `owner` until its storage dies
        weakref.finalize(owner, self.release, offset)
        del owner
        return tensor_views(root, layout)


class _DeviceBlock:
    """Device memory described for torch.as_tensor (__cuda_array_interface__): the tensor it makes
    keeps this object alive for as long as any tensor over that memory lives, and this object keeps
    the heap's mapping open."""

    def __init__(self, memory: Any, offset: int, size: int) -> None:
        self.memory = memory
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (memory.data_ptr() + offset, False),
                                         "version": 3, "strides": None, "stream": None}  # written and synchronized


def tensor_views(raw: Any, layout: Layout, *, offset: int = 0, names: Any = None) -> dict[str, Any]:
    """Tensors over a uint8 tensor's bytes (from `offset`), as the layout places them (no copy): the
    torch twin of Arena.views. `names`: only these."""
    return {name: raw[offset + start:offset + start + nbytes(shape, dtype)].view(torch_dtype(dtype)).view(shape)
            for name, dtype, shape, start in layout if names is None or name in names}


@functools.lru_cache(maxsize=None)
def torch_dtype(dtype: str) -> Any:
    """The torch dtype of a numpy dtype string ('<i8' -> torch.int64)."""
    import torch

    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype

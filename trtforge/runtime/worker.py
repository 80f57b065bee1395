"""One worker process per device: loads its engine through the checked loader, then serves requests.

Tensors travel in shared memory (runtime/shm.py): the caller writes a chunk's inputs into a slot of
the worker's input arena; the worker writes host outputs into the request's block of the caller's
results heap (or, where the caller had no room there, into the same slot of its output arena), and
only descriptors cross the pipes. A reader thread takes messages off the pipe (and tokenizes text
requests there, so that tokenization overlaps the engine); the main thread queues each chunk's work
on the GPU (copies in, engine, copies out on a stream of their own) without waiting for it; a writer
thread waits for each chunk in turn, finishes it on the host and answers, while the GPU runs the
next.

For device outputs, a GPU worker allocates one device heap at start and shares it once (CUDA IPC, in
its ready message); the caller gives each chunk a block of it, the worker copies the chunk's outputs
there, and only their layout comes back (where the chunk got no block: its tensors, shared by CUDA
IPC one by one).

Messages in (its own pipe): ("run", request_id, chunk, slot, layout, target) | ("encode", request_id,
chunk, slot, layout of the texts, None) | ("tokens", request_id, chunk, slot, layout of ragged token
ids (runtime/tokenize.py), None) | None to stop; target: host outputs, (block, layout, span)
of the request's results in the heap; device outputs, (offset, size) of the chunk's block in the
device heap; or None.
Messages out (its own pipe, so that a worker killed mid-send holds no lock the others need):
("ready", worker, info) | ("failed", worker, message) when loading fails |
("result", request_id, chunk, worker, ("heap", None) | ("device-heap", layout) | ("shm", layout) |
("inline", outputs), timings) | ("error", request_id, chunk, worker, message, timings).
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from trtforge.runtime.batching import bucket_for, real_tokens
from trtforge.runtime.shm import Arena, layout_bytes, place, send_plain, tensor_views
from trtforge.tokens import load_dense, pool


def serve(index: int, artifact: str, device: str, backend_name: str | None, outputs_on: str,
          requests: Any, responses: Any, warm: list[tuple[int, int]], arenas: tuple[Any, Any],
          device_heap_bytes: int = 0, cores: tuple[int, ...] | None = None) -> None:
    try:
        if cores:  # a CPU worker's share of the cores: its engine's threads stay there (see cpu_shares)
            os.sched_setaffinity(0, cores)
        import torch

        # Few CPU threads: the worker's CPU work (scattering result rows) is small, and one pool of all
        # cores per worker, one worker per GPU, thrashes (10x slower scatters measured on 4 GPUs).
        torch.set_num_threads(1 if device == "cpu" else WORKER_THREADS)
        if device != "cpu" and torch.cuda.is_available():  # (without CUDA, loading says why this engine cannot run here)
            torch.cuda.set_device(device)  # every context, stream and registration on this worker's GPU
        engine, text, io, info = _set_up(artifact, device, backend_name, warm,
                                         *(Arena.attach(a) if a is not None else None for a in arenas))
        if outputs_on == "device" and io.on_gpu and device_heap_bytes:
            io.allocate_device_heap(device_heap_bytes)
    except Exception as e:  # reported to the parent, which raises it to the caller
        responses.send(("failed", index, f"{type(e).__name__}: {e}"))
        return
    responses.send(("ready", index, {**info, "pid": os.getpid(),
                                    **({"device_heap": io.device_heap} if io.device_heap is not None else {})}))
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read, args=(requests, inbox, io, text), daemon=True, name="trtforge-reader").start()
    answers = _Answers(index, responses, device)
    served = 0
    while True:
        message = inbox.get()
        if message is None:
            break
        kind, request_id, chunk, slot, payload, target, received = message
        timings: dict[str, float] = {"received": received}
        try:
            if isinstance(payload, Exception):  # the reader could not prepare it (tokenization)
                raise payload
            result = _run(kind, slot, payload, target, timings, engine, text, io, outputs_on)
            if callable(result):  # queued on the GPU: the writer waits for it and answers, the engine goes on
                answers.later(request_id, chunk, result, timings)
            else:
                answers.result(request_id, chunk, result, timings)
        except Exception as e:  # one bad request must not stop the worker
            answers.error(request_id, chunk, e, timings)
        served += 1
        if io.on_gpu and served % 64 == 0:
            torch.cuda.ipc_collect()  # free device results the caller has released
    answers.close()
    engine.close()
    io.close()


WORKER_THREADS = 4


def tokenizer_threads(device: str) -> int:
    """The tokenizers library's threads in a worker: its CPU share (a CPU worker is pinned to one),
    or the host's cores shared among its GPUs' workers."""
    if device == "cpu" and hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    try:
        import torch

        gpus = max(1, torch.cuda.device_count())
    except Exception:
        gpus = 1
    return max(1, (os.cpu_count() or 1) // gpus)


def _set_up(artifact: str, device: str, backend_name: str | None, warm: list[tuple[int, int]],
            inputs: Arena, outputs: Arena, heap: Arena | None) -> tuple[Any, TextEncoder | None, _DataPath, dict]:
    """The engine loaded (through the checked loader), the text encoder where the artifact has a
    tokenizer, the data path over the arenas, and each warm shape run once: (engine, text, io, info)."""
    import trtforge

    start = time.perf_counter()
    engine = trtforge.load(artifact, device, backend_name=backend_name)
    loaded_s = time.perf_counter() - start
    text = TextEncoder.of(Path(artifact), engine.profile, threads=tokenizer_threads(device))
    io = _DataPath(device, inputs, outputs, heap)
    io.sequence_outputs = {o["name"] for o in engine.outputs if "sequence" in o["shape"]}
    for batch, length in warm:  # the shapes this workload will meet: set up before the first request
        feed = {spec["name"]: io.staging.to_device(spec["name"], _warm_input(spec, batch, length), device)
                for spec in engine.inputs}
        engine(feed)  # by size alone: the padding-free graph where it may serve this shape
        if io.on_gpu:  # full rows: the fused graph (a CPU engine has one graph)
            engine(feed, real_tokens=batch * length)
    if io.on_gpu:
        import torch

        torch.cuda.synchronize()
    info = {"device": device, "backend": engine.backend, "profile": engine.profile, "load_s": round(loaded_s, 3),
            "warm_s": round(time.perf_counter() - start - loaded_s, 3), "warmed": len(warm), "registered": io.registered}
    return engine, text, io, info


class InProcess:
    """A worker's work done in the caller's own process, in the thread that sends the chunk
    (Runtime(in_process=True)): the same engine, data path and answers as a worker process, without
    the two pipes and the thread hand-offs on each side, for the lowest latency of one request at a
    time on one device. What it gives up: a crash in the engine takes the caller with it, and the
    caller's own work does not overlap the engine's. Chunks run one at a time (a lock)."""

    def __init__(self, index: int, artifact: str, device: str, backend_name: str | None, outputs_on: str,
                 warm: list[tuple[int, int]], inputs: Arena, outputs: Arena, heap: Arena | None) -> None:
        self.index, self.device, self.outputs_on = index, device, outputs_on
        self.lock = threading.Lock()
        with self._on_device():
            self.engine, self.text, self.io, self.info = _set_up(artifact, device, backend_name, warm, inputs, outputs, heap)
        self.info["pid"] = os.getpid()

    def _on_device(self) -> Any:
        import contextlib

        import torch

        if self.device == "cpu" or not torch.cuda.is_available():  # (without CUDA, loading says why)
            return contextlib.nullcontext()
        return torch.cuda.device(self.device)  # the caller's current device is left as it was

    def handle(self, message: tuple) -> tuple:
        """A request message, answered as a worker process would answer it."""
        kind, request_id, chunk, slot, layout, target = message
        timings: dict[str, float] = {"received": time.monotonic()}
        with self.lock, self._on_device():
            try:
                prepared = _prepare(kind, slot, layout, self.io, self.text)
                result = _run(kind, slot, prepared, target, timings, self.engine, self.text, self.io, self.outputs_on)
                if callable(result):  # queued on the GPU: wait for it here
                    result = result()
            except Exception as e:  # one bad request fails only itself
                return ("error", request_id, chunk, self.index, _describe(e), timings)
        timings["sent"] = time.monotonic()
        return ("result", request_id, chunk, self.index, result, timings)

    def close(self) -> None:
        with self.lock, self._on_device():
            self.engine.close()
            self.io.close()


def _prepare(kind: str, slot: int, layout: Any, io: _DataPath, text: TextEncoder | None) -> Any:
    """A chunk made ready for its engine: its texts tokenized ("encode"), or its inputs read from
    the slot (on a GPU, their copies to the device queued)."""
    if kind in ("encode", "tokens"):
        if text is None:
            raise ValueError("this artifact carries no tokenizer (text.json); send token ids with run()")
        if kind == "tokens":  # ids tokenized by the caller, ragged: padded here
            from trtforge.runtime.tokenize import Tokens

            return text.batches(Tokens.from_arrays(io.inputs.views(slot, layout)))  # (the padded copies outlive the slot)
        return text.prepare(io.inputs.read_texts(slot, layout))
    return io.prepare(slot, layout)


def _run(kind: str, slot: int, prepared: Any, target: Any, timings: dict[str, float], engine: Any,
         text: TextEncoder | None, io: _DataPath, outputs_on: str) -> Any:
    """A prepared chunk through the engine: the answer's payload, or (a chunk queued on the GPU) a
    function that waits for it and gives the payload."""
    if kind in ("encode", "tokens"):
        result = io.reply(slot, text.finish(prepared, lambda arrays: io.run(engine, arrays)))
        timings["worker_ms"] = 1e3 * (time.monotonic() - timings["received"])
        return result
    return io.serve(engine, slot, prepared, outputs_on, timings, target)


def _describe(e: Exception) -> str:
    """An error as one line for the caller: its type, first line and where it was raised."""
    where = traceback.extract_tb(e.__traceback__)[-1].name if e.__traceback__ else "reader"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first} [{where}]"


class _Answers:
    """The worker's answers, from the main thread or from the writer thread, which finishes the
    chunks the main thread has queued on the GPU (waiting for each, then scattering its rows where
    needed), so that the GPU runs the next chunk meanwhile."""

    def __init__(self, index: int, responses: Any, device: str) -> None:
        self.index, self.responses, self.device = index, responses, device
        self.lock = threading.Lock()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.writer = threading.Thread(target=self._write, daemon=True, name="trtforge-writer")
        self.writer.start()

    def result(self, request_id: int, chunk: int, result: Any, timings: dict[str, float]) -> None:
        timings["sent"] = time.monotonic()
        message = ("result", request_id, chunk, self.index, result, timings)
        with self.lock:
            if result[0] == "inline":  # tensors: shared by the connection's pickler (CUDA IPC, fds)
                self.responses.send(message)
            else:  # a descriptor
                send_plain(self.responses, message)

    def error(self, request_id: int, chunk: int, e: Exception, timings: dict[str, float]) -> None:
        with self.lock:
            self.responses.send(("error", request_id, chunk, self.index, _describe(e), timings))

    def later(self, request_id: int, chunk: int, finish: Any, timings: dict[str, float]) -> None:
        self.queue.put((request_id, chunk, finish, timings))

    def _write(self) -> None:
        if self.device != "cpu":
            import torch

            torch.cuda.set_device(self.device)  # (per thread)
        while True:
            item = self.queue.get()
            if item is None:
                return
            request_id, chunk, finish, timings = item
            try:
                result = finish()
                self.result(request_id, chunk, result, timings)
            except Exception as e:
                self.error(request_id, chunk, e, timings)

    def close(self) -> None:
        self.queue.put(None)
        self.writer.join(timeout=30)


def _read(requests: Any, inbox: queue.SimpleQueue, io: _DataPath, text: TextEncoder | None) -> None:
    """Messages off the pipe into the inbox, each chunk made ready here while the engine runs the
    one before: inputs queued for copy to the device, or text tokenized."""
    if io.on_gpu:
        import torch

        torch.cuda.set_device(io.device)  # (per thread)
    while True:
        try:
            message = requests.recv()
        except (EOFError, OSError):  # the caller has gone: stop
            message = None
        if message is None:
            inbox.put(None)
            return
        kind, request_id, chunk, slot, layout, target = message
        received = time.monotonic()  # CLOCK_MONOTONIC: comparable with the caller's clock
        try:
            payload: Any = _prepare(kind, slot, layout, io, text)
        except Exception as e:
            payload = e
        inbox.put((kind, request_id, chunk, slot, payload, target, received))


class _DataPath:
    """The worker's side of the shared memory: inputs read in place (on a GPU, copied to the device
    straight from the arena, which is registered with CUDA); host outputs written into the request's
    result block in the caller's heap, each row where the request has it (or, where the caller had no
    room there, into the chunk's output slot)."""

    def __init__(self, device: str, inputs: Arena, outputs: Arena, heap: Arena | None) -> None:
        self.device, self.inputs, self.outputs, self.heap = device, inputs, outputs, heap
        self.on_gpu = device != "cpu"
        self.staging = _Staging()  # the main thread's (text)
        self.reader_staging = _Staging()  # the reader's (inputs, where the slots are not registered)
        self.sequence_outputs: set[str] = set()
        self.copies: Any = None
        if self.on_gpu:
            import torch

            self.copies = torch.cuda.Stream()  # copies back to the host, beside the next chunk's engine
            self.target = torch.device(device)  # (parsed once: a device string is parsed on every use)
        self.registered = self.on_gpu and all(_register(a) for a in (inputs, outputs, heap) if a is not None)
        self.device_heap: Any = None  # device outputs: chunks' blocks, allocated by the caller

    def allocate_device_heap(self, size: int) -> None:
        """The device heap, at most a share of the GPU's free memory once the engine is loaded and
        warm (see device_heap_bytes); without room for it, device outputs cross one by one."""
        import torch

        size = device_heap_bytes(size, torch.cuda.mem_get_info(self.device)[0])
        try:
            self.device_heap = torch.empty(size, dtype=torch.uint8, device=self.device) if size else None
        except torch.OutOfMemoryError:
            self.device_heap = None

    def run(self, engine: Any, arrays: dict[str, Any]) -> dict[str, Any]:
        """Arrays the worker made itself (text): through the staging buffers; outputs left on the device."""
        return engine({name: self.staging.to_device(name, array, self.device) for name, array in arrays.items()},
                      real_tokens=real_tokens(arrays))

    def prepare(self, slot: int, layout: Any) -> tuple[dict[str, Any], Any, int | None, float]:
        """A chunk's inputs as the engine takes them (on a GPU, their copies to the device queued
        straight from the registered slot, else through the reader's own staging buffers), where its
        rows go in the request's result, its real tokens (counted on the host) and the milliseconds
        it took."""
        import torch

        start = time.monotonic()
        views = self.inputs.views(slot, layout)
        rows = views.pop("__rows__", None)
        real = real_tokens(views)
        if not self.on_gpu:
            feed = {name: torch.from_numpy(view) for name, view in views.items()}
        elif self.registered:  # one copy of the slot's bytes, the inputs as views of it on the device
            base = slot * self.inputs.slot_bytes
            raw = torch.from_numpy(self.inputs.memory[base:base + layout_bytes(layout)]).to(self.target, non_blocking=True)
            feed = tensor_views(raw, layout, names=views)
        else:
            feed = {name: self.reader_staging.to_device(name, view, self.device) for name, view in views.items()}
        return feed, rows, real, 1e3 * (time.monotonic() - start)

    def serve(self, engine: Any, slot: int, prepared: tuple, outputs_on: str, timings: dict[str, float],
              target: Any = None) -> Any:
        """One prepared chunk through the engine. On a GPU the work is only queued here (the engine,
        then the copies out on a stream of their own, so that they overlap the next chunk's engine)
        and a function is returned that waits for it, finishes on the host and gives the answer (the
        writer thread calls it); on the CPU, the answer. `timings` gets milliseconds of inputs and
        launch (the host's time to queue the copies in, in the reader, and the engine), engine (on a
        GPU, the device's time from the engine's start to its end) and outputs (to the outputs'
        arrival where the caller reads them, host work included)."""
        feed, rows, real, timings["inputs_ms"] = prepared
        start = time.monotonic()
        stream = self._stream()  # looked up once a chunk (each lookup resolves the device anew)
        began = self._mark(stream)
        outputs = engine(feed, real_tokens=real)
        ended = self._mark(stream)
        timings["launch_ms"] = 1e3 * (time.monotonic() - start)
        placed = (self.deliver_device(outputs, target, stream) if outputs_on == "device" and self.on_gpu and target
                  else None)
        if placed is not None:  # copied into the chunk's block of the device heap
            ready, layout = placed
            after = lambda: ("device-heap", layout)  # noqa: E731
        elif outputs_on == "device" and self.on_gpu:  # shared by CUDA IPC once the engine is done
            shared = {k: v.contiguous() for k, v in outputs.items()}
            ready, after = self._mark(stream), lambda: ("inline", shared)
        elif target is not None:
            ready, scatter = self.deliver(slot, outputs, target, rows, feed.get("attention_mask"), stream)
            after = lambda: (scatter(), ("heap", None))[1]  # noqa: E731
        else:
            ready, after = ended, lambda: self.reply(slot, outputs)

        def finish() -> tuple:
            if ready is not None:
                ready.synchronize()
            waited = time.monotonic()
            result = after()
            host_ms = 1e3 * (time.monotonic() - waited)
            if self.on_gpu:
                timings.update(engine_ms=began.elapsed_time(ended), outputs_ms=ended.elapsed_time(ready) + host_ms)
            else:
                timings.update(engine_ms=timings.pop("launch_ms"), outputs_ms=host_ms)
            return result

        return finish if self.on_gpu else finish()

    def _stream(self) -> Any:
        """The stream the chunk's work is queued on: this thread's current one (None on the CPU)."""
        if not self.on_gpu:
            return None
        import torch

        return torch.cuda.current_stream(self.target)

    def _mark(self, stream: Any) -> Any:
        """A timing event recorded on `stream` (None on the CPU)."""
        if not self.on_gpu:
            return None
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def deliver_device(self, outputs: dict[str, Any], target: tuple[int, int], stream: Any) -> tuple[Any, Any] | None:
        """The chunk's device outputs copied (queued, on the engine's stream) into its block of the
        device heap: the event the copies record and where they are in the block; None where they do
        not fit (or have a dtype numpy cannot name, as bfloat16)."""
        offset, size = target
        try:
            layout = place({k: (tuple(v.shape), _numpy_dtype(v)) for k, v in outputs.items()}, size)
        except TypeError:
            return None
        if layout is None:
            return None
        for name, block in tensor_views(self.device_heap, layout, offset=offset).items():
            block.copy_(outputs[name])
        return self._mark(stream), layout

    def deliver(self, slot: int, outputs: dict[str, Any], target: tuple, rows: Any, mask: Any,
                stream: Any) -> tuple[Any, Any]:
        """The chunk's outputs into the request's result block: padded positions zeroed and the
        sequence axis padded or cut back to the request's length (on the device), then copied
        straight into the block in runs of rows that are consecutive there (rows put in the block's
        order on the device first), where there are at most MAX_RUNS of them (a chunk that holds
        every row of its request is one run); else through the chunk's output slot and one scatter
        of its rows on the host. On a GPU the copies are only queued, on the copy stream: returns
        the event they record (None on the CPU) and the scatter left for the host once it has fired."""
        import contextlib

        import numpy as np
        import torch

        block, layout, span = target
        full = {k: torch.from_numpy(v) for k, v in self.heap.views(0, layout, offset=block).items()}
        order = None  # the chunk's rows in the block's order, where it is not that already
        if span is not None:
            runs: list[tuple[int, int, int]] | None = [(span[0], span[1], 0)]
        else:
            runs = _runs(np.sort(rows))
            if len(runs) > MAX_RUNS:
                runs = None
            elif self.on_gpu:  # sorted on the device: a copy from pageable memory would wait for the engine
                order = torch.argsort(torch.from_numpy(rows).to(self.target, non_blocking=self.registered))
            else:
                order = torch.from_numpy(np.argsort(rows))
        values = {}
        for name, value in outputs.items():
            dest = full[name]
            if name in self.sequence_outputs and mask is not None and value.ndim >= 2:
                value = value * mask.reshape(*mask.shape, *([1] * (value.ndim - 2))).to(value.dtype)
                if value.shape[1] < dest.shape[1]:
                    pad = [0, 0] * (value.ndim - 2) + [0, dest.shape[1] - value.shape[1]]
                    value = torch.nn.functional.pad(value, pad)
                value = value[:, :dest.shape[1]]  # a chunk padded past the request's width to its bucket
            if order is not None:
                value = value.index_select(0, order)
            values[name] = value
        if self.on_gpu:
            self.copies.wait_stream(stream)
            for value in values.values():
                value.record_stream(self.copies)  # not reused before the copy stream has read it
        scatters = []
        with torch.cuda.stream(self.copies) if self.on_gpu else contextlib.nullcontext():
            if runs is not None:
                for name, value in values.items():
                    for start, stop, first in runs:
                        full[name][start:stop].copy_(value[first:first + stop - start], non_blocking=self.registered)
            else:
                if self.on_gpu:  # to the host first, into the chunk's output slot
                    staged = self.outputs.views(slot, self.outputs.layout(
                        {k: (tuple(v.shape), full[k].numpy().dtype) for k, v in values.items()}))
                    for name, value in values.items():
                        staged_value = torch.from_numpy(staged[name])
                        staged_value.copy_(value, non_blocking=self.registered)
                        values[name] = staged_value
                index = torch.from_numpy(rows)
                scatters = [(full[name], index, value) for name, value in values.items()]
            done = self._mark(self.copies)

        def scatter() -> None:
            for dest, index, value in scatters:
                dest.index_copy_(0, index, value.to(dest.dtype))

        return done, scatter

    def reply(self, slot: int, outputs: dict[str, Any]) -> tuple:
        """Host outputs into the caller's output slot (or inline, where they do not fit it)."""
        import torch

        layout = self.outputs.layout({k: (tuple(v.shape), _numpy_dtype(v)) for k, v in outputs.items()})
        if layout is None:
            return "inline", {k: self.staging.to_host(k, v) for k, v in outputs.items()}
        views = self.outputs.views(slot, layout)
        for name, value in outputs.items():
            if isinstance(value, torch.Tensor):
                torch.from_numpy(views[name]).copy_(value, non_blocking=self.registered)
            else:
                views[name][...] = value
        if self.on_gpu:
            torch.cuda.current_stream().synchronize()
        return "shm", layout

    def close(self) -> None:
        if self.registered:
            import torch

            for arena in (self.inputs, self.outputs, self.heap):
                if arena is not None:
                    torch.cuda.cudart().cudaHostUnregister(arena.address)


MAX_RUNS = 4  # copies straight into the result block per output, before the host scatters instead
DEVICE_HEAP_SHARE = 0.1  # of the GPU's free memory at most, for the device heap


def device_heap_bytes(wanted: int, free: int) -> int:
    """The device heap's size: what the runtime asks for (rounds of every slot's largest outputs),
    capped at DEVICE_HEAP_SHARE of the free device memory, so that a model with large outputs (a
    decoder's logits over its vocabulary) leaves the engine room to run; chunks whose outputs do not
    fit what is left of it cross by CUDA IPC instead."""
    return max(0, min(wanted, int(free * DEVICE_HEAP_SHARE)))


def _runs(rows: Any) -> list[tuple[int, int, int]]:
    """Sorted destination rows as runs of consecutive ones: (start, stop, first source row)."""
    import numpy as np

    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


def _register(arena: Arena) -> bool:
    """Page-lock an arena for CUDA, so that copies to and from the device need no staging copy."""
    import torch

    portable = 1  # cudaHostRegisterPortable: pinned for every CUDA context, not only the current one
    error = torch.cuda.cudart().cudaHostRegister(arena.address, arena.size, portable)
    return int(error) == 0


def _numpy_dtype(value: Any) -> Any:
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return torch.empty(0, dtype=value.dtype).numpy().dtype
    return np.asarray(value).dtype


def _warm_input(spec: dict[str, Any], batch: int, length: int) -> Any:
    """Zeros of the input's shape at (batch, length), every token real (a packed graph needs some)."""
    import numpy as np

    shape = [batch if d == "batch" else length if d in ("sequence", "image") else d for d in spec["shape"]]
    return (np.ones if spec["name"] == "attention_mask" else np.zeros)(shape, dtype=spec["dtype"])


class TextEncoder:
    """Text in the worker: the artifact's tokenizer.json run by the tokenizers library (truncating
    at its validated max_length; runtime/tokenize.py), rows sorted by length and run in batches cut
    to their longest, pooling where text.json declares it, and for classifiers the top label and its
    score, all on the device, so that only what the caller keeps crosses to the host; results in the
    order of the texts given. prepare() tokenizes (the reader thread), batches() pads token ids sent
    ready-made, finish() runs."""

    @classmethod
    def of(cls, artifact: Path, profile: dict[str, tuple[int, int, int]], threads: int | None = None) -> TextEncoder | None:
        """The artifact's text encoder, its files verified against the manifest first (the worker
        reads them itself); None where the artifact has no text interface."""
        from trtforge.manifest import read_manifest, verified_text_config

        manifest = read_manifest(artifact)
        config = verified_text_config(artifact, manifest)
        if config is None:
            return None
        return cls(artifact, config, profile, task=manifest["model"]["task"], threads=threads)

    def __init__(self, artifact: Path, config: dict[str, Any], profile: dict[str, tuple[int, int, int]], *,
                 task: str = "feature-extraction", threads: int | None = None) -> None:
        from trtforge.runtime.tokenize import FastTokenizer
        from trtforge.tokens import LABEL_TASKS

        self.config, self.artifact = config, artifact
        self.dense: list | None = None  # sentence-transformers' Dense layers, loaded on first use
        self.tokenizer = FastTokenizer(artifact / config["tokenizer"], config["max_length"], threads=threads)
        self.labels = task in LABEL_TASKS  # the top label and its score, computed beside the logits
        self.max_batch = profile["batch"][2]
        self.sequence = profile["sequence"]

    def prepare(self, texts: list[str]) -> tuple[int, list[tuple[Any, Any, dict[str, Any]]]]:
        """Token ids in length-sorted batches: (count, [(rows, mask, feed)])."""
        return self.batches(self.tokenizer.encode(texts))

    def batches(self, tokens: Any) -> tuple[int, list[tuple[Any, Any, dict[str, Any]]]]:
        import numpy as np

        order = np.argsort(tokens.lengths, kind="stable")
        batches = []
        for part in np.array_split(order, max(1, -(-len(tokens) // self.max_batch))):
            width = bucket_for(int(tokens.lengths[part].max()), self.sequence)
            batches.append((part, *tokens.padded(part, width, self.config["inputs"])))
        return len(tokens), batches

    def finish(self, prepared: tuple[int, list[tuple[Any, Any, dict[str, Any]]]], run: Any) -> dict[str, Any]:
        import numpy as np

        count, batches = prepared
        width_all = max(int(mask.sum(1).max()) for _, mask, _ in batches)
        results: dict[str, Any] = {}
        for part, mask, feed in batches:
            outputs = run(feed)  # left where computed
            pooling = self.config.get("pooling")
            if pooling:  # on the device: only (rows, hidden) crosses to the host
                hidden = next(iter(outputs.values()))
                if self.dense is None:  # the Dense layers' weights, once, where the states are
                    self.dense = load_dense(self.artifact, pooling, device=getattr(hidden, "device", "cpu"))
                outputs = {"embedding": pool(hidden, mask, pooling, self.dense)}
            elif self.labels:
                outputs = {**outputs, **top_label(next(iter(outputs.values())))}
            outputs = {k: _host_array(v) for k, v in outputs.items()}
            for name, value in outputs.items():
                if value.ndim > 2:  # per token: zeros past each text's end, whatever the batch's width
                    value = value * mask.reshape(*mask.shape, *([1] * (value.ndim - 2))).astype(value.dtype)
                    value = value[:, :width_all]
                if name not in results:
                    shape = (count, *(width_all if i == 0 and value.ndim > 2 else n
                                      for i, n in enumerate(value.shape[1:])))
                    results[name] = np.zeros(shape, dtype=value.dtype)
                results[name][(part, *(slice(0, n) for n in value.shape[1:]))] = value
        return results


def _host_array(value: Any) -> Any:
    """A result on the host as numpy: floating tensors in FP32, integer ones (labels) as they are."""
    if not hasattr(value, "cpu"):
        return value
    return (value.float() if value.is_floating_point() else value).cpu().numpy()


def top_label(logits: Any) -> dict[str, Any]:
    """The classifier's top label per row and its softmax probability, where the logits are (a
    worker's GPU: two small vectors cross to the host, beside the logits)."""
    import torch

    probabilities = torch.as_tensor(logits).float().softmax(-1)
    score, label = probabilities.max(-1)
    return {"label": label.to(torch.int64), "score": score}


class _Staging:
    """Pinned host buffers, kept per tensor name and reused while the shape fits: allocating pinned
    memory costs more than the copy itself, so it is done once, not per request. An input buffer is
    refilled only once the copy that last read it has fired its event (runs are asynchronous)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, str], Any] = {}
        self.read: dict[str, Any] = {}  # input name -> event of the last copy out of its buffer

    def _buffer(self, key: tuple[str, str], shape: tuple[int, ...], dtype: Any) -> Any:
        import torch

        numel = 1
        for size in shape:
            numel *= size
        buffer = self.buffers.get(key)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = torch.empty(max(numel, 1), dtype=dtype, pin_memory=True)
            self.buffers[key] = buffer
        return buffer[:numel].view(shape)

    def to_device(self, name: str, array: Any, device: str) -> Any:
        import torch

        tensor = torch.from_numpy(array)
        if device == "cpu":
            return tensor
        if name in self.read:
            self.read.pop(name).synchronize()
        pinned = self._buffer(("in", name), tuple(tensor.shape), tensor.dtype)
        pinned.copy_(tensor)
        on_device = pinned.to(device, non_blocking=True)
        self.read[name] = torch.cuda.Event()
        self.read[name].record()
        return on_device

    def to_host(self, name: str, tensor: Any) -> Any:
        import torch

        if tensor.device.type == "cpu":
            return tensor.numpy().copy()
        pinned = self._buffer(("out", name), tuple(tensor.shape), tensor.dtype)
        pinned.copy_(tensor, non_blocking=True)
        torch.cuda.current_stream(tensor.device).synchronize()
        return pinned.numpy().copy()  # the buffer is reused by the next chunk

"""The runtime: an artifact served on a set of devices, one engine and one worker process per device.

    with Runtime("engines/bert-base-classifier", devices="all") as rt:
        logits = rt.run({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})["logits"]

Processes, not threads: a process per device never serialises on the GIL, and a crash in one
engine (a library abort, an out-of-memory kill) takes down only its worker. A batch larger than
the devices can take at once is split into chunks within each engine's profile and spread over the
live workers; results come back in input order. Errors in a worker reach the caller as
WorkerError (WorkerDied, RequestTimeout); the other workers keep serving; nothing waits forever.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from trtforge.errors import CompatibilityError, ShapeError, TrtforgeError
from trtforge.loader import check_shapes
from trtforge.runtime.batching import as_array, bucket_for, concatenate_padded, real_lengths
from trtforge.store import read_manifest


class WorkerError(TrtforgeError):
    """A request failed inside a worker (bad input, out of memory, an engine error)."""

    exit_code = 1


class WorkerDied(WorkerError):
    """The worker process serving (part of) a request exited."""


class RequestTimeout(WorkerError):
    """No answer within the runtime's timeout."""


@dataclass
class _Request:
    future: Future
    chunks: list[Any]
    deadline: float
    slots: dict[int, int] = field(default_factory=dict)  # chunk -> worker slot
    rows: list[np.ndarray] | None = None  # per chunk, the request rows it holds (length-aware batches)
    text: bool = False  # a submit_text request: chunks are consecutive parts of the texts
    submitted: float = 0.0  # time.monotonic() when submit was called
    queued: dict[int, float] = field(default_factory=dict)  # chunk -> time.monotonic() just before its put
    mask: np.ndarray | None = None  # real positions of a length-aware request
    shape: dict[str, tuple[int, ...]] | None = None  # per output, the full result's shape

    @property
    def remaining(self) -> int:
        return sum(c is None for c in self.chunks)


@dataclass
class _Worker:
    slot: int
    device: str
    process: Any
    requests: Any
    responses: Any  # the read end of this worker's own pipe
    info: dict[str, Any] = field(default_factory=dict)
    outstanding: set[tuple[int, int]] = field(default_factory=set)
    alive: bool = True


def resolve_devices(devices: str | int | Sequence[int | str]) -> list[str]:
    """"all" (every GPU), "cpu", an int N (N CPU workers, for tests), or a list of GPU indices/names."""
    if devices == "all":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CompatibilityError("devices='all' but this machine has no GPU; use devices='cpu' "
                                     "with an artifact that has an onnxruntime-cpu engine")
        return [f"cuda:{i}" for i in range(count)]
    if devices == "cpu":
        return ["cpu"]
    if isinstance(devices, bool) or (isinstance(devices, int) and devices < 1):
        raise ValueError(f"devices={devices!r}: give 'all', 'cpu', a number of CPU workers >= 1, or GPU indices")
    if isinstance(devices, int):
        return ["cpu"] * devices
    if isinstance(devices, str) or not devices:
        raise ValueError(f"devices={devices!r}: give 'all', 'cpu', a number of CPU workers >= 1, or GPU indices")
    for d in devices:
        if isinstance(d, bool) or (isinstance(d, int) and d < 0):
            raise ValueError(f"devices: {d!r} is not a GPU index (0, 1, ...)")
    return [d if isinstance(d, str) else f"cuda:{d}" for d in devices]


CLOSE_GRACE_S = 3.0  # how long idle workers get to exit by themselves when the runtime closes


class Runtime:
    """An artifact served on a set of devices (see the module's docstring).

    `batching="length"` (the default for host outputs): within a request, rows are grouped by their
    real length (from the attention mask), each chunk is cut to its longest row (rounded up to a
    bucket: see buckets()), and results come back in input order in the request's shape, with
    zeros at padded positions of per-token outputs (positions no consumer reads). `"fixed"` keeps
    every row at the request's length. `warm`: (batch, sequence) shapes each worker runs once before
    the runtime is ready, so first requests do not pay the engine's per-shape set-up; `rt.startup_s`
    says how long start-up took.
    """

    def __init__(self, artifact: str | Path, devices: str | int | Sequence[int | str] = "all", *,
                 backend: str | None = None, outputs: Literal["host", "device"] = "host",
                 batching: Literal["length", "fixed"] | None = None, warm: Sequence[tuple[int, int]] = (),
                 timeout_s: float = 60.0, start_timeout_s: float = 600.0) -> None:
        import torch.multiprocessing as tmp

        started = time.perf_counter()
        self.artifact = Path(artifact)
        manifest = read_manifest(self.artifact)
        self.manifest = manifest
        self.inputs = manifest["io"]["inputs"]
        self.output_specs = {o["name"]: o for o in manifest["io"]["outputs"]}
        self.sequence_inputs = {s["name"] for s in self.inputs if "sequence" in s["shape"]}
        self.profile = {k: tuple(v) for k, v in manifest["shapes"].items()}
        self.max_batch = self.profile["batch"][2]
        self.outputs_on, self.timeout_s = outputs, timeout_s
        self.batching = batching or ("length" if outputs == "host" else "fixed")
        if self.batching not in ("length", "fixed"):
            raise ValueError(f"batching must be 'length' or 'fixed', got {self.batching!r}")
        if self.batching == "length" and outputs == "device":
            raise ValueError("length-aware batching returns host outputs in input order; use outputs='host' "
                             "or batching='fixed'")
        self.text = _text_config(self.artifact, manifest)
        self.devices = resolve_devices(devices)
        context = tmp.get_context("spawn")  # CUDA cannot be used in forked children
        self._workers: list[_Worker] = []
        for slot, device in enumerate(self.devices):
            requests = context.Queue()
            # One pipe per worker for its answers: a shared queue's write lock, held by a worker that
            # is killed mid-send, would block every other worker for good.
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=_serve, daemon=True, name=f"trtforge-worker-{slot}",
                                      args=(slot, str(self.artifact), device, backend, outputs, requests, writer,
                                            [tuple(w) for w in warm]))
            process.start()
            writer.close()  # the worker holds the only write end: its exit shows as EOF here
            self._workers.append(_Worker(slot, device, process, requests, reader))
        self._requests: dict[int, _Request] = {}
        self._timings: collections.deque[dict[str, float]] = collections.deque(maxlen=100_000)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._wait_ready(start_timeout_s)
        except BaseException:
            self.close()
            raise
        self._collector = threading.Thread(target=self._collect, name="trtforge-collector", daemon=True)
        self._collector.start()
        self.startup_s = round(time.perf_counter() - started, 3)

    # --- start-up -------------------------------------------------------------------------------------
    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = {w.slot for w in self._workers}
        while waiting:
            pending = [self._workers[slot] for slot in waiting]
            for worker, message in self._receive(pending, timeout=min(1.0, max(0.1, deadline - time.monotonic()))):
                if message is None:
                    worker.process.join(timeout=5)  # its exit code, not None
                    raise WorkerDied(f"worker for {worker.device} exited while loading "
                                     f"(exit code {worker.process.exitcode})")
                kind, slot, payload = message
                if kind == "failed":
                    raise WorkerError(f"worker for {worker.device} could not load the engine: {payload}")
                worker.info = payload
                waiting.discard(slot)
            if waiting and time.monotonic() > deadline:
                raise RequestTimeout(f"workers for {sorted(waiting)} not ready after {timeout_s:.0f} s")

    @staticmethod
    def _receive(workers: list[_Worker], timeout: float) -> list[tuple[_Worker, Any]]:
        """Messages from whichever workers have one; (worker, None) for a worker whose pipe closed."""
        from multiprocessing.connection import wait

        by_reader = {id(w.responses): w for w in workers}
        received = []
        for reader in wait([w.responses for w in workers], timeout=timeout):
            worker = by_reader[id(reader)]
            try:
                received.append((worker, reader.recv()))
            except Exception:  # EOF, or a message cut short by the worker's death: the pipe is done
                received.append((worker, None))
        return received

    @property
    def workers(self) -> list[dict[str, Any]]:
        return [{"slot": w.slot, "device": w.device, "alive": w.alive, **w.info} for w in self._workers]

    # --- requests -------------------------------------------------------------------------------------
    def submit(self, batch: Mapping[str, Any]) -> Future:
        """Send a batch of named tensors (numpy or torch); the future's result is a dict of outputs
        in input order: numpy arrays (outputs="host"), or a list of per-chunk dicts of torch tensors
        on the devices that computed them (outputs="device")."""
        if self._closed:
            raise WorkerError("the runtime is closed")
        submitted = time.monotonic()
        arrays = self._inputs(batch)
        rows = self._check(arrays)
        live = [w for w in self._workers if w.alive]
        if not live:
            raise WorkerDied("every worker has exited; create a new Runtime")
        lengths = real_lengths(arrays) if self.batching == "length" else None
        groups = self._groups(rows, len(live), lengths)
        future: Future = Future()
        request_id = next(self._ids)
        with self._lock:
            request = _Request(future, [None] * len(groups), time.monotonic() + self.timeout_s, submitted=submitted)
            if lengths is not None:
                request.rows = [index for index, _ in groups]
                request.shape = self._result_shapes(arrays, rows)
                request.mask = arrays["attention_mask"] != 0
            self._requests[request_id] = request
            for chunk, (index, length) in enumerate(groups):
                worker = min(live, key=lambda w: len(w.outstanding))
                worker.outstanding.add((request_id, chunk))
                request.slots[chunk] = worker.slot
                request.queued[chunk] = time.monotonic()
                worker.requests.put(("run", request_id, chunk, self._slice(arrays, index, length)))
        return future

    def _groups(self, rows: int, workers: int, lengths: np.ndarray | None) -> list[tuple[Any, int | None]]:
        """Chunks of the request as (rows, sequence length to cut to): at most the profile's max batch,
        at least its min (so every chunk fits a profile a single engine accepts), spread over the
        workers; rows sorted by length and each chunk cut to its longest (bucketed) where `lengths`."""
        lo_batch = self.profile["batch"][0]
        count = max(math.ceil(rows / self.max_batch), min(workers, max(1, rows // lo_batch)))
        order = np.argsort(lengths, kind="stable") if lengths is not None else np.arange(rows)
        groups: list[tuple[Any, int | None]] = []
        start = 0
        for part in np.array_split(order, count):
            if lengths is None:  # contiguous rows, kept at the request's length
                groups.append((slice(start, start + len(part)), None))
                start += len(part)
            else:
                groups.append((part, bucket_for(int(lengths[part].max()), self.profile["sequence"])))
        return groups

    def _slice(self, arrays: dict[str, np.ndarray], index: Any, length: int | None) -> dict[str, np.ndarray]:
        if length is None:
            return {k: v[index] for k, v in arrays.items()}
        return {k: np.ascontiguousarray(v[index][:, :length] if self._has_sequence(k) else v[index])
                for k, v in arrays.items()}

    def _has_sequence(self, name: str) -> bool:
        return name in self.sequence_inputs

    def _result_shapes(self, arrays: dict[str, np.ndarray], rows: int) -> dict[str, tuple[int, ...]]:
        """Each output's shape for the whole request: its sequence axis at the request's length."""
        length = next(v.shape[1] for k, v in arrays.items() if self._has_sequence(k))
        shapes = {}
        for name, spec in self.output_specs.items():
            shapes[name] = tuple(rows if d == "batch" else length if d == "sequence" else d for d in spec["shape"])
        return shapes

    def submit_text(self, texts: Sequence[str]) -> Future:
        """Send strings; the workers tokenize them (in parallel, with the artifact's tokenizer and its
        validated truncation limit), run them in length-sorted batches, and apply the artifact's
        pooling. The future's result: {"embedding": (n, hidden)} where the model has pooling, else the
        model's outputs in text order (per-token outputs padded with zeros to the longest text)."""
        if self._closed:
            raise WorkerError("the runtime is closed")
        if self.text is None:
            raise WorkerError(f"{self.artifact} carries no tokenizer (no text.json); send token ids with run()")
        submitted = time.monotonic()
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("encode() takes a non-empty list of strings")
        live = [w for w in self._workers if w.alive]
        if not live:
            raise WorkerDied("every worker has exited; create a new Runtime")
        parts = [p for p in np.array_split(np.arange(len(texts)), len(live)) if len(p)]
        future: Future = Future()
        request_id = next(self._ids)
        with self._lock:
            request = _Request(future, [None] * len(parts), time.monotonic() + self.timeout_s)
            request.text = True
            self._requests[request_id] = request
            for chunk, part in enumerate(parts):
                worker = min(live, key=lambda w: len(w.outstanding))
                worker.outstanding.add((request_id, chunk))
                request.slots[chunk] = worker.slot
                request.submitted, request.queued[chunk] = submitted, time.monotonic()
                worker.requests.put(("encode", request_id, chunk, [texts[i] for i in part]))
        return future

    def encode(self, texts: Sequence[str], timeout: float | None = None) -> dict[str, np.ndarray]:
        """Text in, the model's outputs (or pooled embeddings) out: see submit_text."""
        return self.submit_text(texts).result(timeout=timeout if timeout is not None else self.timeout_s + 5)

    def run(self, batch: Mapping[str, Any], timeout: float | None = None) -> Any:
        return self.submit(batch).result(timeout=timeout if timeout is not None else self.timeout_s + 5)

    def _inputs(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The request as arrays of the engine's dtypes, or a clear error at the call: unknown or
        misspelled names, types that cannot be cast safely, token ids outside the vocabulary."""
        import difflib

        if not isinstance(batch, Mapping):
            raise TypeError(f"a request is a dict of named inputs ({', '.join(s['name'] for s in self.inputs)}), "
                            f"got {type(batch).__name__}")
        specs = {s["name"]: s for s in self.inputs}
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
        vocab = self.manifest["model"].get("vocab_size")
        ids = arrays.get("input_ids")
        if vocab and ids is not None and ids.size:
            lowest, highest = int(ids.min()), int(ids.max())
            if lowest < 0 or highest >= vocab:
                bad = lowest if lowest < 0 else highest
                raise ShapeError(f"input_ids holds {bad}, outside the vocabulary [0, {vocab}); the model would "
                                 "read past its embedding table")
        return arrays

    def _check(self, arrays: dict[str, np.ndarray]) -> int:
        rows = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
        if len(rows) != 1:
            raise ShapeError(f"inputs disagree on the batch size: {sorted(rows)}")
        lengths = {k: a.shape[1] for k, a in arrays.items() if self._has_sequence(k) and a.ndim > 1}
        if len(set(lengths.values())) > 1:
            raise ShapeError(f"inputs disagree on the sequence length: {lengths}")
        count = rows.pop()
        lo_batch = self.profile["batch"][0]
        if count < lo_batch:
            raise ShapeError(f"batch {count} is below the engine's profile min {lo_batch}; send at least "
                             f"{lo_batch} rows or rebuild with a smaller [shapes] batch min")
        # Each chunk must fit the profile: check one row against every other axis.
        check_shapes(self.inputs, {**self.profile, "batch": (1, 1, self.max_batch)},
                     {k: v[:1] for k, v in arrays.items()})
        return count

    # --- results --------------------------------------------------------------------------------------
    def _collect(self) -> None:
        while not self._closed:
            live = [w for w in self._workers if w.alive]
            if not live:
                time.sleep(0.1)
            received = self._receive(live, timeout=0.1) if live else []
            with self._lock:
                for _, message in received:
                    if message is not None:  # a closed pipe is handled by _reap, from the exit code
                        self._handle(message)
                self._reap()

    def _handle(self, message: tuple) -> None:
        kind, request_id, chunk, slot, payload, *rest = message
        self._workers[slot].outstanding.discard((request_id, chunk))
        request = self._requests.get(request_id)
        if rest and request is not None:
            self._record(request, chunk, rest[0])
        if request is None or request.future.done():
            return  # timed out or failed earlier
        if kind == "error":
            self._fail(request_id, WorkerError(f"worker {slot} ({self._workers[slot].device}): {payload}"))
            return
        request.chunks[chunk] = payload
        if request.remaining == 0:
            del self._requests[request_id]
            request.future.set_result(self._assemble(request))

    def _record(self, request: _Request, chunk: int, worker: dict[str, float]) -> None:
        """One chunk's time, phase by phase (see time_breakdown)."""
        queued = request.queued[chunk]
        record = {"enqueue_ms": 1e3 * (queued - request.submitted),
                  "queue_ms": 1e3 * (worker["received"] - queued),
                  "return_ms": 1e3 * (time.monotonic() - worker["sent"])}
        record.update({k: v for k, v in worker.items() if k.endswith("_ms")})
        self._timings.append(record)

    def time_breakdown(self, *, reset: bool = False) -> dict[str, float]:
        """Median milliseconds per chunk since the start (or the last reset), by phase: enqueue (the
        caller splits and queues the request), queue (waiting in the worker's queue, and the pipe),
        inputs (to the device), engine, outputs (back to the host), return (the result's trip back to
        the caller); for text requests, worker (tokenization, chunks and pooling together)."""
        import statistics

        records = list(self._timings)
        if reset:
            self._timings.clear()
        keys = sorted({k for r in records for k in r})
        return {"chunks": len(records), **{k: round(statistics.median(r[k] for r in records if k in r), 4) for k in keys}}

    def _assemble(self, request: _Request) -> Any:
        chunks = request.chunks
        if request.text:  # per-worker parts in text order; per-token outputs padded to the longest
            return {name: concatenate_padded([c[name] for c in chunks]) for name in chunks[0]}
        if self.outputs_on == "device":
            return chunks
        if request.rows is None:
            return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
        results = {}
        for name, shape in request.shape.items():  # scatter rows back into input order, unpadding
            full = np.zeros(shape, dtype=chunks[0][name].dtype)
            for rows, chunk in zip(request.rows, chunks):
                part = chunk[name]
                full[(rows, *(slice(0, n) for n in part.shape[1:]))] = part
            if "sequence" in self.output_specs[name]["shape"]:
                full[~request.mask] = 0  # padded positions: the same (meaningless) zeros whatever the cut
            results[name] = full
        return results

    def _fail(self, request_id: int, error: Exception) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None and not request.future.done():
            request.future.set_exception(error)

    def _reap(self) -> None:
        """Fail what a dead worker held, and what has waited past its deadline."""
        for worker in self._workers:
            if worker.alive and not worker.process.is_alive():
                worker.alive = False
                for request_id, _ in list(worker.outstanding):
                    self._fail(request_id, WorkerDied(
                        f"worker {worker.slot} ({worker.device}) exited with code {worker.process.exitcode} "
                        "during the request; the other workers keep serving"))
                worker.outstanding.clear()
        now = time.monotonic()
        for request_id, request in list(self._requests.items()):
            if now > request.deadline:
                slots = sorted(set(request.slots.values()))
                self._fail(request_id, RequestTimeout(f"no answer within {self.timeout_s:.0f} s from worker(s) "
                                                      f"{slots}"))

    # --- shutdown -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every worker and release its device; pending requests fail."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            # The queue's feeder thread may be blocked on a full pipe to a stopped or dead worker:
            # never let interpreter exit wait on it.
            worker.requests.cancel_join_thread()
            if worker.process.is_alive() and not worker.outstanding:
                try:
                    worker.requests.put(None)
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + CLOSE_GRACE_S  # one grace period for all, not one per worker
        for worker in self._workers:
            if not worker.outstanding:
                worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():  # busy with work nobody will read, stopped, or slow to exit
                worker.process.kill()
                worker.process.join(timeout=5)
            worker.requests.close()
        for request_id in list(getattr(self, "_requests", {})):
            self._fail(request_id, WorkerError("the runtime was closed"))

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(*args: Any) -> None:
    from trtforge.runtime.worker import serve

    serve(*args)


def _text_config(artifact: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    import json

    rel = manifest["roles"].get("text-config")
    return json.loads((artifact / rel).read_text()) if rel else None

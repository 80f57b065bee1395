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
    if isinstance(devices, int):
        return ["cpu"] * devices
    return [d if isinstance(d, str) else f"cuda:{d}" for d in devices]


class Runtime:
    def __init__(self, artifact: str | Path, devices: str | int | Sequence[int | str] = "all", *,
                 backend: str | None = None, outputs: Literal["host", "device"] = "host",
                 timeout_s: float = 60.0, start_timeout_s: float = 600.0) -> None:
        import torch.multiprocessing as tmp

        self.artifact = Path(artifact)
        manifest = read_manifest(self.artifact)
        self.inputs = manifest["io"]["inputs"]
        self.profile = {k: tuple(v) for k, v in manifest["shapes"].items()}
        self.max_batch = self.profile["batch"][2]
        self.outputs_on, self.timeout_s = outputs, timeout_s
        self.devices = resolve_devices(devices)
        context = tmp.get_context("spawn")  # CUDA cannot be used in forked children
        self._workers: list[_Worker] = []
        for slot, device in enumerate(self.devices):
            requests = context.Queue()
            # One pipe per worker for its answers: a shared queue's write lock, held by a worker that
            # is killed mid-send, would block every other worker for good.
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=_serve, daemon=True, name=f"trtforge-worker-{slot}",
                                      args=(slot, str(self.artifact), device, backend, outputs, requests, writer))
            process.start()
            writer.close()  # the worker holds the only write end: its exit shows as EOF here
            self._workers.append(_Worker(slot, device, process, requests, reader))
        self._requests: dict[int, _Request] = {}
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

    # --- start-up -------------------------------------------------------------------------------------
    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = {w.slot for w in self._workers}
        while waiting:
            pending = [self._workers[slot] for slot in waiting]
            for worker, message in self._receive(pending, timeout=min(1.0, max(0.1, deadline - time.monotonic()))):
                if message is None:
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
        arrays = {name: _numpy(value) for name, value in batch.items()}
        rows = self._check(arrays)
        live = [w for w in self._workers if w.alive]
        if not live:
            raise WorkerDied("every worker has exited; create a new Runtime")
        size = min(self.max_batch, math.ceil(rows / len(live)))
        bounds = [(start, min(start + size, rows)) for start in range(0, rows, size)]
        future: Future = Future()
        request_id = next(self._ids)
        with self._lock:
            request = _Request(future, [None] * len(bounds), time.monotonic() + self.timeout_s)
            self._requests[request_id] = request
            for chunk, (lo, hi) in enumerate(bounds):
                worker = min(live, key=lambda w: len(w.outstanding))
                worker.outstanding.add((request_id, chunk))
                request.slots[chunk] = worker.slot
                worker.requests.put(("run", request_id, chunk, {k: v[lo:hi] for k, v in arrays.items()}))
        return future

    def run(self, batch: Mapping[str, Any], timeout: float | None = None) -> Any:
        return self.submit(batch).result(timeout=timeout if timeout is not None else self.timeout_s + 5)

    def _check(self, arrays: dict[str, np.ndarray]) -> int:
        rows = {a.shape[0] for a in arrays.values()}
        if len(rows) != 1:
            raise ShapeError(f"inputs disagree on the batch size: {sorted(rows)}")
        # Each chunk must fit the profile: check one row against every other axis.
        check_shapes(self.inputs, {**self.profile, "batch": (1, 1, self.max_batch)},
                     {k: v[:1] for k, v in arrays.items()})
        return rows.pop()

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
        kind, request_id, chunk, slot, payload = message
        self._workers[slot].outstanding.discard((request_id, chunk))
        request = self._requests.get(request_id)
        if request is None or request.future.done():
            return  # timed out or failed earlier
        if kind == "error":
            self._fail(request_id, WorkerError(f"worker {slot} ({self._workers[slot].device}): {payload}"))
            return
        request.chunks[chunk] = payload
        if request.remaining == 0:
            del self._requests[request_id]
            request.future.set_result(self._assemble(request.chunks))

    def _assemble(self, chunks: list[dict[str, Any]]) -> Any:
        if self.outputs_on == "device":
            return chunks
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

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
            if worker.process.is_alive():
                try:
                    worker.requests.put(None)
                except (OSError, ValueError):
                    pass
        for worker in self._workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
        for request_id in list(getattr(self, "_requests", {})):
            self._fail(request_id, WorkerError("the runtime was closed"))

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(*args: Any) -> None:
    from trtforge.runtime.worker import serve

    serve(*args)


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.ascontiguousarray(value)

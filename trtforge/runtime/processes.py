"""The caller's side of the runtime's worker processes (one per device; what runs inside them is
worker.py): started with their shared memory and pipes, waited for until their engines are loaded,
and stopped."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from trtforge.checks import device_name
from trtforge.errors import CompatibilityError, TrtforgeError
from trtforge.runtime.shm import SLOTS, Arena, DeviceHeap


class WorkerError(TrtforgeError):
    """A request failed inside a worker (bad input, out of memory, an engine error)."""

    exit_code = 1


class WorkerDied(WorkerError):
    """The worker process serving (part of) a request exited."""


class RequestTimeout(WorkerError):
    """No answer within the runtime's timeout."""


@dataclass
class Worker:
    """A worker process as the caller sees it: its pipes, its slots (free, or held by a chunk) and
    the thread that receives its answers."""

    index: int
    device: str
    process: Any
    requests: Any  # the write end of this worker's request pipe
    responses: Any  # the read end of this worker's own answer pipe
    inputs: Arena
    outputs: Arena
    info: dict[str, Any] = field(default_factory=dict)
    free: list[int] = field(default_factory=lambda: list(range(SLOTS)))
    # (request id, chunk) -> (slot, request), from the chunk's send until its answer
    outstanding: dict[tuple[int, int], tuple[int, Any]] = field(default_factory=dict)
    alive: bool = True
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    receiver: threading.Thread | None = None
    device_heap: DeviceHeap | None = None  # device outputs: the worker's results memory, mapped here
    local: Any = None  # in-process (worker.InProcess): no process, no pipes; chunks run in the sender's thread


MAX_CPU_WORKERS = 1024


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
    if isinstance(devices, int) and devices > MAX_CPU_WORKERS:
        raise ValueError(f"devices={devices}: at most {MAX_CPU_WORKERS} CPU workers")
    if isinstance(devices, int):
        return ["cpu"] * devices
    if isinstance(devices, str) or not isinstance(devices, Sequence) or not devices:
        raise ValueError(f"devices={devices!r}: give 'all', 'cpu', a number of CPU workers >= 1, or GPU indices")
    names = []
    for d in devices:
        if isinstance(d, bool) or not isinstance(d, (int, str)) or (isinstance(d, int) and d < 0):
            raise ValueError(f"devices: {d!r} is not a GPU index (0, 1, ...) or a device name ('cpu', 'cuda:N')")
        names.append(device_name(d) if isinstance(d, str) else f"cuda:{d}")
    return names


def cpu_shares(devices: Sequence[str], cores: Sequence[int]) -> list[tuple[int, ...] | None]:
    """Each CPU worker's share of the caller's cores (None for GPU workers): disjoint, as even as
    they divide, one core each (round robin) where there are more workers than cores. A CPU engine
    then runs as many threads as its share (onnxruntime sizes its pool from the worker's affinity),
    instead of every worker running one thread per core of the machine."""
    workers = [i for i, device in enumerate(devices) if device == "cpu"]
    shares: list[tuple[int, ...] | None] = [None] * len(devices)
    cores = sorted(cores)
    if not workers or not cores:
        return shares
    size = max(1, len(cores) // len(workers))
    for rank, i in enumerate(workers):
        start = rank * size if len(workers) <= len(cores) else rank % len(cores)
        shares[i] = tuple(cores[start:start + size])
    return shares


CLOSE_GRACE_S = 3.0  # how long idle workers get to exit by themselves when the runtime closes


def start_worker(index: int, device: str, artifact: str, *, backend: str | None, outputs: str,
                 warm: Sequence[tuple[int, int]], input_bytes: int, output_bytes: int, heap: Arena | None,
                 context: Any, device_heap_bytes: int = 0, cores: tuple[int, ...] | None = None,
                 slots: int = SLOTS) -> Worker:
    """One worker process for `device`, with its input and output slots and its two pipes (and, for
    device outputs on a GPU, a device heap of `device_heap_bytes`, which the worker allocates)."""
    inputs, outputs_arena = _arenas(index, input_bytes, output_bytes, slots)
    requests_reader, requests_writer = context.Pipe(duplex=False)
    # One answer pipe per worker: a shared queue's write lock, held by a worker that is killed
    # mid-send, would block every other worker for good.
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_serve, daemon=True, name=f"trtforge-worker-{index}",
                              args=(index, artifact, device, backend, outputs, requests_reader, writer,
                                    [tuple(w) for w in warm],
                                    (inputs.handle(), outputs_arena.handle(), heap.handle() if heap is not None else None),
                                    device_heap_bytes, cores))
    process.start()
    writer.close()  # the worker holds the only write end: its exit shows as EOF here
    requests_reader.close()
    return Worker(index, device, process, requests_writer, reader, inputs, outputs_arena, free=list(range(slots)))


def start_in_process(index: int, device: str, artifact: str, *, backend: str | None, outputs: str,
                     warm: Sequence[tuple[int, int]], input_bytes: int, output_bytes: int, heap: Arena | None,
                     slots: int = SLOTS) -> Worker:
    """A worker in the caller's own process (see worker.InProcess), over the same kind of slots."""
    from trtforge.runtime.worker import InProcess

    inputs, outputs_arena = _arenas(index, input_bytes, output_bytes, slots)
    try:
        local = InProcess(index, artifact, device, backend, outputs, [tuple(w) for w in warm], inputs, outputs_arena, heap)
    except Exception as e:
        inputs.close()
        outputs_arena.close()
        raise WorkerError(f"could not load the engine for {device}: {type(e).__name__}: {e}") from e
    return Worker(index, device, None, None, None, inputs, outputs_arena, info=local.info, local=local,
                  free=list(range(slots)))


def _arenas(index: int, input_bytes: int, output_bytes: int, slots: int) -> tuple[Arena, Arena]:
    """A worker's input and output slots."""
    return (Arena(input_bytes, slots, name=f"trtforge-{index}-inputs"),
            Arena(output_bytes, slots, name=f"trtforge-{index}-outputs"))


def wait_ready(workers: list[Worker], timeout_s: float) -> None:
    """Until every worker has loaded its engine (and warmed its shapes), or the first failure."""
    from multiprocessing.connection import wait

    deadline = time.monotonic() + timeout_s
    waiting = {w.index: w for w in workers}
    while waiting:
        by_reader = {id(w.responses): w for w in waiting.values()}
        timeout = min(1.0, max(0.1, deadline - time.monotonic()))
        for reader in wait([w.responses for w in waiting.values()], timeout=timeout):
            worker = by_reader[id(reader)]
            try:
                kind, index, payload = reader.recv()
            except Exception:  # EOF, or a message cut short by the worker's death
                worker.process.join(timeout=5)  # its exit code, not None
                raise WorkerDied(f"worker for {worker.device} exited while loading "
                                 f"(exit code {worker.process.exitcode})") from None
            if kind == "failed":
                raise WorkerError(f"worker for {worker.device} could not load the engine: {payload}")
            shared = payload.pop("device_heap", None)  # mapped here, once (CUDA IPC)
            worker.device_heap = DeviceHeap(shared) if shared is not None else None
            worker.info = payload
            waiting.pop(index)
        if waiting and time.monotonic() > deadline:
            raise RequestTimeout(f"workers for {sorted(waiting)} not ready after {timeout_s:.0f} s")


def stop_workers(workers: list[Worker]) -> None:
    """Idle workers are asked to exit and get one grace period (for all of them together); busy,
    stopped or slow ones are killed. Then their pipes and slots are closed (in-process workers:
    their engine and slots)."""
    for worker in [w for w in workers if w.local is not None]:
        worker.local.close()
        worker.inputs.close()
        worker.outputs.close()
    workers = [w for w in workers if w.local is None]
    for worker in workers:
        if worker.process.is_alive() and not worker.outstanding and worker.send_lock.acquire(timeout=1):
            try:
                worker.requests.send(None)  # at most SLOTS small descriptors ahead of it: never blocks
            except (OSError, ValueError):
                pass
            finally:
                worker.send_lock.release()
    deadline = time.monotonic() + CLOSE_GRACE_S
    for worker in workers:
        if not worker.outstanding:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5)
    for worker in workers:
        if worker.receiver is not None:
            worker.receiver.join(timeout=5)
        worker.requests.close()
        worker.responses.close()
        worker.inputs.close()
        worker.outputs.close()


def _serve(*args: Any) -> None:
    from trtforge.runtime.worker import serve

    serve(*args)



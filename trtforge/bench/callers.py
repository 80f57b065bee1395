"""Several caller processes in front of the same devices, as a service with several web-server
worker processes runs: each process opens its own Runtime over every device (a worker and an engine
per device, per process) and submits its share of the requests. A runtime belongs to the process
that created it; processes do not attach to one another's. Measures whether P processes together
keep the devices busier than one process can, where one caller process is the limit (fast engines,
small batches: see the bench's caller_cpu_percent).

    from trtforge.bench.callers import measure_processes
    measure_processes("engines/minilm", devices=2, rows=64, sequence=128, processes=2, iterations=1000)
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

START_TIMEOUT_S = 900.0  # every process's runtime started (engines loaded, shapes warmed)


def feed_for(manifest: dict[str, Any], rows: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed random token ids within the model's vocabulary, no padding, for the artifact's inputs."""
    from trtforge.bench.harness import token_feed

    return token_feed([spec["name"] for spec in manifest["io"]["inputs"]], manifest["model"].get("vocab_size") or 1000,
                      rows, sequence, seed)


def measure_processes(artifact: str | Path, *, devices: int | list[str], rows: int, sequence: int, processes: int,
                      iterations: int, depth: int = 4, outputs: str = "host", slots: int = 4,
                      warmup: int = 20, start_timeout_s: float = START_TIMEOUT_S) -> dict[str, Any]:
    """`processes` caller processes, each with its own Runtime over `devices`, submit `iterations`
    requests of `rows` x `sequence` between them (`depth` in flight per device in each), all
    starting together. Returns the sequences per second of all of them together (rows sent over
    the span from the first start to the last end), each process's share, its caller CPU as a share
    of its wall time, and a checksum of one result per process (the same inputs: they should agree)."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes + 1)
    results = context.Queue()
    share = [iterations // processes + (i < iterations % processes) for i in range(processes)]
    children = [context.Process(target=_caller, name=f"trtforge-caller-{i}",  # (not daemonic: it starts workers)
                                args=(str(artifact), devices, rows, sequence, share[i], depth, outputs, slots, warmup,
                                      barrier, results, start_timeout_s))
                for i in range(processes)]
    for child in children:
        child.start()
    try:
        try:
            barrier.wait(timeout=start_timeout_s)  # every runtime up: the measured span starts together
        except threading.BrokenBarrierError:
            pass  # a process failed before it: its error is in the queue
        answers = []
        for _ in children:
            try:
                answer = results.get(timeout=start_timeout_s)
            except queue.Empty:
                raise RuntimeError(f"a caller process gave no answer within {start_timeout_s:.0f} s") from None
            if "error" in answer:
                raise RuntimeError(f"caller process failed: {answer['error']}")
            answers.append(answer)
    finally:
        for child in children:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
                child.join(timeout=10)
    span = max(a["end"] for a in answers) - min(a["start"] for a in answers)
    sent = sum(a["requests"] for a in answers) * rows
    return {"processes": processes, "devices": devices, "rows": rows, "sequence": sequence, "outputs": outputs,
            "slots": slots, "depth": depth, "iterations": iterations, "throughput": round(sent / span, 1),
            "span_s": round(span, 6),
            "per_process": [{k: a[k] for k in ("requests", "throughput", "caller_cpu_percent", "checksum")}
                            for a in answers]}


def _caller(artifact: str, devices: Any, rows: int, sequence: int, requests: int, depth: int, outputs: str,
            slots: int, warmup: int, barrier: Any, results: Any, start_timeout_s: float) -> None:
    from trtforge.runtime import Runtime, chunk_shapes, default_batching
    from trtforge.manifest import read_manifest

    try:
        manifest = read_manifest(Path(artifact))
        feed = feed_for(manifest, rows, sequence)
        profile = {axis: tuple(r) for axis, r in manifest["shapes"].items()}
        count = devices if isinstance(devices, int) else len(devices)
        warm = chunk_shapes(feed, profile, count, default_batching(outputs))
        with Runtime(artifact, devices=devices, outputs=outputs, warm=warm, timeout_s=600, slots=slots) as runtime:
            first = runtime.run(feed)
            checksum = _checksum(first)
            del first
            for _ in range(warmup):
                runtime.run(feed)
            barrier.wait(timeout=start_timeout_s)
            start, cpu = time.monotonic(), time.process_time()
            in_flight: list[Any] = []
            for _ in range(requests):
                if len(in_flight) >= depth * count:
                    in_flight.pop(0).result()
                in_flight.append(runtime.submit(feed))
            for future in in_flight:
                future.result()
            end, cpu = time.monotonic(), time.process_time() - cpu
        results.put({"start": start, "end": end, "requests": requests, "checksum": checksum,
                     "throughput": round(rows * requests / (end - start), 1),
                     "caller_cpu_percent": round(100 * cpu / (end - start), 1)})
    except BaseException as e:  # the parent reports it; a broken barrier frees the others
        barrier.abort()
        try:
            results.put({"error": f"{type(e).__name__}: {e}"})
        except (OSError, ValueError, queue.Full):
            pass


def _checksum(result: Any) -> float:
    """A sum over every output of one result (host arrays, or the device outputs' chunks)."""
    if isinstance(result, list):  # device outputs: per-chunk dicts of tensors
        return round(float(sum(float(t.float().sum()) for part in result for t in part.values())), 3)
    return round(float(sum(float(np.asarray(v, dtype=np.float64).sum()) for v in result.values())), 3)

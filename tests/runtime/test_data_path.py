"""The shared-memory data path (runtime/shm.py), on CPU workers: slots reused under many callers
without corrupting results, a worker killed while it holds slots, close() with work in flight, and
no shared memory left behind by close or by a caller that crashes. Anything that could hang runs
under a timeout (a subprocess, or a future's result)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.runtime.conftest import outcomes
from trtforge.runtime import Runtime, WorkerError
from trtforge.runtime.results import HEAP_ROUNDS
from trtforge.runtime.shm import SLOTS, Arena

ROOT = Path(__file__).resolve().parents[2]


def padded(rows: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq + 1, rows)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 1000, (rows, seq), dtype=np.int64) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def single_process(artifact, batch):
    """The reference: the same graph in this process, one row at a time at the request's length."""
    session = ort.InferenceSession(str(artifact / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {k: v[i:i + 1] for k, v in batch.items()})[0]
                           for i in range(len(batch["input_ids"]))])


def memfds(pid: int | str = "self") -> list[str]:
    """A process's trtforge shared memory: open descriptors and mappings. (Compare with what was
    there before a test: runtimes of earlier tests may still be waiting for the garbage collector.)"""
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return [x for x in fds + maps if "memfd:trtforge" in x]


def test_an_arena_round_trips_tensors_and_texts_in_place():
    gc.collect()
    before = set(memfds())
    arena = Arena(4096, slots=2)
    try:
        arrays = {"a": np.arange(12, dtype=np.int64).reshape(3, 4), "b": np.ones((2, 5), np.float16)}
        layout = arena.write(1, arrays)
        views = arena.views(1, layout)
        for name, array in arrays.items():
            np.testing.assert_array_equal(views[name], array)
            assert views[name].dtype == array.dtype
        assert views["a"].ctypes.data % 64 == 0 and views["b"].ctypes.data % 64 == 0
        views["a"][0, 0] = 99  # a view of the slot, not a copy
        assert arena.views(1, layout)["a"][0, 0] == 99
        assert arena.write(0, {"big": np.zeros(4096 + 1, np.uint8)}) is None  # does not fit: refused
        texts = ["plain", "", "naïve – ünïcödé ✓", "x" * 1000]
        assert arena.read_texts(0, arena.write_texts(0, texts)) == texts
        del views  # the mapping lives while views of it do
    finally:
        arena.close()
    assert set(memfds()) <= before


def test_many_caller_threads_reusing_slots_get_exactly_their_own_results(artifact):
    """Eight threads submit 240 requests of varied shapes through two workers with four slots each,
    so every slot is reused many times while earlier results are still held: every result equals
    the single-process run of its own inputs, and results already returned never change."""
    requests = {i: padded(1 + i % 7, 4 + (i * 5) % 29, seed=i) for i in range(240)}
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def caller(ids: list[int], rt: Runtime) -> None:
        try:
            futures = [(i, rt.submit(requests[i])) for i in ids]
            for i, future in futures:
                results[i] = future.result(timeout=60)["logits"]
        except BaseException as e:
            errors.append(e)

    with Runtime(artifact, devices=2, timeout_s=60) as rt:
        threads = [threading.Thread(target=caller, args=(list(range(t, 240, 8)), rt)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        held = {i: results[i].copy() for i in range(0, 240, 17)}
        for i in range(40):  # more traffic through the same slots after those results were returned
            rt.run(requests[i])
    for i, result in held.items():
        np.testing.assert_array_equal(results[i], result)
    for i, batch in requests.items():
        np.testing.assert_allclose(results[i], single_process(artifact, batch), rtol=1e-3, atol=1e-3)


def test_more_chunks_than_slots_wait_their_turn_in_order(artifact):
    """One request of 4 x SLOTS x 2 chunks on two workers: chunks queue in the caller and take slots as
    they free up; the result is in input order."""
    batch = padded(4 * SLOTS * 2 * 4, 16, seed=3)  # profile max batch 4
    with Runtime(artifact, devices=2, timeout_s=60) as rt:
        got = rt.run(batch, timeout=60)["logits"]
        breakdown = rt.time_breakdown()
    assert breakdown["chunks"] == 4 * SLOTS * 2
    np.testing.assert_allclose(got, single_process(artifact, batch), rtol=1e-3, atol=1e-3)


def test_a_worker_killed_while_holding_slots_fails_only_its_chunks_and_leaks_nothing(artifact):
    gc.collect()
    before = set(memfds())
    with Runtime(artifact, devices=2, timeout_s=30) as rt:
        victim = rt.workers[0]["pid"]
        os.kill(victim, signal.SIGSTOP)  # it holds its slots: every one filled and unanswered
        futures = [rt.submit(padded(1, 8, seed=s)) for s in range(3 * SLOTS)]
        time.sleep(0.3)
        held = len(rt._workers[0].outstanding)  # the chunks in its slots (the rest went to worker 1)
        assert 1 <= held <= SLOTS
        os.kill(victim, signal.SIGKILL)
        died = [message for message in outcomes(futures, timeout=20) if message != "ok"]
        assert len(died) == held  # exactly the chunks in the dead worker's slots
        assert [w["alive"] for w in rt.workers] == [False, True]
        batch = padded(7, 16, seed=9)
        np.testing.assert_allclose(rt.run(batch, timeout=20)["logits"], single_process(artifact, batch),
                                   rtol=1e-3, atol=1e-3)
    del futures  # results live in the runtime's shared heap while they are referenced
    gc.collect()
    assert set(memfds()) <= before


def test_close_with_requests_in_flight_fails_them_and_frees_everything(artifact):
    gc.collect()
    before = set(memfds())
    rt = Runtime(artifact, devices=2, timeout_s=30)
    pids = [w["pid"] for w in rt.workers]
    # Worker 0 holds its chunks until the close: requests are surely in flight then (on a busy
    # machine the other worker alone can otherwise finish all 50 before close() is reached).
    os.kill(pids[0], signal.SIGSTOP)
    futures = [rt.submit(padded(4, 32, seed=s)) for s in range(50)]
    start = time.monotonic()
    rt.close()
    assert time.monotonic() - start < 10
    outcomes = set()
    for future in futures:
        try:
            future.result(timeout=10)
            outcomes.add("ok")
        except WorkerError as e:
            assert "closed" in str(e)
            outcomes.add("closed")
    assert "closed" in outcomes
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    del futures, future
    gc.collect()
    assert set(memfds()) <= before
    with pytest.raises(WorkerError, match="closed"):
        rt.submit(padded(1, 8, seed=0))


CRASH = """
import os, sys, time
import numpy as np
from trtforge.runtime import Runtime

if __name__ == "__main__":
    rt = Runtime({artifact!r}, devices=2, timeout_s=30)
    ids = np.ones((4, 16), np.int64)
    for _ in range(20):
        rt.submit({{"input_ids": ids, "attention_mask": ids, "token_type_ids": 0 * ids}})
    print(" ".join(str(w["pid"]) for w in rt.workers), flush=True)
    time.sleep(60)  # killed here, with work in flight
"""


def test_a_caller_that_crashes_leaves_no_workers_and_no_shared_memory(artifact, tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(CRASH.format(artifact=str(artifact))))
    before = set(os.listdir("/dev/shm"))
    caller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = ""
        deadline = time.monotonic() + 120
        while not line and time.monotonic() < deadline and caller.poll() is None:
            line = caller.stdout.readline().strip()
        workers = [int(p) for p in line.split()]
        assert len(workers) == 2
        assert memfds(workers[0])  # the worker maps the caller's arenas
        caller.kill()  # no close(), no atexit: the crash
        caller.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
            time.sleep(0.1)
        alive = [p for p in workers if Path(f"/proc/{p}").exists()
                 and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]
        assert not alive, "workers outlived their caller"
        assert set(os.listdir("/dev/shm")) <= before  # memfds have no names: nothing to leave there
    finally:
        caller.kill()
        caller.wait(timeout=30)


def test_results_live_in_the_heap_until_dropped_and_a_full_heap_falls_back_to_copies(artifact):
    """Host results are arrays over the runtime's shared heap, written there by the workers; a caller
    that holds more results than the heap has room for gets copies (still right), and each block goes
    back to the heap when the arrays over it die."""
    with Runtime(artifact, devices=1, timeout_s=30) as rt:
        heap = rt._heap
        requests = [padded(4, 12, seed=s) for s in range(3 * SLOTS)]
        held = [rt.run(batch)["logits"] for batch in requests]
        assert len(heap.blocks.used) == HEAP_ROUNDS * SLOTS  # room for its rounds of slots: the rest were copied
        in_heap = [r for r in held if in_the_heap(r)]
        assert len(in_heap) == HEAP_ROUNDS * SLOTS
        for batch, result in zip(requests, held):
            np.testing.assert_allclose(result, single_process(artifact, batch), rtol=1e-3, atol=1e-3)
        view = held[0][1:3]  # a view keeps its block
        del held, in_heap, result
        gc.collect()
        assert len(heap.blocks.used) == 1
        del view
        gc.collect()
        assert not heap.blocks.used and heap.blocks.free_blocks == [(0, heap.slot_bytes)]


def test_requests_waiting_for_a_slot_hold_no_heap_memory(artifact):
    """A heap block is taken when a request's first chunk goes to a worker, not at submit: with the
    worker stopped, only the requests in its slots hold blocks, however many wait behind them; once
    it runs again, every request gets its own results (from the heap or copied, as room allows), and
    every block goes back."""
    with Runtime(artifact, devices=1, timeout_s=60) as rt:
        heap, worker = rt._heap, rt.workers[0]["pid"]
        requests = [padded(4, 12, seed=s) for s in range(4 * SLOTS)]
        os.kill(worker, signal.SIGSTOP)
        try:
            futures = [rt.submit(batch) for batch in requests]
            assert len(heap.blocks.used) == SLOTS  # the slots' requests only (the heap has room for more)
        finally:
            os.kill(worker, signal.SIGCONT)
        for i, (batch, future) in enumerate(zip(requests, futures)):
            result = future.result(timeout=60)["logits"]
            futures[i] = None  # the caller drops each result once read
            np.testing.assert_allclose(result, single_process(artifact, batch), rtol=1e-3, atol=1e-3)
            del result
        gc.collect()
        assert not heap.blocks.used


def in_the_heap(result: np.ndarray) -> bool:
    """Whether an output is a view over the runtime's heap (not a copy)."""
    return result.base is not None and result.base.base is not None and isinstance(result.base.base, memoryview)


def test_chunks_at_the_profiles_largest_shape_with_scattered_rows_fit_their_slots(artifact):
    """The largest chunk the profile allows (max batch, max sequence), its rows scattered through the
    request by length-aware batching, still fits its slot with the row index that goes with it."""
    lengths = [32, 3, 31, 5, 32, 2, 30, 4]  # two chunks of 4 (the max batch), one at sequence 32 (the max)
    mask = (np.arange(32)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    ids = np.random.default_rng(5).integers(1, 1000, (8, 32)) * mask
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    with Runtime(artifact, devices=1, timeout_s=30) as rt:
        got = rt.run(batch)["logits"]
    np.testing.assert_allclose(got, single_process(artifact, batch), rtol=1e-3, atol=1e-3)


def test_a_chunks_rows_are_copied_in_runs_of_consecutive_result_rows():
    """Where a chunk's rows fall in few runs of consecutive rows of the result (one run when the chunk
    holds its whole request), the worker copies each run straight into the result block; the runs
    are (start, stop, first row of the chunk, rows sorted)."""
    from trtforge.runtime.worker import _runs

    assert _runs(np.array([0, 1, 2, 3])) == [(0, 4, 0)]
    assert _runs(np.array([2, 3, 7, 8, 9, 12])) == [(2, 4, 0), (7, 10, 2), (12, 13, 5)]
    assert _runs(np.array([5])) == [(5, 6, 0)]


def test_the_device_heap_is_capped_at_a_share_of_free_device_memory():
    """Rounds of every slot's largest outputs, unless that is more than a tenth of the free device
    memory (a decoder's logits: 64 x 512 x 32000 x 4 bytes a chunk, 33 GB for eight): then a tenth,
    and chunks that do not fit cross by CUDA IPC."""
    from trtforge.runtime.worker import device_heap_bytes

    gib = 1 << 30
    assert device_heap_bytes(800 * (1 << 20), 120 * gib) == 800 * (1 << 20)  # MiniLM on an H200: as asked
    assert device_heap_bytes(8 * 64 * 512 * 32000 * 4, 60 * gib) == 6 * gib
    assert device_heap_bytes(gib, 0) == 0  # no room: no heap


def test_the_results_heap_is_capped_at_a_share_of_the_machines_memory():
    """Two rounds of every slot's largest results (MiniLM on 4 GPUs: 1.6 GB, as asked on a 256 GB
    host), unless that is more than a quarter of the machine's memory (a decoder's logits on 4 GPUs:
    134 GB): then a quarter, and the results past it are copied."""
    from trtforge.runtime.results import host_heap_bytes

    gib = 1 << 30
    minilm = 2 * 4 * 4 * 128 * 256 * 384 * 4
    assert host_heap_bytes(minilm, 256 * gib) == minilm
    assert host_heap_bytes(2 * 4 * 4 * 64 * 512 * 32000 * 4, 256 * gib) == 64 * gib
    assert host_heap_bytes(minilm, 0) > 0  # never empty: a heap of one aligned block

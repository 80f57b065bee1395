"""Runtime(in_process=True): the worker's work done in the caller's thread, on CPU engines
(onnxruntime-cpu). The same answers as worker processes, the same errors, and its limits said at
the call. What could wait runs under a timeout (thread joins, futures' results)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from trtforge.errors import ShapeError
from trtforge.errors import CompatibilityError
from trtforge.runtime import Runtime, WorkerError


def feed(rows: int, width: int, seed: int) -> dict[str, np.ndarray]:
    """Rows of random real lengths (padding at the end), as tokenized text comes."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(width)[None, :] < rng.integers(1, width + 1, (rows, 1))).astype(np.int64)
    ids = rng.integers(5, 1000, (rows, width)) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_in_process_answers_equal_worker_processes_from_many_threads(artifact):
    """Requests of 1 to 11 rows (up to three chunks of the profile's 4), of mixed lengths, sent by
    four threads at once: each gets exactly what a worker process gives for it, in input order."""
    requests = [feed(1 + s % 11, 8 + s % 25, seed=s) for s in range(40)]
    with Runtime(artifact, devices=1, timeout_s=60) as rt:
        reference = [rt.run(r)["logits"] for r in requests]
    answers: dict[int, np.ndarray] = {}
    with Runtime(artifact, devices=1, in_process=True, timeout_s=60) as rt:
        assert rt.workers[0]["pid"] == os.getpid() and rt.workers[0]["backend"] == "onnxruntime-cpu"

        def caller(start: int) -> None:
            for i in range(start, len(requests), 4):
                answers[i] = rt.run(requests[i])["logits"]

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
        assert rt.time_breakdown()["chunks"] >= len(requests)
    assert sorted(answers) == list(range(len(requests)))
    for i, expected in enumerate(reference):
        np.testing.assert_allclose(answers[i], expected, rtol=1e-5, atol=1e-5)


def test_in_process_submit_returns_a_done_future_and_results_outlive_later_requests(artifact):
    with Runtime(artifact, devices=1, in_process=True, timeout_s=60) as rt:
        first = rt.submit(feed(3, 16, seed=1))
        assert first.done()  # run in the submitting thread
        held = first.result()["logits"].copy()
        kept = first.result()["logits"]
        for s in range(20):  # the heap's blocks are reused by later requests, not the one still held
            rt.run(feed(4, 16, seed=100 + s))
        np.testing.assert_array_equal(kept, held)


def test_in_process_errors_reach_the_caller_and_it_keeps_serving(artifact):
    with Runtime(artifact, devices=1, in_process=True, timeout_s=60) as rt:
        with pytest.raises(ShapeError, match="outside the engine's profile"):
            rt.submit(feed(2, 40, seed=0))  # refused at the call, as with worker processes
        wrong = {**feed(2, 16, seed=0), "input_ids": feed(2, 16, seed=0)["input_ids"].astype(np.float32)}
        rt._inputs = lambda batch: dict(batch)  # the call's checks bypassed: the engine itself refuses
        with pytest.raises(WorkerError, match=r"worker 0 \(cpu\)"):
            rt.run(wrong)
        assert rt.run(feed(2, 16, seed=0))["logits"].shape == (2, 2)
    with pytest.raises(WorkerError, match="closed"):
        rt.submit(feed(1, 16, seed=0))


def test_in_process_serves_one_device_only(artifact):
    with pytest.raises(ValueError, match="in_process=True runs one device, got 2"):
        Runtime(artifact, devices=2, in_process=True)


def test_in_process_engine_that_cannot_load_fails_at_start_and_leaves_nothing_open(artifact):
    before = set(os.listdir("/proc/self/fd"))
    # Refused before any engine or memory is set up (it used to fail in the engine's load, at start).
    with pytest.raises(CompatibilityError, match="cuda:0 does not exist|no engine in"):
        Runtime(artifact, devices=["cuda:0"], in_process=True)
    assert set(os.listdir("/proc/self/fd")) == before  # its slots' and results heap's memfds closed

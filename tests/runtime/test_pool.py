"""The runtime's scheduling, ordering and fault handling, on CPU engines (onnxruntime-cpu)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import onnxruntime as ort
import pytest

from trtforge.errors import ShapeError
from tests.runtime.conftest import outcomes
from trtforge.errors import CompatibilityError
from trtforge.runtime import RequestTimeout, Runtime, WorkerError


def feed(rows: int, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, 1000, (rows, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def expected(artifact, batch):
    session = ort.InferenceSession(str(artifact / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {k: v[i:i + 1] for k, v in batch.items()})[0]
                           for i in range(len(batch["input_ids"]))])


def test_large_batches_are_split_and_come_back_in_order(artifact):
    batch = feed(11)
    with Runtime(artifact, devices=2, timeout_s=30) as rt:
        assert [w["backend"] for w in rt.workers] == ["onnxruntime-cpu"] * 2
        out = rt.run(batch)["logits"]
        futures = [rt.submit(feed(3, seed=s)) for s in range(20)]
        results = [f.result(timeout=30)["logits"] for f in futures]
    np.testing.assert_allclose(out, expected(artifact, batch), rtol=1e-3, atol=1e-3)
    for s, result in enumerate(results):
        np.testing.assert_allclose(result, expected(artifact, feed(3, seed=s)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("slots", [1, 7])
def test_the_slots_per_worker_bound_what_is_in_flight_and_all_come_back(artifact, slots):
    with Runtime(artifact, devices=2, timeout_s=30, slots=slots) as rt:
        futures = [rt.submit(feed(5, seed=s)) for s in range(20)]  # more chunks than slots: they wait their turn
        results = [f.result(timeout=30)["logits"] for f in futures]
        assert [(w.inputs.slots, w.outputs.slots, sorted(w.free)) for w in rt._workers] == \
            [(slots, slots, list(range(slots)))] * 2  # every slot free again
    for s, result in enumerate(results):
        np.testing.assert_allclose(result, expected(artifact, feed(5, seed=s)), rtol=1e-3, atol=1e-3)


def test_slots_must_be_a_positive_whole_number(artifact):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="the chunks in flight per worker"):
            Runtime(artifact, devices=1, slots=bad)


def test_torch_inputs_are_accepted(artifact):
    import torch

    batch = {k: torch.from_numpy(v) for k, v in feed(4).items()}
    with Runtime(artifact, devices=1) as rt:
        assert rt.run(batch)["logits"].shape == (4, 2)


def test_bad_input_reaches_the_caller_and_the_worker_keeps_serving(artifact):
    with Runtime(artifact, devices=1, timeout_s=30) as rt:
        with pytest.raises(ShapeError, match=r"sequence 40, outside the engine's profile \[1, 32\]"):
            rt.submit(feed(2, seq=40))
        wrong_dtype = {**feed(2), "input_ids": feed(2)["input_ids"].astype(np.float32)}
        with pytest.raises(TypeError, match="float32, the engine takes int64"):  # refused at the call
            rt.run(wrong_dtype)
        # An error inside the worker (here: the call-side checks bypassed, so the engine itself
        # refuses the dtype) reaches the caller as WorkerError, and the worker keeps serving.
        rt._inputs = lambda batch: dict(batch)
        with pytest.raises(WorkerError, match="worker 0 \\(cpu\\)"):
            rt.run(wrong_dtype)
        assert rt.run(feed(2))["logits"].shape == (2, 2)


def test_worker_killed_mid_request_fails_its_requests_and_the_rest_keep_serving(artifact):
    with Runtime(artifact, devices=2, timeout_s=30) as rt:
        victim = rt.workers[0]["pid"]
        os.kill(victim, signal.SIGSTOP)  # hold its requests so the kill lands mid-request
        futures = [rt.submit(feed(1, seed=s)) for s in range(6)]  # one chunk each, spread over both
        time.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        settled = outcomes(futures, timeout=10)
        died = [message for message in settled if message != "ok"]
        assert all("exited" in message and "keep serving" in message for message in died)
        assert died and "ok" in settled
        assert [w["alive"] for w in rt.workers] == [False, True]
        after = rt.run(feed(5), timeout=10)["logits"]  # the survivor takes the whole batch
        np.testing.assert_allclose(after, expected(artifact, feed(5)), rtol=1e-3, atol=1e-3)


def test_a_hung_worker_times_out_instead_of_hanging(artifact):
    with Runtime(artifact, devices=2, timeout_s=1.0) as rt:
        stuck = rt.workers[0]["pid"]
        os.kill(stuck, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(RequestTimeout, match="no answer for 1 s"):
                rt.run(feed(2), timeout=5)  # one chunk per worker: worker 0's never comes back
            assert time.monotonic() - start < 3
            assert rt.run(feed(1), timeout=5)["logits"].shape == (1, 2)  # routed to the idle worker
        finally:
            os.kill(stuck, signal.SIGCONT)


def test_close_releases_every_worker(artifact):
    rt = Runtime(artifact, devices=2)
    pids = [w["pid"] for w in rt.workers]
    rt.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(WorkerError, match="closed"):
        rt.submit(feed(1))


def test_a_device_without_a_fitting_engine_fails_at_start(artifact):
    # Refused before any worker starts (it used to fail in the worker's engine load).
    with pytest.raises(CompatibilityError, match="cuda:0 does not exist|no engine in"):
        Runtime(artifact, devices=["cuda:0"], start_timeout_s=120)


def test_eight_workers_share_a_batch(artifact):
    """Nothing in the runtime assumes at most four devices: eight workers split one batch of 32 rows
    into eight chunks of the profile's maximum, 4 (CPU workers here; the same code serves GPUs)."""
    batch = feed(8 * 4)
    with Runtime(artifact, devices=8, timeout_s=60, start_timeout_s=300) as rt:
        assert len({w["pid"] for w in rt.workers}) == 8
        out = rt.run(batch, timeout=60)["logits"]
        assert all(w["alive"] for w in rt.workers)
    np.testing.assert_allclose(out, expected(artifact, batch), rtol=1e-3, atol=1e-3)


def test_cpu_workers_share_the_cores_instead_of_each_taking_all_of_them(artifact):
    """Each CPU worker is confined to its own share of the caller's cores, so that its engine runs
    that many threads (benchmarks/results/cpu-workers.md: what it changed); GPU workers are not pinned."""
    from trtforge.runtime.processes import cpu_shares

    assert cpu_shares(["cpu", "cpu"], [0, 1, 2, 3]) == [(0, 1), (2, 3)]
    assert cpu_shares(["cpu"] * 3, [0, 1]) == [(0,), (1,), (0,)]  # more workers than cores: one each
    assert cpu_shares(["cuda:0", "cuda:1"], [0, 1]) == [None, None]
    mine = sorted(os.sched_getaffinity(0))
    with Runtime(artifact, devices=2, timeout_s=30) as rt:
        pinned = [os.sched_getaffinity(w["pid"]) for w in rt.workers]
        assert rt.run(feed(3))["logits"].shape == (3, 2)
    assert pinned == [set(share) for share in cpu_shares(["cpu", "cpu"], mine)]
    if len(mine) >= 2:
        assert not pinned[0] & pinned[1]


def test_where_the_platform_cannot_pin_cpu_workers_are_left_unpinned(artifact, monkeypatch):
    """macOS has no sched_setaffinity: the runtime starts and serves with its workers unpinned."""
    monkeypatch.delattr(os, "sched_setaffinity")
    everything = os.sched_getaffinity(0)
    with Runtime(artifact, devices=2, timeout_s=30) as rt:
        assert rt.run(feed(3))["logits"].shape == (3, 2)
        assert [os.sched_getaffinity(w["pid"]) for w in rt.workers] == [everything, everything]


def test_timeout_bounds_the_wait_for_progress_not_the_size_of_the_work(artifact):
    """5,000 texts on two CPU workers used to time out at timeout_s whatever their progress."""
    batch = feed(4000)
    with Runtime(artifact, devices=2, timeout_s=0.05) as rt:
        start = time.monotonic()
        out = rt.run(batch, timeout=120)["logits"]
        assert time.monotonic() - start > 0.05  # the request took longer than timeout_s in all
    assert out.shape == (4000, 2)
    head = {k: v[:5] for k, v in batch.items()}
    np.testing.assert_allclose(out[:5], expected(artifact, head), rtol=1e-3, atol=1e-3)

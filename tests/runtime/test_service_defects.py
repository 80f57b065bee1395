"""What a service meets: bad inputs refused at the call, and no hang at exit or close (every case
that could hang runs in a subprocess under a timeout)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from trtforge.errors import ShapeError
from trtforge.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]


def feed(rows=2, seq=8, dtype=np.int64):
    ids = np.arange(rows * seq, dtype=dtype).reshape(rows, seq) % 1000
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def test_inputs_are_checked_at_the_call(artifact):
    import torch

    with Runtime(artifact, devices=1, timeout_s=30) as rt:
        good = rt.run(feed())["logits"]
        # int32 ids are cast (safely) rather than failing deep in onnxruntime; lists are accepted.
        np.testing.assert_array_equal(rt.run(feed(dtype=np.int32))["logits"], good)
        np.testing.assert_array_equal(rt.run({k: v.tolist() for k, v in feed().items()})["logits"], good)
        with pytest.raises(ShapeError, match=r"unknown input 'input_idz' \(did you mean 'input_ids'\?\)"):
            rt.submit({**{k: v for k, v in feed().items() if k != "input_ids"}, "input_idz": feed()["input_ids"]})
        with pytest.raises(ShapeError, match="unknown input 'pixels'"):
            rt.submit({**feed(), "pixels": np.zeros((2, 8))})
        with pytest.raises(ShapeError, match="disagree on the sequence length"):
            rt.submit({**feed(), "attention_mask": np.ones((2, 7), np.int64)})
        with pytest.raises(TypeError, match="bfloat16"):
            rt.submit({**feed(), "input_ids": torch.ones((2, 8), dtype=torch.bfloat16)})
        with pytest.raises(TypeError, match="float64, the engine takes int64"):
            rt.submit({**feed(), "input_ids": np.ones((2, 8))})
        with pytest.raises(ShapeError, match=r"input_ids holds 1000, outside the vocabulary \[0, 1000\)"):
            rt.submit({**feed(), "input_ids": np.full((2, 8), 1000)})
        with pytest.raises(ShapeError, match=r"holds -1"):
            rt.submit({**feed(), "input_ids": np.full((2, 8), -1)})
        with pytest.raises(TypeError, match="dict of named inputs"):
            rt.submit([feed()])
        with pytest.raises(TypeError, match="rectangular"):
            rt.submit({**feed(), "input_ids": [[1, 2], [3]]})


@pytest.mark.parametrize("devices", [0, -1, [], [-2], True])
def test_impossible_device_lists_are_refused_at_once(artifact, devices):
    with pytest.raises(ValueError, match="devices"):
        Runtime(artifact, devices=devices)


SCRIPT = """
import os, signal, sys, time
import numpy as np
from trtforge.runtime import Runtime, RequestTimeout, WorkerError

def feed(rows):
    ids = np.ones((rows, 32), np.int64)
    return {{"input_ids": ids, "attention_mask": ids, "token_type_ids": np.zeros_like(ids)}}

if __name__ == "__main__":
    case = sys.argv[1]
    rt = Runtime({artifact!r}, devices=1, timeout_s=1.0)
    pid = rt.workers[0]["pid"]
    if case == "timeout":  # a stopped worker, a pipe filled by requests it will never read
        os.kill(pid, signal.SIGSTOP)
        futures = [rt.submit(feed(4)) for _ in range(400)]
        try:
            futures[0].result(timeout=10)
        except RequestTimeout:
            print("timed out", flush=True)
    elif case == "killed":  # a dead worker, more rows submitted
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        try:
            for _ in range(400):
                rt.submit(feed(4))
        except WorkerError as e:
            print("refused:", type(e).__name__, flush=True)
    elif case == "with-block":  # leaving a with block by an exception, requests in flight
        try:
            with rt:
                for _ in range(200):
                    rt.submit(feed(4))
                raise KeyError("boom")
        except KeyError:
            print("left the block", flush=True)
    start = time.monotonic()
    rt.close()
    print(f"closed in {{time.monotonic() - start:.1f}} s", flush=True)
"""


@pytest.mark.parametrize("case", ["timeout", "killed", "with-block"])
def test_the_process_exits_promptly_whatever_the_workers_state(artifact, tmp_path, case):
    script = tmp_path / "service.py"
    script.write_text(textwrap.dedent(SCRIPT.format(artifact=str(artifact))))
    start = time.monotonic()
    process = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.returncode == 0, process.stderr[-2000:]
    closed = float(process.stdout.strip().splitlines()[-1].split()[2])
    assert closed < 8, process.stdout  # no 10 s per worker wait
    assert time.monotonic() - start < 90


def test_where_the_time_goes_is_measured_per_chunk(artifact):
    with Runtime(artifact, devices=2, timeout_s=30) as rt:
        for _ in range(5):
            rt.run(feed(4))
        breakdown = rt.time_breakdown(reset=True)
        assert rt.time_breakdown()["chunks"] == 0  # reset
    assert breakdown["chunks"] == 10  # two chunks per request, one per worker
    phases = ("enqueue_ms", "queue_ms", "inputs_ms", "engine_ms", "outputs_ms", "return_ms")
    assert all(breakdown[p] >= 0 for p in phases) and breakdown["engine_ms"] > 0

"""Several caller processes, each with its own Runtime over the same devices (bench/callers.py)."""

from __future__ import annotations

import numpy as np
import pytest

from trtforge.runtime import Runtime
from trtforge.bench.callers import _checksum, feed_for, measure_processes
from trtforge.manifest import read_manifest


def test_caller_processes_share_the_requests_and_agree_with_one_runtime(artifact):
    run = measure_processes(artifact, devices=1, rows=4, sequence=16, processes=2, iterations=21, warmup=2,
                            start_timeout_s=240)
    with Runtime(artifact, devices=1) as rt:
        want = _checksum(rt.run(feed_for(read_manifest(artifact), 4, 16)))
    assert sorted(p["requests"] for p in run["per_process"]) == [10, 11]  # every request sent, once
    assert [p["checksum"] for p in run["per_process"]] == [want, want]
    assert run["throughput"] == pytest.approx(21 * 4 / run["span_s"], rel=0.01)
    assert all(0 < p["caller_cpu_percent"] for p in run["per_process"])


def test_a_caller_process_that_cannot_start_fails_the_measurement_with_its_error(tmp_path):
    with pytest.raises(RuntimeError, match="caller process failed: .*manifest"):
        measure_processes(tmp_path / "missing", devices=1, rows=4, sequence=16, processes=2, iterations=4,
                          start_timeout_s=120)


def test_the_feed_fits_the_artifact(artifact):
    manifest = read_manifest(artifact)
    feed = feed_for(manifest, 3, 8)
    assert sorted(feed) == sorted(s["name"] for s in manifest["io"]["inputs"])
    assert feed["input_ids"].shape == (3, 8) and feed["input_ids"].max() < manifest["model"]["vocab_size"]
    assert np.all(feed["attention_mask"] == 1)

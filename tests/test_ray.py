"""`trtforge run --ray local` on a real local Ray instance (127.0.0.1, 2 CPUs), against the
single-host `trtforge run` on the same input: same rows, ids, values and shards; a tampered
artifact is refused before any row. Each run is a process of its own, under a timeout, and stops
the Ray instance it started."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.test_run import minilm, table, texts, trtforge, vectors  # noqa: F401 (minilm is a fixture)

pytest.importorskip("ray", reason="needs the ray extra: pip install 'trtforge[ray]'")
RAY = ["--ray", "local", "--ray-cpus", "2", "--devices", "cpu"]


def parquet_input(path: Path, rows: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(len(rows))], "text": rows}), path, row_group_size=300)
    return path


def test_the_ray_pipeline_writes_what_the_single_host_run_writes(minilm, tmp_path):  # noqa: F811
    rows = texts(1500, seed=3)
    rows[7], rows[1100] = "", None  # bad rows: left out and listed by both paths alike
    source = parquet_input(tmp_path / "in.parquet", rows)
    common = [str(minilm), str(source), "--id-column", "id", "--on-bad-row", "skip", "--shard-rows", "512", "-q"]
    single = trtforge("run", *common, "--out", str(tmp_path / "single"), "--devices", "cpu", timeout=300)
    assert single.returncode == 0, single.stderr
    ray = trtforge("run", *common, "--out", str(tmp_path / "ray"), *RAY, timeout=400)
    assert ray.returncode == 0, ray.stderr[-3000:]
    a, b = table(tmp_path / "single"), table(tmp_path / "ray")
    assert b.num_rows == a.num_rows == 1498
    assert b.column("row").to_pylist() == a.column("row").to_pylist()  # input order, every row once
    assert b.column("id").to_pylist() == a.column("id").to_pylist()
    np.testing.assert_allclose(vectors(b.column("embedding")), vectors(a.column("embedding")), atol=1e-6)
    record = {name: json.loads((tmp_path / name / "_run.json").read_text()) for name in ("single", "ray")}
    assert [s["rows"] for s in record["ray"]["shards"]] == [512, 512, 476]
    assert [b["row"] for s in record["ray"]["shards"] for b in s["bad_rows"]] == [7, 1100]
    assert record["ray"]["summary"]["devices"] == "ray:local"
    assert record["ray"]["complete"] and record["single"]["complete"]


def test_a_tampered_artifact_is_refused_by_the_ray_run_before_any_row(minilm, tmp_path):  # noqa: F811
    artifact = tmp_path / "minilm"
    shutil.copytree(minilm, artifact)
    engine = next(p for p in artifact.rglob("*.onnx") if p.is_file())
    engine.write_bytes(engine.read_bytes()[:-8] + b"tampered")
    source = parquet_input(tmp_path / "in.parquet", texts(50, seed=4))
    result = trtforge("run", str(artifact), str(source), "--out", str(tmp_path / "out"), *RAY, timeout=400)
    assert result.returncode != 0
    assert "sha256" in result.stderr or "does not match" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing half-written left behind

"""`trtforge bench` end to end on CPU workers: runtime vs a gloo DDP baseline, reports and plots."""

from __future__ import annotations

import json

from click.testing import CliRunner

from tests.conftest import tiny_recipe_text
from trtforge.cli import main


def test_bench_on_cpu_workers_writes_parity_speed_and_plots(tmp_path):
    recipe = tmp_path / "r.toml"
    text = tiny_recipe_text("bert", extra="[engines]\nbackends = ['onnxruntime-cpu']\n")
    recipe.write_text(text.replace('"feature-extraction"', '"sequence-classification"'))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench", str(recipe), "--out", str(out), "--cpu", "2", "--batches", "1,4",
                                       "--sequence", "16", "--iterations", "10", "--warmup", "2"])
    assert result.exit_code == 0, result.stderr
    bench_dir = out / "tiny-bert.bench"
    report = json.loads((bench_dir / "bench.json").read_text())
    assert report["parity_passed"] is True
    assert set(report["results"]["runtime"]) == {"1", "2"} and set(report["results"]["ddp"]) == {"1", "2"}
    for n in ("1", "2"):
        for b in ("1", "4"):
            row = report["results"]["runtime"][n][b]
            assert row["throughput"] > 0 and row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        parity = report["results"]["parity"][n]
        assert parity["passed"] and parity["outputs"][0]["shape"][0] == 4 * int(n)
    assert report["scaling"]["1"]["1"] == 1.0 and "2" in report["scaling"]["4"]
    for plot in ("throughput_vs_devices.png", "latency_vs_batch.png"):
        assert (bench_dir / plot).read_bytes()[:4] == b"\x89PNG"
    summary = (bench_dir / "bench.md").read_text()
    assert "Scaling efficiency" in summary and "runtime / DDP" in summary


def test_bench_rejects_bad_batches(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(tiny_recipe_text("bert"))
    result = CliRunner().invoke(main, ["bench", str(recipe), "--batches", "1,x"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output + result.stderr

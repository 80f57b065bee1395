"""ONNX Runtime engines: CUDA (FP16, fused, I/O bound to torch tensors, CUDA graphs for fixed shapes)
and CPU (the validated FP16 graph as it is; it lets the runtime's logic be tested without a GPU).

The CUDA engine starts from the FP32 graph: ONNX Runtime's transformer optimizer fuses attention,
SkipLayerNorm, BiasGelu and the embedding on FP32 patterns (told the head count and hidden size,
which it cannot infer from this export), then converts to FP16 with I/O types kept, as ONNX
Runtime's own FP16 flow does. The engine is checked against PyTorch FP32 like every other.

Beside it, where ONNX Runtime fused the attention of an encoder, a padding-free twin of the same
graph (`model.packed.onnx`, ONNX Runtime's packing mode): RemovePadding after the embedding packs
the batch's real tokens into one row, PackedAttention attends within each sequence, RestorePadding
puts the rows back before the output, so its inputs and outputs are the fused graph's and only real
tokens are computed. It is checked on its own, and timed against the fused graph (CUDA graphs) on
batches with real padding: the engine uses it from the smallest batch at which it wins, on chunks
with padding enough to remove (the rule in the manifest's `packed` section); smaller batches keep
the CUDA graphs, which win on launch cost.
Decoders (causal attention), vision models and attention ONNX Runtime does not fuse have no twin,
and the manifest says why.

CUDA runs are asynchronous, like a PyTorch op: ONNX Runtime is told not to synchronize at the end
of a run (`disable_synchronize_execution_providers`, which CUDA graph replay honours since
onnxruntime PR 28686), the engine's stream waits on the caller's current stream before the run and the current stream waits on
the engine's after it, so outputs are ordered on the caller's stream and the host can queue the
next batch while this one runs.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from trtforge.backends.base import Backend, BuildJob, Engine, Target
from trtforge.devices import GpuInfo, distinct_models

# ONNX Runtime's optimizer knows these model types; architectures not listed use "bert" fusions.
# CUDA graphs are captured per input shape, each in a session of its own; past this many shapes the
# engine serves new shapes from its dynamic session rather than grow without bound.
MAX_CUDA_GRAPHS = 16
# Captured graphs save launch overhead, which matters for small chunks; a capture costs 0.1-1 s of its
# own, mid-stream where a run meets a new shape. Only chunks of at most this many padded tokens are
# captured: measured on an H100 through `trtforge run` (results/2026-12-06-h100-graph-limit), 2048 was
# the best or near-best rule for MiniLM and BERT-base on short text and passages; capturing every shape
# made BERT-base 3.4x slower. TRTFORGE_CUDA_GRAPH_MAX_TOKENS=N overrides it (0: no graphs, all: every shape).
def _graph_max_tokens(value: str | None) -> int | None:
    if value is None:
        return 2048
    if value == "all":
        return None
    if not value.isdigit():
        raise ValueError(f"TRTFORGE_CUDA_GRAPH_MAX_TOKENS={value!r}: give a number of tokens, 0 or 'all'")
    return int(value)


_GRAPH_MAX_TOKENS = _graph_max_tokens(os.environ.get("TRTFORGE_CUDA_GRAPH_MAX_TOKENS"))
PACKED_FILE = "model.packed.onnx"
OPTIMIZER_MODEL_TYPE = {"gpt2": "gpt2", "vit": "vit", "bart": "bart", "t5": "t5", "clip": "clip", "swin": "swin"}


class OnnxruntimeBackend(Backend):
    engine_file = "model.onnx"
    module = "onnxruntime"
    layout = 2  # 2: the CUDA engine's directory also holds the padding-free twin

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.name = f"onnxruntime-{provider}"
        self.distribution = "onnxruntime-gpu" if provider == "cuda" else "onnxruntime"

    def missing(self) -> str | None:
        reason = super().missing()
        if reason or self.provider == "cpu":
            return reason
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return (f"{self.name}: this onnxruntime has no CUDA execution provider; "
                    "pip uninstall onnxruntime && pip install onnxruntime-gpu")
        return None

    def library_version(self) -> str:
        import onnxruntime as ort

        return ort.__version__

    def targets(self, *, gpus: list[GpuInfo], rtx_targets: tuple[str, ...]) -> list[Target]:
        if self.provider == "cpu":
            return [Target(name="cpu", kind="portable")]
        # The graph itself suits any NVIDIA GPU, but each distinct GPU model gets its own, checked
        # and timed on that model, like every other backend.
        return [Target(name=key, kind="gpu", compute_capabilities=(group[0].compute_capability,),
                       gpu=group[0].as_dict()) for key, group in distinct_models(gpus).items()]

    @property
    def candidates(self) -> tuple[str, ...]:
        """Graphs the worker builds, checks and times (worker.pick keeps one). On a CPU, FP16
        is no faster than FP32 (ONNX Runtime's CPU kernels mostly compute in FP32 and add casts) and
        is less precise, so both validated graphs compete; on a GPU there is one, fused FP16 graph."""
        return ("fp32", "fp16") if self.provider == "cpu" else ("",)

    def build(self, job: BuildJob, log: Any, candidate: str = "") -> dict[str, Any]:
        out = Path(job.out_dir) / self.engine_file
        if self.provider == "cpu":
            shutil.copyfile(job.fp32_onnx if candidate == "fp32" else job.fp16_onnx, out)
            return {"graph": f"the validated {candidate.upper() or 'FP16'} ONNX, unfused"}
        return fuse_and_convert(job, out, log)

    def load(self, engine_dir: Path, entry: dict[str, Any], device: str) -> Engine:
        packed = entry.get("packed") or {}
        graph, rule = packed_graph(engine_dir, packed)
        return OnnxruntimeEngine(engine_dir / self.engine_file, device=device, outputs=entry["io"]["outputs"],
                                 cuda_graph=bool(entry.get("options", {}).get("cuda_graph", False)),
                                 packed=graph, packed_rule=rule)


def packed_graph(engine_dir: Path, packed: dict[str, Any]) -> tuple[Path | None, dict[str, Any] | None]:
    """The padding-free twin an engine loads, and the rule for when it serves: the checked twin with
    its rule; at build time (status "unchecked": the engine worker loads it to check it) the twin
    where the build wrote one, which it does not for graphs without fused attention (decoders,
    vision models); otherwise none."""
    path, status = engine_dir / PACKED_FILE, packed.get("status")
    if status not in ("passed", "unchecked") or not path.is_file():
        return None, None
    return path, packed_rule(packed) if status == "passed" else None


def packed_rule(packed: dict[str, Any]) -> dict[str, Any] | None:
    """When the packed graph serves, from the manifest's `packed` section: at least `from_batch` rows
    and at least `from_tokens` padded tokens (rows x width), the size at which it was measured to
    win, and at most `max_real_share` of those tokens real; smaller chunks (length-aware batching
    leaves little padding to remove) and chunks of full rows keep the fused graph, whose CUDA graphs
    win on launch cost. Manifests written before these keys: derived from the sweep."""
    rule = packed.get("rule") or {}
    if rule.get("from_batch") is None:
        return None
    sweep = packed["sweep"]
    return {"from_batch": rule["from_batch"],
            "from_tokens": rule.get("from_tokens") or packed_from_tokens(rule["from_batch"], sweep),
            "max_real_share": rule.get("max_real_share") or packed_max_share(rule["from_batch"], sweep)}


def packed_from_tokens(from_batch: int | None, sweep: list[dict[str, Any]]) -> int | None:
    """The padded size (rows x width) at which the sweep saw the packed graph win: from_batch rows
    at the sweep's sequence."""
    return from_batch * sweep[0]["sequence"] if from_batch and sweep else None


def packed_max_share(from_batch: int | None, sweep: list[dict[str, Any]]) -> float | None:
    """The largest share of real tokens at which the packed graph should still win at from_batch:
    its work follows the real tokens and the fused graph's the padded ones, so the sweep's win there
    (fused_ms / packed_ms at its real share) holds down to the share where the two cross."""
    row = next((r for r in sweep if r["batch"] == from_batch), None)
    if row is None:
        return None
    return round(min(1.0, row["real_token_share"] * row["fused_ms"] / row["packed_ms"]), 3)


def packed_serves(rows: int, width: int, rule: dict[str, Any] | None, real_tokens: int | None = None) -> bool:
    """Whether the packed graph serves a chunk (see packed_rule); without `real_tokens`, by size alone."""
    if rule is None or rows < rule["from_batch"] or rows * width < rule["from_tokens"]:
        return False
    share = rule.get("max_real_share")
    return real_tokens is None or share is None or real_tokens <= share * rows * width


def fuse_and_convert(job: BuildJob, out: Path, log: Any) -> dict[str, Any]:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from trtforge.stages.fp16 import clamp_constants

    options = job.options
    model_type = OPTIMIZER_MODEL_TYPE.get(options.get("architecture") or "", "bert")
    fusions = FusionOptions(model_type)
    # Its RotaryEmbedding takes position ids of the batch's size; the export's are one row broadcast
    # to every sequence, so a fused rotary graph fails at any batch above one (seen with the rotary
    # pattern transformers 5.17 exports, on an H100: results/2026-12-07-h100-st-gpu).
    fusions.enable_rotary_embeddings = False
    optimized = optimize_model(job.fp32_onnx, model_type=model_type, num_heads=int(options.get("num_heads", 0)),
                               hidden_size=int(options.get("hidden_size", 0)), optimization_options=fusions,
                               opt_level=0, use_gpu=True, only_onnxruntime=False)
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    optimized.convert_float_to_float16(keep_io_types=True, op_block_list=list(options.get("keep_fp32_ops", [])))
    clamp_constants(optimized.model)
    optimized.save_model_to_file(str(out))
    print(f"fused operators: {fused}", file=log)
    packed = pack(optimized.model, out.parent / PACKED_FILE)
    print(f"packing mode: {packed}", file=log)
    return {"graph": f"ONNX Runtime transformer optimizer ({model_type}) on FP32, then FP16", "fused": fused,
            "packed": packed}


def pack(fused: Any, out: Path) -> dict[str, Any]:
    """Write the padding-free twin of a fused graph (see the module's docstring) where ONNX Runtime's
    packing mode covers its attention; say why not otherwise."""
    import logging

    import onnx
    from onnxruntime.transformers.convert_to_packing_mode import PackingMode
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.ModelProto.FromString(fused.SerializeToString()))  # a copy: the fused graph stays
    ops = {node.op_type for node in model.nodes()}
    if not ops & {"Attention", "MultiHeadAttention"}:
        return {"skipped": "ONNX Runtime fused no attention in this graph (as for decoders, vision models and "
                           "attention it does not recognise): the fused engine serves every batch"}
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        PackingMode(model).convert()
    finally:
        quiet.setLevel(level)
    packed = sum(node.op_type in ("PackedAttention", "PackedMultiHeadAttention") for node in model.nodes())
    if not packed:
        return {"skipped": "ONNX Runtime's packing mode does not cover this attention (causal, with past "
                           "state, or without one shared padding mask): the fused engine serves every batch"}
    model.save_model_to_file(str(out))
    return {"file": PACKED_FILE, "packed_attention_nodes": packed}


def _run_options() -> Any:
    """No host synchronization at the end of a CUDA run: the outputs are stream-ordered."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return options


def _session(path: Path, *, device: str, static_shapes: dict[str, tuple[int, ...]] | None = None,
             cuda_graph: bool = False, stream: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if device == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if cores < (os.cpu_count() or cores):  # confined to a share of the machine (a runtime's CPU worker)
            options.intra_op_num_threads = cores
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ort.preload_dlls()  # the CUDA and cuDNN libraries that torch's wheels carry
    # Kernels are launched from the calling thread; a pool of spinning CPU threads per session (one
    # session per captured shape, one set per GPU worker) would only take cores from the host work.
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    cuda = {"device_id": int(device.split(":")[1]) if ":" in device else 0}
    if stream is not None:
        cuda["user_compute_stream"] = str(stream)
    if cuda_graph:
        cuda["enable_cuda_graph"] = "1"
    source: Any = str(path)
    if static_shapes:
        source = _with_static_shapes(path, static_shapes)
    return ort.InferenceSession(source, options, providers=[("CUDAExecutionProvider", cuda)])


def _with_static_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> bytes:
    """The graph with fixed input shapes: ONNX Runtime then folds the shape arithmetic, which would
    otherwise run on the CPU and prevent CUDA graph capture."""
    import onnx

    model = onnx.load(str(path))
    for value in model.graph.input:
        if value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
                dim.ClearField("dim_param")
                dim.dim_value = size
    return model.SerializeToString()


class OnnxruntimeEngine(Engine):
    """`mode`: "auto" (the packed graph where `packed_rule` says it serves: see packed_rule), or
    "fused" / "packed" to force one graph (what the check and the benchmarks do)."""

    def __init__(self, path: Path, *, device: str, outputs: list[dict[str, Any]], cuda_graph: bool,
                 packed: Path | None = None, packed_rule: dict[str, int] | None = None) -> None:
        self.path, self.device, self.outputs = path, device, outputs
        self.backend = "onnxruntime-cpu" if device == "cpu" else "onnxruntime-cuda"
        self.cuda_graph = cuda_graph and device != "cpu"
        self.graphs: dict[tuple, Any] = {}
        self.graph_failures: dict[tuple, str] = {}
        self.packed_session, self.packed_rule, self.mode = None, packed_rule, "auto"
        if device == "cpu":
            self.session = _session(path, device="cpu")
        else:
            import torch

            self.run_options = _run_options()
            self.torch_device = torch.device(device)
            with torch.cuda.device(self.torch_device):
                self.stream = torch.cuda.Stream(self.torch_device)
            self.session = _session(path, device=device, stream=self.stream.cuda_stream)
            if packed is not None:  # PackedAttention has CUDA kernels only
                self.packed_session = _session(packed, device=device, stream=self.stream.cuda_stream)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def _packed(self, feed: Mapping[str, Any], real_tokens: int | None) -> bool:
        if self.packed_session is None or self.mode == "fused":
            return False
        if self.mode == "packed":
            return True
        first = feed[self.input_names[0]]
        return packed_serves(first.shape[0], first.shape[1] if first.ndim > 1 else 1, self.packed_rule, real_tokens)

    def output_shape(self, spec: dict[str, Any], sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in spec["shape"])

    def _axis_sizes(self, feed: Mapping[str, Any]) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for value in self.session.get_inputs():
            for dim, size in zip(value.shape, feed[value.name].shape):
                if isinstance(dim, str):
                    sizes[dim] = int(size)
        return sizes

    def __call__(self, feed: Mapping[str, Any], *, real_tokens: int | None = None) -> dict[str, Any]:
        import torch

        if self.device == "cpu":
            arrays = {n: feed[n].detach().cpu().numpy() if hasattr(feed[n], "detach") else feed[n]
                      for n in self.input_names}
            return {o["name"]: torch.from_numpy(v) for o, v in zip(self.outputs, self.session.run(None, arrays))}
        if self._packed(feed, real_tokens):
            return self._run(self.packed_session, feed, self._bind_outputs(feed))
        key = tuple(tuple(feed[n].shape) for n in self.input_names)
        if self._capturable(key):
            graph = self.graphs.get(key) or self._capture(key, feed)
            if graph is not None:
                return graph.run(feed)
        return self._run(self.session, feed, self._bind_outputs(feed))

    def _capturable(self, key: tuple) -> bool:
        if not self.cuda_graph or key in self.graph_failures:
            return False
        if key in self.graphs:
            return True
        if _GRAPH_MAX_TOKENS is not None and math.prod(key[0]) > _GRAPH_MAX_TOKENS:
            return False
        return len(self.graphs) < MAX_CUDA_GRAPHS

    def _bind_outputs(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        sizes = self._axis_sizes(feed)
        return {o["name"]: torch.empty(self.output_shape(o, sizes), dtype=getattr(torch, o["dtype"]),
                                       device=self.torch_device) for o in self.outputs}

    def _run(self, session: Any, feed: Mapping[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        binding = session.io_binding()
        inputs = {}
        for name in self.input_names:
            tensor = feed[name].to(self.torch_device).contiguous()
            inputs[name] = tensor
            _bind(binding.bind_input, name, tensor, self.torch_device)
        for name, tensor in outputs.items():
            _bind(binding.bind_output, name, tensor, self.torch_device)
        self.stream.wait_stream(torch.cuda.current_stream(self.torch_device))
        session.run_with_iobinding(binding, self.run_options)
        torch.cuda.current_stream(self.torch_device).wait_stream(self.stream)
        return outputs

    def _capture(self, key: tuple, feed: Mapping[str, Any]) -> Any:
        try:
            graph = _CudaGraph(self, dict(zip(self.input_names, key)), feed)
        except Exception as e:  # ONNX Runtime refuses capture for graphs with CPU nodes; stay dynamic
            self.graph_failures[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            return None
        self.graphs[key] = graph
        return graph

    def close(self) -> None:
        self.graphs.clear()
        self.session = self.packed_session = None


class _CudaGraph:
    """A session for one fixed shape, captured into a CUDA graph on first run; inputs and outputs live
    in static buffers that each call copies into and out of."""

    def __init__(self, engine: OnnxruntimeEngine, shapes: dict[str, tuple[int, ...]], feed: Mapping[str, Any]) -> None:
        self.engine = engine
        self.session = _session(engine.path, device=engine.device, static_shapes=shapes, cuda_graph=True,
                                stream=engine.stream.cuda_stream)
        self.inputs = {n: feed[n].to(engine.torch_device).clone().contiguous() for n in engine.input_names}
        self.outputs = engine._bind_outputs(feed)
        self.binding = self.session.io_binding()
        for name, tensor in self.inputs.items():
            _bind(self.binding.bind_input, name, tensor, engine.torch_device)
        for name, tensor in self.outputs.items():
            _bind(self.binding.bind_output, name, tensor, engine.torch_device)
        self._replay()  # the first run captures the graph

    def _replay(self) -> None:
        import torch

        current = torch.cuda.current_stream(self.engine.torch_device)
        self.engine.stream.wait_stream(current)
        self.session.run_with_iobinding(self.binding, self.engine.run_options)
        current.wait_stream(self.engine.stream)

    def run(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        for name, buffer in self.inputs.items():
            buffer.copy_(feed[name], non_blocking=True)
        self._replay()
        return {name: tensor.clone() for name, tensor in self.outputs.items()}


def _bind(bind: Any, name: str, tensor: Any, device: Any) -> None:
    import numpy as np

    bind(name, "cuda", device.index or 0, np.dtype(str(tensor.dtype).removeprefix("torch.")), tuple(tensor.shape),
         tensor.data_ptr())

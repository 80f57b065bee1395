"""Stage 3: an FP16 ONNX fit for strongly typed TensorRT builds, checked against PyTorch FP32.

TensorRT 11 and TensorRT-RTX build only strongly typed networks, so precision lives in the graph:
weights and activations become FP16, inputs and outputs keep their types, and the ops that overflow
FP16 (LayerNormalization by default) stay FP32 behind explicit Casts. Constants beyond FP16's range,
such as the attention mask's float32 minimum, are clamped to +-65504 instead of becoming +-inf
(0 * -inf is NaN).

When the FP16 graph still breaches tolerance or yields NaN/Inf, `make_fp16` finds the nodes
responsible by comparing every intermediate tensor with the FP32 graph's, keeps them in FP32, and
tries again, recording each round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtforge.compare import Feed, ParityResult
from trtforge.errors import TrtforgeError
from trtforge.recipe import FP16Spec
from trtforge.stages.validate import Reference, gate_session, validate_onnx

FP16_MAX = 65504.0
CANDIDATE = "onnx-fp16"


class FP16Error(TrtforgeError):
    """The FP16 conversion itself failed."""


@dataclass
class FallbackRound:
    kept_nodes: list[str]
    passed: bool
    failures: list[str]
    added: list[str] = field(default_factory=list)
    reason: str = ""


@dataclass
class FP16Result:
    parity: ParityResult
    kept_ops: list[str]
    kept_nodes: list[str]
    rounds: list[FallbackRound]


def convert(fp32: Path, out: Path, *, keep_ops: tuple[str, ...], keep_nodes: list[str]) -> Path:
    import onnx

    from trtforge.stages.export import EXTERNAL_DATA_THRESHOLD, weight_bytes
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from unittest import mock

    from onnxruntime.transformers import float16

    model = onnx.load(str(fp32))
    try:
        with mock.patch.object(float16, "convert_np_to_float16", clamp_to_float16):
            fp16 = convert_float_to_float16(
                model, keep_io_types=True, max_finite_val=FP16_MAX,
                op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_ops)), node_block_list=keep_nodes)
    except Exception as e:
        raise FP16Error(f"FP16 conversion of {fp32.name} failed: {e}; "
                        "set [fp16] enabled = false to skip it, or keep the failing ops in keep_fp32_ops") from e
    clamp_constants(fp16)
    _drop_duplicate_casts(fp16)
    _fold_round_trip_casts(fp16)
    large = weight_bytes(fp16) > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(fp16, str(out), save_as_external_data=large, location=out.name + ".data" if large else None)
    return out


def clamp_to_float16(array: Any, min_positive_val: float = 5.96e-08, max_finite_val: float = 65504.0) -> np.ndarray:
    """onnxruntime.transformers.float16.convert_np_to_float16, with the same result in two passes
    instead of eleven (the original also scans every tensor six times for debug-log statistics;
    that was a third of a MiniLM build's FP16 stage). Finite magnitudes are clamped into
    [min_positive_val, max_finite_val] keeping their sign; 0, NaN and +-inf are unchanged."""
    values = np.asarray(array)  # float32 (raw data) or float64 (float_data): rounded to FP16 from as it is
    kind = values.dtype.type
    magnitude = np.abs(values)
    clamped = np.where((magnitude > 0) & (magnitude < min_positive_val), np.copysign(kind(min_positive_val), values),
                       values)
    clamped = np.where((magnitude > max_finite_val) & np.isfinite(values),
                       np.copysign(kind(max_finite_val), values), clamped)
    return clamped.astype(np.float16)


def clamp_constants(model: Any) -> None:
    """Clamp FP16 constants and initializers that are +-inf (converted from float32 extremes)."""
    from onnx import TensorProto, numpy_helper

    def clamp(tensor: Any) -> None:
        if tensor.data_type != TensorProto.FLOAT16:
            return
        array = numpy_helper.to_array(tensor)
        if np.isinf(array).any():
            tensor.CopyFrom(numpy_helper.from_array(np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16),
                                                    tensor.name))

    for init in model.graph.initializer:
        clamp(init)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                clamp(attr.t)


def _drop_duplicate_casts(model: Any) -> None:
    """onnxruntime before 1.32 gives a tensor read by several nodes kept in FP32 one Cast per reader,
    all with the same node name and output name: an invalid graph ("two nodes with same node name";
    a Qwen2 rotary embedding feeds Cos and Sin so). They compute the same tensor: keep the first."""
    seen: set[tuple[str, ...]] = set()
    kept = []
    for node in model.graph.node:
        if node.op_type == "Cast":
            key = (node.name, *node.input, *node.output)
            if key in seen:
                continue
            seen.add(key)
        kept.append(node)
    if len(kept) < len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(kept)


def _fold_round_trip_casts(model: Any) -> None:
    """Between two nodes kept in FP32 the converter casts to FP16 and straight back, which loses the
    very range they were kept for. Wire such consumers to the FP32 tensor and drop the dead casts."""
    from collections import defaultdict

    from onnx import TensorProto

    def cast_to(node: Any) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    nodes = list(model.graph.node)
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in nodes:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in model.graph.output}
    dropped: set[int] = set()
    for down in (n for n in nodes if cast_to(n) == TensorProto.FLOAT16 and n.name.endswith("_cast_to_fp16_node")):
        source, narrowed = down.input[0], down.output[0]
        for up in [c for c in consumers[narrowed] if cast_to(c) == TensorProto.FLOAT]:
            if up.output[0] in graph_outputs:
                continue
            for user in consumers[up.output[0]]:
                user.input[:] = [source if name == up.output[0] else name for name in user.input]
                consumers[source].append(user)
            consumers[narrowed].remove(up)
            dropped.add(id(up))
        if not consumers[narrowed] and narrowed not in graph_outputs:
            dropped.add(id(down))
    if dropped:
        kept = [n for n in nodes if id(n) not in dropped]
        del model.graph.node[:]
        model.graph.node.extend(kept)


def make_fp16(fp32: Path, out: Path, reference: Reference, spec: FP16Spec) -> FP16Result:
    kept: list[str] = []
    rounds: list[FallbackRound] = []
    while True:
        convert(fp32, out, keep_ops=spec.keep_fp32_ops, keep_nodes=kept)
        parity = validate_onnx(out, reference, tolerance=spec.tolerance, name=CANDIDATE)
        failures = [f"{o.output}@{o.shape_label}: {'; '.join(o.failures)}" for o in parity.outputs if not o.passed]
        rounds.append(FallbackRound(kept_nodes=list(kept), passed=parity.passed, failures=failures))
        if parity.passed or len(rounds) > spec.max_fallback_rounds:
            break
        worst = next(o for o in parity.outputs if not o.passed)
        feed = _worst_rows(reference.feeds[worst.shape_label], reference.outputs_for(worst.shape_label)[worst.output],
                           worst.output, out)
        culprits, reason = find_culprits(fp32, out, feed, kept=kept)
        if not culprits:
            rounds[-1].reason = "no further node to keep in FP32"
            break
        kept.extend(culprits)
        rounds[-1].added, rounds[-1].reason = culprits, reason
    return FP16Result(parity=parity, kept_ops=list(spec.keep_fp32_ops), kept_nodes=kept, rounds=rounds)


def _worst_rows(feed: Feed, ref: np.ndarray, output: str, fp16: Path, limit: int = 2) -> Feed:
    """The rows of a feed where the FP16 graph is furthest off (a smaller feed for the intermediates)."""
    got = gate_session(fp16).run([output], feed)[0].astype(np.float64)
    err = np.abs(got - ref)
    if "attention_mask" in feed and err.ndim >= 2 and err.shape[:2] == feed["attention_mask"].shape:
        err = err * feed["attention_mask"].reshape(err.shape[:2] + (1,) * (err.ndim - 2))
    err = err.reshape(len(ref), -1)
    err = np.where(np.isfinite(err), err, np.inf).max(axis=1)
    rows = np.argsort(-err)[:limit]
    return {k: v[np.sort(rows)] for k, v in feed.items()}


def find_culprits(fp32: Path, fp16: Path, feed: Feed, *, kept: list[str], per_round: int = 2) -> tuple[list[str], str]:
    """Nodes to keep in FP32 next: the first one (in graph order) whose FP16 output has NaN where the FP32
    output has none, then the first with Inf (an -inf before a Softmax is harmless, so NaN comes first);
    failing that, those that amplify the relative error most."""
    import onnx

    graph = onnx.load(str(fp32), load_external_data=False).graph
    floats = _float_tensors(fp32)
    nodes = [n for n in graph.node if n.op_type not in ("Constant", "Cast") and
             any(o in floats for o in n.output)]
    names = sorted({o for n in nodes for o in n.output if o in floats})
    ref = _run_with_intermediates(fp32, names, feed)
    got = _run_with_intermediates(fp16, names, feed)
    names = [name for name in names if name in got]  # the FP16 graph may have renamed or folded some

    def error(name: str) -> float:
        r, g = ref[name].astype(np.float64), got[name].astype(np.float64)
        if np.isnan(g).any():
            return float("nan")
        if np.isinf(g).any():
            return float("inf")
        return float(np.abs(g - r).max() / (np.abs(r).max() + 1e-6)) if r.size else 0.0

    errors = {name: error(name) for name in names if np.isfinite(ref[name]).all()}
    for bad, what in ((np.isnan, "NaN"), (np.isinf, "Inf")):
        for node in nodes:
            if not any(bad(errors.get(o, 0.0)) for o in node.output):
                continue
            if node.name not in kept:
                return [node.name], f"{node.name} ({node.op_type}) is the first node whose FP16 output has {what}"
            # A kept node whose result overflows on the cast back to FP16: keep its consumers too.
            consumers = [c.name for c in graph.node if set(c.input) & set(node.output) and c.name not in kept]
            if consumers:
                return consumers, f"{node.name} computes beyond FP16 range in FP32; its consumers stay FP32"
    gains = []
    finite = {k: v for k, v in errors.items() if np.isfinite(v)}
    for node in nodes:
        if node.name in kept:
            continue
        out = max((finite.get(o, 0.0) for o in node.output), default=0.0)
        inp = max((finite.get(i, 0.0) for i in node.input), default=0.0)
        gains.append((out / max(inp, 1e-3), node.name, node.op_type))
    gains.sort(reverse=True)
    chosen = [g for g in gains[:per_round] if g[0] > 1.0]
    reason = ", ".join(f"{name} ({op}) multiplies the relative error by {gain:.3g}" for gain, name, op in chosen)
    return [name for _, name, _ in chosen], reason


def _float_tensors(path: Path) -> set[str]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    values = list(inferred.graph.value_info) + list(inferred.graph.output)
    return {v.name for v in values if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


def _run_with_intermediates(path: Path, names: list[str], feed: Feed) -> dict[str, np.ndarray]:
    import onnx

    model = onnx.load(str(path))
    existing = {o.name for o in model.graph.output}
    # Only tensors this graph computes: conversion renames or drops some of the FP32 graph's (casts
    # around kept nodes, folded round trips), and asking for one it lacks fails the whole session.
    computed = {o for node in model.graph.node for o in node.output} | existing
    present = [n for n in names if n in computed]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in present if n not in existing)
    return dict(zip(present, gate_session(model.SerializeToString()).run(present, feed)))

"""Each stage as the pipeline runs it: inputs from the build, outputs into the stage's scratch
directory, and a JSON-serialisable result that the cache and the manifest keep."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trtforge.pipeline import Build


def export(build: Build, scratch: Path) -> dict[str, Any]:
    import onnx

    from trtforge.stages.export import export_onnx

    loaded = build.loaded
    path = export_onnx(loaded, build.recipe.shapes, build.recipe.export, scratch / "model.onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    return {
        "opset": build.recipe.export.opset,
        "model_class": type(loaded.model).__name__,
        "nodes": len(graph.node),
        "ops": dict(ops.most_common()),
        "io": {"inputs": [asdict(t) for t in loaded.inputs], "outputs": [asdict(t) for t in loaded.outputs]},
    }


def validate(build: Build, fp32: Path) -> dict[str, Any]:
    from trtforge.stages.validate import validate_onnx

    parity = validate_onnx(fp32, build.reference, tolerance=build.recipe.validate.tolerance, name="onnx-fp32")
    return {"status": "passed" if parity.passed else "failed", "parity": parity.as_dict()}


def fp16(build: Build, fp32: Path, scratch: Path) -> dict[str, Any]:
    from trtforge.stages.fp16 import make_fp16

    result = make_fp16(fp32, scratch / "model.fp16.onnx", build.reference, build.recipe.fp16)
    for round_ in result.rounds:
        build.progress.detail(f"fp16 round: kept {len(round_.kept_nodes)} nodes, "
                              f"{'passed' if round_.passed else 'failed'} {round_.reason}")
    return {
        "status": "passed" if result.parity.passed else "failed",
        "parity": result.parity.as_dict(),
        "kept_ops": result.kept_ops,
        "kept_nodes": result.kept_nodes,
        "rounds": [asdict(r) for r in result.rounds],
    }

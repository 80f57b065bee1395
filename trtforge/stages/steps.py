"""Each stage as the pipeline runs it: inputs from the build, outputs into the stage's scratch
directory, and a JSON-serialisable result that the cache and the manifest keep."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trtforge.errors import EnvironmentProblem
from trtforge.stages.context import BuildContext


def export(build: BuildContext, scratch: Path) -> dict[str, Any]:
    import onnx

    from trtforge.stages.export import export_onnx
    from trtforge.tokens import (LABEL_TASKS, MODULES_DIR, TOKENIZER_DIR, ModulesError, cross_encoder_of,
                                 label_names, pooling_of, prompts_of, save_tokenizer)

    loaded = build.loaded
    path = export_onnx(loaded, build.recipe.shapes, build.recipe.export, scratch / "model.onnx",
                       source=build.source_as_written)
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    config = loaded.model.config
    tokenizer = save_tokenizer(loaded.tokenizer, scratch / TOKENIZER_DIR, max_length=build.recipe.shapes.extent[2])
    try:  # sentence-transformers' modules after the transformer, and its prompts
        pooling = pooling_of(loaded.spec.local_dir, scratch / MODULES_DIR) if tokenizer else None
        prompts = prompts_of(loaded.spec.local_dir) if tokenizer else None
        cross_encoder = (cross_encoder_of(loaded.spec.local_dir)
                         if tokenizer and build.recipe.model.task == "sequence-classification" else None)
    except ModulesError as e:
        raise EnvironmentProblem(f"{loaded.spec.source}: {e}; trtforge refuses what it cannot reproduce exactly "
                                 "(docs/architectures.md lists what is supported)") from None
    return {
        "text": {"tokenizer": tokenizer, "pooling": pooling, "prompts": prompts, "cross_encoder": cross_encoder,
                 "labels": label_names(config) if build.recipe.model.task in LABEL_TASKS else None},
        "model_type": config.model_type,
        "num_heads": getattr(config, "num_attention_heads", 0),
        "hidden_size": getattr(config, "hidden_size", 0),
        "vocab_size": getattr(config, "vocab_size", 0),
        "type_vocab_size": getattr(config, "type_vocab_size", None),  # the range of token_type_ids
        "opset": build.recipe.export.opset,
        "model_class": type(loaded.model).__name__,
        "nodes": len(graph.node),
        "ops": dict(ops.most_common()),
        "io": {"inputs": [_io(t, graph.input) for t in loaded.inputs],
               "outputs": [_io(t, graph.output) for t in loaded.outputs]},
    }


def _io(spec: Any, values: Any) -> dict[str, Any]:
    """A tensor's declaration plus its shape in the graph: axis names where dynamic, sizes where static."""
    value = next(v for v in values if v.name == spec.name)
    shape = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    return {**asdict(spec), "shape": shape}


def validate(build: BuildContext, fp32: Path) -> dict[str, Any]:
    from trtforge.stages.validate import gate_record, validate_onnx

    parity = validate_onnx(fp32, build.reference, tolerance=build.recipe.validate.tolerance, name="onnx-fp32")
    return {"status": "passed" if parity.passed else "failed", "parity": parity.as_dict(), "checked_with": gate_record()}


def fp16(build: BuildContext, fp32: Path, scratch: Path) -> dict[str, Any]:
    from trtforge.stages.fp16 import make_fp16
    from trtforge.stages.validate import gate_record

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
        "checked_with": gate_record(),
    }

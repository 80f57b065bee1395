"""Stage 2 (and the check of stage 3): ONNX Runtime on the CPU against PyTorch FP32.

Inputs are made once per profile shape (min, opt, max) and the PyTorch outputs are computed once, so
the FP32 graph, the FP16 graph and every FP16 fallback round are judged against the same reference.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from trtforge.compare import Feed, ParityResult, compare, function_runner
from trtforge.models import LoadedModel, make_inputs
from trtforge.recipe import Shapes, Tolerance
from trtforge.tasks import SEQUENCE, TaskSpec

REFERENCE = "pytorch-fp32"
OPT_ROWS = 8


def validation_shapes(shapes: Shapes) -> dict[str, tuple[int, int]]:
    """The (batch, extent) shapes every graph and engine is checked at: label -> shape.

    Each axis is taken to its extremes, one axis at a time: the profile's min; the opt sequence (at
    most OPT_ROWS rows of it: a row's numerics do not depend on how many rows share its batch); the
    max batch at a short sequence (catches what the batch axis breaks); and the max sequence at a
    small batch with padding (catches position limits and FP16 overflow that grows with length). The
    corner (max batch x max sequence) adds nothing these do not catch and cost half of a cold build,
    so it is left out; engines are still built for it, and timed at the full opt shape.
    """
    (b_min, b_opt, b_max), (e_min, e_opt, e_max) = shapes.batch, shapes.extent
    plan = {"opt": (min(b_opt, max(b_min, OPT_ROWS)), e_opt), "min": (b_min, e_min)}  # "opt" first: always kept
    if shapes.extent_name == "image":  # one size: the model's
        plan["max-batch"] = (b_max, e_max)
    else:
        plan["max-batch"] = (b_max, max(e_min, min(8, e_max)))
        plan["max-sequence"] = (min(b_max, max(b_min, 2)), e_max)
    unique: dict[str, tuple[int, int]] = {}
    for label, shape in plan.items():
        if shape not in unique.values():
            unique[label] = shape
    return unique


def profile_feeds(loaded: LoadedModel, shapes: Shapes, *, seed: int) -> dict[str, Feed]:
    """Fresh inputs at the validation shapes (a different seed for each)."""
    return {label: make_inputs(loaded, *shape, seed=seed + i)
            for i, (label, shape) in enumerate(validation_shapes(shapes).items())}


def feed_key(feed: Feed) -> str:
    digest = hashlib.sha256()
    for name in sorted(feed):
        digest.update(name.encode() + str(feed[name].shape).encode() + np.ascontiguousarray(feed[name]).tobytes())
    return digest.hexdigest()


class Reference:
    """Reference outputs for a set of feeds, computed once and replayed to every comparison.

    `signature` maps input names to (dtype, shape with None for dynamic axes); `logits` and
    `padded_outputs` say how `compare` treats outputs (see there).
    """

    def __init__(self, feeds: dict[str, Feed], outputs: dict[str, dict[str, np.ndarray]], *,
                 signature: dict[str, tuple[str, tuple[int | None, ...]]], logits: tuple[str, ...] = (),
                 padded_outputs: tuple[str, ...] = ()) -> None:
        self.feeds = feeds
        self.outputs = {feed_key(feeds[label]): outputs[label] for label in feeds}
        self.signature = signature
        self.logits, self.padded_outputs = logits, padded_outputs

    @classmethod
    def from_model(cls, loaded: LoadedModel, feeds: dict[str, Feed]) -> Reference:
        """PyTorch FP32 outputs of a loaded model."""
        return cls(feeds, {label: loaded.run_torch(feed) for label, feed in feeds.items()},
                   signature=input_signature(loaded), **task_policy(loaded.task))

    def policy(self) -> dict[str, tuple[str, ...]]:
        return {"logits": self.logits, "padded_outputs": self.padded_outputs}


    def outputs_for(self, label: str) -> dict[str, np.ndarray]:
        return self.outputs[feed_key(self.feeds[label])]

    def runner(self) -> Any:
        return function_runner(REFERENCE, lambda feed: self.outputs[feed_key(feed)], self.signature)


def task_policy(task: TaskSpec) -> dict[str, tuple[str, ...]]:
    """How `compare` treats a task's outputs: which are logits, which have padded positions."""
    return {"logits": task.logits, "padded_outputs": tuple(o.name for o in task.outputs if SEQUENCE in o.axes)}


def input_signature(loaded: LoadedModel) -> dict[str, tuple[str, tuple[int | None, ...]]]:
    return signature_of(loaded.inputs)


def signature_of(inputs: Any) -> dict[str, tuple[str, tuple[int | None, ...]]]:
    """Input name -> (dtype, shape of None per axis: any size), from TensorSpecs or manifest entries."""
    entries = [t if isinstance(t, dict) else asdict(t) for t in inputs]
    return {t["name"]: (t["dtype"], tuple(None for _ in t["axes"])) for t in entries}


# The ONNX gates judge the graph as written, not a runtime's rewrite of it: ONNX Runtime at its basic
# level (constant folding and redundant-node removal, no fusions). A fusion swaps a subgraph for a kernel
# of the runtime's own, whose numerics are the runtime's: ONNX Runtime 1.30 and 1.31 fuse an FP16 RMSNorm
# into a SimplifiedLayerNormalization whose CPU kernel is 40x less accurate than the ops it replaces (a
# two-layer Qwen2: 0.036 against 0.0009; 1.32 is fixed), which failed a sound FP16 graph on one machine
# and passed it on another, and which the fallback search could not see, since it reads intermediate
# tensors and an intermediate read as an output blocks the fusion. Each engine is still checked with its
# own runtime's optimizations (an onnxruntime-cpu engine is judged with that kernel).
GATE_OPTIMIZATION = "basic"


def gate_options() -> Any:
    """ONNX Runtime session options that run the graph as written (see GATE_OPTIMIZATION)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{GATE_OPTIMIZATION.upper()}")
    return options


def gate_session(graph: Path | bytes) -> Any:
    """A CPU session over the graph as written: a file, or a serialized model."""
    import onnxruntime as ort

    return ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph), gate_options(),
                                providers=["CPUExecutionProvider"])


def gate_record() -> dict[str, str]:
    """What judged an ONNX gate, for the manifest."""
    import onnxruntime as ort

    return {"runtime": f"onnxruntime {ort.__version__}", "provider": "CPUExecutionProvider",
            "graph_optimization": GATE_OPTIMIZATION}


def onnxruntime_cpu_runner(path: Path, name: str) -> Any:
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(lambda: gate_session(path), name=name)


def validate_onnx(path: Path, reference: Reference, *, tolerance: Tolerance, name: str) -> ParityResult:
    [result] = compare(reference.runner(), [onnxruntime_cpu_runner(path, name)], reference.feeds,
                       tolerance=tolerance, **reference.policy())
    return result

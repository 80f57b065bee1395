"""Per-task knowledge, declared as data: the inputs a task feeds, the outputs it returns, their axes.

The same declaration drives loading, export (names and dynamic axes), input generation and
validation, so generic code never asks which model it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Axis names used in ONNX dynamic axes; "sequence" and "image" are sized by the recipe's shapes.
BATCH, SEQUENCE, IMAGE = "batch", "sequence", "image"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    axes: tuple[str | None, ...]  # a named dynamic axis, or None for a static one


@dataclass(frozen=True)
class TaskSpec:
    task: str
    auto_class: str  # the transformers Auto class that loads this task's head
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Inputs fed only when the model's forward takes them and its config has the named attribute.
    optional_inputs: tuple[tuple[TensorSpec, str], ...] = ()
    logits: tuple[str, ...] = ()  # outputs whose argmax is meaningful
    forward_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        return any(IMAGE in t.axes for t in self.inputs)


_IDS = TensorSpec("input_ids", "int64", (BATCH, SEQUENCE))
_MASK = TensorSpec("attention_mask", "int64", (BATCH, SEQUENCE))
_TYPES = (TensorSpec("token_type_ids", "int64", (BATCH, SEQUENCE)), "type_vocab_size")
_PIXELS = TensorSpec("pixel_values", "float32", (BATCH, None, IMAGE, IMAGE))

TASK_SPECS: dict[str, TaskSpec] = {
    spec.task: spec
    for spec in (
        TaskSpec("feature-extraction", "AutoModel", (_IDS, _MASK),
                 (TensorSpec("last_hidden_state", "float32", (BATCH, SEQUENCE, None)),),
                 optional_inputs=(_TYPES,)),
        TaskSpec("sequence-classification", "AutoModelForSequenceClassification", (_IDS, _MASK),
                 (TensorSpec("logits", "float32", (BATCH, None)),),
                 optional_inputs=(_TYPES,), logits=("logits",)),
        TaskSpec("token-classification", "AutoModelForTokenClassification", (_IDS, _MASK),
                 (TensorSpec("logits", "float32", (BATCH, SEQUENCE, None)),),
                 optional_inputs=(_TYPES,), logits=("logits",)),
        TaskSpec("causal-lm", "AutoModelForCausalLM", (_IDS, _MASK),
                 (TensorSpec("logits", "float32", (BATCH, SEQUENCE, None)),),
                 logits=("logits",), forward_kwargs={"use_cache": False}),
        TaskSpec("image-classification", "AutoModelForImageClassification", (_PIXELS,),
                 (TensorSpec("logits", "float32", (BATCH, None)),), logits=("logits",)),
    )
}


def task_spec(task: str) -> TaskSpec:
    return TASK_SPECS[task]

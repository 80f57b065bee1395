"""What a run writes for each shard: the task a model's artifact is run for (`kind`), the width of its
vectors, and the Arrow table of a shard's results. Shared by the single-host run (run.py) and the
Ray Data pipeline (raydata.py), so both write the same tables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trtforge.errors import ArtifactError
from trtforge.job.inputs import InputError
from trtforge.tokens import activate, embedding_width

CHARS_PER_TOKEN = 16  # texts are cut at max_length x this many characters, far past what the tokenizer keeps


@dataclass
class Shard:
    index: int
    rows: int  # input rows it covers (bad ones included)
    numbers: list[int]  # the global row number of each good row
    texts: list[str]
    ids: list[str | None] | None
    bad: list[dict[str, Any]]
    truncated: np.ndarray | None = None  # bool per good row: cut at the model's max_length


def kind(artifact: Path, text: dict | None, task: str, pair_column: str | None) -> str:
    from trtforge.tokens import LABEL_TASKS

    if text is None:
        raise ArtifactError(f"{artifact} carries no tokenizer (no text.json), so trtforge run cannot read text "
                            "with it; build it from a model folder that has its tokenizer")
    if text.get("cross_encoder"):
        if not pair_column:
            raise InputError(f"{artifact} is a cross-encoder: it scores pairs of texts; name the column of each "
                             "pair's second text with --pair-column")
        return "scores"
    if pair_column:
        raise InputError(f"--pair-column: {artifact} is not a cross-encoder (it reads one text a row); drop --pair-column")
    if text.get("pooling"):
        return "embeddings"
    if task in LABEL_TASKS:
        return "labels"
    raise ArtifactError(f"{artifact} is a {task} model without pooling: trtforge run writes embeddings (models "
                        "with sentence-transformers pooling), labels (sequence classifiers) and scores "
                        "(cross-encoders) only; per-token outputs are not written yet (use trtforge.runtime.Runtime.encode)")


def width(manifest: dict, text: dict, kind: str) -> int:
    """The length of each row's vector: the embedding's (after Dense layers and truncate_dim), or
    the number of labels."""
    output = manifest["io"]["outputs"][0]
    last = output["shape"][-1]
    if not isinstance(last, int):
        raise ArtifactError(f"the artifact's output {output['name']} has no fixed last axis ({last!r})")
    return embedding_width(text["pooling"], last) if kind == "embeddings" else last


def table(shard: Shard, outputs: dict | None, kind: str, width: int, text: dict) -> Any:
    """A shard's results as an Arrow table: row, id (where asked), the task's columns, then
    `truncated` (the row was longer than the model's max_length and cut there)."""
    found = columns(outputs, len(shard.numbers), kind, width, text)
    truncated = shard.truncated if shard.truncated is not None else np.zeros(len(shard.numbers), dtype=bool)
    return arrow(shard.numbers, shard.ids, {**found, "truncated": truncated})


def columns(outputs: dict | None, n: int, kind: str, width: int, text: dict) -> dict[str, np.ndarray]:
    """The task's columns from the runtime's outputs for n rows: `embedding`; or `score` (the
    cross-encoder's activation on its logits, as CrossEncoder.predict gives them); or `label` (the
    config's name), `label_id`, `score` and `logits`."""
    empty = np.zeros((0, width), np.float32)
    if kind == "embeddings":
        return {"embedding": np.asarray(outputs["embedding"] if outputs else empty, dtype=np.float32)}
    if kind == "scores":
        activation = (text.get("cross_encoder") or {}).get("activation", "identity")
        scores = activate(activation, np.asarray(outputs["logits"] if outputs else empty, dtype=np.float32))
        return {"score": scores[:, 0] if width == 1 else scores}
    labels = text.get("labels")
    label = outputs["label"].astype(np.int64) if outputs else np.zeros(0, np.int64)
    names = [labels[i] for i in label.tolist()] if labels else label.astype(str).tolist()
    columns = {"label": np.array(names, dtype=object).reshape(n), "label_id": label,
               "score": np.asarray(outputs["score"] if outputs else np.zeros(0), dtype=np.float32),
               "logits": np.asarray(outputs["logits"] if outputs else empty, dtype=np.float32)}
    return columns


def arrow(numbers: list[int], ids: list[str | None] | None, columns: dict[str, np.ndarray]) -> Any:
    import pyarrow as pa

    table: dict[str, Any] = {"row": pa.array(np.asarray(numbers, dtype=np.int64))}
    if ids is not None:
        table["id"] = pa.array(ids, pa.string())
    for name, values in columns.items():
        if values.dtype == object:
            table[name] = pa.array(values.tolist(), pa.string())
        elif values.ndim == 2:
            table[name] = vectors(values, values.shape[1])
        else:
            table[name] = pa.array(values)
    result = pa.table(table)
    assert result.num_rows == len(numbers), (result.num_rows, len(numbers))
    return result


def vectors(values: np.ndarray, width: int) -> Any:
    import pyarrow as pa

    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), width)

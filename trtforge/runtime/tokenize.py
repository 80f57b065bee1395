"""Texts to token ids at engine speed: the artifact's tokenizer.json run by the tokenizers library
(Rust, its own thread pool, outside the GIL), its output kept ragged (one flat array of ids and
the rows' lengths) until a chunk is padded to its bucket, in one vectorised step.

transformers' tokenizer `__call__` tops out near 24k short texts/s on a 16-core host whatever the
thread count (Python work per text); `encode_batch_fast` with the conversion below is the
tokenizers library's own speed (docs/measured.md). The ids are the same: the shipped tokenizer.json
truncates at text.json's max_length and adds the model's special tokens (tests/test_tokens.py checks
them against transformers).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np


@dataclass
class Tokens:
    """Ragged token ids of `len(lengths)` texts: row i is ids[starts[i]:starts[i] + lengths[i]]."""

    ids: np.ndarray  # int64, every row's ids one after another
    type_ids: np.ndarray | None  # int64 like ids, where the tokenizer gives segment ids that are not all 0
    lengths: np.ndarray  # int64, real tokens per row (special tokens included)
    truncated: np.ndarray | None = None  # bool per row: the tokenizer cut it at max_length (None: not known)

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, rows: Any) -> Tokens:
        """The rows' tokens as a Tokens of their own (ragged, in the order given)."""
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows)
        lengths = self.lengths[rows]
        index = _ragged_index(self.starts[rows], lengths)
        return Tokens(self.ids[index], None if self.type_ids is None else self.type_ids[index], lengths,
                      None if self.truncated is None else self.truncated[rows])

    def arrays(self) -> dict[str, np.ndarray]:
        """The parts as named arrays (to cross shared memory); from_arrays() reads them back."""
        parts = {"ids": self.ids, "lengths": self.lengths}
        if self.type_ids is not None:
            parts["type_ids"] = self.type_ids
        if self.truncated is not None:
            parts["truncated"] = self.truncated
        return parts

    @classmethod
    def from_arrays(cls, parts: dict[str, np.ndarray]) -> Tokens:
        return cls(parts["ids"], parts.get("type_ids"), parts["lengths"], parts.get("truncated"))

    def padded(self, rows: np.ndarray, width: int, inputs: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The rows' attention mask and the engine's inputs for them, right-padded with zeros to
        `width` (masked)."""
        lengths = np.minimum(self.lengths[rows], width)
        mask = np.arange(width)[None, :] < lengths[:, None]
        index = self.starts[rows][:, None] + np.arange(width)[None, :]
        feed = {"attention_mask": mask.astype(np.int64)}
        flat = np.flatnonzero(mask.ravel())
        for name, source in (("input_ids", self.ids), ("token_type_ids", self.type_ids)):
            block = np.zeros((len(rows), width), dtype=np.int64)
            if source is not None:
                block.ravel()[flat] = source[index.ravel()[flat]]
            feed[name] = block
        return feed["attention_mask"], {name: feed[name] for name in inputs}


def _ragged_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions of the rows' tokens in the flat arrays, row after row."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    row_start = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return row_start + np.arange(total)


class FastTokenizer:
    """The artifact's tokenizer.json, truncating at `max_length`, without padding (chunks are
    padded to their own bucket later). `threads`: the tokenizers library's pool size for this
    process (RAYON_NUM_THREADS), set before its first use; None leaves its default (every core)."""

    def __init__(self, tokenizer_dir: Path, max_length: int, *, threads: int | None = None) -> None:
        if threads is not None:
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        from tokenizers import Tokenizer

        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the artifact's text interface needs its fast tokenizer")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()
        self.max_length = max_length

    def encode(self, texts: list[str]) -> Tokens:
        """Ragged ids of the texts (encode_batch_fast: no character offsets, which cost more), and
        which rows were cut at max_length (those of max_length tokens with overflowing tokens)."""
        encodings = self.tokenizer.encode_batch_fast(texts)
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
        total = int(lengths.sum())
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=total)
        types = np.fromiter(itertools.chain.from_iterable(e.type_ids for e in encodings), dtype=np.int64, count=total)
        truncated = np.zeros(len(lengths), dtype=bool)
        for row in np.flatnonzero(lengths == self.max_length):
            truncated[row] = bool(encodings[row].overflowing)
        return Tokens(ids, types if types.any() else None, lengths, truncated)

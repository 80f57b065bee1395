"""Request shaping: what a caller sends, checked, made into a request of chunks the engines take.

A batch of token ids becomes chunks within the profile (at most its max batch, at least its min),
spread over the live workers; with length-aware batching, rows are grouped by real length and each
chunk is cut to its longest row, rounded up to a bucket. Texts become chunks of similar length that
the workers tokenize. Nothing here touches a worker, a pipe or shared memory.
"""

from __future__ import annotations

import itertools
import math
import time
from concurrent.futures import Future
from typing import Any, Mapping, Sequence

import numpy as np

from trtforge.runtime.batching import bucket_for, real_lengths
from trtforge.runtime.requests import Chunk, Request, request_arrays, request_rows

TEXT_BYTES_PER_TOKEN = 16  # texts are cut at max_length x this many characters before they are sent
TOKEN_BUDGET = 16_384  # padded tokens a chunk of token ids holds at most (text-embeddings-inference's default)


class RequestShaper:
    """Checks a request at the call and cuts it into chunks (see the module's docstring)."""

    def __init__(self, manifest: dict[str, Any], *, batching: str, text: dict[str, Any] | None) -> None:
        self.inputs = manifest["io"]["inputs"]
        self.sequence_inputs = {s["name"] for s in self.inputs if "sequence" in s["shape"]}
        self.profile = {k: tuple(v) for k, v in manifest["shapes"].items()}
        self.max_batch = self.profile["batch"][2]
        self.vocab = manifest["model"].get("vocab_size")
        self.type_vocab = manifest["model"].get("type_vocab_size")
        self.batching, self.text = batching, text

    def arrays(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The request as arrays of the engine's dtypes (requests.request_arrays: names, dtypes, ids)."""
        return request_arrays(batch, self.inputs, self.vocab, self.type_vocab)

    def request(self, request_id: int, arrays: dict[str, np.ndarray], workers: int, *, submitted: float,
                timeout_s: float) -> Request:
        """Token ids in chunks over `workers` workers."""
        rows = request_rows(arrays, self.inputs, self.profile, self.sequence_inputs)
        lengths = real_lengths(arrays) if self.batching == "length" else None
        chunks = [Chunk(request_id, i, index, length)
                  for i, (index, length) in enumerate(groups(rows, workers, lengths, self.profile))]
        request = Request(Future(), arrays, chunks, submitted + timeout_s, submitted)
        sequence = [v.shape[1] for k, v in arrays.items() if k in self.sequence_inputs and v.ndim > 1]
        request.length = sequence[0] if sequence else 0
        request.length_aware = lengths is not None
        return request

    def text_request(self, request_id: int, texts: Sequence[str], workers: int, *, timeout_s: float) -> Request:
        """Texts in length-sorted chunks over `workers` workers, each cut far past what the tokenizer keeps."""
        submitted = time.monotonic()
        texts = checked_texts(texts)
        cut = TEXT_BYTES_PER_TOKEN * self.text["max_length"]
        texts = [t[:cut] for t in texts]
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths share a batch
        count = max(math.ceil(len(texts) / self.max_batch), min(workers, len(texts)))
        chunks = [Chunk(request_id, i, part) for i, part in enumerate(np.array_split(order, count))]
        return Request(Future(), texts, chunks, submitted + timeout_s, submitted, text=True)

    def tokens_request(self, request_id: int, tokens: Any, workers: int, *, timeout_s: float,
                       token_budget: int = TOKEN_BUDGET) -> Request:
        """Ragged token ids (runtime/tokenize.Tokens) in chunks of rows of similar length, each at
        most `token_budget` tokens once padded to its bucket (and at most the profile's max batch):
        short texts make chunks of many rows, long ones of few, so that every engine call has work
        of about one size; at least one chunk per worker where there are rows enough."""
        submitted = time.monotonic()
        if len(tokens) == 0:
            raise ValueError("submit_tokens() takes at least one row, got none")
        if int(tokens.lengths.min()) < 1:
            raise ValueError("submit_tokens(): every row needs at least one token")
        too_long = int(tokens.lengths.max())
        if too_long > self.profile["sequence"][2]:
            raise ValueError(f"a row of {too_long} tokens is longer than the profile's max sequence "
                             f"{self.profile['sequence'][2]}; tokenize with truncation at text.json's max_length")
        order = np.argsort(tokens.lengths, kind="stable")
        rows_cap = min(self.max_batch, max(1, -(-len(tokens) // workers)))
        chunks = [Chunk(request_id, i, part) for i, part in
                  enumerate(budget_chunks(tokens.lengths[order], order, rows_cap, token_budget, self.profile))]
        return Request(Future(), tokens, chunks, submitted + timeout_s, submitted, text=True)

    def slice(self, arrays: dict[str, np.ndarray], chunk: Chunk) -> dict[str, np.ndarray]:
        """The chunk's rows; with length-aware batching, sequence inputs at exactly the chunk's
        bucket: cut, or padded with zeros (masked) where the request is narrower than its bucket, so
        that engines only ever meet bucket widths (one CUDA graph each, all warmed ahead)."""
        if chunk.length is None:
            return {k: v[chunk.rows] for k, v in arrays.items()}
        return {k: _to_width(v[chunk.rows], chunk.length) if k in self.sequence_inputs else v[chunk.rows]
                for k, v in arrays.items()}


def budget_chunks(sorted_lengths: np.ndarray, order: np.ndarray, rows_cap: int, token_budget: int,
                  profile: Mapping[str, tuple[int, int, int]]) -> list[np.ndarray]:
    """Rows (in `order`, ascending length) cut into runs whose padded size (rows x the bucket of the
    longest) stays within `token_budget`, of at most `rows_cap` rows (at least one row each)."""
    parts, start = [], 0
    while start < len(order):
        lo, hi = start + 1, min(len(order), start + rows_cap)  # padded size grows with stop: search it
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (mid - start) * bucket_for(int(sorted_lengths[mid - 1]), profile["sequence"]) <= token_budget:
                lo = mid
            else:
                hi = mid - 1
        parts.append(order[start:lo])
        start = lo
    return parts


def checked_texts(texts: Any) -> list[str]:
    """A non-empty list of strings, or an error that names what is wrong (a bare string, an element)."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"encode() takes a list of texts, got one {type(texts).__name__} (it would be read as "
                        f"{len(texts)} one-character texts); pass [text]")
    texts = list(texts)
    if not texts:
        raise ValueError("encode() takes a non-empty list of strings, got an empty one")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"encode() takes strings; texts[{index}] is {type(text).__name__} {text!r:.60}")
    return texts


def default_batching(outputs: str) -> str:
    """Length-aware where results come back to the host in input order; fixed rows on the devices."""
    return "length" if outputs == "host" else "fixed"


def groups(rows: int, workers: int, lengths: np.ndarray | None,
           profile: Mapping[str, tuple[int, int, int]]) -> list[tuple[Any, int | None]]:
    """Chunks of a request as (rows, sequence length to cut to): at most the profile's max batch, at
    least its min (so every chunk fits a profile a single engine accepts), spread over the workers;
    rows sorted by length and each chunk cut to its longest (bucketed) where `lengths`."""
    lo_batch, _, max_batch = profile["batch"]
    count = max(math.ceil(rows / max_batch), min(workers, max(1, rows // lo_batch)))
    if count == 1:  # the whole request, rows in place: no reordering (its results go straight where they belong)
        return [(slice(0, rows), None if lengths is None else bucket_for(int(lengths.max()), profile["sequence"]))]
    if lengths is None:  # contiguous rows, kept at the request's length
        bounds = list(itertools.accumulate((rows // count + (i < rows % count) for i in range(count)), initial=0))
        return [(slice(a, b), None) for a, b in zip(bounds, bounds[1:])]
    uniform = lengths.min() == lengths.max()  # (rows of one length, as unpadded requests are: no sort)
    order = np.arange(rows) if uniform else np.argsort(lengths, kind="stable")
    in_place = uniform or bool((np.diff(order) == 1).all())  # already in order: slices, not copies
    result: list[tuple[Any, int | None]] = []
    for part in np.array_split(order, count):
        rows_of = slice(int(part[0]), int(part[-1]) + 1) if in_place else part
        result.append((rows_of, bucket_for(int(lengths[part].max()), profile["sequence"])))
    return result


def chunk_shapes(arrays: Mapping[str, np.ndarray], profile: Mapping[str, tuple[int, int, int]], workers: int,
                 batching: str = "length") -> list[tuple[int, int]]:
    """The (rows, sequence) shapes a request is run at on `workers` workers (see groups)."""
    rows = len(next(iter(arrays.values())))
    width = next((v.shape[1] for v in arrays.values() if v.ndim > 1), 1)
    lengths = real_lengths(arrays) if batching == "length" else None
    shapes = []
    for part, length in groups(rows, workers, lengths, profile):
        count = len(range(rows)[part]) if isinstance(part, slice) else len(part)
        shapes.append((count, length if length is not None else width))
    return sorted(set(shapes))


def _to_width(array: np.ndarray, width: int) -> np.ndarray:
    if array.shape[1] >= width:
        return array[:, :width]
    wider = np.zeros((array.shape[0], width, *array.shape[2:]), dtype=array.dtype)  # (np.pad: 10x slower)
    wider[:, :array.shape[1]] = array
    return wider

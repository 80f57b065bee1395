"""Real-text workloads: sentences and paragraphs of real English prose, and the contenders that
serve them on one device.

Source: the license texts Debian's base-files package installs under /usr/share/common-licenses
(Apache-2.0, GPL, LGPL, MPL, ...): real English written by people, not for this project, present on
every Debian and Ubuntu machine. "short" takes their sentences (what queries and sentence-embedding
calls look like), "passage" their paragraphs; both are cycled to the number of rows asked for, in a
fixed shuffled order, and the source's sha256 is recorded with every result.

Contenders, on the same token ids:
- the runtime: requests of `request_rows` rows, padded to the request's longest; the runtime groups
  rows by length and cuts each chunk to its longest (length-aware batching); for models with
  sentence pooling (MiniLM), text in and embeddings out (`Runtime.encode`, tokenization included);
- PyTorch eager FP16 (SDPA), batches of `batch` rows in arrival order, each padded to its longest row:
  what a DDP rank does with a padding collator;
- the same with the whole workload sorted by length first;
- torch.compile (dynamic shapes) of the eager model, batches as the first, where it compiles.
"""

from __future__ import annotations

import hashlib
import re
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

SOURCE = Path("/usr/share/common-licenses")


def corpus(kind: str, rows: int, *, seed: int = 0, source: Path = SOURCE) -> tuple[list[str], dict[str, Any]]:
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.is_symlink())
    if not files:
        raise FileNotFoundError(f"no texts under {source}; install Debian's base-files (it ships them)")
    digest = hashlib.sha256()
    units: list[str] = []
    for path in files:
        text = path.read_text(errors="replace")
        digest.update(path.name.encode() + text.encode())
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
        if kind == "passage":
            units += [p for p in paragraphs if len(p.split()) >= 20]
        else:
            units += [s.strip() for p in paragraphs for s in re.split(r"(?<=[.;?!])\s+", p)
                      if 3 <= len(s.split()) <= 60]
    order = np.random.default_rng(seed).permutation(len(units))
    texts = [units[i] for i in np.resize(order, rows)]
    return texts, {"source": str(source), "files": [p.name for p in files], "sha256": digest.hexdigest(),
                   "units": len(units), "kind": kind}


def token_ids(tokenizer: Any, texts: list[str], max_length: int) -> list[np.ndarray]:
    return [np.array(ids, dtype=np.int64) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]


def padded(rows: list[np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {n: feed[n] for n in names}


def batches(rows: list[np.ndarray], size: int, *, sort: bool) -> list[list[np.ndarray]]:
    order = sorted(range(len(rows)), key=lambda i: len(rows[i])) if sort else list(range(len(rows)))
    return [[rows[i] for i in order[k:k + size]] for k in range(0, len(rows), size)]


def summary(seconds: list[float], latencies: list[float], rows: int, tokens: int) -> dict[str, Any]:
    best = min(seconds)
    lat = sorted(latencies)
    return {"seconds_best": round(best, 4), "seconds_all": [round(s, 4) for s in seconds],
            "sequences_per_s": round(rows / best, 1), "tokens_per_s": round(tokens / best, 1),
            "p50_ms": round(lat[len(lat) // 2], 3), "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3)}


def time_torch(model: Any, feeds: list[dict[str, Any]], passes: int, output: str, *,
               pool: bool) -> tuple[list[float], list[float], list[Any]]:
    """Every batch's per-row result delivered to the host, as a service returns it: the output, or
    with `pool` its mean over real tokens, L2-normalised (computed on the GPU)."""
    import torch

    seconds, latencies, outputs = [], [], []
    for p in range(passes + 1):  # the first pass warms every shape and is not counted
        torch.cuda.synchronize()
        start = time.perf_counter()
        results = []
        for feed in feeds:
            t = time.perf_counter()
            with torch.inference_mode():
                out = model(**feed, return_dict=True)[output]
                if pool:
                    weights = feed["attention_mask"].unsqueeze(-1).to(out.dtype)
                    out = torch.nn.functional.normalize((out * weights).sum(1).float() / weights.sum(1).float(), dim=1)
                results.append(out.float().cpu())  # synchronises: the batch is done
            latencies.append(1e3 * (time.perf_counter() - t)) if p else None
        if p:
            seconds.append(time.perf_counter() - start)
        outputs = results
    return seconds, latencies, outputs


def time_runtime(runtime: Any, requests: list[Any], passes: int, depth: int = 2,
                 submit: Any = None) -> tuple[list[float], list[float], list[dict[str, np.ndarray]]]:
    """All requests, `depth` in flight (a service keeps the device fed), timed per pass."""
    submit = submit or runtime.submit
    seconds, latencies, outputs = [], [], []
    for p in range(passes + 1):
        start = time.perf_counter()
        in_flight: list[tuple[float, Any]] = []
        results = []
        for request in requests:
            if len(in_flight) >= depth:
                t, future = in_flight.pop(0)
                results.append(future.result())
                latencies.append(1e3 * (time.perf_counter() - t)) if p else None
            in_flight.append((time.perf_counter(), submit(request)))
        for t, future in in_flight:
            results.append(future.result())
            latencies.append(1e3 * (time.perf_counter() - t)) if p else None
        if p:
            seconds.append(time.perf_counter() - start)
        outputs = results
    return seconds, latencies, outputs


def parity(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
    """Per-row outputs (pooled or logits) of two contenders: worst cosine and max abs difference."""
    a = np.concatenate([r.reshape(len(r), -1) for r in reference]).astype(np.float64)
    b = np.concatenate([c.reshape(len(c), -1) for c in candidate]).astype(np.float64)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"min_cosine": round(float(cosine.min()), 6), "max_abs": round(float(np.abs(a - b).max()), 5),
            "rows": int(len(a))}


def median(values: list[float]) -> float:
    return statistics.median(values)


if __name__ == "__main__":  # python -m trtforge.bench.workloads short|passage ROWS FILE: the texts, one a line
    import sys

    if len(sys.argv) != 4 or sys.argv[1] not in ("short", "passage"):
        raise SystemExit("usage: python -m trtforge.bench.workloads short|passage ROWS FILE")
    texts, about = corpus(sys.argv[1], int(sys.argv[2]))
    Path(sys.argv[3]).write_text("".join(f"{t}\n" for t in texts))
    print(f"wrote {len(texts)} {sys.argv[1]} texts to {sys.argv[3]} (from {about['source']}, sha256 {about['sha256'][:12]})")

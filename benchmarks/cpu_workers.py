"""Throughput of CPU workers (onnxruntime-cpu engines) as their number grows, on this machine: what
confining each worker to its share of the cores changed (before, every worker's engine ran one
thread per core of the machine).

    python benchmarks/cpu_workers.py --out benchmarks/results [--workers 1,2] [--requests 100]

Builds the one-layer BERT feature extractor of caller_cost.py (random weights, hidden 256), then
sends requests of 64 rows x 64 tokens (real lengths 16 to 64), four in flight, to a runtime of N CPU
workers; writes cpu-workers.json and cpu-workers.md (milliseconds per request, median of three runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from caller_cost import RECIPE


def feed(rows: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(seq // 4, seq + 1, rows)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 1000, (rows, seq)) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def per_request_ms(runtime, batch, requests: int, depth: int = 4) -> float:
    for _ in range(5):
        runtime.run(batch)
    in_flight = []
    start = time.perf_counter()
    for _ in range(requests):
        if len(in_flight) >= depth:
            in_flight.pop(0).result(timeout=300)
        in_flight.append(runtime.submit(batch))
    for future in in_flight:
        future.result(timeout=300)
    return 1e3 * (time.perf_counter() - start) / requests


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()

    from trtforge.pipeline import Build
    from trtforge.recipe import load_recipe
    from trtforge.runtime import Runtime

    counts = [int(n) for n in args.workers.split(",")]
    batch = feed(64, 64)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "caller-cost.toml"
        recipe.write_text(RECIPE)
        artifact = Build(load_recipe(recipe), Path(tmp) / "out").run().artifact
        for n in counts:
            with Runtime(artifact, devices=n, timeout_s=300) as runtime:
                cores = [sorted(os.sched_getaffinity(w["pid"])) for w in runtime.workers]
                runs = [per_request_ms(runtime, batch, args.requests) for _ in range(3)]
            row = {"workers": n, "cores_per_worker": cores, "ms_per_request": round(statistics.median(runs), 2),
                   "runs_ms": [round(r, 2) for r in runs]}
            results.append(row)
            print(row, flush=True)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv),
              "host": {"platform": platform.platform(), "cpus": os.cpu_count()}, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-workers.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# CPU workers: milliseconds per request as workers are added", "",
             f"{report['date']}, {report['host']['platform']}, {report['host']['cpus']} CPUs; `{report['command']}`. "
             "Requests of 64 rows x 64 tokens, four in flight, one-layer BERT (hidden 256), onnxruntime-cpu; "
             "median of three runs.", "",
             "| workers | cores per worker | ms per request | runs |", "|---|---|---|---|"]
    for row in results:
        lines.append(f"| {row['workers']} | {row['cores_per_worker']} | {row['ms_per_request']} | {row['runs_ms']} |")
    (args.out / "cpu-workers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

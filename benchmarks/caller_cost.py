"""What the runtime's caller process spends per request, as the bytes of the results grow: results
written by the workers into the shared heap (the default) against results copied out of the
workers' slots (the heap's fallback), on CPU workers, so it runs anywhere.

    python benchmarks/caller_cost.py --out benchmarks/results [--requests 40]

Builds a one-layer BERT feature extractor (random weights, hidden 256, onnxruntime-cpu engine),
then for requests of 256 rows at several sequence lengths measures the caller's CPU time per request
(time.process_time of the calling process: the submitting thread and the receiver threads; the
workers are other processes) with two CPU workers. Writes caller-cost.json and caller-cost.md.
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

RECIPE = """
[model]
name = "caller-cost-bert"
source = "random"
architecture = "bert"
task = "feature-extraction"
config = { num_hidden_layers = 1, hidden_size = 256, num_attention_heads = 4, intermediate_size = 256, vocab_size = 1000, max_position_embeddings = 128 }

[shapes]
batch = [1, 64, 128]
sequence = [1, 128, 128]

[engines]
backends = ["onnxruntime-cpu"]
"""


def feed(rows: int, seq: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(1, 1000, (rows, seq))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def measure(runtime, batch, requests: int, heap: bool) -> dict[str, float]:
    saved = runtime._heap
    if not heap:
        runtime._heap = None  # every request takes the fallback: results copied out of the slots
    try:
        for _ in range(3):
            runtime.run(batch)
        cpu = []
        for _ in range(requests):
            start = time.process_time()
            result = runtime.run(batch)
            cpu.append(1e3 * (time.process_time() - start))
            del result
    finally:
        runtime._heap = saved
    return {"caller_cpu_ms_p50": round(statistics.median(cpu), 3), "caller_cpu_ms_mean": round(statistics.fmean(cpu), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()

    from trtforge.pipeline import Build
    from trtforge.recipe import load_recipe
    from trtforge.runtime import Runtime

    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "caller-cost.toml"
        recipe.write_text(RECIPE)
        artifact = Build(load_recipe(recipe), Path(tmp) / "out").run().artifact
        rows, results = 256, []
        with Runtime(artifact, devices=2, batching="fixed", timeout_s=300) as runtime:
            for seq in (16, 32, 64, 128):
                batch = feed(rows, seq)
                megabytes = rows * seq * 256 * 4 / 1e6
                row = {"rows": rows, "sequence": seq, "result_mb": round(megabytes, 1)}
                for name, heap in (("heap", True), ("copied", False)):
                    row[name] = measure(runtime, batch, args.requests, heap)
                results.append(row)
                print(row, flush=True)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "host": {"platform": platform.platform(),
                                                                    "cpus": os.cpu_count()},
              "workers": "2 CPU workers (onnxruntime-cpu)", "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "caller-cost.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# The caller's CPU per request as results grow", "",
             f"{report['date']}, {report['host']['platform']}, {report['host']['cpus']} CPUs, {report['workers']}; "
             f"`{report['command']}`. Median of {args.requests} requests, one at a time, per-token outputs "
             "(rows x sequence x 256 float32) to host memory.", "",
             "| sequence | result MB | caller CPU ms, heap (default) | caller CPU ms, copied out of slots |",
             "|---|---|---|---|"]
    for row in results:
        lines.append(f"| {row['sequence']} | {row['result_mb']} | {row['heap']['caller_cpu_ms_p50']} | "
                     f"{row['copied']['caller_cpu_ms_p50']} |")
    (args.out / "caller-cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

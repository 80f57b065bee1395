"""The runtime's caller CPU per chunk when engines are fast: a tiny classifier on CPU workers, so
that what is measured is the caller's own work (checks, split, slot writes, descriptors, answers),
not the bytes it moves.

    python benchmarks/caller_chunk_cost.py --out DIR [--requests 6000] [--runs 3] [--label NAME]

Builds a one-layer BERT classifier (random weights, hidden 32, onnxruntime-cpu engine), then sends
requests of 32 x 2 rows of 8 tokens (no padding) to a runtime of two CPU workers, four requests in
flight per worker, with trtforge.bench.harness.measure_runtime, and reports the caller process's CPU
time (all its threads) per chunk: the median of --runs runs. Writes caller-chunk-cost[-LABEL].json
and .md. Run it at two commits to compare them (git worktree add, then run there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RECIPE = """
[model]
name = "caller-chunk-cost"
source = "random"
architecture = "bert"
task = "sequence-classification"
config = { num_hidden_layers = 1, hidden_size = 32, num_attention_heads = 2, intermediate_size = 32, vocab_size = 1000, max_position_embeddings = 128, num_labels = 2 }

[shapes]
batch = [1, 32, 128]
sequence = [1, 128, 128]

[engines]
backends = ["onnxruntime-cpu"]
"""
WORKERS, ROWS, TOKENS = 2, 32, 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--label", default="")
    args = parser.parse_args()

    from trtforge.pipeline import Build
    from trtforge.recipe import load_recipe
    from trtforge.runtime import Runtime
    from trtforge.bench.harness import measure_runtime

    ids = np.random.default_rng(0).integers(1, 1000, (ROWS * WORKERS, TOKENS))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "r.toml"
        recipe.write_text(RECIPE)
        artifact = Build(load_recipe(recipe), Path(tmp) / "out").run().artifact
        for _ in range(args.runs):
            with Runtime(artifact, devices=WORKERS, timeout_s=300) as runtime:
                result = measure_runtime(runtime, feed, iterations=args.requests, warmup=50, depth=4 * WORKERS)
            runs.append({"caller_cpu_ms_per_chunk": round(result["caller_cpu_ms_per_request"] / WORKERS, 4),
                         "throughput": result["throughput"], "caller_cpu_percent": result["caller_cpu_percent"]})
            print(runs[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
              "command": "python " + " ".join(sys.argv),
              "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "setup": f"{WORKERS} CPU workers, requests of {ROWS} x {WORKERS} rows x {TOKENS} tokens, "
                       f"{4 * WORKERS} in flight, {args.requests} requests a run",
              "caller_cpu_ms_per_chunk": statistics.median(r["caller_cpu_ms_per_chunk"] for r in runs), "runs": runs}
    name = "caller-chunk-cost" + (f"-{args.label}" if args.label else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Caller CPU per chunk at {commit}", "",
             f"{report['date']}, {report['host']['platform']}, {report['host']['cpus']} CPUs; `{report['command']}`; "
             f"{report['setup']}.", "",
             f"Median of {args.runs} runs: **{report['caller_cpu_ms_per_chunk']} ms** of the caller process's CPU a chunk.",
             "", "| run | caller CPU ms / chunk | sequences/s | caller CPU % of wall |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['caller_cpu_ms_per_chunk']} | {r['throughput']:.0f} | {r['caller_cpu_percent']} |"
              for i, r in enumerate(runs)]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Where an onnxruntime-cuda engine call spends its time, on one GPU: does the call return before
the GPU is done (asynchronous runs), how long the host is held per call, the GPU's own time, and
back-to-back throughput when the host never waits.

    python benchmarks/engine_host_cost.py ARTIFACT [--json OUT]

For each (batch, width) and graph (fused with CUDA graphs, packed): medians over 100 calls of
call_ms (host time inside engine(feed)), total_ms (until the outputs are ready), gpu_ms (CUDA events
around the call) and, for 100 calls queued back to back with one wait at the end, per_call_ms.
Run with the default run options (ONNX Runtime synchronizes at the end of each run) and with
trtforge's (disable_synchronize_execution_providers=1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import trtforge


def feed_for(batch: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, width // 3), width + 1, (batch, 1))
    mask = (np.arange(width)[None, :] < lengths).astype(np.int64)
    ids = rng.integers(1000, 20000, (batch, width)) * mask
    return {k: torch.from_numpy(v).cuda() for k, v in
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}.items()}


def measure(engine, feed, calls: int = 100) -> dict[str, float]:
    for _ in range(10):
        engine(feed)
    torch.cuda.synchronize()
    call, total, gpu = [], [], []
    for _ in range(calls):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start = time.perf_counter()
        begin.record()
        engine(feed)
        returned = time.perf_counter()
        end.record()
        end.synchronize()
        done = time.perf_counter()
        call.append(1e3 * (returned - start))
        total.append(1e3 * (done - start))
        gpu.append(begin.elapsed_time(end))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        engine(feed)
    torch.cuda.synchronize()
    queued = 1e3 * (time.perf_counter() - start) / calls
    return {"call_ms": round(statistics.median(call), 4), "total_ms": round(statistics.median(total), 4),
            "gpu_ms": round(statistics.median(gpu), 4), "per_call_ms": round(queued, 4)}


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    loaded = trtforge.load(args.artifact, "cuda:0")
    inner = loaded.engine
    ours = inner.run_options
    rows = []
    for batch, width in [(1, 32), (32, 64), (32, 128), (128, 64), (128, 128)]:
        feed = feed_for(batch, width, batch + width)
        for mode in ("fused", "packed"):
            if mode == "packed" and inner.packed_session is None:
                continue
            inner.mode = mode
            for name, options in (("default", ort.RunOptions()), ("async", ours)):
                inner.run_options = options
                row = {"batch": batch, "width": width, "graph": mode, "run_options": name, **measure(loaded, feed)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    inner.run_options, inner.mode = ours, "auto"
    result = {"gpu": torch.cuda.get_device_name(0), "onnxruntime": ort.__version__, "torch": torch.__version__,
              "artifact": str(args.artifact), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Where one request at a time spends its time in the runtime, beyond the engine: the runtime's
phases and a cProfile of the calling process, in-process (`Runtime(in_process=True)`: everything runs
in this process, so the profile sees all of it) and the engine's own call for comparison.

    python benchmarks/profile_single.py ARTIFACT --batch 1 --sequence 128 [--device cuda:0] [--json OUT]

Synthetic rows (every token real) at (batch, sequence); prints the p50s, the phases and the 30
functions with the most own time; --json writes them.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    import trtforge
    from trtforge.runtime import Runtime
    from trtforge.runtime.batching import real_tokens

    from trtforge.manifest import read_manifest

    vocab = read_manifest(args.artifact)["model"].get("vocab_size") or 30000
    rng = np.random.default_rng(0)
    ids = rng.integers(min(1000, vocab // 2), min(20000, vocab), (args.batch, args.sequence))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    sync = torch.cuda.synchronize if args.device != "cpu" else (lambda: None)

    engine = trtforge.load(args.artifact, args.device)
    names = [spec["name"] for spec in engine.inputs]
    on_device = {k: torch.from_numpy(v).to(args.device) for k, v in feed.items() if k in names}
    own = []
    for i in range(args.iterations + 20):
        start = time.perf_counter()
        engine(on_device, real_tokens=real_tokens(feed))
        sync()
        if i >= 20:
            own.append(1e3 * (time.perf_counter() - start))
    engine.close()

    feed = {k: v for k, v in feed.items() if k in names}
    device = [int(args.device.split(":")[1])] if args.device != "cpu" else 1
    with Runtime(args.artifact, devices=device, in_process=True, warm=[(args.batch, args.sequence)]) as rt:
        for _ in range(20):
            rt.run(feed)
        rt.time_breakdown(reset=True)
        times = []
        profile = cProfile.Profile()
        for _ in range(args.iterations):
            start = time.perf_counter()
            profile.enable()
            rt.run(feed)
            profile.disable()
            times.append(1e3 * (time.perf_counter() - start))
        phases = rt.time_breakdown()
        plain = []
        for _ in range(args.iterations):  # without the profiler's own cost
            start = time.perf_counter()
            rt.run(feed)
            plain.append(1e3 * (time.perf_counter() - start))
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(30)
    report = {"artifact": str(args.artifact), "batch": args.batch, "sequence": args.sequence, "device": args.device,
              "engine_own_p50_ms": round(statistics.median(own), 4),
              "in_process_p50_ms": round(statistics.median(plain), 4),
              "in_process_profiled_p50_ms": round(statistics.median(times), 4),
              "phases_ms (profiled)": phases}
    print(json.dumps(report, indent=1))
    print(text.getvalue())
    if args.json:
        args.json.write_text(json.dumps({**report, "profile": text.getvalue()}, indent=1) + "\n")


if __name__ == "__main__":
    main()

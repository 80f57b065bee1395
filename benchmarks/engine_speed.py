"""Median latency of each engine of an artifact against PyTorch eager FP16 and torch.compile, on one GPU,
side by side in one process.

    python benchmarks/engine_speed.py engines/bert-base-classifier --batches 1 32 128 --sequence 128

Inputs are fixed random token ids without padding (speed does not depend on values); CUDA events
time each call after warm-up; the median of --runs calls is reported, with p90.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import trtforge  # noqa: E402
from trtforge.models import load_model  # noqa: E402
from trtforge.recipe import load_recipe  # noqa: E402
from trtforge.manifest import read_manifest  # noqa: E402


def timed(fn: Callable[[], Any], runs: int, warmup: int = 10) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    times.sort()
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--compile", nargs="*", default=["default", "max-autotune"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    manifest = read_manifest(args.artifact)
    recipe = load_recipe(args.artifact / "recipe.toml")
    device = torch.device("cuda:0")
    loaded = load_model(recipe.model)
    names = [t["name"] for t in manifest["io"]["inputs"]]
    vocab = loaded.model.config.vocab_size

    def feed_for(batch: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, vocab, (batch, args.sequence), generator=g)
        full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        return {n: full[n].to(device) for n in names}

    rows: dict[str, dict[str, Any]] = {}
    # PyTorch baselines: FP16, eval, SDPA attention (the fastest eager path).
    import transformers

    config = loaded.model.config
    config._attn_implementation = "sdpa"
    torch_model = getattr(transformers, loaded.task.auto_class).from_config(config, attn_implementation="sdpa")
    torch_model.load_state_dict(loaded.model.state_dict())
    torch_model = torch_model.half().to(device).eval()

    def eager(batch_feed: dict[str, torch.Tensor], model: Any = torch_model) -> Any:
        with torch.inference_mode():
            return model(**batch_feed)

    candidates: dict[str, Callable[[dict[str, torch.Tensor]], Any]] = {"pytorch eager fp16 (sdpa)": eager}
    for mode in args.compile:
        compiled = torch.compile(torch_model, mode=mode, dynamic=False)
        candidates[f"torch.compile {mode}"] = lambda f, m=compiled: eager(f, m)
    for entry in manifest["engines"]:
        if entry["status"] != "passed":
            continue
        engine = trtforge.load(args.artifact, "cuda:0", backend_name=entry["backend"])
        candidates[f"trtforge {entry['backend']}"] = engine
        if entry["backend"] == "onnxruntime-cuda":
            from trtforge.backends.onnxruntime import OnnxruntimeEngine

            plain = OnnxruntimeEngine(args.artifact / entry["dir"] / "model.onnx", device="cuda:0",
                                      outputs=entry["io"]["outputs"], cuda_graph=False)
            candidates["trtforge onnxruntime-cuda, no CUDA graph"] = plain

    for name, fn in candidates.items():
        rows[name] = {}
        for batch in args.batches:
            f = feed_for(batch)
            try:
                rows[name][batch] = timed(lambda: fn(f), args.runs)
            except Exception as e:  # a baseline that does not run here is reported, not hidden
                rows[name][batch] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(f"{name:45s} batch {batch:4d}: {rows[name][batch]}", flush=True)
        failures = getattr(fn, "engine", fn)
        if getattr(failures, "graph_failures", None):
            rows[name]["cuda_graph_failures"] = {str(k): v for k, v in failures.graph_failures.items()}

    props = torch.cuda.get_device_properties(0)
    record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "gpu": props.name,
              "artifact": manifest["name"], "sequence": args.sequence, "runs": args.runs,
              "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
              "command": " ".join(["python", *sys.argv]), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"engine-speed-{manifest['name']}.json").write_text(json.dumps(record, indent=2))
    lines = [f"# Engine latency: {manifest['name']}, sequence {args.sequence}, {props.name}", "",
             f"{record['date']}; `{record['command']}`; torch {torch.__version__}, onnxruntime "
             f"{record['versions']['onnxruntime']}; median (p90) ms per batch over {args.runs} calls, CUDA events.", "",
             "| engine | " + " | ".join(f"batch {b}" for b in args.batches) + " |",
             "|---|" + "---|" * len(args.batches)]
    for name, by_batch in rows.items():
        cells = [(f"{c['median_ms']} ({c['p90_ms']})" if "median_ms" in c else c["error"][:60])
                 for c in (by_batch[b] for b in args.batches)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (args.out / f"engine-speed-{manifest['name']}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

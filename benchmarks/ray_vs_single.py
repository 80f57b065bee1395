"""The Ray path against the single-host `trtforge run` on the same input, on this machine (issue 20).

    python benchmarks/ray_vs_single.py --out DIR [--rows 100000] [--engines /tmp/text-in-engines]

MiniLM (built as benchmarks/text_in.py builds it, sharing its engines directory), `rows` short texts
of trtforge.bench.workloads.corpus in one Parquet file. Times, each a process of its own, from
_run.json's summaries (streaming part; start-up apart):
  - single: `trtforge run ARTIFACT FILE --out ...`
  - ray:    the same with `--ray local` (a Ray instance of this machine: one inference actor per GPU,
            a tokenizing actor per CPU but one)
and checks that both wrote the same rows in the same order with the same embeddings. Also the
tokenize stage's rate on one core (the artifact's tokenizer, one thread, short texts and paragraphs):
what each tokenizing actor sustains, for sizing a cluster. Writes DIR/ray.json and DIR/ray.md with
the card, date, commit and command.
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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import text_in  # noqa: E402 (its builders and commit())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--engines", default="/tmp/text-in-engines")
    args = parser.parse_args()
    out, engines = Path(args.out), Path(args.engines)
    out.mkdir(parents=True, exist_ok=True)
    engines.mkdir(parents=True, exist_ok=True)

    import pyarrow as pa
    import pyarrow.parquet as pq

    from trtforge.bench.workloads import corpus

    artifact = text_in.build_minilm(engines)
    texts, about = corpus("short", args.rows)
    path = engines / "ray-short.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=16384)
    runs = {name: run(artifact, path, engines / f"ray-out-{name}", extra)
            for name, extra in (("single", []), ("ray", ["--ray", "local"]))}
    a, b = pq.read_table(engines / "ray-out-single"), pq.read_table(engines / "ray-out-ray")
    same_rows = a.column("row").to_pylist() == b.column("row").to_pylist() == list(range(len(texts)))
    diff = float(np.abs(np.stack(a.column("embedding").to_numpy(zero_copy_only=False)) -
                        np.stack(b.column("embedding").to_numpy(zero_copy_only=False))).max())
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "card": card(),
              "cpu_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
              "commit": text_in.commit(), "command": "python benchmarks/ray_vs_single.py " + " ".join(sys.argv[1:]),
              "rows": len(texts), "corpus_sha256": about["sha256"], "runs": runs,
              "ray_over_single": round(runs["ray"]["rows_per_s"] / runs["single"]["rows_per_s"], 3),
              "same_rows_in_order": same_rows, "max_abs_embedding_difference": diff,
              "tokenize_one_core": tokenize_rate(artifact)}
    (out / "ray.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "ray.md").write_text(markdown(report))
    print(markdown(report))


def card() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only ({platform.machine()})"


def run(artifact: Path, path: Path, out: Path, extra: list[str]) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "trtforge", "run", str(artifact), str(path), "--out", str(out),
                             "-v", *extra], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"trtforge run {' '.join(extra)} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "_run.json").read_text())["summary"]
    return {**{k: summary[k] for k in ("rows_per_s", "tokens_per_s", "startup_s", "streaming_s", "seconds", "tokens",
                                       "tokenizers", "stages_s")},
            "wall_s": round(time.perf_counter() - started, 2), "log": result.stderr.strip().splitlines()[-4:],
            "stderr": result.stderr}  # -v: with --ray, Ray Data's per-operator stats


def tokenize_rate(artifact: Path) -> dict:
    """Rows/s and tokens/s of the artifact's tokenizer on one thread (a tokenizing actor's rate)."""
    from trtforge.bench.workloads import corpus

    text = json.loads((artifact / "text.json").read_text())
    found = {}
    for kind in ("short", "passage"):
        texts = corpus(kind, 16384)[0]
        script = ("import sys, json, time; from pathlib import Path; from trtforge.runtime.tokenize import FastTokenizer; "
                  f"t = FastTokenizer(Path({str(artifact / text['tokenizer'])!r}), {text['max_length']}, threads=1); "
                  "texts = json.load(sys.stdin); t.encode(texts[:512]); s = time.perf_counter(); "
                  "tok = t.encode(texts); d = time.perf_counter() - s; "
                  "print(json.dumps({'rows_per_s': round(len(texts) / d), 'tokens_per_s': round(int(tok.lengths.sum()) / d)}))")
        result = subprocess.run([sys.executable, "-c", script], input=json.dumps(texts), capture_output=True, text=True,
                                env={**os.environ, "RAYON_NUM_THREADS": "1"})
        if result.returncode != 0:
            raise SystemExit(f"tokenizer timing failed:\n{result.stderr[-2000:]}")
        found[kind] = json.loads(result.stdout)
    return found


def markdown(r: dict) -> str:
    s, ray = r["runs"]["single"], r["runs"]["ray"]
    t = r["tokenize_one_core"]
    return "\n".join([
        f"# `trtforge run` on Ray Data against the single-host run ({r['card']}, {r['date']})", "",
        f"Command: `{r['command']}` at {r['commit']}; {r['cpu_cores']} CPU cores; {r['rows']:,} short rows (MiniLM).", "",
        "| path | rows/s | real tokens/s | streaming s | start-up s |", "|---|---|---|---|---|",
        f"| single host | {s['rows_per_s']:,.0f} | {s['tokens_per_s']:,.0f} | {s['streaming_s']} | {s['startup_s']} |",
        f"| --ray local | {ray['rows_per_s']:,.0f} | {ray['tokens_per_s']:,.0f} | {ray['streaming_s']} | {ray['startup_s']} |",
        "", f"Ray / single: {r['ray_over_single']}; same rows in order: {r['same_rows_in_order']}; "
        f"max |embedding difference|: {r['max_abs_embedding_difference']:.2e}.", "",
        f"Tokenizer on one core (one thread): short {t['short']['rows_per_s']:,} rows/s "
        f"({t['short']['tokens_per_s']:,} tokens/s), paragraphs {t['passage']['rows_per_s']:,} rows/s "
        f"({t['passage']['tokens_per_s']:,} tokens/s).", ""])


if __name__ == "__main__":
    main()

"""A cold trtforge build of a recipe against `optimum-cli export onnx` (export and its validation) of
the same model, on the same machine, alternating run by run so that drift hits both alike.

    python benchmarks/build_vs_optimum.py --optimum /path/to/venv-with-optimum/bin/optimum-cli \
        [--recipe recipes/minilm.toml] [--runs 5]

optimum-onnx needs transformers < 4.58, which trtforge's environment does not have, so it runs from
a virtual environment of its own (`python -m venv V && V/bin/pip install torch==2.13.0
'optimum-onnx[onnxruntime]'`). Writes benchmarks/results/build-vs-optimum.{json,md}.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({process.returncode}): {process.stderr.strip()[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimum", required=True, help="the optimum-cli executable")
    parser.add_argument("--recipe", default="recipes/minilm.toml")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from trtforge.recipe import load_recipe  # fails early where trtforge is not installed

    recipe = load_recipe(ROOT / args.recipe)
    model_dir = recipe.model.source
    task = recipe.model.task
    trtforge_times, same_work_times, optimum_times = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        # The same work as optimum's export: the FP32 graph and its validation, no FP16, no engines.
        same_work = Path(tmp) / "same-work.toml"
        text = (ROOT / args.recipe).read_text().split("[fp16]")[0].split("[engines]")[0]
        source = recipe.raw["model"]["source"]
        same_work.write_text(text.replace(f'source = "{source}"', f'source = "{model_dir}"') + "[fp16]\nenabled = false\n")
        for i in range(args.runs + 1):  # the first round warms the file cache and is not counted
            a = timed([sys.executable, "-m", "trtforge", "build", args.recipe, "--out", f"{tmp}/t", "--force", "-q"])
            c = timed([sys.executable, "-m", "trtforge", "build", str(same_work), "--out", f"{tmp}/s", "--force", "-q"])
            b = timed([args.optimum, "export", "onnx", "--model", model_dir, "--task", task, f"{tmp}/o{i}"])
            if i:
                trtforge_times.append(a)
                same_work_times.append(c)
                optimum_times.append(b)
    ratios = [a / b for a, b in zip(trtforge_times, optimum_times)]
    same_ratios = [c / b for c, b in zip(same_work_times, optimum_times)]
    record = {
        "date": dt.date.today().isoformat(), "cpus": os.cpu_count(), "platform": platform.platform(),
        "command": " ".join(["python", "benchmarks/build_vs_optimum.py", "--optimum", "OPTIMUM_CLI",
                             "--recipe", args.recipe, "--runs", str(args.runs)]),
        "trtforge": f"trtforge build {args.recipe} --force (cold: every stage runs)",
        "optimum": f"optimum-cli export onnx --model <{recipe.raw['model']['source']}> --task {task}",
        "trtforge_s": [round(t, 2) for t in trtforge_times], "optimum_s": [round(t, 2) for t in optimum_times],
        "median_trtforge_s": round(statistics.median(trtforge_times), 2),
        "median_optimum_s": round(statistics.median(optimum_times), 2),
        "median_ratio": round(statistics.median(ratios), 2), "target_ratio": 2.0,
        "same_work": "the recipe with [fp16] enabled = false and no [engines]: export and FP32 validation only",
        "same_work_s": [round(t, 2) for t in same_work_times],
        "median_same_work_s": round(statistics.median(same_work_times), 2),
        "median_same_work_ratio": round(statistics.median(same_ratios), 2),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "build-vs-optimum.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Cold build against optimum-cli export onnx ({record['cpus']} cores, {record['date']})", "",
             f"Command: `{record['command']}`  ", f"Platform: {record['platform']}", "",
             "| | median (s) | runs (s) |", "|---|---|---|",
             f"| {record['trtforge']} | {record['median_trtforge_s']} | {record['trtforge_s']} |",
             f"| trtforge, {record['same_work']} | {record['median_same_work_s']} | {record['same_work_s']} |",
             f"| {record['optimum']} | {record['median_optimum_s']} | {record['optimum_s']} |", "",
             f"Median ratio of the full build, pair by pair: **{record['median_ratio']}x** (target: at most "
             f"{record['target_ratio']}x); of the same work as optimum's export: **{record['median_same_work_ratio']}x**. ",
             "trtforge's build does more than optimum's export: the FP16 graph and its validation, a "
             "TensorRT-RTX plan for sm89 and sm120 built ahead of time, a manifest with every file's sha256. "
             "Both validate against PyTorch on the CPU."]
    (RESULTS / "build-vs-optimum.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

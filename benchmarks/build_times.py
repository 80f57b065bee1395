"""Stage-by-stage build times of recipes on this machine, written as JSON and Markdown.

    python benchmarks/build_times.py recipes/minilm.toml recipes/distilbert-base-random.toml

Each recipe is built from scratch (--force) into a temporary directory, then rebuilt to time the
no-op path (a fresh process, imports included).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run(recipe: Path, out: Path, *extra: str) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trtforge", "build", str(recipe), "--out", str(out), "--json",
                           "--quiet", *extra], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        sys.exit(f"build of {recipe} failed: {proc.stderr.strip()}")
    return wall, json.loads(proc.stdout)


def main() -> None:
    recipes = [Path(a) for a in sys.argv[1:]] or [ROOT / "recipes/minilm.toml"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:
            cold, result = run(recipe, Path(tmp), "--force")
            warm, again = run(recipe, Path(tmp))
            rows.append({"recipe": str(recipe), "cold_s": round(cold, 1), "noop_s": round(warm, 2),
                         "noop_up_to_date": again["up_to_date"], "passed": result["passed"],
                         "stages_s": {k: v["duration_s"] for k, v in result["stages"].items()}})
    record = {"date": dt.date.today().isoformat(), "host": platform.node(), "cpus": os.cpu_count(),
              "platform": platform.platform(), "command": " ".join(["python", *sys.argv]), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "build-times-cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    stages = list(dict.fromkeys(s for r in rows for s in r["stages_s"]))  # pipeline order
    lines = [f"# Build times on a CPU machine ({record['cpus']} cores, {record['date']})", "",
             f"Command: `{record['command']}`  ", f"Platform: {record['platform']}", "",
             "| recipe | cold build (s) | " + " | ".join(f"{s} (s)" for s in stages) + " | no-op rebuild (s) | parity |",
             "|---|---|" + "---|" * len(stages) + "---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['cold_s']} | " + " | ".join(str(r["stages_s"].get(s, "–")) for s in stages)
                     + f" | {r['noop_s']} | {'passed' if r['passed'] else 'FAILED'} |")
    lines += ["", "Model loading and the PyTorch FP32 reference happen inside the first stage that needs them: "
              "export includes loading the model, validate includes running PyTorch at the validation "
              "shapes. The cold build and the no-op rebuild are whole processes, imports included."]
    (RESULTS / "build-times-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Builds, checks and times one engine in a process of its own (pinned to its GPU by the parent
through CUDA_VISIBLE_DEVICES), so that a crashing library cannot take the build down and builds for
different GPUs run in parallel.

    python -m trtforge.backends.worker JOB.json    -> writes result.json beside the engine
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from trtforge.backends import backend
from trtforge.backends.base import BuildJob
from trtforge.backends.onnxruntime import PACKED_FILE, packed_from_tokens, packed_max_share
from trtforge.compare import compare, function_runner
from trtforge.recipe import Tolerance
from trtforge.store import sha256_file


def save_reference(path: Path, reference: Any) -> None:
    arrays = {}
    for label, feed in reference.feeds.items():
        arrays.update({f"feed/{label}/{k}": v for k, v in feed.items()})
        arrays.update({f"out/{label}/{k}": v for k, v in reference.outputs_for(label).items()})
    np.savez(path, **arrays)


def load_reference(path: Path, signature: dict[str, Any], policy: dict[str, Any]) -> Any:
    from trtforge.stages.validate import Reference

    data = np.load(path)
    feeds: dict[str, dict[str, np.ndarray]] = {}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    for key in data.files:
        kind, label, name = key.split("/", 2)
        (feeds if kind == "feed" else outputs).setdefault(label, {})[name] = data[key]
    return Reference(feeds, outputs, signature={k: (v[0], tuple(v[1])) for k, v in signature.items()},
                     logits=tuple(policy["logits"]), padded_outputs=tuple(policy["padded_outputs"]))


def check(engine: Any, name: str, spec: dict[str, Any], reference: Any = None) -> dict[str, Any]:
    """Parity against the FP32 reference at min/opt/max, and latency at the opt shape."""
    import torch

    if reference is None:
        reference = load_reference(Path(spec["reference"]), spec["signature"], spec["policy"])
    device = engine.device

    def infer(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = engine({k: torch.from_numpy(v).to(device) for k, v in feed.items()})
        return {k: v.float().cpu().numpy() for k, v in result.items()}

    tolerance = Tolerance(**{**spec["tolerance"], "outputs": {k: tuple(v) for k, v in spec["tolerance"]["outputs"].items()}})
    [parity] = compare(reference.runner(), [function_runner(name, infer, reference.signature)], reference.feeds,
                       tolerance=tolerance, **reference.policy())
    return {"parity": parity.as_dict(), "latency_ms": latency(engine, at_opt_batch(reference.feeds["opt"], spec), device)}


def at_opt_batch(feed: dict[str, np.ndarray], spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """The checked opt-shape rows repeated to the profile's opt batch: what the engine is timed at."""
    rows = spec["job"]["shapes"]["batch"][1]
    return {name: np.resize(value, (rows, *value.shape[1:])) for name, value in feed.items()}


CPU_MIN_RUNS, CPU_BUDGET_S = 5, 2.0  # timing a CPU engine: at least 5 runs, then at most about 2 s


def latency(engine: Any, feed: dict[str, np.ndarray], device: str, runs: int | None = None) -> dict[str, float]:
    runs = runs or (15 if device == "cpu" else 50)  # CPU runs are long and steady; GPU ones short and noisy
    import torch

    inputs = {k: torch.from_numpy(v).to(device) for k, v in feed.items()}
    for _ in range(2 if device == "cpu" else 5):
        engine(inputs)
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(runs):
        # A long CPU run (hundreds of ms) is steady: after CPU_MIN_RUNS, stop once CPU_BUDGET_S is spent.
        if device == "cpu" and len(times) >= CPU_MIN_RUNS and time.perf_counter() - started > CPU_BUDGET_S:
            break
        if device == "cpu":
            start = time.perf_counter()
            engine(inputs)
            times.append(1e3 * (time.perf_counter() - start))
        else:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            engine(inputs)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
    shape = {k: list(v.shape) for k, v in feed.items()}
    return {"median": round(statistics.median(times), 4), "min": round(min(times), 4), "runs": len(times), "shape": shape}


def run(job_path: Path) -> dict[str, Any]:
    spec = json.loads(job_path.read_text())
    job = BuildJob(**spec["job"])
    out = Path(job.out_dir)
    engine_backend = backend(job.backend)
    result: dict[str, Any] = {"library_version": engine_backend.library_version()}
    if len(engine_backend.candidates) > 1 and spec.get("check"):
        return {**result, **choose_candidate(engine_backend, job, spec)}
    with (out / "build.log").open("w") as log:
        result["build"] = engine_backend.build(job, log)
    result["build"]["sha256"] = sha256_file(out / engine_backend.engine_file)
    if spec.get("check"):
        with _loaded(engine_backend, job, out) as engine:
            engine.mode = "fused"
            result.update(check(engine, f"{job.backend}/{job.target['name']}", spec))
            result["cuda_graph_failures"] = {str(k): v for k, v in getattr(engine, "graph_failures", {}).items()}
            if getattr(engine, "packed_session", None) is not None:
                result["packed"] = check_packed(engine, f"{job.backend}/{job.target['name']}/packed", spec)
    packed = result.get("build", {}).get("packed")
    if packed and "packed" not in result:  # not built (the reason), or built and not checked here
        result["packed"] = ({"status": "not built", "reason": packed["skipped"]} if "skipped" in packed else
                            {"status": "built-not-checked", "file": packed["file"]})
    return result


def check_packed(engine: Any, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The padding-free graph: parity against the FP32 reference like any engine, then timed against
    the fused graph on batches with real padding, which decides the batch it is used from."""
    engine.mode = "packed"
    reference = load_reference(Path(spec["reference"]), spec["signature"], spec["policy"])
    try:
        checked = check(engine, name, spec, reference)
        padded = reference.feeds["opt"]  # the checked rows at the opt sequence, with their real padding
        sweep = []
        for rows in sweep_batches(spec["job"]["shapes"]["batch"]):
            feed = {k: np.resize(v, (rows, *v.shape[1:])) for k, v in padded.items()}
            times = {}
            for mode in ("fused", "packed"):
                engine.mode = mode
                times[mode] = latency(engine, feed, engine.device, runs=30)["median"]
            real = float(feed["attention_mask"].mean()) if "attention_mask" in feed else 1.0
            sweep.append({"batch": rows, "sequence": int(next(iter(feed.values())).shape[1]),
                          "real_token_share": round(real, 3), "fused_ms": times["fused"], "packed_ms": times["packed"]})
    finally:
        engine.mode = "auto"
    winning = [row["batch"] for row in sweep if row["packed_ms"] < row["fused_ms"]]
    # From the smallest batch at which packing wins and keeps winning at every larger one.
    from_batch = next((b for b in winning if all(r["packed_ms"] < r["fused_ms"] for r in sweep if r["batch"] >= b)), None)
    passed = checked["parity"]["passed"]
    return {"status": "passed" if passed else "failed", "file": PACKED_FILE, "parity": checked["parity"],
            "latency_ms": checked["latency_ms"], "sweep": sweep,
            "rule": {"from_batch": from_batch if passed else None,
                     "from_tokens": packed_from_tokens(from_batch, sweep) if passed else None,
                     "max_real_share": packed_max_share(from_batch, sweep) if passed else None,
                     "how": "the packed graph serves chunks of at least from_batch rows and from_tokens padded "
                            "tokens (rows x width; null: none), of which at most max_real_share are real: the "
                            "smallest batch from which it beat the fused graph's CUDA graphs at every larger "
                            "batch, timed here on the checked opt-sequence rows with their real padding, at that "
                            "sequence; the share where the two would cross there (packed work follows real "
                            "tokens, fused work padded ones)"}}


def sweep_batches(batch: list[int]) -> list[int]:
    lo, opt, hi = batch
    return sorted({b for b in (lo, 1, 4, 8, 16, 32, 64, opt, hi) if lo <= b <= hi})


CANDIDATE_MARGIN = 0.10  # how much faster a later candidate must be to displace an earlier one


def choose_candidate(engine_backend: Any, job: BuildJob, spec: dict[str, Any]) -> dict[str, Any]:
    """Build, check and time every candidate; keep the one `pick` chooses as the engine, and record
    every candidate's verdict and latency."""
    out = Path(job.out_dir)
    trials: dict[str, dict[str, Any]] = {}
    with (out / "build.log").open("w") as log:
        for candidate in engine_backend.candidates:
            trial_dir = out / f"candidate-{candidate}"
            trial_dir.mkdir()
            trial_job = BuildJob(**{**asdict(job), "out_dir": str(trial_dir)})
            build = engine_backend.build(trial_job, log, candidate)
            with _loaded(engine_backend, trial_job, trial_dir) as engine:
                trials[candidate] = {"build": build, **check(engine, f"{job.backend}/{job.target['name']}", spec)}
            print(f"{candidate}: parity {'passed' if trials[candidate]['parity']['passed'] else 'FAILED'}, "
                  f"median {trials[candidate]['latency_ms']['median']} ms", file=log)
    chosen = pick(engine_backend.candidates, trials)
    os.replace(out / f"candidate-{chosen}" / engine_backend.engine_file, out / engine_backend.engine_file)
    for candidate in engine_backend.candidates:
        shutil.rmtree(out / f"candidate-{candidate}")
    chosen_trial = trials[chosen]
    build = {**chosen_trial["build"], "candidate": chosen, "sha256": sha256_file(out / engine_backend.engine_file),
             "candidates": {c: {"passed": t["parity"]["passed"], "median_ms": t["latency_ms"]["median"]}
                            for c, t in trials.items()},
             "rule": f"the first candidate that passes its check, unless a later one that passes is at least "
                     f"{CANDIDATE_MARGIN:.0%} faster at the opt shape"}
    return {"build": build, "parity": chosen_trial["parity"], "latency_ms": chosen_trial["latency_ms"]}


def pick(order: tuple[str, ...], trials: dict[str, dict[str, Any]]) -> str:
    """The engine among checked and timed candidates. They come in order of preference (on a CPU, FP32
    before FP16: more precise), and the first that passes is displaced only by a passing one at least
    CANDIDATE_MARGIN faster, so that timing noise does not flip the choice from one build to the next
    (FP32 and FP16 on the CPU are often within a few percent). The first candidate if none passes."""
    passing = [c for c in order if trials[c]["parity"]["passed"]]
    if not passing:
        return order[0]
    chosen = passing[0]
    for candidate in passing[1:]:
        if trials[candidate]["latency_ms"]["median"] < (1 - CANDIDATE_MARGIN) * trials[chosen]["latency_ms"]["median"]:
            chosen = candidate
    return chosen


def _loaded(engine_backend: Any, job: BuildJob, engine_dir: Path) -> Any:
    device = "cpu" if job.target["name"] == "cpu" else "cuda:0"  # the parent pinned our GPU
    entry = {"io": {"outputs": job.outputs}, "options": job.options, "packed": {"status": "unchecked"}}
    return engine_backend.load(engine_dir, entry, device)


def main() -> None:
    job_path = Path(sys.argv[1])
    try:
        result = run(job_path)
    except Exception as e:  # the parent reports it as this engine's failure
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500],
                  "traceback": traceback.format_exc()}
    (job_path.parent / "result.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()

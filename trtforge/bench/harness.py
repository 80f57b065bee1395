"""`trtforge bench RECIPE`: the runtime against PyTorch DDP (and DataParallel, torch.compile) on the same
inputs, on 1..N devices: parity, throughput, latency percentiles, scaling efficiency, plots.

Per-device batch b on N devices means a global batch of b * N rows for every contender.
Throughput is steady state: warm-up first, then `iterations` batches kept in flight (two per device
for the runtime). E(N) = T(N) / (N x T(1)).
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtforge.compare import compare, function_runner
from trtforge.progress import Progress
from trtforge.recipe import Recipe


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1, 32, 128)
    sequence: int = 128
    iterations: int = 200
    warmup: int = 20
    device_counts: tuple[int, ...] | None = None  # default: 1..available
    cpu_workers: int = 0  # > 0: CPU engines and a gloo DDP baseline (for machines without a GPU)
    outputs: str = "host"
    text: Path | None = None
    workload: str | None = None  # "short" or "passage": real text (see workloads.py), padded per request
    baselines: tuple[str, ...] = ("ddp", "dataparallel", "compile")
    backend: str | None = None
    callers: int = 1  # caller threads submitting at once
    depth: int = 4  # requests in flight per device
    slots: int = 4  # chunks in flight per worker (Runtime(slots=...))
    tokenizer: str | None = None  # for models without one (random weights): a directory or package:NAME
    extra: dict[str, Any] = field(default_factory=dict)


def synthetic_feed(loaded: Any, rows: int, sequence: int, seed: int) -> dict[str, np.ndarray]:
    """Fixed random token ids, no padding (speed does not depend on the values)."""
    from trtforge.models import make_inputs

    if loaded.task.is_image:
        return make_inputs(loaded, rows, sequence, seed=seed)
    return token_feed([t.name for t in loaded.inputs], loaded.model.config.vocab_size, rows, sequence, seed)


def token_feed(names: list[str], vocab: int, rows: int, sequence: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids below `vocab`, every position real, for the inputs named (ids, mask, types)."""
    ids = np.random.default_rng(seed).integers(0, vocab, (rows, sequence), dtype=np.int64)
    full = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {name: full[name] for name in names}


def workload_feed(loaded: Any, kind: str, rows: int, sequence: int) -> tuple[dict[str, np.ndarray], float, dict[str, Any]]:
    """`rows` real texts of a workload, tokenized (cut at `sequence`) and padded to the longest of them,
    as a padding collator makes a batch; returns the feed, the seconds tokenizing took, and the
    source with the count of real tokens."""
    from trtforge.bench import workloads

    if loaded.tokenizer is None:
        from trtforge.errors import EnvironmentProblem

        raise EnvironmentProblem(f"--workload needs a tokenizer, and {loaded.spec.source!r} has none; "
                                 "bench a model with a tokenizer or drop --workload")
    texts, source = workloads.corpus(kind, rows)
    start = time.perf_counter()
    ids = workloads.token_ids(loaded.tokenizer, texts, sequence)
    seconds = time.perf_counter() - start
    feed = workloads.padded(ids, [t.name for t in loaded.inputs])
    return feed, seconds, {**source, "real_tokens": int(feed["attention_mask"].sum()), "rows": rows}


def load_tokenizer(source: str) -> Any:
    """A tokenizer from a directory or `package:NAME` (a package that ships a model directory)."""
    import importlib

    import transformers

    from trtforge.errors import EnvironmentProblem

    path = source
    if source.startswith("package:"):
        try:
            path = importlib.import_module(source[len("package:"):]).get_model_path()
        except (ImportError, AttributeError):
            raise EnvironmentProblem(f"--tokenizer {source}: no such package with a get_model_path(); "
                                     "install it or give a tokenizer directory") from None
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise EnvironmentProblem(f"--tokenizer {source}: no tokenizer there ({str(e).splitlines()[0][:120]})") from None


def borrow_tokenizer(loaded: Any, source: str) -> Any:
    """The model with another model's tokenizer (for random-weight models), if its ids fit the vocabulary."""
    import dataclasses

    from trtforge.errors import EnvironmentProblem

    tokenizer = load_tokenizer(source)
    vocab = getattr(loaded.model.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise EnvironmentProblem(f"--tokenizer {source}: {len(tokenizer)} tokens, more than the model's vocabulary "
                                 f"of {vocab}; use a tokenizer whose ids fit")
    return dataclasses.replace(loaded, tokenizer=tokenizer)


def text_feed(loaded: Any, path: Path, rows: int, sequence: int) -> tuple[dict[str, np.ndarray], float]:
    """The first `rows` lines of a text file, tokenized up front; returns the feed and the seconds it took."""
    if loaded.tokenizer is None:
        from trtforge.errors import RecipeError

        raise RecipeError(path, None, f"--text needs a tokenizer, and {loaded.spec.source!r} has none",
                          "drop --text (synthetic inputs) or bench a model with a tokenizer")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    lines = (lines * (rows // max(1, len(lines)) + 1))[:rows]
    start = time.perf_counter()
    encoded = loaded.tokenizer(lines, padding="max_length", truncation=True, max_length=sequence, return_tensors="np")
    seconds = time.perf_counter() - start
    return {t.name: encoded[t.name].astype(np.int64) for t in loaded.inputs}, seconds


def overhead(runtime_ms: float, engine_ms: float) -> dict[str, Any]:
    """The runtime's cost over the engine's own time. A runtime measured faster than the engine
    alone is noise between two measurements, never a negative cost: reported as 0, flagged, with
    the difference as measured."""
    extra = runtime_ms - engine_ms
    row: dict[str, Any] = {"ms": round(max(0.0, extra), 4), "percent": round(100 * max(0.0, extra) / engine_ms, 2)}
    if extra < 0:
        row.update(within_noise=True, measured_ms=round(extra, 4))
    return row


def skipped_baselines(baselines: tuple[str, ...], *, on_gpu: bool, devices: int) -> list[tuple[str, str]]:
    """The baselines asked for that this measurement does not run, each with why."""
    skipped = []
    if "dataparallel" in baselines and (not on_gpu or devices == 1):
        skipped.append(("dataparallel", "it runs on GPUs only" if not on_gpu else "it needs 2 or more GPUs"))
    if "compile" in baselines and (not on_gpu or devices > 1):
        skipped.append(("compile", "torch.compile is measured on one GPU only" if on_gpu else "it runs on a GPU only"))
    return skipped


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def measure_runtime(runtime: Any, feed: dict[str, np.ndarray], *, iterations: int, warmup: int,
                    depth: int, callers: int = 1) -> dict[str, float]:
    """Throughput and latency with `depth` requests in flight, kept there by `callers` threads
    (each with its share of the depth and of the iterations)."""
    import threading

    from trtforge.bench.baselines import percentiles

    for _ in range(warmup):
        runtime.run(feed)
    runtime.time_breakdown(reset=True)  # what follows is measured
    latencies: list[float] = []
    errors: list[BaseException] = []

    def caller(count: int, window: int) -> None:
        in_flight: list[tuple[float, Any]] = []
        mine = []
        try:
            for _ in range(count):
                if len(in_flight) >= window:
                    start, future = in_flight.pop(0)
                    future.result()
                    mine.append(1e3 * (time.perf_counter() - start))
                in_flight.append((time.perf_counter(), runtime.submit(feed)))
            for start, future in in_flight:
                future.result()
                mine.append(1e3 * (time.perf_counter() - start))
        except BaseException as e:  # re-raised in the bench's thread
            errors.append(e)
        latencies.extend(mine)

    shares = [iterations // callers + (i < iterations % callers) for i in range(callers)]
    threads = [threading.Thread(target=caller, args=(share, max(1, depth // callers))) for share in shares]
    begin, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed, cpu = time.perf_counter() - begin, time.process_time() - cpu
    if errors:
        raise errors[0]
    rows = len(next(iter(feed.values())))
    # The caller process's CPU (every thread: submitting, receiving, dispatching) per request and as a
    # share of the wall time: near 100% (one GIL), the caller is what limits the throughput.
    caller = {"caller_cpu_ms_per_request": round(1e3 * cpu / iterations, 4), "caller_cpu_percent": round(100 * cpu / elapsed, 1)}
    return {"throughput": round(rows * iterations / elapsed, 1), "callers": callers, **caller, **percentiles(latencies)}


def engine_latency(artifact: Path, feed: dict[str, np.ndarray], device: str, backend: str | None,
                   iterations: int) -> dict[str, float]:
    """The engine's own time per batch, inputs already on the device, one call at a time: what the
    runtime's one-request-at-a-time latency is compared with (its overhead). Told the real tokens,
    as the runtime's workers tell it, so that both run the same graph."""
    import torch

    import trtforge
    from trtforge.bench.baselines import percentiles
    from trtforge.runtime.batching import real_tokens

    engine = trtforge.load(artifact, device, backend_name=backend)
    real = real_tokens(feed)
    try:
        on_device = {k: torch.from_numpy(v).to(device) for k, v in feed.items()}
        sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
        for _ in range(10):
            engine(on_device, real_tokens=real)
        sync()
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            engine(on_device, real_tokens=real)
            sync()
            times.append(1e3 * (time.perf_counter() - start))
    finally:
        engine.close()
    return percentiles(times)


def single_latency(runtime: Any, feed: dict[str, np.ndarray], *, iterations: int) -> dict[str, float]:
    """Latency of one request at a time (no pipelining): what a caller waiting on each batch sees."""
    from trtforge.bench.baselines import percentiles

    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        runtime.run(feed)
        times.append(1e3 * (time.perf_counter() - start))
    return percentiles(times)


def _engine_feed(feed: dict[str, np.ndarray], manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """The feed as the runtime sends it to the engine: cut to its longest real row, rounded up to a
    bucket, where length-aware batching would cut it."""
    from trtforge.runtime.batching import bucket_for, real_lengths

    lengths = real_lengths(feed)
    sequence = manifest["shapes"].get("sequence")
    if lengths is None or sequence is None:
        return feed
    cut = bucket_for(int(lengths.max()), tuple(sequence))
    names = {s["name"] for s in manifest["io"]["inputs"] if "sequence" in s["shape"]}
    return {k: np.ascontiguousarray(v[:, :cut]) if k in names else v for k, v in feed.items()}


def _gpu0() -> Any:
    from trtforge.devices import gpu

    return gpu(0)


def bench(recipe: Recipe, artifact: Path, config: BenchConfig, progress: Progress) -> dict[str, Any]:
    import torch

    from trtforge.models import load_model
    from trtforge.bench.baselines import run_compiled, run_data_parallel, run_ddp
    from trtforge.runtime import Runtime, chunk_shapes, default_batching
    from trtforge.manifest import read_manifest

    on_gpu = config.cpu_workers == 0
    available = torch.cuda.device_count() if on_gpu else config.cpu_workers
    if available == 0:
        from trtforge.errors import CompatibilityError

        raise CompatibilityError("no GPU on this machine; run with --cpu N to bench CPU engines")
    counts = config.device_counts or tuple(range(1, available + 1))
    manifest = read_manifest(artifact)
    profile = {axis: tuple(r) for axis, r in manifest["shapes"].items()}
    from trtforge.loader import select  # an engine for these devices, or a refusal before any work

    select(manifest, None if not on_gpu else _gpu0(), backend_name=config.backend, device="cpu" if not on_gpu else "cuda:0")
    loaded = load_model(recipe.model)
    if config.tokenizer is not None:
        loaded = borrow_tokenizer(loaded, config.tokenizer)
    task = loaded.task
    progress.line(f"trtforge bench {recipe.model.name}: devices {list(counts)}, per-device batches "
                  f"{list(config.batches)}, sequence {config.sequence}, {config.iterations} iterations")

    tokenize_s: dict[int, float] = {}  # per batch: seconds to tokenize one request's texts
    sources: dict[int, dict[str, Any]] = {}
    results: dict[str, Any] = {"runtime": {}, "ddp": {}, "ddp-sorted": {}, "dataparallel": {}, "compile": {}, "parity": {},
                               "parity-sorted": {}, "startup": {}}
    for n in counts:
        feeds = {}
        for b in config.batches:
            if config.workload is not None:
                feeds[b], tokenize_s[b], sources[b] = workload_feed(loaded, config.workload, b * n, config.sequence)
            elif config.text is not None:
                feeds[b], tokenize_s[b] = text_feed(loaded, config.text, b * n, config.sequence)
            else:
                feeds[b] = synthetic_feed(loaded, b * n, config.sequence, seed=b)
        from trtforge.models import make_inputs

        parity_feed = make_inputs(loaded, min(config.batches[-1], recipe.shapes.batch[2]) * n, config.sequence, seed=7)
        with progress.stage("runtime", f"{n} device(s)") as outcome:
            # Every shape the engines will run, set up on every worker before timing (CUDA graphs are
            # captured per shape, and a request may go to any worker).
            warm = sorted({shape for feed in [*feeds.values(), parity_feed]
                           for shape in chunk_shapes(feed, profile, n, default_batching(config.outputs))})
            with Runtime(artifact, devices=list(range(n)) if on_gpu else n, backend=config.backend, outputs=config.outputs,
                         warm=warm, timeout_s=600, slots=config.slots) as runtime:
                per_batch = {}
                results["startup"][n] = {"seconds": runtime.startup_s, "warmed_shapes": len(warm)}
                runtime.time_breakdown(reset=True)  # start-up and warm-up are not part of it
                for b in config.batches:
                    probe = time.perf_counter()
                    runtime.run(feeds[b])  # one request, timed: what the measurement will take
                    one = time.perf_counter() - probe
                    progress.line(f"  {'runtime':<10} batch {b}: {config.warmup + config.iterations} requests, at most "
                                  f"about {_duration(one * (config.warmup + config.iterations))} (one took "
                                  f"{1e3 * one:.1f} ms; requests in flight overlap)")
                    per_batch[b] = measure_runtime(runtime, feeds[b], iterations=config.iterations,
                                                   warmup=config.warmup, depth=config.depth * n, callers=config.callers)
                    per_batch[b]["time_breakdown_ms"] = runtime.time_breakdown(reset=True)  # the pipelined run
                    per_batch[b]["single"] = single_latency(runtime, feeds[b], iterations=max(20, config.iterations // 4))
                    per_batch[b]["single"]["time_breakdown_ms"] = runtime.time_breakdown(reset=True)
                    if b in tokenize_s:
                        per_batch[b]["tokenize_s"] = round(tokenize_s[b], 4)
                    if b in sources:  # real (unpadded) tokens per second, the padded width
                        share = sources[b]["real_tokens"] / sources[b]["rows"]
                        per_batch[b]["real_tokens_per_s"] = round(per_batch[b]["throughput"] * share, 1)
                        per_batch[b]["padded_to"] = int(feeds[b]["attention_mask"].shape[1])
                runtime_parity = runtime.run(parity_feed)
                if config.outputs == "device":  # chunks left on their devices: gather them for the check
                    runtime_parity = {k: np.concatenate([c[k].float().cpu().numpy() for c in runtime_parity])
                                      for k in runtime_parity[0]}
                backends = sorted({w["backend"] for w in runtime.workers})
            results["runtime"][n] = per_batch
            outcome["summary"] = _summary(per_batch) + f" [{', '.join(backends)}]"
        if n == 1:  # the runtime's overhead: one request at a time against the engine's own time
            device = "cuda:0" if on_gpu else "cpu"
            with progress.stage("in-process", "one request at a time, engine in this process"):
                with Runtime(artifact, devices=[0] if on_gpu else 1, backend=config.backend, outputs=config.outputs,
                             warm=warm, timeout_s=600, in_process=True) as local:
                    for b in config.batches:
                        row = single_latency(local, feeds[b], iterations=max(20, config.iterations // 4))
                        per_batch[b]["single_in_process"] = {**row, "time_breakdown_ms": local.time_breakdown(reset=True)}
            for b in config.batches:
                own = engine_latency(artifact, _engine_feed(feeds[b], manifest), device, config.backend,
                                     iterations=max(20, config.iterations // 4))
                per_batch[b]["engine"] = own
                for key, single in (("overhead", "single"), ("overhead_in_process", "single_in_process")):
                    per_batch[b][key] = overhead(per_batch[b][single]["p50_ms"], own["p50_ms"])
        if "ddp" in config.baselines:
            with progress.stage("ddp", f"PyTorch DDP on {n} device(s)") as outcome:
                ddp = run_ddp(n, str(recipe.path), list(config.batches), feeds, parity_feed,
                              iterations=config.iterations, warmup=config.warmup, on_gpu=on_gpu)
                results["ddp"][n] = ddp["timings"]
                outcome["summary"] = _summary(ddp["timings"])
            if runtime_parity is not None:
                results["parity"][n] = _parity(task, parity_feed, runtime_parity, ddp["parity"], recipe)
                progress.line(f"  {'parity':<10} runtime vs DDP on {n} device(s): "
                              f"{'passed' if results['parity'][n]['passed'] else 'FAILED'}")
        if "ddp-sorted" in config.baselines:
            with progress.stage("ddp-sorted", f"PyTorch DDP, length-sorted batches, on {n} device(s)") as outcome:
                sorted_ddp = run_ddp(n, str(recipe.path), list(config.batches), feeds, parity_feed,
                                     iterations=config.iterations, warmup=config.warmup, on_gpu=on_gpu, sort=True)
                results["ddp-sorted"][n] = sorted_ddp["timings"]
                # Its outputs, put back in input order, against the runtime's: the sort is undone right.
                results["parity-sorted"][n] = _parity(task, parity_feed, runtime_parity, sorted_ddp["parity"], recipe)
                outcome["summary"] = _summary(sorted_ddp["timings"])
        for name, why in skipped_baselines(config.baselines, on_gpu=on_gpu, devices=n):
            progress.line(f"  {name:<10} skipped on {n} device(s): {why}")
        if on_gpu and n > 1 and "dataparallel" in config.baselines:
            with progress.stage("dp", f"DataParallel on {n} GPUs") as outcome:
                results["dataparallel"][n] = run_data_parallel(n, str(recipe.path), list(config.batches), feeds,
                                                               iterations=config.iterations, warmup=config.warmup)
                outcome["summary"] = _summary(results["dataparallel"][n])
        if on_gpu and n == 1 and "compile" in config.baselines:
            with progress.stage("compile", "torch.compile reduce-overhead, 1 GPU") as outcome:
                results["compile"][1] = run_compiled(str(recipe.path), list(config.batches), feeds,
                                                     iterations=config.iterations, warmup=config.warmup)
                outcome["summary"] = _summary(results["compile"][1])

    report = {
        "name": recipe.model.name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "gpus": [torch.cuda.get_device_name(i) for i in range(available)]
                 if on_gpu else [], "cpu_workers": config.cpu_workers},
        "config": {**asdict(config), "text": str(config.text) if config.text else None,
                   "workload_source": next(iter(sources.values()), None)},
        "engines": [{k: e[k] for k in ("backend", "target", "status")} for e in manifest["engines"]],
        "results": results,
        "scaling": scaling(results["runtime"], config.batches),
        "scaling_ddp": scaling(results["ddp"], config.batches),
    }
    report["parity_passed"] = bool(results["parity"]) and all(p["passed"] for p in results["parity"].values())
    return report


def _summary(per_batch: dict[int, dict[str, Any]]) -> str:
    return ", ".join(f"b{b}: {r['throughput']:.0f}/s p50 {r['p50_ms']:.2f} ms" if "throughput" in r else f"b{b}: {r.get('error')}"
                     for b, r in per_batch.items())


def scaling(by_count: dict[int, dict[int, dict[str, Any]]], batches: tuple[int, ...]) -> dict[int, dict[int, float]]:
    """E(N) = T(N) / (N x T(1)) per batch size."""
    if 1 not in by_count:
        return {}
    return {b: {n: round(r[b]["throughput"] / (n * by_count[1][b]["throughput"]), 3)
                for n, r in by_count.items() if "throughput" in r.get(b, {})} for b in batches}


def _parity(task: Any, feed: dict[str, np.ndarray], runtime_out: dict[str, np.ndarray], ddp_out: np.ndarray,
            recipe: Recipe) -> dict[str, Any]:
    from trtforge.stages.validate import task_policy

    name = task.outputs[0].name
    signature = {k: (str(v.dtype), tuple(None for _ in v.shape)) for k, v in feed.items()}
    reference = function_runner("pytorch-ddp-fp16", lambda f: {name: ddp_out}, signature)
    candidate = function_runner("trtforge-runtime", lambda f: {name: runtime_out[name].astype(np.float32)}, signature)
    [result] = compare(reference, [candidate], {"parity": feed}, tolerance=recipe.engines.tolerance,
                       **task_policy(task))
    return result.as_dict()


# Everything write_report puts in its directory (and so everything it may overwrite there).
BENCH_FILES = ("bench.json", "bench.md", "throughput_vs_devices.png", "latency_vs_batch.png")


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "bench.md").write_text(markdown(report))
    return [out / "bench.json", out / "bench.md", *plots(report, out)]


def markdown(report: dict[str, Any]) -> str:
    r = report["results"]
    config = report["config"]
    lines = [f"# trtforge bench: {report['name']}", "",
             f"{report['date']}; devices {', '.join(report['host']['gpus']) or str(report['host']['cpu_workers']) + ' CPU workers'}; "
             f"sequence {config['sequence']}; {config['iterations']} iterations after {config['warmup']} warm-up; "
             f"outputs to {config['outputs']}; {config.get('callers', 1)} caller thread(s), "
             f"{config.get('depth', 2)} request(s) in flight per device, {config.get('slots', 4)} slots per "
             f"worker; inputs {_inputs_said(config)}.", "",
             f"Parity, runtime vs PyTorch DDP (FP16 tolerance policy): "
             f"**{'passed' if report['parity_passed'] else 'FAILED'}** on every device count." if r["parity"] else "Parity not run.",
             "", "Runtime start-up (load, then every chunk shape of these requests set up on every worker): "
             + ", ".join(f"{v['seconds']:.1f} s on {n} device(s) ({v['warmed_shapes']} shapes)"
                         for n, v in r.get("startup", {}).items()) + ".",
             "", "## Throughput (sequences/s) and p50 / p99 latency per batch (ms)", "",
             "| contender | devices | per-device batch | throughput | per device | real tokens/s | p50 | p90 | p99 | one-at-a-time p50 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for contender in ("runtime", "ddp", "ddp-sorted", "dataparallel", "compile"):
        for n, per_batch in sorted(r.get(contender, {}).items(), key=lambda kv: int(kv[0])):
            for b, row in per_batch.items():
                if "throughput" not in row:
                    lines.append(f"| {contender} | {n} | {b} | not run: {row.get('error', '')[:80]} | | | | | | |")
                    continue
                single = row.get("single", {}).get("p50_ms", "–")
                share = _real_share(r["runtime"].get(n, {}).get(b, {}))  # every contender ran the same rows
                real = f"{row['throughput'] * share:.0f}" if share is not None else "–"
                lines.append(f"| {contender} | {n} | {b} | {row['throughput']:.0f} | {row['throughput'] / int(n):.0f} | "
                             f"{real} | {row['p50_ms']:.3f} | {row['p90_ms']:.3f} | {row['p99_ms']:.3f} | {single} |")
    tokenized = [f"{row['tokenize_s']} s for {n} x {b} texts" for n, per_batch in r["runtime"].items()
                 for b, row in per_batch.items() if "tokenize_s" in row]
    if tokenized:
        lines += ["", "Tokenization (the fast tokenizer on the host, before and apart from every timing above), "
                  "one request's texts: " + ", ".join(tokenized) + "."]
    lines += ["", "## Scaling efficiency E(N) = T(N) / (N x T(1))", "",
              "| per-device batch | " + " | ".join(f"runtime E({n})" for n in sorted({int(n) for v in report["scaling"].values() for n in v}))
              + " | " + " | ".join(f"DDP E({n})" for n in sorted({int(n) for v in report["scaling_ddp"].values() for n in v})) + " |"]
    lines.append("|---|" + "---|" * (len(lines[-1].split("|")) - 3))
    for b in report["scaling"]:
        runtime = report["scaling"][b]
        ddp = report["scaling_ddp"].get(b, {})
        lines.append(f"| {b} | " + " | ".join(str(runtime[n]) for n in sorted(runtime, key=int)) + " | "
                     + " | ".join(str(ddp[n]) for n in sorted(ddp, key=int)) + " |")
    one = r["runtime"].get(1) or r["runtime"].get("1") or {}
    if any("overhead" in row for row in one.values()):
        lines += ["", "## Runtime overhead, one request at a time on one device (ms)", "",
                  "Worker process (the default) and in-process (`Runtime(in_process=True)`), each against the "
                  "engine's own time (inputs already on the device).", "",
                  "| batch | engine's own p50 | runtime p50 | overhead | overhead % | in-process p50 | overhead | overhead % |",
                  "|---|---|---|---|---|---|---|---|"]
        for b, row in one.items():
            if "overhead" in row:
                local = (f"{row['single_in_process']['p50_ms']:.3f} | {row['overhead_in_process']['ms']:.3f} | "
                         f"{row['overhead_in_process']['percent']:.1f}" if "overhead_in_process" in row else "– | – | –")
                lines.append(f"| {b} | {row['engine']['p50_ms']:.3f} | {row['single']['p50_ms']:.3f} | "
                             f"{row['overhead']['ms']:.3f}{' (within noise)' if row['overhead'].get('within_noise') else ''} | "
                             f"{row['overhead']['percent']:.1f} | {local} |")
    phases = ("enqueue_ms", "queue_ms", "inputs_ms", "launch_ms", "engine_ms", "outputs_ms", "return_ms")
    lines += ["", "## Where the time goes (runtime, pipelined; median ms per chunk)", "",
              "caller CPU: the caller process's CPU time over the wall time of the run (all its threads; near "
              "100%, its one GIL is the limit).", "",
              "| devices | batch | " + " | ".join(p[:-3] for p in phases) + " | caller CPU |",
              "|---|---|" + "---|" * (len(phases) + 1)]
    for n, per_batch in sorted(r["runtime"].items(), key=lambda kv: int(kv[0])):
        for b, row in per_batch.items():
            breakdown = row.get("time_breakdown_ms", {})
            if breakdown.get("chunks"):
                busy = f"{row['caller_cpu_percent']}%" if "caller_cpu_percent" in row else "–"
                lines.append(f"| {n} | {b} | " + " | ".join(str(breakdown.get(p, "–")) for p in phases) + f" | {busy} |")
    lines += ["", "## Ratios", "", "| devices | per-device batch | runtime / DDP throughput | runtime / DDP length-sorted |",
              "|---|---|---|---|"]
    for n, per_batch in r["ddp"].items():
        for b, row in per_batch.items():
            mine = r["runtime"].get(n, {}).get(b)
            ordered = r.get("ddp-sorted", {}).get(n, {}).get(b, {})
            if mine and "throughput" in row:
                versus_sorted = f"{mine['throughput'] / ordered['throughput']:.2f}x" if "throughput" in ordered else "–"
                lines.append(f"| {n} | {b} | {mine['throughput'] / row['throughput']:.2f}x | {versus_sorted} |")
    return "\n".join(lines) + "\n"


def _real_share(row: dict[str, Any]) -> float | None:
    """Real (unpadded) tokens per row of a real-text request, from the runtime's row of the bench."""
    return row["real_tokens_per_s"] / row["throughput"] if row.get("real_tokens_per_s") and row.get("throughput") else None


def _inputs_said(config: dict[str, Any]) -> str:
    """Where the bench's inputs came from, in words."""
    source = config.get("workload_source")
    if config.get("workload") and source:
        share = source["real_tokens"] / source["rows"]
        return (f"real text, workload {config['workload']!r}: {source['units']} units from {source['source']} "
                f"(sha256 {source['sha256'][:12]}), {share:.1f} real tokens per row")
    return f"from {config['text']}" if config.get("text") else "synthetic"


def plots(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = report["results"]

    def save(fig: Any, ax: Any, name: str, title: str, xlabel: str, ylabel: str) -> Path:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{report['name']}: {title}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return out / name

    fig, ax = plt.subplots(figsize=(6, 4))
    for contender, style in (("runtime", "o-"), ("ddp", "s--"), ("dataparallel", "^:")):
        for b in report["config"]["batches"]:
            points = sorted((int(n), v[b]["throughput"]) for n, v in r[contender].items() if "throughput" in v.get(b, {}))
            if points:
                ax.plot(*zip(*points), style, label=f"{contender} b{b}")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    throughput = save(fig, ax, "throughput_vs_devices.png", "throughput vs devices", "devices", "sequences / s")

    fig, ax = plt.subplots(figsize=(6, 4))
    for contender, style in (("runtime", "o-"), ("ddp", "s--"), ("compile", "d-.")):
        per_batch = r[contender].get(1) or r[contender].get("1")
        if per_batch:
            points = sorted((int(b), v["p50_ms"]) for b, v in per_batch.items() if "p50_ms" in v)
            ax.plot(*zip(*points), style, label=f"{contender} (1 device)")
    ax.set_xscale("log", base=2)
    latency = save(fig, ax, "latency_vs_batch.png", "latency vs batch", "batch", "p50 latency per batch (ms)")
    return [throughput, latency]

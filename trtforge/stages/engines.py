"""Stage 4: FP16 engines per target, each built, checked and timed in a worker process of its own.

Targets: every distinct GPU model present (TensorRT, onnxruntime-cuda), offline compute capabilities
(TensorRT-RTX), the CPU (onnxruntime-cpu). Workers for different targets run in parallel, each
pinned to its GPU. Engines that cannot run here (TensorRT-RTX plans for RTX GPUs on a machine
without one) are recorded as built, not checked.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from trtforge.backends import backend
from trtforge.backends.base import BuildJob, Target
from trtforge.compare import ParityResult
from trtforge.stages.context import BuildContext
from trtforge.store import key_of
from trtforge.tasks import IMAGE, SEQUENCE


AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "tensorrt-rtx")
WORKER_TIMEOUT_S = 3600
# Beside the artifacts' caches under OUT/.trtforge/; a dot name, which no artifact name can be.
TIMING_CACHES = ".timing-caches"
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Planned:
    backend: str
    target: Target
    key: str

    @property
    def stage(self) -> str:
        return f"engine-{self.backend}-{self.target.name}"

    @property
    def relative_dir(self) -> str:
        return f"engines/{self.backend}/{self.target.name}"


def plan(build: BuildContext) -> tuple[list[Planned], list[dict[str, Any]]]:
    """The engines this recipe asks for on this machine, and the backends skipped (with the reason)."""
    from trtforge.devices import list_gpus

    spec = build.recipe.engines
    if not spec.backends:
        return [], []
    gpus = list_gpus()
    if spec.gpus != "all":
        gpus = [g for g in gpus if g.index in spec.gpus]
    named = [b for b in spec.backends if b != "auto"]
    names = [*AUTO_ORDER, *(b for b in named if b not in AUTO_ORDER)] if spec.wants_auto else named
    planned, skipped = [], []
    for name in names:
        engine_backend = backend(name)
        needs_gpu = name in ("tensorrt", "onnxruntime-cuda")
        reason = engine_backend.missing() or (f"{name}: no NVIDIA GPU on this machine" if needs_gpu and not gpus else None)
        targets = [] if reason else engine_backend.targets(gpus=gpus, rtx_targets=spec.rtx_targets)
        if not reason and not targets:
            reason = f"{name}: no target on this machine (no GPU{'' if name != 'tensorrt-rtx' else ' and no rtx_targets'})"
        if reason:
            if name in named or name != "tensorrt":  # auto tries TensorRT only where it is installed
                skipped.append({"backend": name, "status": "skipped", "reason": reason})
            continue
        version = engine_backend.library_version()
        for target in targets:
            key = key_of("engine", build.keys["fp16"], name, target.as_dict(), version, _options(build),
                         asdict(spec.tolerance), engine_backend.layout)
            planned.append(Planned(name, target, key))
    return planned, skipped


def _options(build: BuildContext) -> dict[str, Any]:
    """The recipe's build options: part of each engine's cache key, so known before anything runs."""
    spec = build.recipe.engines
    return {
        "builder_optimization_level": spec.builder_optimization_level,
        "hardware_compatibility": spec.hardware_compatibility,
        "cuda_graph": spec.cuda_graph,
        "keep_fp32_ops": list(build.recipe.fp16.keep_fp32_ops),
        "extra_profiles": [{k: list(v) for k, v in p.items()} for p in spec.extra_profiles],
    }


def _model_facts(build: BuildContext) -> dict[str, Any]:
    """What the exported model is (for ONNX Runtime's fusions). Not part of the key: the export key,
    already in it through the FP16 key, determines these."""
    export = build.export_result()
    return {"architecture": export.get("model_type") or build.recipe.model.architecture,
            "num_heads": export.get("num_heads", 0), "hidden_size": export.get("hidden_size", 0)}


def runnable_here(target: Target) -> bool:
    return target.kind != "aot" or target.gpu is not None


def run_workers(build: BuildContext, jobs: list[tuple[Planned, Path]], fp32: Path, fp16: Path, *,
                alongside: Callable[[], None] = lambda: None) -> dict[str, dict[str, Any]]:
    """Start one worker per engine, all at once, run `alongside` meanwhile, and wait for them.
    Returns results by stage name."""
    from trtforge.backends.worker import save_reference

    # Written afresh for every build that checks engines (a temporary name: removed below, or by the
    # next build if this one is killed), so no engine is ever judged against stale bytes.
    reference_path = build.cache.root / f".tmp-reference-{os.getpid()}.npz"
    save_reference(reference_path, build.reference)
    try:
        return _run(build, jobs, fp32, fp16, reference_path, alongside)
    finally:
        reference_path.unlink(missing_ok=True)


def _run(build: BuildContext, jobs: list[tuple[Planned, Path]], fp32: Path, fp16: Path, reference_path: Path,
         alongside: Callable[[], None]) -> dict[str, dict[str, Any]]:
    export = build.export_result()
    shapes = {"batch": list(build.recipe.shapes.batch), SEQUENCE: list(build.recipe.shapes.extent),
              IMAGE: list(build.recipe.shapes.extent)}
    processes: dict[str, tuple[subprocess.Popen[str], Path]] = {}
    try:
        _start(build, jobs, fp32, fp16, reference_path, export, shapes, processes)
        alongside()
        return _wait(processes)
    finally:  # interrupted or failed: no worker outlives its build
        for process, _ in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def _start(build: BuildContext, jobs: list[tuple[Planned, Path]], fp32: Path, fp16: Path, reference_path: Path,
           export: dict[str, Any], shapes: dict[str, list[int]],
           processes: dict[str, tuple[subprocess.Popen[str], Path]]) -> None:
    from trtforge.stages.validate import signature_of, task_policy
    from trtforge.tasks import task_spec

    for planned, scratch in jobs:
        job = BuildJob(backend=planned.backend, target=planned.target.as_dict(), fp32_onnx=str(fp32),
                       fp16_onnx=str(fp16), out_dir=str(scratch), inputs=export["io"]["inputs"],
                       outputs=export["io"]["outputs"], shapes=shapes,
                       options={**_options(build), **_model_facts(build)},
                       extra_profiles=[_with_both_extents(p) for p in build.recipe.engines.extra_profiles],
                       cache_dir=str(build.cache.root.parent / TIMING_CACHES))
        spec = {"job": asdict(job), "check": runnable_here(planned.target), "reference": str(reference_path),
                "signature": signature_of(export["io"]["inputs"]),
                "policy": task_policy(task_spec(build.recipe.model.task)),
                "tolerance": asdict(build.recipe.engines.tolerance)}
        job_path = scratch / "job.json"
        job_path.write_text(json.dumps(spec, indent=2))
        env = dict(os.environ)
        # The worker imports this very trtforge, wherever it was imported from (a relative
        # PYTHONPATH would point elsewhere from the worker's directory).
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
        if planned.target.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(planned.target.gpu["index"])
        elif planned.target.kind == "aot":
            env["CUDA_VISIBLE_DEVICES"] = ""  # offline build: needs no GPU and must not take one
        build.progress.detail(f"worker for {planned.relative_dir}")
        processes[planned.stage] = (subprocess.Popen([sys.executable, "-m", "trtforge.backends.worker", str(job_path)],
                                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True, preexec_fn=_die_with_parent), job_path)


def _wait(processes: dict[str, tuple[subprocess.Popen[str], Path]]) -> dict[str, dict[str, Any]]:
    results = {}
    for stage, (process, job_path) in processes.items():
        result_path = job_path.parent / "result.json"
        try:
            output, _ = process.communicate(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            results[stage] = {"error": f"worker took longer than {WORKER_TIMEOUT_S} s and was stopped"}
        else:
            if process.returncode == 0 and result_path.is_file():
                results[stage] = json.loads(result_path.read_text())
            else:
                results[stage] = {"error": f"worker {_exit_reason(process.returncode)}: {output.strip()[-300:]}"}
        result_path.unlink(missing_ok=True)
        (job_path.parent / "worker.log").write_text(output)
    return results


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _die_with_parent() -> None:
    """In the worker, before exec: the kernel kills it when the build process dies (Linux), so a
    killed or interrupted build leaves no worker behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def outcome(planned: Planned, result: dict[str, Any]) -> tuple[str, ParityResult]:
    """An engine's status (passed, failed, built-not-checked) and its parity section, from its worker's result."""
    name = f"{planned.backend}/{planned.target.name}"
    if "error" in result:
        return "failed", ParityResult(name, "pytorch-fp32", (), checked=True, error=result["error"],
                                      note=f"build or check failed: {result['error']}")
    if "parity" in result:
        parity = ParityResult.from_dict(result["parity"])
        return ("passed" if parity.passed else "failed"), parity
    ccs = ", ".join("sm" + c.replace(".", "") for c in planned.target.compute_capabilities)
    return "built-not-checked", ParityResult(name, "pytorch-fp32", (), checked=False,
                                             note=f"built for {ccs} ahead of time; no such GPU on this machine to run it")


def entry(build: BuildContext, planned: Planned, result: dict[str, Any]) -> tuple[dict[str, Any], ParityResult]:
    """The manifest entry of one engine, and its parity section."""
    status, parity = outcome(planned, result)
    engine_backend = backend(planned.backend)
    target = planned.target
    return {
        "backend": planned.backend,
        "target": target.name,
        "kind": target.kind,
        "status": status,
        "dir": planned.relative_dir,
        "file": f"{planned.relative_dir}/{engine_backend.engine_file}",
        "compute_capabilities": list(target.compute_capabilities),
        "gpu": target.gpu,
        "library_version": result.get("library_version"),
        "options": _options(build),
        "build": result.get("build", {}),
        "latency_ms": result.get("latency_ms"),
        "cuda_graph_failures": result.get("cuda_graph_failures") or None,
        "packed": result.get("packed"),
        "error": result.get("error"),
        "io": build.export_result()["io"],
        "profiles": [{"batch": list(build.recipe.shapes.batch),
                      build.recipe.shapes.extent_name: list(build.recipe.shapes.extent)},
                     *([{k: list(v) for k, v in p.items()} for p in build.recipe.engines.extra_profiles]
                       if engine_backend.multiple_profiles else [])],
        "key": planned.key,
        "rebuild": build.reproduce + (" (on a machine with this GPU)" if target.kind == "gpu" else ""),
    }, parity


def _with_both_extents(profile: dict[str, Any]) -> dict[str, list[int]]:
    """A recipe profile keyed the way BuildJob resolves input axes (batch, sequence, image)."""
    extent = profile.get(SEQUENCE) or profile.get(IMAGE)
    return {"batch": list(profile["batch"]), SEQUENCE: list(extent), IMAGE: list(extent)}


def choose_defaults(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each GPU model, the fastest passing engine at the opt shape."""
    best: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e["status"] != "passed" or not e.get("latency_ms") or not e.get("gpu"):
            continue
        key = e["gpu"]["model_key"]
        if key not in best or e["latency_ms"]["median"] < best[key]["latency_ms"]:
            best[key] = {"backend": e["backend"], "target": e["target"], "latency_ms": e["latency_ms"]["median"]}
    return best

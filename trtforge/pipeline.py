"""The build: the only place that orders the stages and decides what is up to date.

Each stage is keyed by a hash of its inputs, settings and tool versions. A stage whose key is in
the cache is not run again; a build whose every key matches the published manifest does nothing.
"""

from __future__ import annotations

import datetime as dt
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from trtforge import __version__
from trtforge.compare import ParityResult
from trtforge.errors import TrtforgeError
from trtforge.models import LoadedModel, source_fingerprint
from trtforge.progress import Progress
from trtforge.recipe import Recipe
from trtforge.report import REPORT_FILES, parity_section, render_reports
from trtforge.stages.engines import Planned, choose_defaults
from trtforge.stages.engines import entry as entry_for
from trtforge.stages.engines import outcome as engine_outcome
from trtforge.stages.engines import plan as plan_engines
from trtforge.stages.engines import run_workers as run_engine_workers
from trtforge.store import RESULT, SCHEMA, StageCache, key_of, publish, read_manifest, write_json_atomic

TOOLS = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "polygraphy", "numpy")


def tool_versions(names: tuple[str, ...] = TOOLS) -> dict[str, str]:
    versions = {"python": platform.python_version(), "trtforge": __version__}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class BuildResult:
    artifact: Path
    passed: bool
    up_to_date: bool
    manifest: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {"artifact": str(self.artifact), "passed": self.passed, "up_to_date": self.up_to_date,
                "stages": self.manifest.get("stages", {}), "files": sorted(self.manifest.get("files", {}))}


class Build:
    def __init__(self, recipe: Recipe, out_dir: Path, *, force: bool = False, progress: Progress | None = None,
                 command: list[str] | None = None) -> None:
        self.recipe = recipe
        self.out_dir = out_dir
        self.artifact = out_dir / recipe.model.name
        self.force = force
        self.progress = progress or Progress(quiet=True)
        self.cache = StageCache(out_dir, recipe.model.name)
        self.command = command or ["trtforge", "build", str(recipe.path), "--out", str(out_dir)]
        self.stage_records: dict[str, dict[str, Any]] = {}
        self.engine_entries: list[dict[str, Any]] = []
        self.fp16_result: dict[str, Any] | None = None
        self.skipped_backends: list[dict[str, Any]] = []
        self.used_entries: set[str] = set()

    # --- what determines each stage ------------------------------------------------------------------
    @cached_property
    def versions(self) -> dict[str, str]:
        return tool_versions()

    @cached_property
    def fingerprint(self) -> dict[str, str]:
        return source_fingerprint(self.recipe.model)

    @cached_property
    def keys(self) -> dict[str, str]:
        r, v = self.recipe, self.versions
        model = asdict(r.model)
        model.pop("name")
        model.pop("source")
        export = key_of("export", self.fingerprint, model, asdict(r.export),
                        [v[t] for t in ("trtforge", "torch", "transformers", "onnx", "onnxscript")])
        checked_with = [v[t] for t in ("onnxruntime", "polygraphy", "numpy")]
        validate = key_of("validate", export, asdict(r.shapes), asdict(r.validate), checked_with)
        fp16 = key_of("fp16", export, asdict(r.shapes), r.validate.seed, asdict(r.fp16), checked_with)
        keys = {"export": export, "validate": validate}
        if r.fp16.enabled:
            keys["fp16"] = fp16
        return keys

    @cached_property
    def engine_plan(self) -> tuple[list[Planned], list[dict[str, Any]]]:
        if not self.recipe.fp16.enabled:
            return [], [{"backend": "all", "status": "skipped", "reason": "engines need [fp16] enabled = true"}]
        return plan_engines(self)

    @cached_property
    def build_key(self) -> str:
        planned, skipped = self.engine_plan
        return key_of(self.keys, [p.key for p in planned], skipped, self.recipe.hash)

    # --- lazily loaded heavy state ---------------------------------------------------------------------
    @cached_property
    def loaded(self) -> LoadedModel:
        from trtforge.models import load_model

        with self.progress.stage("load", f"loading {self.recipe.model.source}") as outcome:
            loaded = load_model(self.recipe.model)
            outcome["summary"] = f"{type(loaded.model).__name__}, {loaded.model.num_parameters() / 1e6:.1f} M parameters"
        return loaded

    @cached_property
    def reference(self) -> Any:
        from trtforge.stages.validate import Reference, profile_feeds

        with self.progress.stage("reference", "PyTorch FP32 at the min, opt and max shapes") as outcome:
            feeds = profile_feeds(self.loaded, self.recipe.shapes, seed=self.recipe.validate.seed)
            reference = Reference.from_model(self.loaded, feeds)
            outcome["summary"] = ", ".join(f"{k} {tuple(next(iter(f.values())).shape)}" for k, f in feeds.items())
        return reference

    # --- running ------------------------------------------------------------------------------------
    def run(self) -> BuildResult:
        self.progress.line(f"trtforge build {self.recipe.model.name} -> {self.artifact}")
        self.build_key  # resolves the model source and the engine plan: fails before anything is written
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.cache.locked():
            if not self.force and (manifest := self._published_if_current()) is not None:
                self.progress.line(f"  up to date: every stage matches {self.artifact / 'manifest.json'}; "
                                   "nothing to do (--force rebuilds)")
                return BuildResult(self.artifact, manifest["parity"]["passed"], True, manifest)
            files, parity = self._run_stages()
            manifest = self._package(files, parity)
            self.cache.prune(self.used_entries)
        verdict = "PASSED" if manifest["parity"]["passed"] else "FAILED"
        self.progress.line(f"{verdict}  {self.artifact}  (report: {self.artifact / REPORT_FILES[1]})")
        return BuildResult(self.artifact, manifest["parity"]["passed"], False, manifest)

    def _published_if_current(self) -> dict[str, Any] | None:
        try:
            manifest = read_manifest(self.artifact)
        except TrtforgeError:
            return None
        if manifest.get("build_key") != self.build_key:
            return None
        complete = all((self.artifact / rel).is_file() and (self.artifact / rel).stat().st_size == f["size"]
                       for rel, f in manifest["files"].items())
        return manifest if complete else None

    def _stage(self, name: str, doing: str, work: Callable[[Path], dict[str, Any]],
               summarize: Callable[[dict[str, Any]], str]) -> tuple[Path, dict[str, Any]]:
        key = self.keys[name]
        entry = self.cache.path(name, key)
        self.used_entries.add(entry.name)
        cached = None if self.force else self.cache.lookup(name, key)
        if cached is not None:
            self.progress.cached(name, summarize(cached))
            self.stage_records[name] = {**_record(cached), "cached": True}
            return entry, cached
        with self.progress.stage(name, doing) as outcome, self.cache.writing(name, key) as scratch:
            start = time.perf_counter()
            result = work(scratch)
            result["duration_s"] = round(time.perf_counter() - start, 3)
            result["key"] = key
            result.setdefault("status", "done")
            write_json_atomic(scratch / RESULT, result)
            outcome["summary"] = summarize(result)
        self.stage_records[name] = {**_record(result), "cached": False}
        return entry, result

    def _run_stages(self) -> tuple[dict[str, Path], list[tuple[str, ParityResult]]]:
        from trtforge.stages import steps as stages

        files: dict[str, Path] = {}
        parity: list[tuple[str, ParityResult]] = []

        export_dir, _ = self._stage("export", "ONNX with dynamic axes",
                                    lambda d: stages.export(self, d), lambda r: f"{r['nodes']} nodes, opset {r['opset']}")
        files.update(_files(export_dir))
        fp32 = export_dir / "model.onnx"

        _, validated = self._stage("validate", "ONNX Runtime (CPU) against PyTorch FP32",
                                   lambda d: stages.validate(self, fp32), _parity_summary)
        parity.append(("validate", ParityResult.from_dict(validated["parity"])))

        if self.recipe.fp16.enabled:
            fp16_dir, fp16 = self._stage("fp16", "FP16 graph, checked against PyTorch FP32",
                                         lambda d: stages.fp16(self, fp32, d),
                                         lambda r: f"{_parity_summary(r)}, {len(r['kept_nodes'])} nodes kept in FP32")
            files.update(_files(fp16_dir))
            parity.append(("fp16", ParityResult.from_dict(fp16["parity"])))
            self.fp16_result = fp16
            engine_files, engine_parity = self._run_engines(fp32, fp16_dir / "model.fp16.onnx")
            files.update(engine_files)
            parity.extend(engine_parity)
        return files, parity

    def _run_engines(self, fp32: Path, fp16: Path) -> tuple[dict[str, Path], list[tuple[str, ParityResult]]]:
        planned, self.skipped_backends = self.engine_plan
        for skipped in self.skipped_backends:
            self.progress.line(f"  {'engines':<10} skipped: {skipped['reason']}")
        results: dict[str, dict[str, Any]] = {}
        todo = []
        for p in planned:
            self.used_entries.add(self.cache.path(p.stage, p.key).name)
            cached = None if self.force else self.cache.lookup(p.stage, p.key)
            if cached is not None:
                results[p.stage] = cached
                self.progress.cached("engine", f"{p.relative_dir}: {cached['status']}")
            else:
                todo.append(p)
        if todo:
            names = ", ".join(p.relative_dir for p in todo)
            with self.progress.stage("engines", f"building {names} (one process each)") as outcome:
                jobs = [(p, self.cache.scratch(p.stage, p.key)) for p in todo]
                fresh = run_engine_workers(self, jobs, fp32, fp16)
                for p, scratch in jobs:
                    result = fresh[p.stage]
                    result["status"] = engine_outcome(p, result)[0]
                    if "error" in result:  # not cached: a failed build is retried next time
                        results[p.stage] = result
                        continue
                    write_json_atomic(scratch / RESULT, result)
                    results[p.stage] = result
                    self.cache.commit(p.stage, p.key, scratch)
                outcome["summary"] = ", ".join(f"{p.relative_dir} {results[p.stage]['status']}" for p in todo)
        files: dict[str, Path] = {}
        parity = []
        for p in planned:
            entry, result_parity = entry_for(self, p, results[p.stage])
            self.engine_entries.append(entry)
            self.stage_records[p.stage] = {"status": entry["status"], "key": p.key,
                                           "duration_s": entry["build"].get("build_seconds"), "cached": p not in todo}
            parity.append((f"engine {p.relative_dir}", result_parity))
            cache_dir = self.cache.path(p.stage, p.key)
            if cache_dir.is_dir():
                files.update({f"{p.relative_dir}/{f.name}": f for f in sorted(cache_dir.iterdir())
                              if f.is_file() and f.name not in (RESULT, "job.json")})
        return files, parity

    def _package(self, files: dict[str, Path], parity_results: list[tuple[str, ParityResult]]) -> dict[str, Any]:
        with self.progress.stage("package", "manifest, reports, hashes") as outcome:
            parity = parity_section(parity_results)
            recipe_text = self.recipe.path.read_text()
            manifest = self._manifest(parity)
            context = {"model": self.recipe.model.source, "task": self.recipe.model.task,
                       "built": manifest["created"], "reproduce": manifest["reproduce"]}
            texts = {"recipe.toml": recipe_text, **render_reports(self.recipe.model.name, parity, context)}
            publish(self.out_dir, self.recipe.model.name, files, texts, manifest)
            outcome["summary"] = f"{len(manifest['files'])} files, parity {'passed' if parity['passed'] else 'FAILED'}"
        return manifest

    def _manifest(self, parity: dict[str, Any]) -> dict[str, Any]:
        fp16 = self.fp16_result
        return {
            "schema": SCHEMA,
            "name": self.recipe.model.name,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "build_key": self.build_key,
            "recipe": {"path": str(self.recipe.path), "sha256": self.recipe.hash, "content": self.recipe.raw},
            "model": {"source": self.recipe.model.source, "task": self.recipe.model.task,
                      "architecture": self.recipe.model.architecture, "fingerprint": self.fingerprint,
                      "class": self.export_result().get("model_class")},
            "versions": self.versions,
            "host": {"platform": platform.platform(), "python": sys.version.split()[0]},
            "io": self.export_result().get("io", {}),
            "shapes": {"batch": list(self.recipe.shapes.batch),
                       self.recipe.shapes.extent_name: list(self.recipe.shapes.extent)},
            "stages": self.stage_records,
            "fp16": ({"kept_ops": fp16["kept_ops"], "kept_nodes": fp16["kept_nodes"], "rounds": fp16["rounds"]}
                     if fp16 else None),
            "parity": parity,
            "engines": self.engine_entries,
            "defaults": choose_defaults(self.engine_entries),
            "skipped_backends": self.skipped_backends,
            "reproduce": self.reproduce,
        }

    @property
    def reproduce(self) -> str:
        return shlex.join(self.command)

    def export_result(self) -> dict[str, Any]:
        return self.cache.lookup("export", self.keys["export"]) or {}


def _files(stage_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(stage_dir.iterdir()) if p.is_file() and p.name != RESULT}


def _record(result: dict[str, Any]) -> dict[str, Any]:
    return {"status": result.get("status"), "duration_s": result.get("duration_s"), "key": result.get("key")}


def _parity_summary(result: dict[str, Any]) -> str:
    rows = result["parity"]["outputs"]
    worst = max((r["max_abs"] for r in rows), default=0.0)
    return f"{result['status']} (max abs error {worst:.2g} over {len(rows)} output/shape checks)"

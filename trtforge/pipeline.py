"""The build: the only place that orders the stages and decides what is up to date.

Each stage is keyed by a hash of its inputs, settings and tool versions. A stage whose key is in
the cache is not run again; a build whose every key matches the published manifest does nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from trtforge import __version__, interrupts
from trtforge.compare import ParityResult
from trtforge.errors import EnvironmentProblem, TrtforgeError, os_error_message
from trtforge.models import LoadedModel, source_fingerprint
from trtforge.progress import Progress
from trtforge.recipe import Recipe
from trtforge.report import REPORT_FILES, parity_section, render_reports
from trtforge.stages.engines import Planned, choose_defaults
from trtforge.stages.engines import entry as entry_for
from trtforge.stages.engines import outcome as engine_outcome
from trtforge.stages.engines import plan as plan_engines
from trtforge.stages.engines import run_workers as run_engine_workers
from trtforge.manifest import SCHEMA, read_manifest, verify_files
from trtforge.stages.validate import GATE_OPTIMIZATION
from trtforge.store import (FAILED_SUFFIX, RESULT, StageCache, key_of, publish, refuse_unowned, remove_leftovers,
                            remove_owned, sha256_file, write_json_atomic)
from trtforge.tokens import TEXT_CONFIG, TOKENIZER_DIR

TOOLS = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "polygraphy", "numpy")


class StageFailed(TrtforgeError):
    """A stage that could not complete for this model: the build fails with its reason."""

    exit_code = 1


ENGINE_LIBRARIES = ("onnxruntime-gpu", "tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-rtx-cu12",
                    "tensorrt-rtx-cu13", "tensorrt_rtx_cu13_libs", "tensorrt_cu13_libs")


def installed_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Each distribution's version from package metadata (no import), None where it is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def engine_library_versions() -> dict[str, str]:
    """Installed engine libraries (what the engine plan depends on)."""
    return {name: v for name, v in installed_versions(ENGINE_LIBRARIES).items() if v is not None}


def tool_versions(names: tuple[str, ...] = TOOLS) -> dict[str, str]:
    return {"python": platform.python_version(), "trtforge": __version__,
            **{name: v or "not installed" for name, v in installed_versions(names).items()}}


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
                 command: list[str] | None = None, wait_s: float = 1800.0, publish_failed: bool = False) -> None:
        self.recipe = recipe
        self.out_dir = out_dir
        self.artifact = out_dir / recipe.model.name
        self.failed_artifact = out_dir / f"{recipe.model.name}{FAILED_SUFFIX}"
        self.force = force
        self.wait_s = wait_s
        self.publish_failed = publish_failed
        self.progress = progress or Progress(quiet=True)
        self.cache = StageCache(out_dir, recipe.model.name, warn=lambda line: self.progress.line(f"  {line}"))
        self.command = command or ["trtforge", "build", str(recipe.path), "--out", str(out_dir)]
        self.stage_records: dict[str, dict[str, Any]] = {}
        self.stage_results: dict[str, dict[str, Any]] = {}  # each stage's result as this build has it
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
        checked_with = [v[t] for t in ("onnxruntime", "polygraphy", "numpy")] + [GATE_OPTIMIZATION]
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

        with self.progress.stage("reference", "PyTorch FP32 at the validation shapes") as outcome:
            feeds = profile_feeds(self.loaded, self.recipe.shapes, seed=self.recipe.validate.seed)
            reference = Reference.from_model(self.loaded, feeds)
            outcome["summary"] = ", ".join(f"{k} {tuple(next(iter(f.values())).shape)}" for k, f in feeds.items())
        return reference

    # --- running ------------------------------------------------------------------------------------
    def run(self) -> BuildResult:
        """Refuse bad input before writing anything; then, under the artifact's lock, reuse or run
        each stage and publish the artifact (or, for a failed rebuild of a passing one, beside it)."""
        from trtforge.preflight import preflight

        from trtforge.ownership import refuse_inside_owned

        refuse_inside_owned(self.out_dir, "--out")  # a later build would delete what lands in there
        self.fingerprint  # finds the weights (or says where they are missing)
        if not self.force and (done := self._nothing_to_do()) is not None:
            return done
        self.recipe = preflight(self.recipe)  # the model's config against the recipe: nothing written yet
        self.build_key  # resolves the model source and the engine plan
        refuse_unowned(self.artifact, self.recipe.model.name)
        refuse_unowned(self.failed_artifact, self.recipe.model.name)
        with _naming(self.out_dir), _undo_if_refused(self.out_dir, self.cache.root), \
                self.cache.locked(timeout_s=self.wait_s):
            self.progress.line(f"trtforge build {self.recipe.model.name} -> {self.artifact}")
            remove_leftovers(self.out_dir, self.recipe.model.name)
            refuse_unowned(self.artifact, self.recipe.model.name)  # again: it may have changed while we waited
            if not self.force and (manifest := self._published_if_current()) is not None:
                return self._up_to_date(manifest, "every stage and every file's sha256 match")
            files, parity = self._run_stages()
            published, manifest = self._package(files, parity)
            self.cache.prune(self.used_entries)
        passed = manifest["parity"]["passed"]
        line = f"{'PASSED' if passed else 'FAILED'}  {published}  (report: {published / REPORT_FILES[1]})"
        if published != self.artifact:
            line += (f"; the passing artifact {self.artifact} was kept (--publish-failed replaces it)")
        if passed:
            self.progress.line(line)
        else:
            self._say_failed(line, manifest)
        return BuildResult(published, passed, False, manifest)

    @cached_property
    def request_key(self) -> str:
        """What decides, without importing torch or transformers, that a build would redo nothing:
        the recipe as written, the weights' fingerprint, the tool and engine-library versions, and
        the GPUs this machine shows. Recorded beside the published manifest's sha256."""
        from trtforge.devices import gpu_signature

        return key_of("request", SCHEMA, self.recipe.hash, self.fingerprint, self.versions, engine_library_versions(),
                      gpu_signature())

    def _nothing_to_do(self) -> BuildResult | None:
        """The no-op rebuild, decided by the request key and the manifest alone: the published
        manifest is the one this cache recorded for this very request, and every file's sha256
        matches it. None where anything differs (the full check then runs, and says why)."""
        record = self.cache.published_record(self.artifact.name)
        if record is None or record.get("request_key") != self.request_key or not self.artifact.is_dir():
            return None
        try:
            manifest = read_manifest(self.artifact)
        except TrtforgeError:
            return None
        if manifest["name"] != self.recipe.model.name:
            return None
        with _naming(self.out_dir), self.cache.locked(timeout_s=self.wait_s):
            remove_leftovers(self.out_dir, self.recipe.model.name)  # what a killed build left, as every build does
            if record != self.cache.published_record(self.artifact.name) \
                    or sha256_file(self.artifact / "manifest.json") != record.get("manifest_sha256") \
                    or verify_files(self.artifact, manifest):
                return None
            self.progress.line(f"trtforge build {self.recipe.model.name} -> {self.artifact}")
            return self._up_to_date(manifest, "the recipe, the model and the tools are as built, and every file's "
                                              "sha256 matches")

    def _up_to_date(self, manifest: dict[str, Any], why: str) -> BuildResult:
        """Nothing to do (said, with `why`); a passing artifact supersedes a stale `<name>.failed`."""
        self.progress.line(f"  up to date: {why} {self.artifact / 'manifest.json'}; nothing to do (--force rebuilds)")
        passed = manifest["parity"]["passed"]
        if passed:
            remove_owned(self.failed_artifact, self.recipe.model.name)
        else:
            self._say_failed(f"FAILED  {self.artifact}  (unchanged recipe; report: {self.artifact / REPORT_FILES[1]})",
                             manifest)
        return BuildResult(self.artifact, passed, True, manifest)

    def _say_failed(self, line: str, manifest: dict[str, Any]) -> None:
        """A failed gate is an error, said even under --quiet: the verdict and the first breach."""
        self.progress.error(f"{line}\n  first failing check: {_first_failure(manifest)}")

    def _published_if_current(self) -> dict[str, Any] | None:
        """The published manifest, if this build would write it as it is: the same build key, the
        very manifest this cache's build published (its sha256 pinned here), every file verified."""
        try:
            manifest = read_manifest(self.artifact)
        except TrtforgeError as e:
            if self.artifact.exists():
                self.progress.line(f"  {e}; rebuilding it")
            return None
        if manifest.get("build_key") != self.build_key:
            return None
        pinned = (self.cache.published_record(self.artifact.name) or {}).get("manifest_sha256")
        if pinned != sha256_file(self.artifact / "manifest.json"):
            self.progress.line(f"  {self.artifact / 'manifest.json'} is not the manifest this cache's last build "
                               f"published ({'edited since' if pinned else 'no record of it'}); rebuilding it")
            return None
        problems = verify_files(self.artifact, manifest)
        if problems:
            self.progress.line(f"  {self.artifact} fails verification ({problems[0]}); rebuilding it")
            return None
        return manifest

    def _destination(self, passed: bool) -> Path:
        """Where a finished build goes: its own name, unless it failed where a passing artifact stands."""
        if passed or self.publish_failed:
            return self.artifact
        try:
            previous = read_manifest(self.artifact)
        except TrtforgeError:
            return self.artifact
        return self.failed_artifact if previous["parity"]["passed"] else self.artifact

    def _stage(self, name: str, doing: str, work: Callable[[Path], dict[str, Any]],
               summarize: Callable[[dict[str, Any]], str]) -> tuple[Path, dict[str, Any]]:
        key = self.keys[name]
        entry = self.cache.path(name, key)
        self.used_entries.add(entry.name)
        cached = None if self.force else self.cache.lookup(name, key)
        if cached is not None:
            self.progress.cached(name, summarize(cached))
            self.stage_records[name] = {**_record(cached), "cached": True}
            self.stage_results[name] = cached
            return entry, cached
        with self.progress.stage(name, doing) as outcome, self.cache.writing(name, key) as scratch, \
                _naming(scratch), self._clean_failure(name):
            start = time.perf_counter()
            result = work(scratch)
            result["duration_s"] = round(time.perf_counter() - start, 3)
            result["key"] = key
            result.setdefault("status", "done")
            write_json_atomic(scratch / RESULT, result)
            outcome["summary"] = summarize(result)
        self.stage_records[name] = {**_record(result), "cached": False}
        self.stage_results[name] = result
        return entry, result

    @contextlib.contextmanager
    def _clean_failure(self, stage: str) -> Iterator[None]:
        """A stage that fails in a library (an exporter, onnxruntime, a model's own code) fails the
        build with one line naming the model, the stage and the reason: exit 1, nothing cached."""
        try:
            yield
        except (TrtforgeError, OSError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:
            if interrupts.received():  # the library swallowed Ctrl-C: this is an interruption, not a failure
                raise KeyboardInterrupt from e
            if self.progress.verbose:
                import traceback

                traceback.print_exc()
            reason = (str(e).strip().splitlines() or [""])[0][:300] or "no message"
            raise StageFailed(f"{self.recipe.model.name}: the {stage} stage failed ({type(e).__name__}: {reason}); "
                              "nothing was published (-v shows the traceback)") from e
        if interrupts.received():  # swallowed, and the library went on as if nothing happened: stop here
            raise KeyboardInterrupt

    def _run_stages(self) -> tuple[dict[str, Path], list[tuple[str, ParityResult]]]:
        from trtforge.stages import steps as stages

        files: dict[str, Path] = {}
        parity: list[tuple[str, ParityResult]] = []

        export_dir, _ = self._stage("export", "ONNX with dynamic axes",
                                    lambda d: stages.export(self, d), lambda r: f"{r['nodes']} nodes, opset {r['opset']}")
        files.update(self._cached_files("export"))
        fp32 = export_dir / "model.onnx"

        def validate() -> None:
            _, validated = self._stage("validate", "ONNX Runtime (CPU) against PyTorch FP32",
                                       lambda d: stages.validate(self, fp32), _parity_summary)
            parity.insert(0, ("validate", ParityResult.from_dict(validated["parity"])))

        if not self.recipe.fp16.enabled:
            validate()
            return files, parity
        # The FP16 graph first, so that engine workers (processes of their own) build while the FP32
        # graph is validated here; the stages do not depend on each other.
        fp16_dir, fp16 = self._stage("fp16", "FP16 graph, checked against PyTorch FP32",
                                     lambda d: stages.fp16(self, fp32, d),
                                     lambda r: f"{_parity_summary(r)}, {len(r['kept_nodes'])} nodes kept in FP32")
        files.update(self._cached_files("fp16"))
        parity.append(("fp16", ParityResult.from_dict(fp16["parity"])))
        self.fp16_result = fp16
        engine_files, engine_parity = self._run_engines(fp32, fp16_dir / "model.fp16.onnx", alongside=validate)
        files.update(engine_files)
        parity.extend(engine_parity)
        return files, parity

    def _cached_files(self, stage: str, key: str | None = None, prefix: str = "") -> dict[str, tuple[Path, str]]:
        """A cache entry's files (but its records), each with the sha256 recorded when it was cached."""
        key = key or self.keys[stage]
        entry = self.cache.path(stage, key)
        return {f"{prefix}{rel}": (entry / rel, record["sha256"]) for rel, record in self.cache.records(stage, key).items()
                if rel not in (RESULT, "job.json")}

    def _run_engines(self, fp32: Path, fp16: Path, *, alongside: Callable[[], None]
                     ) -> tuple[dict[str, tuple[Path, str | None]], list[tuple[str, ParityResult]]]:
        """Reuse or build every planned engine; `alongside` runs here while the workers build."""
        planned, self.skipped_backends = self.engine_plan
        for skipped in self.skipped_backends:
            self.progress.line(f"  {'engines':<10} skipped: {skipped['reason']}")
        results: dict[str, dict[str, Any]] = {}
        todo = []
        failed_scratch: dict[str, Path] = {}
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
                fresh = run_engine_workers(self, jobs, fp32, fp16, alongside=alongside)
                for p, scratch in jobs:
                    result = fresh[p.stage]
                    result["status"] = engine_outcome(p, result)[0]
                    if "error" in result:  # not cached: a failed build is retried next time; its logs ship
                        results[p.stage] = result
                        failed_scratch[p.stage] = scratch
                        continue
                    write_json_atomic(scratch / RESULT, result)
                    results[p.stage] = result
                    self.cache.commit(p.stage, p.key, scratch)
                outcome["summary"] = ", ".join(f"{p.relative_dir} {results[p.stage]['status']}" for p in todo)
        else:
            alongside()
        files: dict[str, tuple[Path, str | None]] = {}
        parity = []
        for p in planned:
            entry, result_parity = entry_for(self, p, results[p.stage])
            self.engine_entries.append(entry)
            self.stage_records[p.stage] = {"status": entry["status"], "key": p.key,
                                           "duration_s": entry["build"].get("build_seconds"), "cached": p not in todo}
            parity.append((f"engine {p.relative_dir}", result_parity))
            if p.stage in failed_scratch:  # this build's logs, never an earlier build's engine
                scratch = failed_scratch[p.stage]
                files.update({f"{p.relative_dir}/{f.name}": (f, None) for f in sorted(scratch.iterdir())
                              if f.is_file() and f.name not in (RESULT, "job.json", "result.json")})
            else:
                files.update(self._cached_files(p.stage, p.key, prefix=f"{p.relative_dir}/"))
        return files, parity

    def _package(self, files: dict[str, tuple[Path, str | None]],
                 parity_results: list[tuple[str, ParityResult]]) -> tuple[Path, dict[str, Any]]:
        """Publish the artifact; returns where it went and its manifest (with every file's sha256)."""
        with self.progress.stage("package", "manifest, reports, hashes") as outcome:
            parity = parity_section(parity_results)
            manifest = self._manifest(parity, files)
            context = {"model": self.source_as_written, "task": self.recipe.model.task,
                       "built": manifest["created"], "reproduce": manifest["reproduce"]}
            # The recipe as it was read and built, not as it may have been edited since.
            texts = {"recipe.toml": self.recipe.text, **render_reports(self.recipe.model.name, parity, context)}
            if manifest["text"] is not None:
                texts[TEXT_CONFIG] = json.dumps(manifest["text"], indent=2) + "\n"
            destination = self._destination(parity["passed"])
            published = publish(self.out_dir, self.recipe.model.name, files, texts, manifest,
                                directory=destination.name,
                                before_swap=lambda name, sha: self.cache.record_published(name, sha, self.request_key))
            if destination == self.artifact:
                remove_owned(self.failed_artifact, self.recipe.model.name)  # superseded
            outcome["summary"] = f"{len(manifest['files'])} files, parity {'passed' if parity['passed'] else 'FAILED'}"
        return published, manifest

    @property
    def source_as_written(self) -> str:
        """The model source as the recipe gives it (no path of the build machine)."""
        return str(self.recipe.raw["model"]["source"])

    def _manifest(self, parity: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
        fp16 = self.fp16_result
        return {
            "schema": SCHEMA,
            "name": self.recipe.model.name,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "build_key": self.build_key,
            "roles": self._roles(files),
            "onnx": {"opset": self.recipe.export.opset, "exporter": self.recipe.export.exporter},
            "recipe": {"file": self.recipe.path.name, "sha256": self.recipe.hash, "content": self.recipe.raw},
            "model": {"source": self.source_as_written, "task": self.recipe.model.task,
                      "architecture": self.recipe.model.architecture, "fingerprint": self.fingerprint,
                      "class": self.export_result().get("model_class"),
                      "vocab_size": self.export_result().get("vocab_size"),
                      "type_vocab_size": self.export_result().get("type_vocab_size")},
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
            "text": self._text_config() if self.export_result().get("text", {}).get("tokenizer") else None,
            "reproduce": self.reproduce,
        }

    def _text_config(self) -> dict[str, Any]:
        from trtforge.tokens import text_config

        return text_config(max_length=self.recipe.shapes.extent[2],
                           inputs=[t["name"] for t in self.export_result()["io"]["inputs"]],
                           pooling=self.export_result()["text"]["pooling"],
                           labels=self.export_result()["text"].get("labels"),
                           prompts=self.export_result()["text"].get("prompts"),
                           cross_encoder=self.export_result()["text"].get("cross_encoder"))

    def _roles(self, files: dict[str, Any]) -> dict[str, str]:
        """Which file is which, for consumers that do not want to guess from names."""
        written = ("recipe.toml", *REPORT_FILES)
        roles = {"onnx-fp32": "model.onnx", "onnx-fp16": "model.fp16.onnx", "recipe": "recipe.toml",
                 "report-json": REPORT_FILES[0], "report-markdown": REPORT_FILES[1], "report-junit": REPORT_FILES[2],
                 "tokenizer": f"{TOKENIZER_DIR}/tokenizer.json"}
        if self.export_result().get("text", {}).get("tokenizer"):
            roles["text-config"] = TEXT_CONFIG
            written += (TEXT_CONFIG,)
        roles.update({f"engine:{e['backend']}/{e['target']}": e["file"] for e in self.engine_entries})
        return {role: rel for role, rel in roles.items() if rel in files or rel in written}

    @property
    def reproduce(self) -> str:
        return shlex.join(self.command)

    def export_result(self) -> dict[str, Any]:
        """The export stage's result: as this build ran or verified it (looked up, and verified, once)."""
        if "export" not in self.stage_results:
            found = self.cache.lookup("export", self.keys["export"])
            if found is None:
                return {}
            self.stage_results["export"] = found
        return self.stage_results["export"]


@contextlib.contextmanager
def _naming(directory: Path) -> Iterator[None]:
    """Give a file-system error without a path (a library's write failing) the directory it wrote into."""
    try:
        yield
    except OSError as e:
        if not e.filename:
            e.filename = str(directory)
        raise


@contextlib.contextmanager
def _undo_if_refused(out_dir: Path, cache_root: Path) -> Iterator[None]:
    """Create `out_dir` and the artifact's cache directory for a build, turning what the file
    system refuses into one line; if the build is then refused (exit 2) before any stage is cached,
    remove what was created here, so that a refusal leaves nothing behind."""
    chain = [cache_root, cache_root.parent, out_dir, *out_dir.parents]
    created = [p for p in chain if not p.exists()]
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EnvironmentProblem(f"cannot create the output directory {out_dir}: {os_error_message(e, '--out')}") from None
    try:
        yield
    except (TrtforgeError, OSError) as e:
        only_lock = all(p.name == "lock" for p in cache_root.rglob("*") if not p.is_dir())
        if getattr(e, "exit_code", 2) == 2 and cache_root in created and only_lock:
            shutil.rmtree(cache_root, ignore_errors=True)
            for path in created[1:]:
                with contextlib.suppress(OSError):
                    path.rmdir()  # only if empty
        raise


def _record(result: dict[str, Any]) -> dict[str, Any]:
    record = {"status": result.get("status"), "duration_s": result.get("duration_s"), "key": result.get("key")}
    if "checked_with" in result:  # the ONNX gates: which runtime judged the graph, and how
        record["checked_with"] = result["checked_with"]
    return record


def _parity_summary(result: dict[str, Any]) -> str:
    rows = result["parity"]["outputs"]
    worst = max((r["max_abs"] for r in rows), default=0.0)
    return f"{result['status']} (max abs error {worst:.2g} over {len(rows)} output/shape checks)"


def _first_failure(manifest: dict[str, Any]) -> str:
    """The first failing parity check of a failed manifest, in a line: its stage, and its error or
    its first breached output with the breach ("none checked" where nothing was: read_manifest
    holds the verdict to its results)."""
    for result in manifest["parity"]["results"]:
        if not result["checked"] or result["passed"]:
            continue
        if result.get("error"):
            return f"{result['stage']}: {result['error']}"
        row = next((r for r in result["outputs"] if not r["passed"]), None)
        if row is None:
            return f"{result['stage']}: no output compared"
        return f"{result['stage']}: {row['output']} at the {row['shape_label']} shape: {'; '.join(row['failures'])}"
    return "none checked"

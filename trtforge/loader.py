"""`trtforge.load(artifact, device=...)`: the engine of an artifact that fits a device, checked first.

Before anything is deserialized, the manifest is checked against the device (GPU model and compute
capability) and the installed library (its version), and the engine file against its sha256. A
mismatch raises CompatibilityError naming what differs and the command that rebuilds for this
device. Inputs outside the engine's optimization profile are refused, with the allowed range,
before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from trtforge.backends import backend
from trtforge.backends.base import Engine, Target
from trtforge.devices import GpuInfo
from trtforge.errors import ArtifactError, CompatibilityError, EnvironmentProblem, ShapeError
from trtforge.manifest import read_manifest, verify_files
from trtforge.text import printable

USABLE = ("passed", "built-not-checked")


class ProfiledEngine(Engine):
    """An engine that refuses inputs outside its profile and reports what it is."""

    def __init__(self, engine: Engine, entry: dict[str, Any]) -> None:
        self.engine, self.entry = engine, entry
        self.backend, self.device = engine.backend, engine.device
        self.inputs = entry["io"]["inputs"]
        self.outputs = entry["io"]["outputs"]
        # axis -> (min, opt, max), one dict per optimization profile; the first is the recipe's [shapes]
        self.profiles = [{axis: tuple(r) for axis, r in p.items()} for p in entry["profiles"]]
        self.profile = self.profiles[0]

    def check_shapes(self, feed: Mapping[str, Any]) -> None:
        check_profiles(self.inputs, self.profiles, feed)

    def __call__(self, feed: Mapping[str, Any], *, real_tokens: int | None = None) -> dict[str, Any]:
        self.check_shapes(feed)
        return self.engine(feed, real_tokens=real_tokens)

    def close(self) -> None:
        self.engine.close()


def check_shapes(inputs: list[dict[str, Any]], profile: Mapping[str, tuple[int, ...]], feed: Mapping[str, Any]) -> None:
    """Refuse a feed that misses an input or leaves the profile's (min, opt, max) on any axis."""
    for spec in inputs:
        if spec["name"] not in feed:
            raise ShapeError(f"input {spec['name']!r} is missing; this engine takes "
                             f"{', '.join(i['name'] for i in inputs)}")
        shape = tuple(feed[spec["name"]].shape)
        if len(shape) != len(spec["shape"]):
            raise ShapeError(f"input {spec['name']!r} has {len(shape)} dimensions, expected {len(spec['shape'])} "
                             f"({spec['shape']})")
        for size, dim in zip(shape, spec["shape"]):
            if isinstance(dim, str):
                lo, _, hi = profile[dim]
                if not lo <= size <= hi:
                    raise ShapeError(f"input {spec['name']!r} has {dim} {size}, outside the engine's profile "
                                     f"[{lo}, {hi}]; split the batch or rebuild with a wider [shapes] {dim}")
            elif size != dim:
                raise ShapeError(f"input {spec['name']!r} has size {size} where the engine needs {dim}")


def check_profiles(inputs: list[dict[str, Any]], profiles: list[Mapping[str, tuple[int, ...]]],
                   feed: Mapping[str, Any]) -> None:
    """Refuse a feed that fits none of an engine's optimization profiles."""
    errors = []
    for profile in profiles:
        try:
            return check_shapes(inputs, profile, feed)
        except ShapeError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    ranges = "; ".join(", ".join(f"{axis} [{r[0]}, {r[2]}]" for axis, r in p.items()) for p in profiles)
    raise ShapeError(f"{errors[0]} (no profile fits; this engine's profiles: {ranges})")


def load(artifact: str | Path, device: str = "cuda:0", *, backend_name: str | None = None) -> ProfiledEngine:
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    gpu = _device(device)
    entry = select(manifest, gpu, backend_name=backend_name, device=device)
    engine_backend = backend(entry["backend"])
    reason = engine_backend.missing()
    if reason:
        raise EnvironmentProblem(f"cannot load {entry['backend']} engine: {reason}")
    installed = engine_backend.library_version()
    problem = version_problem(entry["backend"], str(entry.get("library_version")), installed)
    if problem:
        raise CompatibilityError(f"{entry['file']}: {problem}; rebuild it here with "
                                 f"`{printable(manifest['reproduce'])} --force` or install that version")
    # Every file of the engine's directory that the backend may open, not only the engine file.
    problems = verify_files(artifact, manifest, only=[entry["dir"]])
    if problems:
        raise ArtifactError(f"{artifact}: {problems[0]}; the engine is corrupted or was modified, rebuild with "
                            f"`{printable(manifest['reproduce'])} --force`")
    return ProfiledEngine(engine_backend.load(artifact / entry["dir"], entry, device), entry)


def version_problem(backend_name: str, built: str, installed: str) -> str | None:
    """The version policy (README, "Version policy"): None when an engine built with `built` may
    run on `installed`, else what differs.

    - TensorRT and TensorRT-RTX plans are tied to the exact library version that built them
      (TensorRT's own rule for plans built without version compatibility): every field must match.
    - onnxruntime engines are ONNX graphs (with ONNX Runtime contrib ops where fused): they run on
      the same major version at the same or a newer minor version, which keeps every op and fusion
      the build used; an older minor may lack them, a new major may drop them.
    """
    if backend_name in ("tensorrt", "tensorrt-rtx"):
        if built != installed:
            return f"built with {backend_name} {built}, this machine has {installed} (plans need the exact version)"
        return None
    b, i = _major_minor(built), _major_minor(installed)
    if b is None or i is None or b[0] != i[0] or i[1] < b[1]:
        return (f"built with onnxruntime {built}, this machine has {installed} (needs {b[0] if b else '?'}.x "
                f"at or above {built})")
    return None


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def _device(device: Any) -> GpuInfo | None:
    from trtforge.checks import device_name

    try:
        device = device_name(device)
    except ValueError as e:
        raise CompatibilityError(str(e)) from None
    if device == "cpu":
        return None
    from trtforge.devices import gpu

    return gpu(int(device.split(":")[1]))


def select(manifest: dict[str, Any], gpu: GpuInfo | None, *, backend_name: str | None, device: str) -> dict[str, Any]:
    """The engine entry for a device: the recorded default for its GPU model if any, else the first
    usable engine that runs on it."""
    entries = [e for e in manifest.get("engines", []) if backend_name in (None, e["backend"])]
    fits = [e for e in entries if e["status"] in USABLE and _target(e).runs_on(gpu)]
    if not fits:
        where = "the CPU" if gpu is None else f"{gpu.name} (sm{gpu.compute_capability.replace('.', '')})"
        built = ", ".join(f"{e['backend']}/{e['target']} ({e['status']})" for e in entries) or "none"
        if gpu is None:
            fix = ('add "onnxruntime-cpu" to the recipe\'s [engines] backends (e.g. backends = ["auto", '
                   '"onnxruntime-cpu"]) and rebuild')
        else:
            fix = (f"rebuild on a machine with this GPU with `{printable(manifest['reproduce'])}` (the recipe's "
                   "[engines] backends, gpus and rtx_targets decide the targets)")
        raise CompatibilityError(f"no engine in {manifest['name']} fits {where} on {device}; built: {built}; {fix}")
    default = manifest.get("defaults", {}).get(gpu.model_key if gpu else "", {})
    return next((e for e in fits if e["backend"] == default.get("backend")), fits[0])


def _target(entry: dict[str, Any]) -> Target:
    return Target(name=entry["target"], kind=entry["kind"], compute_capabilities=tuple(entry["compute_capabilities"]),
                  gpu=entry["gpu"])

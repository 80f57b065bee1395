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

from trtforge.backends.base import Engine, Target, backend
from trtforge.devices import GpuInfo
from trtforge.errors import ArtifactError, CompatibilityError, EnvironmentProblem, ShapeError
from trtforge.store import read_manifest, verify_files

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

    def __call__(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        self.check_shapes(feed)
        return self.engine(feed)

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
    if installed != entry["library_version"]:
        raise CompatibilityError(
            f"{entry['file']} was built with {entry['backend']} {entry['library_version']}, this machine has "
            f"{installed}; rebuild it here with `{manifest['reproduce']} --force` or install that version")
    problems = verify_files(artifact, manifest, only=[entry["file"]])
    if problems:
        raise ArtifactError(f"{artifact}: {problems[0]}; the engine is corrupted or was modified, rebuild with "
                            f"`{manifest['reproduce']} --force`")
    return ProfiledEngine(engine_backend.load(artifact / entry["dir"], entry, device), entry)


def _device(device: str) -> GpuInfo | None:
    if device == "cpu":
        return None
    if not device.startswith("cuda"):
        raise CompatibilityError(f"unknown device {device!r}; use 'cpu' or 'cuda:N'")
    from trtforge.devices import gpu

    return gpu(int(device.split(":")[1]) if ":" in device else 0)


def select(manifest: dict[str, Any], gpu: GpuInfo | None, *, backend_name: str | None, device: str) -> dict[str, Any]:
    """The engine entry for a device: the recorded default for its GPU model if any, else the first
    usable engine that runs on it."""
    entries = [e for e in manifest.get("engines", []) if backend_name in (None, e["backend"])]
    fits = [e for e in entries if e["status"] in USABLE and _target(e).runs_on(gpu)]
    if not fits:
        where = "the CPU" if gpu is None else f"{gpu.name} (sm{gpu.compute_capability.replace('.', '')})"
        built = ", ".join(f"{e['backend']}/{e['target']} ({e['status']})" for e in entries) or "none"
        raise CompatibilityError(
            f"no engine in {manifest['name']} fits {where} on {device}; built: {built}. Rebuild on this machine "
            f"with `{manifest['reproduce']}` (recipe [engines] backends/gpus/rtx_targets decide the targets)")
    default = manifest.get("defaults", {}).get(gpu.model_key if gpu else "", {})
    return next((e for e in fits if e["backend"] == default.get("backend")), fits[0])


def _target(entry: dict[str, Any]) -> Target:
    return Target(name=entry["target"], kind=entry["kind"], compute_capabilities=tuple(entry["compute_capabilities"]),
                  gpu=entry["gpu"])

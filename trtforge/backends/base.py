"""One small interface for every engine backend.

A backend builds an engine artifact from the ONNX graphs for a target, and loads one onto a device
as an object that runs a dict of named torch tensors (on that device) and returns a dict. Heavy
imports (tensorrt, onnxruntime) stay inside each backend module.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from trtforge.devices import GpuInfo


@dataclass(frozen=True)
class Target:
    """Where an engine runs: a GPU model (built on that GPU), an offline compute capability, or the CPU."""

    name: str  # directory name: a GPU model key, "sm89", "cuda", "cpu"
    kind: str  # "gpu" (built and checked on a GPU of this model), "aot" (built offline), "portable"
    compute_capabilities: tuple[str, ...] = ()
    gpu: dict[str, Any] | None = None  # GpuInfo.as_dict() of the GPU that builds and checks it

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def runs_on(self, device: GpuInfo | None) -> bool:
        if self.kind == "portable":
            return (self.name == "cpu") == (device is None)
        if device is None:
            return False
        return device.compute_capability in self.compute_capabilities and (
            self.kind == "aot" or self.gpu is None or self.gpu["model_key"] == device.model_key)


@dataclass
class BuildJob:
    """Everything a backend needs to build one engine; JSON round-trips to the worker process."""

    backend: str
    target: dict[str, Any]
    fp32_onnx: str
    fp16_onnx: str
    out_dir: str
    inputs: list[dict[str, Any]]  # [{"name", "dtype", "axes"}]
    outputs: list[dict[str, Any]]
    shapes: dict[str, list[int]]  # axis name -> [min, opt, max]
    options: dict[str, Any] = field(default_factory=dict)
    extra_profiles: list[dict[str, list[int]]] = field(default_factory=list)  # more optimization profiles
    cache_dir: str = ""  # where timing caches persist across builds

    def profiles(self) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
        """Per profile, per input (min, opt, max) shapes from the ranges and the inputs' axes; the
        recipe's [shapes] first, then [[engines.profiles]]."""
        result = []
        for ranges in [self.shapes, *self.extra_profiles]:
            profile = {}
            for spec in self.inputs:
                dims = [[ranges[a][i] if isinstance(a, str) else a for a in spec["shape"]] for i in range(3)]
                profile[spec["name"]] = tuple(tuple(d) for d in dims)
            result.append(profile)
        return result


class Engine(ABC):
    """A loaded engine on one device: call it with named torch tensors on that device. On a GPU the
    call may return before the work is done, as a PyTorch op does: outputs are ordered on the
    device's current stream (read them through stream-ordered operations, `.cpu()`, or after a
    synchronize). `real_tokens`: how many of the feed's tokens are real (not padding), where the
    caller knows it without reading the device; an engine with a padding-free path may use it to
    choose, others ignore it."""

    backend: str
    device: str

    @abstractmethod
    def __call__(self, feed: Mapping[str, Any], *, real_tokens: int | None = None) -> dict[str, Any]: ...

    def close(self) -> None:
        """Release device memory held by the engine."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(ABC):
    name: str
    module: str  # the Python module whose presence makes this backend available
    distribution: str  # the pip package that provides it
    engine_file: str
    multiple_profiles = False  # builds [[engines.profiles]] into the engine

    def missing(self) -> str | None:
        """None when the library imports; else one line that says what to install."""
        try:
            importlib.import_module(self.module)
        except ImportError as e:
            return f"{self.name}: {self.module} is not installed ({e.name or e}); pip install {self.distribution}"
        return None

    def library_version(self) -> str:
        try:
            return metadata.version(self.distribution.split("[")[0].split("=")[0].split(">")[0])
        except metadata.PackageNotFoundError:
            return str(getattr(importlib.import_module(self.module), "__version__", "unknown"))

    @abstractmethod
    def targets(self, *, gpus: list[GpuInfo], rtx_targets: tuple[str, ...]) -> list[Target]: ...

    # Variants of the engine that the worker builds, checks and times, keeping the fastest that
    # passes; one unnamed variant for most backends.
    candidates: tuple[str, ...] = ("",)
    # What a built engine directory holds, as a number in every engine's cache key: raised when a
    # backend starts writing something more, so that cached engines without it are rebuilt.
    layout: int = 1

    @abstractmethod
    def build(self, job: BuildJob, log: Any, candidate: str = "") -> dict[str, Any]:
        """Write the engine (of `candidate`, one of `candidates`) into job.out_dir; return build
        metadata for the manifest."""

    @abstractmethod
    def load(self, engine_dir: Path, entry: dict[str, Any], device: str) -> Engine: ...

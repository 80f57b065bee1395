"""The GPUs of this machine, described the way engine targets and compatibility checks need them."""

from __future__ import annotations

import re
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "9.0"
    memory_gib: float
    driver: str
    cuda_runtime: str

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")

    @property
    def model_key(self) -> str:
        """Identifies GPUs that can share an engine: same model, same compute capability."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        return f"{slug}-{self.sm}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sm": self.sm, "model_key": self.model_key}


def gpu_signature() -> list[str]:
    """What GPUs this machine shows, cheaply (no torch, no CUDA): the driver's description of each
    (/proc/driver/nvidia/gpus/*/information) and CUDA_VISIBLE_DEVICES. Engines are planned per GPU,
    so a change here means the engine plan may differ."""
    import os

    root = Path("/proc/driver/nvidia/gpus")
    described = []
    if root.is_dir():
        for info in sorted(root.glob("*/information")):
            try:
                described.append(info.read_text())
            except OSError:
                described.append(info.parent.name)
    elif Path("/dev/nvidiactl").exists():
        described.append("nvidia device without /proc description")
    return [*described, f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}"]


def list_gpus() -> list[GpuInfo]:
    """The CUDA devices torch sees (none on a CPU-only machine or with a CPU build of torch)."""
    import shutil

    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidiactl").exists():
        return []  # no NVIDIA driver: skip importing torch (a second) to learn nothing
    import torch

    if not torch.cuda.is_available():
        return []
    driver = _driver_version()
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(GpuInfo(index=index, name=props.name, compute_capability=f"{props.major}.{props.minor}",
                            memory_gib=round(props.total_memory / 2**30, 1), driver=driver,
                            cuda_runtime=str(torch.version.cuda)))
    return gpus


def gpu(index: int) -> GpuInfo:
    gpus = list_gpus()
    if index >= len(gpus):
        from trtforge.errors import CompatibilityError

        raise CompatibilityError(f"cuda:{index} does not exist (this machine has {len(gpus)} GPU(s)); "
                                 "use an index below that, or device='cpu'")
    return gpus[index]


def _driver_version() -> str:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        out = []
    return out[0] if out else "unknown"


def distinct_models(gpus: list[GpuInfo]) -> dict[str, list[GpuInfo]]:
    """GPUs grouped by model key: one build serves each group."""
    groups: dict[str, list[GpuInfo]] = {}
    for g in gpus:
        groups.setdefault(g.model_key, []).append(g)
    return groups

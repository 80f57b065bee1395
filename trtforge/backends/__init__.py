"""Engine backends behind one interface (see base.py): onnxruntime (CUDA, CPU), tensorrt, tensorrt-rtx.

This module is the registry; the concrete backends import base.py, never the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trtforge.backends.base import Backend

# The file each backend's engine lives in, inside engines/<backend>/<target>/ (known without imports).
ENGINE_FILES = {"onnxruntime-cuda": "model.onnx", "onnxruntime-cpu": "model.onnx",
                "tensorrt": "engine.plan", "tensorrt-rtx": "engine.plan"}


def engine_file_of(name: str) -> str:
    return ENGINE_FILES[name]


def backend(name: str) -> Backend:
    """The backend called `name` (one of ENGINE_FILES); its heavy library is imported only when used."""
    if name.startswith("onnxruntime-"):
        from trtforge.backends.onnxruntime import OnnxruntimeBackend

        return OnnxruntimeBackend(provider=name.removeprefix("onnxruntime-"))
    if name in ("tensorrt", "tensorrt-rtx"):
        from trtforge.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(module=name.replace("-", "_"))
    raise KeyError(f"unknown backend {name!r}")

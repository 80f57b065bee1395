"""trtforge: Hugging Face model -> validated ONNX -> FP16 engines per GPU, with parity reports."""

from __future__ import annotations

from typing import Any

__version__ = "0.3.0"


def load(artifact: Any, device: str = "cuda:0", *, backend_name: str | None = None) -> Any:
    """Load the engine of `artifact` that fits `device` ("cuda:N" or "cpu"), after checking the
    manifest against the device, the installed library and the engine's sha256 (see loader.py)."""
    from trtforge.loader import load as _load

    return _load(artifact, device, backend_name=backend_name)

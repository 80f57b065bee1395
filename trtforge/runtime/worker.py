"""One worker process per device: loads its engine through the checked loader, then serves requests.

Messages in (its own queue): ("run", request_id, chunk, {name: ndarray}) or None to stop.
Messages out (its own pipe, so that a worker killed mid-send holds no lock the others need): ("ready", slot, info) | ("result", request_id, chunk, slot, outputs)
| ("error", request_id, chunk, slot, message) | ("failed", slot, message) when loading fails.
"""

from __future__ import annotations

import os
import traceback
from typing import Any


def serve(slot: int, artifact: str, device: str, backend_name: str | None, outputs_on: str,
          requests: Any, responses: Any) -> None:
    try:
        import torch

        import trtforge

        if device == "cpu":
            torch.set_num_threads(1)
        engine = trtforge.load(artifact, device, backend_name=backend_name)
    except Exception as e:  # reported to the parent, which raises it to the caller
        responses.send(("failed", slot, f"{type(e).__name__}: {e}"))
        return
    on_gpu = device != "cpu"
    staging = _Staging()
    responses.send(("ready", slot, {"pid": os.getpid(), "device": device, "backend": engine.backend,
                                   "profile": engine.profile}))
    sent = 0
    while True:
        message = requests.get()
        if message is None:
            break
        _, request_id, chunk, arrays = message
        try:
            feed = {name: staging.to_device(name, array, device) for name, array in arrays.items()}
            outputs = engine(feed)
            if outputs_on == "device" and on_gpu:
                result = {k: v.contiguous() for k, v in outputs.items()}  # shared by CUDA IPC
            else:
                result = {k: staging.to_host(k, v) for k, v in outputs.items()}
            responses.send(("result", request_id, chunk, slot, result))
        except Exception as e:  # one bad request must not stop the worker
            responses.send(("error", request_id, chunk, slot, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                                            f" [{traceback.extract_tb(e.__traceback__)[-1].name}]"))
        sent += 1
        if on_gpu and sent % 64 == 0:
            torch.cuda.ipc_collect()  # free device results the caller has released
    engine.close()


class _Staging:
    """Pinned host buffers, kept per tensor name and reused while the shape fits: allocating pinned
    memory costs more than the copy itself, so it is done once, not per request."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, str], Any] = {}

    def _buffer(self, key: tuple[str, str], shape: tuple[int, ...], dtype: Any) -> Any:
        import torch

        numel = 1
        for size in shape:
            numel *= size
        buffer = self.buffers.get(key)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = torch.empty(max(numel, 1), dtype=dtype, pin_memory=True)
            self.buffers[key] = buffer
        return buffer[:numel].view(shape)

    def to_device(self, name: str, array: Any, device: str) -> Any:
        import torch

        tensor = torch.from_numpy(array)
        if device == "cpu":
            return tensor
        pinned = self._buffer(("in", name), tuple(tensor.shape), tensor.dtype)
        pinned.copy_(tensor)
        # Asynchronous: the engine runs after the copy on the same stream; the buffer is reused only
        # by the next request, after this one's results are back.
        return pinned.to(device, non_blocking=True)

    def to_host(self, name: str, tensor: Any) -> Any:
        import torch

        if tensor.device.type == "cpu":
            return tensor.numpy()
        pinned = self._buffer(("out", name), tuple(tensor.shape), tensor.dtype)
        pinned.copy_(tensor, non_blocking=True)
        torch.cuda.current_stream(tensor.device).synchronize()
        # A copy: the queue pickles in a background thread, after the buffer may be reused.
        return pinned.numpy().copy()

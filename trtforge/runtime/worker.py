"""One worker process per device: loads its engine through the checked loader, then serves requests.

Messages in (its own queue): ("run", request_id, chunk, {name: ndarray}) or None to stop.
Messages out (the shared queue): ("ready", slot, info) | ("result", request_id, chunk, slot, outputs)
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
        responses.put(("failed", slot, f"{type(e).__name__}: {e}"))
        return
    on_gpu = device != "cpu"
    responses.put(("ready", slot, {"pid": os.getpid(), "device": device, "backend": engine.backend,
                                   "profile": engine.profile}))
    sent = 0
    while True:
        message = requests.get()
        if message is None:
            break
        _, request_id, chunk, arrays = message
        try:
            feed = {name: _to_device(array, device) for name, array in arrays.items()}
            outputs = engine(feed)
            if outputs_on == "device" and on_gpu:
                result = {k: v.contiguous() for k, v in outputs.items()}  # shared by CUDA IPC
            else:
                result = {k: _to_host(v) for k, v in outputs.items()}
            responses.put(("result", request_id, chunk, slot, result))
        except Exception as e:  # one bad request must not stop the worker
            responses.put(("error", request_id, chunk, slot, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                                            f" [{traceback.extract_tb(e.__traceback__)[-1].name}]"))
        sent += 1
        if on_gpu and sent % 64 == 0:
            torch.cuda.ipc_collect()  # free device results the caller has released
    engine.close()


def _to_device(array: Any, device: str) -> Any:
    import torch

    tensor = torch.from_numpy(array)
    if device == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _to_host(tensor: Any) -> Any:
    import torch

    if tensor.device.type == "cpu":
        return tensor.numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host.numpy()

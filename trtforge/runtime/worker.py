"""One worker process per device: loads its engine through the checked loader, then serves requests.

Messages in (its own queue): ("run", request_id, chunk, {name: ndarray}) or None to stop.
Messages out (its own pipe, so that a worker killed mid-send holds no lock the others need): ("ready", slot, info) | ("result", request_id, chunk, slot, outputs)
| ("error", request_id, chunk, slot, message) | ("failed", slot, message) when loading fails.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any

from trtforge.runtime.batching import bucket_for
from trtforge.tokens import TEXT_CONFIG, pool


def serve(slot: int, artifact: str, device: str, backend_name: str | None, outputs_on: str,
          requests: Any, responses: Any, warm: list[tuple[int, int]] = ()) -> None:
    try:
        import torch

        import trtforge

        if device == "cpu":
            torch.set_num_threads(1)
        start = time.perf_counter()
        engine = trtforge.load(artifact, device, backend_name=backend_name)
        loaded_s = time.perf_counter() - start
        text = TextEncoder(Path(artifact), engine.profile) if (Path(artifact) / TEXT_CONFIG).is_file() else None
        staging = _Staging()
        for batch, length in warm:  # the shapes this workload will meet: set up before the first request
            engine({spec["name"]: staging.to_device(spec["name"], _zeros(spec, batch, length), device)
                    for spec in engine.inputs})
        if device != "cpu":
            torch.cuda.synchronize()
    except Exception as e:  # reported to the parent, which raises it to the caller
        responses.send(("failed", slot, f"{type(e).__name__}: {e}"))
        return
    on_gpu = device != "cpu"
    responses.send(("ready", slot, {"pid": os.getpid(), "device": device, "backend": engine.backend,
                                   "profile": engine.profile, "load_s": round(loaded_s, 3),
                                   "warm_s": round(time.perf_counter() - start - loaded_s, 3), "warmed": len(warm)}))
    sent = 0
    while True:
        message = requests.get()
        if message is None:
            break
        kind, request_id, chunk, payload = message
        received = time.monotonic()  # CLOCK_MONOTONIC: comparable with the caller's clock
        timings: dict[str, float] = {}
        try:
            if kind == "encode":
                if text is None:
                    raise ValueError("this artifact carries no tokenizer (text.json); send token ids with run()")
                result = text.encode(payload, lambda arrays: _run(engine, staging, arrays, device, "device", on_gpu))
                timings["worker_ms"] = 1e3 * (time.monotonic() - received)
            else:
                result = _run(engine, staging, payload, device, outputs_on, on_gpu, timings)
            timings["received"], timings["sent"] = received, time.monotonic()
            responses.send(("result", request_id, chunk, slot, result, timings))
        except Exception as e:  # one bad request must not stop the worker
            responses.send(("error", request_id, chunk, slot, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                                            f" [{traceback.extract_tb(e.__traceback__)[-1].name}]"))
        sent += 1
        if on_gpu and sent % 64 == 0:
            torch.cuda.ipc_collect()  # free device results the caller has released
    engine.close()


def _run(engine: Any, staging: Any, arrays: dict[str, Any], device: str, outputs_on: str, on_gpu: bool,
         timings: dict[str, float] | None = None) -> dict[str, Any]:
    """One chunk through the engine; `timings` gets the milliseconds of inputs (to the device),
    engine (to its last kernel, where outputs go to the host anyway) and outputs (back)."""
    start = time.monotonic()
    feed = {name: staging.to_device(name, array, device) for name, array in arrays.items()}
    inputs_done = time.monotonic()
    outputs = engine(feed)
    if outputs_on == "device" and on_gpu:
        result = {k: v.contiguous() for k, v in outputs.items()}  # shared by CUDA IPC
    else:
        if on_gpu:
            import torch

            torch.cuda.current_stream().synchronize()  # the copy back would wait here anyway
        engine_done = time.monotonic()
        result = {k: staging.to_host(k, v) for k, v in outputs.items()}
    if timings is not None:
        end = time.monotonic()
        engine_end = end if outputs_on == "device" and on_gpu else engine_done
        timings.update(inputs_ms=1e3 * (inputs_done - start), engine_ms=1e3 * (engine_end - inputs_done),
                       outputs_ms=1e3 * (end - engine_end))
    return result


def _zeros(spec: dict[str, Any], batch: int, length: int) -> Any:
    import numpy as np

    shape = [batch if d == "batch" else length if d in ("sequence", "image") else d for d in spec["shape"]]
    return np.zeros(shape, dtype=spec["dtype"])


class TextEncoder:
    """Text in the worker: the artifact's tokenizer (truncating at its validated max_length), rows
    sorted by length and run in batches cut to their longest, pooling where text.json declares it;
    results in the order of the texts given."""

    def __init__(self, artifact: Path, profile: dict[str, tuple[int, int, int]]) -> None:
        import json

        import transformers

        self.config = json.loads((artifact / TEXT_CONFIG).read_text())
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(artifact / self.config["tokenizer"])
        self.tokenizer.padding_side = "right"  # the engine's positions count from the first column
        self.max_batch = profile["batch"][2]
        self.sequence = profile["sequence"]

    def encode(self, texts: list[str], run: Any) -> dict[str, Any]:
        import numpy as np

        encoded = self.tokenizer(texts, truncation=True, max_length=self.config["max_length"])
        lengths = np.array([len(ids) for ids in encoded["input_ids"]])
        order = np.argsort(lengths, kind="stable")
        results: dict[str, Any] = {}
        for part in np.array_split(order, max(1, -(-len(texts) // self.max_batch))):
            width = bucket_for(int(lengths[part].max()), self.sequence)
            mask = (np.arange(width)[None, :] < lengths[part][:, None]).astype(np.int64)
            feed = {"attention_mask": mask}
            for name in self.config["inputs"]:
                if name == "attention_mask":
                    continue
                block = np.zeros((len(part), width), dtype=np.int64)  # token types default to 0
                if name in encoded:
                    for row, i in enumerate(part):
                        block[row, : lengths[i]] = encoded[name][i]
                feed[name] = block
            outputs = run({name: feed[name] for name in self.config["inputs"]})  # left where computed
            pooling = self.config.get("pooling")
            if pooling:  # on the device: only (rows, hidden) crosses to the host
                outputs = {"embedding": pool(next(iter(outputs.values())), mask, pooling)}
            outputs = {k: v.float().cpu().numpy() if hasattr(v, "cpu") else v for k, v in outputs.items()}
            for name, value in outputs.items():
                if value.ndim > 2:  # per token: zeros past each text's end, whatever the batch's width
                    value = value * mask.reshape(*mask.shape, *([1] * (value.ndim - 2))).astype(value.dtype)
                if name not in results:
                    width_all = int(lengths.max())
                    shape = (len(texts), *(width_all if i == 0 and value.ndim > 2 else n
                                           for i, n in enumerate(value.shape[1:])))
                    results[name] = np.zeros(shape, dtype=value.dtype)
                results[name][(part, *(slice(0, n) for n in value.shape[1:]))] = value
        return results


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

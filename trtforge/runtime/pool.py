"""The runtime: an artifact served on a set of devices, one engine and one worker process per device.

    with Runtime("engines/bert-base-classifier", devices="all") as rt:
        logits = rt.run({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})["logits"]

Processes, not threads: a process per device never serialises on the GIL, and a crash in one
engine (a library abort, an out-of-memory kill) takes down only its worker. A batch larger than
the devices can take at once is split into chunks within each engine's profile; chunks wait in one
queue and go to whichever worker has a free slot, and results come back in input order.

The data path (runtime/shm.py): each worker has SLOTS slots of shared memory for inputs (and as many
for staging outputs), and the runtime has one shared heap for results, all created here and reused
for the runtime's life. A chunk's inputs are written once, into a slot; the worker reads them in
place. For host outputs, each request gets a block of the heap when its first chunk is dispatched
(requests waiting for a free slot hold none), the workers write their rows of the result straight
into it (padding zeroed, in input order), and the caller hands out numpy arrays over the block: no
copy on the caller's side, whatever the size of the outputs; the block returns to the heap when
those arrays die. For device outputs, each GPU worker has a device heap, shared once at start (CUDA
IPC); each chunk gets a block of it, which the caller hands out as tensors. Only descriptors cross the
pipes; one receiver thread per worker takes them. With in_process=True (one device) the worker's
engine and data path run in this process, in the submitting thread, and nothing crosses a pipe.

Errors in a worker reach the caller as WorkerError (WorkerDied, RequestTimeout); the other workers
keep serving; nothing waits forever. Any number of caller threads may submit at once; the runtime
belongs to the process that created it (caller processes do not attach to it).
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from trtforge.checks import seconds, whole_number
from trtforge.manifest import read_manifest, verified_text_config
from trtforge.runtime.processes import (RequestTimeout, Worker, WorkerDied, WorkerError, cpu_shares,
                                        resolve_devices, start_in_process, start_worker, stop_workers, wait_ready)
from trtforge.runtime.requests import Chunk, Request, span
from trtforge.runtime.results import HEAP_ROUNDS, Results
from trtforge.runtime.shaping import TEXT_BYTES_PER_TOKEN, TOKEN_BUDGET, RequestShaper, default_batching
from trtforge.runtime.tokenize import Tokens
from trtforge.tokens import prompt_text
from trtforge.runtime.shm import ALIGN, MAX_SLOTS, SLOTS, max_bytes, send_plain

__all__ = ["Runtime", "WorkerError", "WorkerDied", "RequestTimeout", "resolve_devices"]


class Runtime:
    """An artifact served on a set of devices (see the module's docstring).

    `batching="length"` (the default for host outputs): within a request, rows are grouped by their
    real length (from the attention mask), each chunk is cut to its longest row (rounded up to a
    bucket: see buckets()), and results come back in input order in the request's shape, with
    zeros at padded positions of per-token outputs (positions no consumer reads). `"fixed"` keeps
    every row at the request's length. `warm`: (batch, sequence) shapes each worker runs once before
    the runtime is ready, so first requests do not pay the engine's per-shape set-up; `rt.startup_s`
    says how long start-up took. Inputs are read when their chunk is sent to a worker: do not change
    arrays passed to submit() until its future is done.

    `in_process=True` (one device only): the engine runs in this process, in the thread that
    submits (submit() returns once the request is done), for the lowest latency of one request at a
    time; it gives up the worker process's isolation (an engine crash takes the caller down) and the
    overlap of the caller's work with the engine's. Several caller threads take turns on the engine.

    `slots`: chunks in flight per worker (each holds an input slot and an output slot of shared
    memory from its dispatch to its answer; the results heap is sized to match). More slots hide
    more of the round trip (the caller's dispatch, the pipes, the answer's handling) behind the
    engine, for more memory.
    """

    def __init__(self, artifact: str | Path, devices: str | int | Sequence[int | str] = "all", *,
                 backend: str | None = None, outputs: Literal["host", "device"] = "host",
                 batching: Literal["length", "fixed"] | None = None, warm: Sequence[tuple[int, int]] = (),
                 timeout_s: float = 60.0, start_timeout_s: float = 600.0, in_process: bool = False,
                 slots: int = SLOTS) -> None:
        import torch.multiprocessing as tmp

        started = time.perf_counter()
        timeout_s = seconds("timeout_s", timeout_s)
        start_timeout_s = seconds("start_timeout_s", start_timeout_s)
        whole_number("slots", slots, 1, MAX_SLOTS, "the chunks in flight per worker")
        self.artifact = Path(artifact)
        manifest = read_manifest(self.artifact)
        self.manifest = manifest
        self.outputs_on, self.timeout_s = outputs, timeout_s
        self.batching = batching or default_batching(outputs)
        if self.batching not in ("length", "fixed"):
            raise ValueError(f"batching must be 'length' or 'fixed', got {self.batching!r}")
        if self.batching == "length" and outputs == "device":
            raise ValueError("length-aware batching returns host outputs in input order; use outputs='host' "
                             "or batching='fixed'")
        self.text = verified_text_config(self.artifact, manifest)  # the files the workers read, verified first
        # The collaborators: requests in, chunks out (shaping); outputs back in, results out.
        self._shaper = RequestShaper(manifest, batching=self.batching, text=self.text)
        self._results = Results(manifest, outputs_on=outputs)
        self.inputs, self.profile = self._shaper.inputs, self._shaper.profile
        self.sequence_inputs, self.max_batch = self._shaper.sequence_inputs, self._shaper.max_batch
        self.output_specs = self._results.output_specs
        self.slots = slots
        self.devices = resolve_devices(devices)
        _refuse_devices_without_engine(manifest, self.devices, backend)  # before any worker starts
        if in_process and len(self.devices) != 1:
            raise ValueError(f"in_process=True runs one device, got {len(self.devices)}; serve several devices "
                             "with worker processes (in_process=False, the default)")
        self._requests: dict[int, Request] = {}
        self._pair_tokenizer: Any = None  # made by score(), once
        self._pending: collections.deque[Chunk] = collections.deque()
        self._timings: collections.deque[tuple] = collections.deque(maxlen=100_000)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._progress = time.monotonic()  # the last time any worker answered
        input_bytes, output_bytes = self._slot_bytes()
        self._results.open_heap(output_bytes, len(self.devices) * slots)
        self._heap = self._results.heap
        # Device outputs: each worker's device heap holds as many rounds of its slots' results.
        largest_chunk = self._results.chunk_output_bytes(self.max_batch, self._results.largest.get("sequence", 1))
        device_heap_bytes = HEAP_ROUNDS * slots * largest_chunk if outputs == "device" else 0
        if in_process:
            try:
                self._workers: list[Worker] = [
                    start_in_process(0, self.devices[0], str(self.artifact), backend=backend, outputs=outputs,
                                     warm=warm, input_bytes=input_bytes, output_bytes=output_bytes, heap=self._heap,
                                     slots=slots)]
            except BaseException:
                self.close()  # the results heap
                raise
        else:
            context = tmp.get_context("spawn")  # CUDA cannot be used in forked children
            # CPU workers pinned to shares of this process's cores, where the platform can pin (Linux)
            shares = (cpu_shares(self.devices, os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity")
                      else [None] * len(self.devices))
            self._workers = [
                start_worker(index, device, str(self.artifact), backend=backend, outputs=outputs, warm=warm,
                             input_bytes=input_bytes, output_bytes=output_bytes, heap=self._heap, context=context,
                             device_heap_bytes=device_heap_bytes, cores=shares[index], slots=slots)
                for index, device in enumerate(self.devices)]
            try:
                wait_ready(self._workers, start_timeout_s)
            except BaseException:
                self.close()
                raise
            for worker in self._workers:
                worker.receiver = threading.Thread(target=self._receive, args=(worker,), daemon=True,
                                                   name=f"trtforge-receiver-{worker.index}")
                worker.receiver.start()
        self._watcher = threading.Thread(target=self._watch, name="trtforge-watcher", daemon=True)
        self._watcher.start()
        self.startup_s = round(time.perf_counter() - started, 3)

    def _slot_bytes(self) -> tuple[int, int]:
        """One chunk at the profile's largest shapes: its inputs (or its texts), its host outputs
        (at least 4 bytes an element: FP16 engines may return FP32)."""
        rows = {"name": "__rows__", "shape": ["batch"], "dtype": "int64"}  # where a chunk's rows go in the result
        inputs = max_bytes([*self.inputs, rows], self._results.largest)
        if self.text is not None:
            # UTF-8 takes at most 4 bytes a character; 8 bytes of end offset per text.
            per_text = 4 * TEXT_BYTES_PER_TOKEN * self.text["max_length"] + 8
            inputs = max(inputs, self.max_batch * per_text + 2 * ALIGN)
        if self.outputs_on == "device" and self.text is None:
            return inputs, ALIGN  # results stay on the devices (in the workers' device heaps)
        outputs = self._results.chunk_output_bytes(self.max_batch, self._results.largest.get("sequence", 1))
        if self.text is not None:  # a classifier's text results add its top label (int64) and score (float32)
            outputs += self.max_batch * 12 + 2 * ALIGN
        return inputs, outputs

    @property
    def workers(self) -> list[dict[str, Any]]:
        return [{"index": w.index, "device": w.device, "alive": w.alive, **w.info} for w in self._workers]

    # --- requests -------------------------------------------------------------------------------------
    def submit(self, batch: Mapping[str, Any]) -> Future:
        """Send a batch of named tensors (numpy or torch); the future's result is a dict of outputs
        in input order: numpy arrays (outputs="host"), or a list of per-chunk dicts of torch tensors
        on the devices that computed them (outputs="device"; they live in the workers' device memory:
        valid while the runtime is open, so clone what you keep past close())."""
        submitted = time.monotonic()
        self._check_open()
        arrays = self._inputs(batch)
        return self._enqueue(self._shaper.request(next(self._ids), arrays, len(self._live()), submitted=submitted,
                                                  timeout_s=self.timeout_s))

    def _inputs(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return self._shaper.arrays(batch)

    def _check_open(self) -> None:
        if self._closed:
            raise WorkerError("the runtime is closed")

    def _live(self) -> list[Worker]:
        live = [w for w in self._workers if w.alive]
        if not live:
            raise WorkerDied("every worker has exited; create a new Runtime")
        return live

    def submit_text(self, texts: Sequence[str], *, prompt: str | None = None) -> Future:
        """Send strings; the workers tokenize them (in parallel, with the artifact's tokenizer and its
        validated truncation limit, while their engines run), run them in length-sorted batches, and
        apply the artifact's pooling. The future's result: {"embedding": (n, hidden)} where the model
        has pooling, else the model's outputs in text order (per-token outputs padded with zeros to
        the longest text). Texts are cut at max_length x 16 characters before they are sent, far
        past what the tokenizer keeps. `prompt`: the name of one of the model's prompts (text.json's
        `prompts`, from sentence-transformers' config), put before every text as sentence-transformers
        does; None takes the model's default prompt, where it names one."""
        self._check_open()
        if self.text is None:
            raise WorkerError(f"{self.artifact} carries no tokenizer (no text.json); send token ids with run()")
        prefix = prompt_text(self.text, prompt)
        if prefix:
            texts = [prefix + t if isinstance(t, str) else t for t in texts]
        request = self._shaper.text_request(next(self._ids), texts, len(self._live()), timeout_s=self.timeout_s)
        return self._enqueue(request)

    def submit_tokens(self, tokens: Tokens, *, token_budget: int = TOKEN_BUDGET) -> Future:
        """Send texts tokenized already (runtime/tokenize.Tokens: ragged ids, as FastTokenizer makes
        them with the artifact's tokenizer, in this process or in others): the workers pad each chunk
        to its bucket and go on as for submit_text (pooling, labels, results in row order). Chunks
        hold at most `token_budget` padded tokens. This is `trtforge run`'s path: tokenization
        scales with the caller's processes instead of one reader thread per worker."""
        self._check_open()
        if self.text is None:
            raise WorkerError(f"{self.artifact} carries no tokenizer (no text.json); send token ids with run()")
        request = self._shaper.tokens_request(next(self._ids), tokens, len(self._live()), timeout_s=self.timeout_s,
                                              token_budget=token_budget)
        return self._enqueue(request)

    def score(self, pairs: Sequence[tuple[str, str]], timeout: float | None = None) -> np.ndarray:
        """A cross-encoder's (reranker's) scores of (query, passage) pairs, as sentence-transformers'
        CrossEncoder.predict gives them: the model's activation (text.json's cross_encoder) on its
        logits, (n,) for one label, else (n, labels). The pairs are tokenized here, together, with
        the artifact's tokenizer (truncating the longer text first, at max_length), and go to the
        workers as submit_tokens."""
        from trtforge.tokens import activate

        self._check_open()
        cross = (self.text or {}).get("cross_encoder")
        if cross is None:
            raise WorkerError(f"{self.artifact} is not a cross-encoder (its text.json has no cross_encoder); "
                              "score() takes a model saved by sentence-transformers' CrossEncoder")
        if isinstance(pairs, (str, bytes)) or not all(isinstance(p, (tuple, list)) and len(p) == 2
                                                      and all(isinstance(t, str) for t in p) for p in pairs):
            raise ValueError("score() takes a sequence of (text, text) pairs of strings")
        if self._pair_tokenizer is None:
            from trtforge.runtime.tokenize import FastTokenizer

            self._pair_tokenizer = FastTokenizer(self.artifact / self.text["tokenizer"], self.text["max_length"])
        tokens = self._pair_tokenizer.encode([tuple(p) for p in pairs])
        logits = self.submit_tokens(tokens).result(timeout=timeout if timeout is not None else self.timeout_s + 5)
        scores = activate(cross["activation"], logits[next(iter(self.output_specs))])
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def encode(self, texts: Sequence[str], timeout: float | None = None, *, prompt: str | None = None) -> dict[str, np.ndarray]:
        """Text in, the model's outputs (or pooled embeddings) out: see submit_text."""
        return self.submit_text(texts, prompt=prompt).result(timeout=timeout if timeout is not None else self.timeout_s + 5)

    def run(self, batch: Mapping[str, Any], timeout: float | None = None) -> Any:
        return self.submit(batch).result(timeout=timeout if timeout is not None else self.timeout_s + 5)

    def _enqueue(self, request: Request) -> Future:
        with self._lock:
            self._requests[request.chunks[0].request_id] = request
            self._pending.extend(request.chunks)
        self._dispatch()
        return request.future

    def _dispatch(self) -> None:
        """Pending chunks to workers with a free slot (the one with the most free slots first)."""
        while True:
            with self._lock:
                if self._closed or not self._pending:
                    return
                ready = [w for w in self._workers if w.alive and w.free]
                if not ready:
                    return
                worker = max(ready, key=lambda w: len(w.free))
                chunk = self._pending.popleft()
                request = self._requests.get(chunk.request_id)
                if request is None:  # failed or timed out while it waited
                    continue
                if not request.reserved:
                    self._results.reserve(request)
                slot = worker.free.pop()
                worker.outstanding[(chunk.request_id, chunk.index)] = (slot, request)
                request.workers[chunk.index] = worker.index
            self._send(worker, slot, request, chunk)

    def _send(self, worker: Worker, slot: int, request: Request, chunk: Chunk) -> None:
        """The chunk's inputs into the worker's slot, then its descriptor down the worker's pipe."""
        target = None
        if isinstance(request.arrays, Tokens):
            layout = worker.inputs.write(slot, request.arrays.take(chunk.rows).arrays())
            kind = "tokens"
        elif request.text:
            layout = worker.inputs.write_texts(slot, [request.arrays[i] for i in chunk.rows])
            kind = "encode"
        else:
            arrays = self._shaper.slice(request.arrays, chunk)
            if request.block is not None:  # where the worker puts this chunk's rows of the result
                contiguous = span(chunk.rows)
                if contiguous is None:
                    arrays["__rows__"] = np.asarray(chunk.rows, dtype=np.int64)
                target = (request.block, request.layout, contiguous)
            if self.outputs_on == "device" and worker.device_heap is not None:  # its outputs' block there
                size = self._results.chunk_output_bytes(len(next(iter(arrays.values()))), chunk.length or request.length)
                chunk.block = worker.device_heap.allocate(size)
                target = (chunk.block, size) if chunk.block is not None else None
            layout = worker.inputs.write(slot, arrays)
            kind = "run"
        if layout is None:  # cannot happen for checked requests: slots hold the profile's largest chunk
            raise AssertionError("a chunk larger than its slot")
        request.queued[chunk.index] = time.monotonic()
        with request.lock:
            request.in_flight += 1
            request.deadline = request.queued[chunk.index] + self.timeout_s
        if worker.local is not None:  # run here, now; the dispatch loop that called goes on after it
            self._handle(worker, worker.local.handle((kind, chunk.request_id, chunk.index, slot, layout, target)),
                         dispatch=False)
            return
        try:
            with worker.send_lock:
                send_plain(worker.requests, (kind, chunk.request_id, chunk.index, slot, layout, target))
        except (OSError, ValueError):
            pass  # the worker has exited: its receiver fails what it held, this chunk included

    # --- results --------------------------------------------------------------------------------------
    def _receive(self, worker: Worker) -> None:
        """This worker's answers, until its pipe closes (the worker exited)."""
        while True:
            try:
                message = worker.responses.recv()
            except Exception:  # EOF, or a message cut short by the worker's death
                break
            self._handle(worker, message)
        self._exited(worker)

    def _handle(self, worker: Worker, message: tuple, *, dispatch: bool = True) -> None:
        kind, request_id, chunk, _, payload, timings = message
        with self._lock:
            slot, sent = worker.outstanding.pop((request_id, chunk), (None, None))
            request = self._requests.get(request_id)
        if sent is not None:
            self._answered(sent)
        try:
            if request is not None:
                self._record(request, chunk, timings)
                if kind == "error":
                    self._fail(request_id, WorkerError(f"worker {worker.index} ({worker.device}): {payload}"))
                else:
                    self._results.take(request, chunk, worker, slot, payload)
                    self._chunk_done(request)
        except Exception as e:  # a bug here must fail the request, not the receiver
            self._fail(request_id, WorkerError(f"results of worker {worker.index}: {type(e).__name__}: {e}"))
        finally:
            if sent is not None and sent.chunks[chunk].block is not None:  # no tensors took the block
                worker.device_heap.release(sent.chunks[chunk].block)
                sent.chunks[chunk].block = None
            if slot is not None:
                with self._lock:
                    worker.free.append(slot)
            if dispatch:
                self._dispatch()

    def _chunk_done(self, request: Request) -> None:
        with self._lock:
            request.done += 1
            complete = request.done == len(request.chunks) and self._requests.pop(request.chunks[0].request_id, None)
        if complete:
            request.future.set_result(self._results.assemble(request))

    def _record(self, request: Request, chunk: int, worker: dict[str, float]) -> None:
        """One chunk's time, phase by phase (see time_breakdown)."""
        queued = request.queued.get(chunk)
        if queued is not None and "received" in worker:  # made into phases when asked for (time_breakdown)
            self._timings.append((request.submitted, queued, time.monotonic(), worker))

    def time_breakdown(self, *, reset: bool = False) -> dict[str, float]:
        """Median milliseconds per chunk since the start (or the last reset), by phase: enqueue (the
        caller splits the request, waits for a free slot and writes the inputs into it), queue (the
        descriptor's trip to the worker), inputs and launch (the worker's host time to queue the
        copies to the device and the engine), engine (on a GPU, the device's own time for the
        engine), outputs (from the engine's end to the results where the caller reads them: copies
        back and the host's scatter), return (the descriptor's trip back); for text requests, worker
        (chunks and pooling; tokenization is done while the previous chunk runs)."""
        import statistics

        records = [_phases(*timing) for timing in list(self._timings)]
        if reset:
            self._timings.clear()
        keys = sorted({k for r in records for k in r})
        return {"chunks": len(records), **{k: round(statistics.median(r[k] for r in records if k in r), 4) for k in keys}}

    def _fail(self, request_id: int, error: Exception) -> None:
        with self._lock:
            request = self._requests.pop(request_id, None)
        if request is None:
            return
        with request.lock:
            request.failed = True
        self._settle(request)
        if not request.future.done():
            request.future.set_exception(error)

    def _answered(self, request: Request) -> None:
        now = time.monotonic()
        self._progress = now
        with request.lock:
            request.in_flight -= 1
            request.deadline = now + self.timeout_s  # progress: the wait starts again
        self._settle(request)

    def _settle(self, request: Request) -> None:
        self._results.settle(request)

    def _exited(self, worker: Worker) -> None:
        """The worker's pipe closed: fail what it held (and, if it was the last, what waits)."""
        worker.process.join(timeout=5)
        with self._lock:
            worker.alive = False
            failed = {request_id for request_id, _ in worker.outstanding}
            dead = [request for _, request in worker.outstanding.values()]
            worker.outstanding.clear()
            if not any(w.alive for w in self._workers):
                failed |= {c.request_id for c in self._pending}
                self._pending.clear()
        for request in dead:  # it writes no more
            self._answered(request)
        error = (WorkerError("the runtime was closed") if self._closed else
                 WorkerDied(f"worker {worker.index} ({worker.device}) exited with code {worker.process.exitcode} "
                            "during the request; the other workers keep serving"))
        for request_id in failed:
            self._fail(request_id, error)
        self._dispatch()

    def _watch(self) -> None:
        """Fail requests that stopped making progress: `timeout_s` bounds the wait for a worker's
        next answer, not the size of the work. A request with chunks in flight waits for its own
        answers; one still queued behind others waits while the runtime answers anyone."""
        while not self._closed:
            time.sleep(0.05)
            now = time.monotonic()
            with self._lock:
                late = [(i, r) for i, r in self._requests.items()
                        if now > r.deadline and (r.in_flight or now > self._progress + self.timeout_s)]
            for request_id, request in late:
                workers = sorted(set(request.workers.values()))
                where = f" from worker(s) {workers}" if workers else " (every worker busy with earlier requests)"
                self._fail(request_id, RequestTimeout(
                    f"no answer for {self.timeout_s:g} s{where}; Runtime(timeout_s=...) (default 60) bounds the wait "
                    "for a worker's next answer, whatever the request's size: a worker has stopped answering"))

    # --- shutdown -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every worker and release its device and shared memory; pending requests fail."""
        if self._closed:
            return
        self._closed = True
        stop_workers(getattr(self, "_workers", []))
        if hasattr(self, "_results"):
            self._results.close()
        with self._lock:
            self._pending.clear()
            left = list(self._requests)
        for request_id in left:
            self._fail(request_id, WorkerError("the runtime was closed"))

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _phases(submitted: float, queued: float, answered: float, worker: dict[str, float]) -> dict[str, float]:
    """One chunk's phases in milliseconds (see Runtime.time_breakdown)."""
    phases = {"enqueue_ms": 1e3 * (queued - submitted), "queue_ms": 1e3 * (worker["received"] - queued)}
    if "sent" in worker:
        phases["return_ms"] = 1e3 * (answered - worker["sent"])
    phases.update({k: v for k, v in worker.items() if k.endswith("_ms")})
    return phases


def _refuse_devices_without_engine(manifest: dict[str, Any], devices: list[str], backend: str | None) -> None:
    """CompatibilityError naming the fix where some device has no engine in the artifact, before
    any worker process is started (a worker would find the same, seconds later)."""
    from trtforge.loader import select

    for device in dict.fromkeys(devices):
        if device == "cpu":
            select(manifest, None, backend_name=backend, device=device)
        else:
            from trtforge.devices import gpu

            select(manifest, gpu(int(device.split(":")[1])), backend_name=backend, device=device)

"""The PyTorch ways of doing the runtime's job, measured on the same inputs.

- DDP done right for inference: one process per GPU over NCCL (gloo on CPU), the model in FP16 eval
  (FP32 on CPU), each rank takes its DistributedSampler shard (rows rank, rank + N, ...) padded to
  its own longest row (as a padding collator makes each rank's batch), outputs are all-gathered
  (per-token outputs padded back to the request's length) and put back in input order.
- The same with length-sorted batches ("ddp-sorted"): the request's rows sorted by real length and
  cut into one contiguous block per rank (what a length-grouping sampler does), each padded to its
  own longest row.
- DataParallel: one process, the batch scattered over the GPUs and gathered on the first.
- torch.compile on one GPU, where it runs.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from typing import Any, Callable

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(times_ms: list[float]) -> dict[str, float]:
    ordered = sorted(times_ms)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99), "mean_ms": round(statistics.fmean(ordered), 4)}


def torch_model(recipe_path: str, device: str) -> Any:
    """The recipe's model as PyTorch serves it best: FP16 and SDPA attention on a GPU, FP32 on CPU."""
    import transformers

    from trtforge.models import load_model
    from trtforge.recipe import load_recipe

    loaded = load_model(load_recipe(recipe_path).model)
    config = loaded.model.config
    model = getattr(transformers, loaded.task.auto_class).from_config(config, attn_implementation="sdpa")
    model.load_state_dict(loaded.model.state_dict())
    model = model.eval().to(device)
    if device != "cpu":
        model = model.half()
    return model, loaded.task


def _forward(model: Any, task: Any, feed: dict[str, Any]) -> Any:
    outputs = model(**feed, **task.forward_kwargs, return_dict=True)
    return outputs[task.outputs[0].name]


def shard(feed: dict[str, np.ndarray], rank: int, world: int, *, sort: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """This rank's rows of a request (interleaved, or a block of the length-sorted rows), cut to
    their longest real row where the attention mask pads on the right; and the rows it took."""
    from trtforge.runtime.batching import real_lengths

    rows = len(next(iter(feed.values())))
    lengths = real_lengths(feed)
    if sort and lengths is not None:
        taken = np.array_split(np.argsort(lengths, kind="stable"), world)[rank]
    else:
        taken = np.arange(rank, rows, world)
    part = {k: v[taken] for k, v in feed.items()}
    if lengths is not None and len(taken):
        cut = int(lengths[taken].max())
        part = {k: np.ascontiguousarray(v[:, :cut]) if v.ndim == 2 and v.shape[1] == feed["attention_mask"].shape[1]
                else v for k, v in part.items()}
    return part, taken


def ddp_rank(rank: int, world: int, port: int, recipe_path: str, batches: list[int], feeds: dict[int, dict],
             parity_feed: dict, iterations: int, warmup: int, on_gpu: bool, results: Any, sort: bool = False) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world)
    device = f"cuda:{rank}" if on_gpu else "cpu"
    if on_gpu:
        torch.cuda.set_device(rank)
    model, task = torch_model(recipe_path, device)
    model = DistributedDataParallel(model, device_ids=[rank] if on_gpu else None)

    def step(feed: dict[str, np.ndarray], part: dict[str, np.ndarray], taken: np.ndarray) -> Any:
        mine = {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in part.items()}
        with torch.inference_mode():
            out = _forward(model, task, mine).contiguous()
        width = next(iter(feed.values())).shape[1] if out.ndim == 3 else 0
        if out.ndim == 3 and out.shape[1] < width:  # per token: back to the request's length for the gather
            out = torch.nn.functional.pad(out, (0, 0, 0, width - out.shape[1]))
        gathered = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(gathered, out)
        if not sort:  # undo the interleaved sharding: row i came from rank i % world, position i // world
            return torch.stack(gathered, dim=1).reshape(-1, *out.shape[1:])
        order = torch.from_numpy(np.concatenate([shard(feed, r, world, sort=True)[1] for r in range(world)]))
        return torch.cat(gathered)[torch.argsort(order).to(out.device)]

    report: dict[str, Any] = {}
    for batch in batches:
        feed = feeds[batch]
        part, taken = shard(feed, rank, world, sort=sort)  # the collator's work, done before timing
        for _ in range(warmup):
            step(feed, part, taken)
        sync = torch.cuda.synchronize if on_gpu else (lambda: None)
        sync()
        dist.barrier()
        times = []
        begin = time.perf_counter()
        for _ in range(iterations):
            start = time.perf_counter()
            step(feed, part, taken)
            sync()
            times.append(1e3 * (time.perf_counter() - start))
        dist.barrier()
        elapsed = time.perf_counter() - begin
        report[batch] = {"throughput": round(batch * world * iterations / elapsed, 1), **percentiles(times)}
    parity = step(parity_feed, *shard(parity_feed, rank, world, sort=sort)).float().cpu().numpy()
    if rank == 0:
        results.put({"timings": report, "parity": parity})
    dist.barrier()
    dist.destroy_process_group()


def run_ddp(world: int, recipe_path: str, batches: list[int], feeds: dict[int, dict], parity_feed: dict, *,
            iterations: int, warmup: int, on_gpu: bool, sort: bool = False) -> dict[str, Any]:
    """Per-rank batch `b` means a global batch of b * world rows, as the runtime gets."""
    import torch.multiprocessing as tmp

    context = tmp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=ddp_rank, args=(rank, world, port, recipe_path, batches, feeds, parity_feed,
                                                         iterations, warmup, on_gpu, results, sort))
                 for rank in range(world)]
    for p in processes:
        p.start()
    try:
        result = results.get(timeout=1800)
    finally:
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return result


def time_local(fn: Callable[[], Any], iterations: int, warmup: int, on_gpu: bool) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        if on_gpu:
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def run_data_parallel(world: int, recipe_path: str, batches: list[int], feeds: dict[int, dict], *,
                      iterations: int, warmup: int) -> dict[int, dict[str, float]]:
    import torch

    model, task = torch_model(recipe_path, "cuda:0")
    parallel = torch.nn.DataParallel(model, device_ids=list(range(world)))
    report = {}
    for batch in batches:
        feed = {k: torch.from_numpy(v).to("cuda:0") for k, v in feeds[batch].items()}

        def step() -> Any:
            with torch.inference_mode():
                return _forward(parallel, task, feed)

        times = time_local(step, iterations, warmup, True)
        report[batch] = {"throughput": round(batch * world * 1e3 / statistics.fmean(times), 1), **percentiles(times)}
    return report


def run_compiled(recipe_path: str, batches: list[int], feeds: dict[int, dict], *, iterations: int, warmup: int,
                 mode: str = "reduce-overhead") -> dict[int, dict[str, Any]]:
    import torch

    model, task = torch_model(recipe_path, "cuda:0")
    compiled = torch.compile(model, mode=mode, dynamic=False)
    report: dict[int, dict[str, Any]] = {}
    for batch in batches:
        feed = {k: torch.from_numpy(v).to("cuda:0") for k, v in feeds[batch].items()}

        def step() -> Any:
            with torch.inference_mode():
                return _forward(compiled, task, feed)

        try:
            times = time_local(step, iterations, warmup, True)
        except Exception as e:  # reported as not run, with the reason
            report[batch] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        report[batch] = {"throughput": round(batch * 1e3 / statistics.fmean(times), 1), **percentiles(times)}
    return report

"""`trtforge run`: an artifact over a user's texts, on every GPU, to embeddings or labels.

The input is read in shards of `shard_rows` rows, in order. Each shard flows through three stages
that overlap, so that the engines never wait on the others:

    read (this thread) -> tokenize (processes: job/tokenizing.py)
        -> infer (Runtime.submit_tokens: every worker, chunks by token budget)
        -> write (a writer thread: a Parquet shard, then its line in _run.json; job/output.py)

Each stage holds a bounded number of shards (TOKENIZE_AHEAD per tokenizing process, INFER_AHEAD,
WRITE_AHEAD), so memory is bounded by shards in flight x shard size, whatever the input's size (the
bound is printed with -v and stated in docs/run.md). Shards are written in order; a rerun of the
same command keeps the shards _run.json lists (sha256-verified) and starts after them.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

from trtforge import __version__, interrupts
from trtforge.errors import TrtforgeError
from trtforge.job.inputs import InputError, Source
from trtforge.job.output import SCHEMA, RunDir, fingerprint
from trtforge.job import tables
from trtforge.job.tokenizing import TokenizerPool, plan
from trtforge.tokens import prompt_text

SHARD_ROWS_GPU, SHARD_ROWS_CPU = 16384, 1024
TOKENIZE_AHEAD = 2  # shards queued per tokenizing process
INFER_AHEAD = 2  # shards submitted to the runtime at once
WRITE_AHEAD = 2  # shards waiting for the writer



class Interrupted(TrtforgeError):
    exit_code = 130


@dataclass
class Options:
    column: str = "text"
    id_column: str | None = None
    devices: str | list[int] = "all"  # "all" (every GPU; CPU workers where there is none), "cpu", or GPU indices
    cpu_workers: int = 1
    format: str = "parquet"  # or "npy" (embeddings)
    on_bad_row: str = "fail"  # or "skip"
    shard_rows: int | None = None  # None: SHARD_ROWS_GPU on GPUs, SHARD_ROWS_CPU on CPU workers
    tokenizer_processes: int | None = None  # None: from the cores (job/tokenizing.plan)
    prompt: str | None = None  # one of the model's prompts (None: its default prompt, if any)
    pair_column: str | None = None  # cross-encoders: the second text of each pair
    ray: str | None = None  # a Ray cluster's address, or "local": run as a Ray Data pipeline (job/raydata.py)
    ray_cpus: int | None = None  # --ray local: the CPUs the local Ray instance may use (None: all)
    quiet: bool = False
    verbose: bool = False
    command: list[str] = field(default_factory=list)



def run_job(artifact: Path, input_path: Path, out: Path, options: Options, stream: TextIO | None = None) -> dict:
    """Run the job; its summary (also in OUT/_run.json). Raises TrtforgeError (one line, an exit code)."""
    from trtforge.manifest import read_manifest, verified_text_config
    from trtforge.ownership import refuse_inside_owned
    from trtforge.store import sha256_file

    started = time.perf_counter()
    meter = Meter(stream or sys.stderr, quiet=options.quiet)
    manifest = read_manifest(artifact)
    text = verified_text_config(artifact, manifest)
    task = manifest["model"]["task"]
    kind = tables.kind(artifact, text, task, options.pair_column)
    if options.format == "npy" and kind != "embeddings":
        raise InputError(f"--format npy writes embeddings, and {artifact} is a {task} model (labels); "
                         "use --format parquet")
    refuse_inside_owned(out, "--out")
    try:
        prefix = prompt_text(text, options.prompt)
    except ValueError as e:
        raise InputError(f"--prompt: {e}; name one of them, or leave --prompt out") from None
    source = Source.open(input_path, column=options.column, id_column=options.id_column,
                         pair_column=options.pair_column, max_chars=tables.CHARS_PER_TOKEN * text["max_length"])
    devices, gpus = _devices(options)
    shard_rows = options.shard_rows or (SHARD_ROWS_GPU if gpus else SHARD_ROWS_CPU)
    identity = {"artifact": {"path": str(artifact.resolve()), "manifest_sha256": sha256_file(artifact / "manifest.json"),
                             "model": manifest["model"].get("name"), "task": task},
                "input": {"files": source.identity(), "column": options.column, "id_column": options.id_column,
                          "pair_column": options.pair_column},
                "options": {"shard_rows": shard_rows, "on_bad_row": options.on_bad_row, "format": options.format,
                            "prompt": prefix}}
    header = {"schema": SCHEMA, "trtforge": __version__, "command": options.command, **identity,
              "fingerprint": fingerprint(identity)}
    width = tables.width(manifest, text, kind)
    made = not os.path.lexists(out)
    run = RunDir.open(out, header, meter.line)
    if run.record.get("complete"):
        meter.line(f"  {out} holds this run already, complete and verified: nothing to do")
        return run.record["summary"]
    done_shards, done_rows = len(run.record["shards"]), run.done_rows
    if done_shards:
        meter.line(f"  resuming: {done_shards} shard(s), {done_rows:,} rows, written before and verified")
    try:
        if options.ray:
            from trtforge.job.raydata import RayPipeline

            job: Any = RayPipeline(options.ray, artifact, text, options, meter)
        else:
            job = _Pipeline(artifact, devices, gpus, text, options, meter)
        startup_s = time.perf_counter() - started
        meter.start(done_rows, source, total=source.known_rows())  # rates from here: the streaming part
        try:
            job.run(source, shard_rows, done_shards, options.on_bad_row, prefix, run, kind, width, text)
        finally:
            job.close()
    except InputError:
        run.abandon(made)  # a bad row under --on-bad-row fail: this run's shards are of no use
        raise
    except BaseException as e:
        if not run.record["shards"]:  # nothing to resume from: leave nothing behind
            run.abandon(made)
        if not (isinstance(e, KeyboardInterrupt) or interrupts.received()):
            raise
        raise Interrupted(f"interrupted; {len(run.record['shards'])} shard(s) are written and recorded in {out}/_run.json: "
                          "run the same command again to resume") from None
    shards = run.record["shards"]
    rows = sum(s["rows"] for s in shards)
    if rows == 0:
        run.abandon(made)
        raise InputError(f"input {input_path} holds no rows; give a file with one text a line (or a record a row)")
    bad = [b for s in shards for b in s["bad_rows"]]
    seconds = time.perf_counter() - started
    streaming = max(time.perf_counter() - meter.began, 1e-9)
    new_rows = rows - done_rows
    summary = {"rows": rows, "written": sum(s["written"] for s in shards), "bad_rows": len(bad),
               "bad_row_numbers": [b["row"] for b in bad[:1000]], "tokens": sum(s["tokens"] for s in shards),
               "truncated_rows": sum(s.get("truncated", 0) for s in shards),
               "seconds": round(seconds, 3), "startup_s": round(startup_s, 3), "streaming_s": round(streaming, 3),
               "rows_this_run": new_rows, "rows_per_s": round(new_rows / streaming, 1),
               "tokens_per_s": round(meter.tokens / streaming, 1),
               "devices": devices, "resumed_shards": done_shards,
               "tokenizers": {"processes": job.tokenizers.processes, "threads": job.tokenizers.threads},
               "stages_s": {k: round(v, 3) for k, v in getattr(job, "stages_s", {}).items()}}
    published = run.finish(summary, options.format == "npy")
    meter.finish(summary, out, published, bad)
    if options.verbose and summary["stages_s"]:
        meter.line("  time: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in summary["stages_s"].items()) +
                   " (this thread's reading and waits on each stage; the writer thread's busy time)")
    return summary


def _devices(options: Options) -> tuple[Any, bool]:
    if options.ray:  # the cluster's devices, which its actors see (GPUs unless --devices cpu)
        return f"ray:{options.ray}", options.devices != "cpu"
    if options.devices == "cpu":
        return options.cpu_workers, False
    if options.devices == "all":
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return options.cpu_workers, False
        return "all", True
    return list(options.devices), True


def _shards(source: Source, shard_rows: int, start: int, policy: str, prefix: str = "") -> Iterator[tables.Shard]:
    """The input in shards of `shard_rows` rows, from shard `start` on, each text after `prefix`
    (the model's prompt); bad rows raise (fail) or are recorded in their shard (skip)."""
    number = start * shard_rows
    index = start
    shard = tables.Shard(index, 0, [], [], [] if source.id_column else None, [])
    for row in source.rows(skip=number):
        text, problem = source.text_of(row)
        if problem is not None:
            if policy == "fail":
                raise InputError(f"{source.where(row)}: {problem}; fix the row, or pass --on-bad-row skip to "
                                 "leave such rows out (they are counted and listed)")
            shard.bad.append({"row": number, "where": source.where(row), "problem": problem})
        else:
            shard.numbers.append(number)
            if prefix:
                text = (prefix + text[0], text[1]) if isinstance(text, tuple) else prefix + text
            shard.texts.append(text)
            if shard.ids is not None:
                shard.ids.append(row.id)
        shard.rows += 1
        number += 1
        if shard.rows == shard_rows:
            yield shard
            index += 1
            shard = tables.Shard(index, 0, [], [], [] if source.id_column else None, [])
    if shard.rows:
        yield shard


class _Pipeline:
    """The runtime, the tokenizing processes and the writer, with bounded queues between them."""

    def __init__(self, artifact: Path, devices: Any, gpus: bool, text: dict, options: Options, meter: Meter) -> None:
        from trtforge.runtime import Runtime

        self.meter = meter
        self.runtime = Runtime(artifact, devices=devices)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        processes, threads = plan(cores, len(self.runtime.devices), gpus)
        if options.tokenizer_processes:
            processes = options.tokenizer_processes
        self.tokenizers = TokenizerPool(artifact / text["tokenizer"], text["max_length"], processes=processes,
                                        threads=threads)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="trtforge-writer")
        # Where the streaming time went: seconds this thread spent reading and waiting on each stage
        # (a stage it waits on is the one holding the run back), and the writer thread's busy time.
        self.stages_s = dict.fromkeys(("read", "wait_tokenize", "wait_infer", "wait_write", "writer_busy"), 0.0)
        if options.verbose:
            meter.line(f"  {len(self.runtime.devices)} engine worker(s) on {', '.join(self.runtime.devices)}; "
                       f"{processes} tokenizing process(es) x {threads} thread(s)")

    def run(self, source: Source, shard_rows: int, start: int, policy: str, prefix: str, out: RunDir, kind: str,
            width: int, text: dict) -> None:
        """The input from shard `start` on, through the stages, into `out`."""
        shards = _shards(source, shard_rows, start, policy, prefix)
        tokenizing: collections.deque[tuple[tables.Shard, Future | None]] = collections.deque()
        inferring: collections.deque[tuple[tables.Shard, int, Future | None]] = collections.deque()
        writing: collections.deque[Future] = collections.deque()
        ahead = TOKENIZE_AHEAD * self.tokenizers.processes

        def infer(shard: tables.Shard, tokens: Future | None) -> None:
            began = time.perf_counter()
            ids = tokens.result() if tokens is not None else None
            self.stages_s["wait_tokenize"] += time.perf_counter() - began
            if ids is not None:
                shard.truncated = ids.truncated
            count = int(ids.lengths.sum()) if ids is not None else 0
            inferring.append((shard, count, self.runtime.submit_tokens(ids) if ids is not None else None))

        def write(shard: tables.Shard, count: int, result: Future | None) -> None:
            began = time.perf_counter()
            outputs = result.result() if result is not None else None  # the runtime bounds every wait
            self.stages_s["wait_infer"] += time.perf_counter() - began
            writing.append(self.writer.submit(self._write, out, shard, outputs, count, kind, width, text))

        def settle(limit_t: int, limit_i: int, limit_w: int) -> None:
            while len(tokenizing) > limit_t or (tokenizing and _ready(tokenizing[0][1])):
                infer(*tokenizing.popleft())
            while len(inferring) > limit_i or (inferring and _ready(inferring[0][2])):
                write(*inferring.popleft())
            began = time.perf_counter()
            while len(writing) > limit_w or (writing and writing[0].done()):
                writing.popleft().result()
            self.stages_s["wait_write"] += time.perf_counter() - began

        while True:
            began = time.perf_counter()
            shard = next(shards, None)
            self.stages_s["read"] += time.perf_counter() - began
            if shard is None:
                break
            tokenizing.append((shard, self.tokenizers.submit(shard.texts) if shard.texts else None))
            settle(ahead, INFER_AHEAD, WRITE_AHEAD)
        settle(0, 0, 0)

    def _write(self, out: RunDir, shard: tables.Shard, outputs: dict | None, tokens: int, kind: str, width: int,
               text: dict) -> None:
        began = time.perf_counter()
        truncated = int(shard.truncated.sum()) if shard.truncated is not None else 0
        out.write_shard(shard.index, tables.table(shard, outputs, kind, width, text), rows=shard.rows, bad=shard.bad,
                        tokens=tokens, truncated=truncated)
        self.stages_s["writer_busy"] += time.perf_counter() - began
        self.meter.add(shard.rows, tokens)

    def close(self) -> None:
        self.tokenizers.close(now=True)
        self.writer.shutdown(wait=True)  # a shard being written is finished (and recorded) or not begun
        self.runtime.close()


def _ready(future: Future | None) -> bool:
    return future is None or future.done()


class Meter:
    """Progress on stderr: a line redrawn in place on a terminal (at most 4 times a second), plain
    lines every PLAIN_EVERY_S seconds otherwise; nothing with quiet."""

    PLAIN_EVERY_S = 10.0

    def __init__(self, stream: TextIO, *, quiet: bool) -> None:
        self.stream, self.quiet = stream, quiet
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.lock = threading.Lock()
        self.rows = self.tokens = 0
        self.drawn = 0.0

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def start(self, rows: int, source: Source, total: int | None) -> None:
        self.base, self.rows, self.source, self.total = rows, rows, source, total
        self.began = time.perf_counter()
        self.drawn = self.began - self.PLAIN_EVERY_S  # the first shard is reported at once

    def add(self, rows: int, tokens: int) -> None:
        with self.lock:
            self.rows += rows
            self.tokens += tokens
            now = time.perf_counter()
            if self.quiet or now - self.drawn < (0.25 if self.tty else self.PLAIN_EVERY_S):
                return
            self.drawn = now
            text = self._status(now)
        if self.tty:
            print(f"\r\033[K{text}", end="", file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)

    def _status(self, now: float) -> str:
        elapsed = max(now - self.began, 1e-9)
        rate = (self.rows - self.base) / elapsed
        total = self.total or self.source.estimated_rows()  # Parquet says; line formats, from bytes per row
        done = f"{self.rows:,}/{self.total:,} rows" if self.total else f"{self.rows:,} rows"
        fraction = self.rows / total if total else 0.0
        eta = f", ETA {_clock(elapsed * (1 - fraction) / fraction)}" if 0 < fraction < 1 else ""
        return (f"  run  {done} ({100 * min(fraction, 1):.0f}%), {_count(rate)} rows/s, "
                f"{_count(self.tokens / elapsed)} tokens/s{eta}")

    def finish(self, summary: dict, out: Path, published: list[str], bad: list[dict]) -> None:
        if self.quiet:
            return
        if self.tty:
            print(file=self.stream)
        resumed = f" ({summary['resumed_shards']} shard(s) kept from before)" if summary["resumed_shards"] else ""
        self.line(f"  done {summary['rows']:,} rows, {summary['written']:,} written, {summary['bad_rows']:,} bad, in "
                  f"{summary['seconds']:.1f} s ({summary['startup_s']:.1f} s start-up){resumed}: "
                  f"{_count(summary['rows_per_s'])} rows/s, {_count(summary['tokens_per_s'])} real tokens/s")
        if summary["truncated_rows"]:
            self.line(f"  {summary['truncated_rows']:,} row(s) were longer than the model's maximum and were cut there, "
                      "as sentence-transformers cuts them (column truncated)")
        if bad:
            shown = ", ".join(f"{b['row']} ({b['problem']})" for b in bad[:10])
            self.line(f"  bad rows left out: {shown}{' ...' if len(bad) > 10 else ''} (all in {out}/_run.json)")
        files = published[0] if len(published) == 1 else f"{published[0]} .. {published[-1]}"
        self.line(f"  output: {out}/ ({len(published)} file(s): {files}), record {out}/_run.json")


def _count(value: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"

"""Tokenization beside the engines: processes of their own, each running the artifact's
tokenizer.json (the tokenizers library, Rust, its own threads), so that neither the Rust work nor
the conversion of its output to arrays (Python, under a GIL) competes with the process that feeds
the GPUs. Each shard's texts go to one process and come back as ragged ids (runtime/tokenize.Tokens).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

THREADS_PER_PROCESS = 4

_tokenizer: Any = None  # each tokenizing process's FastTokenizer, made once by _start


def plan(cores: int, engine_processes: int, gpus: bool) -> tuple[int, int]:
    """(processes, threads each) for tokenization on a host of `cores`: with GPUs, the cores
    left after the engine workers and this process; without, one process of one thread (the CPU
    engines need the cores more)."""
    if not gpus:
        return 1, 1
    spare = max(1, cores - engine_processes - 1)
    threads = min(THREADS_PER_PROCESS, spare)
    return max(1, spare // threads), threads


class TokenizerPool:
    """`processes` processes, each with a FastTokenizer of `threads` threads over the artifact's
    tokenizer (truncating at `max_length`)."""

    def __init__(self, tokenizer_dir: Path, max_length: int, *, processes: int, threads: int) -> None:
        self.processes, self.threads = processes, threads
        self._pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start, initargs=(str(tokenizer_dir), max_length, threads))

    def submit(self, texts: list[str]) -> Future:
        """The texts' Tokens, as a future."""
        return self._pool.submit(_encode, texts)

    def close(self, *, now: bool = False) -> None:
        self._pool.shutdown(wait=not now, cancel_futures=now)


def _start(tokenizer_dir: str, max_length: int, threads: int) -> None:
    global _tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the run's to handle: it stops this pool
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    from trtforge.runtime.tokenize import FastTokenizer

    _tokenizer = FastTokenizer(Path(tokenizer_dir), max_length, threads=threads)


def _encode(texts: list[str]) -> Any:
    return _tokenizer.encode(texts)

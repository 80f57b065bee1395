"""Progress lines on stderr: what each stage is doing and how long it took."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO


class Progress:
    def __init__(self, *, quiet: bool = False, verbose: bool = False, stream: TextIO | None = None) -> None:
        self.quiet, self.verbose = quiet, verbose
        self.stream = stream or sys.stderr

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def error(self, text: str) -> None:
        """What went wrong, said even under --quiet ("print nothing but errors")."""
        print(text, file=self.stream, flush=True)

    def detail(self, text: str) -> None:
        if self.verbose and not self.quiet:
            print(f"      {text}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, doing: str) -> Iterator[dict[str, str]]:
        """Announce a stage, time it, and print its outcome (the block may set `outcome["summary"]`)."""
        self.line(f"  {name:<10} {doing} ...")
        start = time.perf_counter()
        outcome = {"summary": "done"}
        yield outcome
        self.line(f"  {name:<10} {outcome['summary']} ({time.perf_counter() - start:.1f} s)")

    def cached(self, name: str, summary: str) -> None:
        self.line(f"  {name:<10} {summary} (cached, nothing to do)")

"""Ctrl-C stops trtforge as an interruption even where a library swallowed it.

Some libraries catch everything, KeyboardInterrupt included (Polygraphy's lazy imports use bare
``except:``), and answer with an error of their own. A build interrupted there would otherwise end as
a failed stage (exit 1) instead of an interruption (exit 130). The handler installed by ``watching``
raises KeyboardInterrupt as Python's does and also records that the signal came, so the places that
turn errors into exit codes can ask ``received()``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_received = False


def _on_sigint(signum: int, frame: object) -> None:
    global _received
    _received = True
    raise KeyboardInterrupt


def received() -> bool:
    """Whether Ctrl-C (SIGINT) came while ``watching`` was active."""
    return _received


@contextlib.contextmanager
def watching() -> Iterator[None]:
    """Record SIGINT for the duration (main thread only; elsewhere signals cannot be handled)."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = False
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

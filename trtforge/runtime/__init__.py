"""Serve an artifact on several devices: one engine and one worker process per device."""

from trtforge.runtime.pool import RequestTimeout, Runtime, WorkerDied, WorkerError

__all__ = ["Runtime", "WorkerError", "WorkerDied", "RequestTimeout"]

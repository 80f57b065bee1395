"""Serve an artifact on several devices: one engine and one worker process per device."""

from trtforge.runtime.pool import RequestTimeout, Runtime, WorkerDied, WorkerError, chunk_shapes, default_batching

__all__ = ["Runtime", "WorkerError", "WorkerDied", "RequestTimeout", "chunk_shapes", "default_batching"]

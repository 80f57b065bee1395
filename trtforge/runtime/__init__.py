"""Serve an artifact on several devices: one engine and one worker process per device.

    pool.py        Runtime: the public API, dispatch of chunks to workers, answers, failures
    shaping.py     requests checked at the call and cut into chunks (RequestShaper)
    results.py     where results go and how the caller gets them (Results, the results heap)
    processes.py   the worker processes: started, waited for, stopped
    worker.py      what runs inside one
    shm.py         shared memory: slots, heaps, layouts
    requests.py    the checks at the call, and the records that follow a request
    batching.py    real lengths, buckets, arrays from what callers send
"""

from trtforge.runtime.pool import RequestTimeout, Runtime, WorkerDied, WorkerError
from trtforge.runtime.shaping import chunk_shapes, default_batching

__all__ = ["Runtime", "WorkerError", "WorkerDied", "RequestTimeout", "chunk_shapes", "default_batching"]

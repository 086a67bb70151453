"""CPU-heavy work on big documents, away from the event loop.

CPython's JSON encoder and decoder hold the GIL for the whole call: decoding or rendering a 20 MB
packument in a thread still stalls every other request for a second. Large inputs therefore go to
a worker process; small ones run inline, where a process hop would cost more than the work.

Functions sent to the worker must be importable module-level functions (they are pickled by
name), take and return plain data (bytes, str, small dicts), and have no side effects.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from batlehub import memory

log = logging.getLogger(__name__)

T = TypeVar("T")

INLINE_MAX_BYTES = 256 * 1024
"""Inputs up to this size are handled on the event loop (well under a millisecond of work)."""
WORKERS = 1
"""Worker processes per hub process: single-flight means one render per document at a time."""
TASKS_PER_WORKER = 64
"""A worker is replaced after this many tasks, so the memory a huge document took is returned."""
WORKER_NICENESS = 5
"""Workers yield the CPU to the serving process: a big render may wait, requests should not."""


class Offloader:
    """Runs `fn(*args)` inline for small inputs, in a worker process for large ones."""

    def __init__(self, *, workers: int = WORKERS, inline_max_bytes: int = INLINE_MAX_BYTES) -> None:
        self.workers = workers
        self.inline_max_bytes = inline_max_bytes
        self._pool: ProcessPoolExecutor | None = None

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`; `size` is the input's size in bytes, which decides where it runs."""
        if size <= self.inline_max_bytes:
            return fn(*args)
        loop = asyncio.get_running_loop()
        memory.note_big_work(size)  # its input and output pass through this process's helper threads
        for attempt in (1, 2):
            try:
                return await loop.run_in_executor(self._executor(), fn, *args)
            except BrokenProcessPool:
                # The worker died (killed, or out of memory): a new pool, once, then give up.
                self._pool = None
                if attempt == 2:
                    raise
                log.warning("the document worker process died; starting a new one")
        raise AssertionError("unreachable")

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                max_tasks_per_child=TASKS_PER_WORKER,
                initializer=_lower_priority,
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _lower_priority() -> None:
    try:
        os.nice(WORKER_NICENESS)
    except OSError:  # not permitted here: run at the hub's priority
        pass

"""A whole-model switch's compiled packing, queued while the switch's Python goes on and run on its threads (issue 12).

Inside :func:`batch` the fused kernels (:mod:`.cpu_fused`) do not run where they are called: the layer's buffers are
allocated, the kernel call is queued, and ``threads - 1`` worker threads run the queue while the calling thread goes
on with the next layer's Python; at the end the calling thread helps with what is left and waits. The kernels are
numba ``nogil`` code, so a worker needs the GIL only to pick up a call (spreading whole layers over threads instead
measured slower than one thread: each layer's ~25 torch calls hand the GIL over). With one thread there are no
workers and the calling thread runs the whole queue at the end: all the switch's Python, then all its kernels, was
10-30% faster for the int4 packs than alternating the two per layer (BENCHMARKS.md, stop 34).
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

_local = threading.local()
_lock = threading.Lock()
_pool: list = []  # [ThreadPoolExecutor, pid], made on the first batch with more than one thread


class Batch:
    """The kernel calls of one switch. ``errors``: what the calls raised (their outputs are not to be used)."""

    def __init__(self, threads: int):
        self.threads = threads
        self.errors: list[BaseException] = []
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list = []

    def submit(self, fn, args: tuple, fallback=None) -> None:
        """Queue ``fn(*args)``; ``fallback()`` runs instead of failing when ``fn`` returns ``False``."""
        if not self._workers and self.threads > 1:
            with _lock:
                # a forked child inherits the pool but not its threads: it would queue work that nobody runs
                if not _pool or _pool[0]._max_workers < self.threads - 1 or _pool[1] != os.getpid():
                    if _pool and _pool[1] == os.getpid():
                        _pool[0].shutdown(wait=False)  # its threads end once a batch still using them is done
                    _pool[:] = [ThreadPoolExecutor(self.threads - 1, thread_name_prefix="abs_llm_switch"), os.getpid()]
                pool = _pool[0]
            self._workers = [pool.submit(self._drain, True) for _ in range(self.threads - 1)]
        self._jobs.put((fn, args, fallback))

    def _drain(self, block: bool) -> None:
        while True:
            try:
                job = self._jobs.get() if block else self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:
                return
            fn, args, fallback = job
            try:
                if fn(*args) is False:
                    if fallback is None:
                        raise RuntimeError(f"{getattr(fn, '__name__', fn)} refused its input")
                    fallback()
            except Exception as e:  # kept for the caller: the batch's outputs are then not used
                self.errors.append(e)

    def finish(self) -> None:
        self._drain(False)  # the calling thread takes what is left, then waits for the workers' last calls
        for _ in self._workers:
            self._jobs.put(None)
        for w in self._workers:
            w.result()


def current() -> Batch | None:
    """The batch open on this thread, if any."""
    return getattr(_local, "batch", None)


@contextmanager
def batch(threads: int):
    """Queue the fused kernel calls made inside and run them on ``max(threads, 1)`` threads; yields the batch, or
    ``None`` inside another batch (calls then join that one). Waits for every call before leaving, also on an
    exception."""
    if current() is not None:
        yield None
        return
    b = _local.batch = Batch(max(int(threads), 1))
    try:
        yield b
    finally:
        _local.batch = None
        b.finish()

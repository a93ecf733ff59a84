"""Worker processes for parallel export (``--jobs N``), startable before torch is imported.

This module imports neither torch nor the engine: the CLI starts the workers
(:func:`start_workers`) before it imports them itself, so the seconds each process spends
importing torch and coremltools and discovering plugins run side by side instead of one
after the other. Each worker then imports the engine in :func:`init_worker`.

A worker that has sent its last result has nothing left to do but tear down its
interpreter (freeing torch's and coremltools' modules: over a second, while the parent
waits for it in ``shutdown``), so a worker skips that (:mod:`sora_export.core.quick_exit`).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from typing import Any

import attrs

from sora_export.core import quick_exit, runtime


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def init_worker(extra_modules: tuple[str, ...]) -> None:
    """A worker's start-up: the quick exit armed before anything registers its own exit
    handlers, then the engine's set-up (plugins discovered, one torch thread)."""
    quick_exit.arm(0)
    from sora_export.core import engine

    engine.worker_setup(extra_modules)


def _ready() -> int:
    return os.getpid()


def new_executor(workers: int, extra_modules: Sequence[str] = ()) -> Any:
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes (torch and fork do not
    mix), each started by :func:`init_worker`. Processes start on the first submits, with
    the allocator settings of :func:`sora_export.core.runtime.tune_environment`."""
    from concurrent.futures import ProcessPoolExecutor

    runtime.tune_environment()

    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(tuple(extra_modules),),
    )


@attrs.define
class WorkerPool:
    """Worker processes started before the plan is made (:func:`start_workers`), so that
    their start-up (importing torch and coremltools, discovering plugins: seconds) runs
    while the parent plans. The engine's ``run`` takes them when the plan wants as many."""

    executor: Any
    workers: int
    extra_modules: tuple[str, ...]

    def close(self) -> None:
        """Stop the workers (a no-op once ``run`` has used and closed them). Not waited
        for here: an error found while planning is reported at once; the interpreter's
        exit joins them."""
        self.executor.shutdown(wait=False, cancel_futures=True)


def start_workers(workers: int, extra_modules: Sequence[str] = ()) -> WorkerPool:
    """Start ``workers`` worker processes now."""
    extra = tuple(extra_modules)
    executor = new_executor(workers, extra)
    for _ in range(workers):  # each submit starts one more process while none is idle
        executor.submit(_ready)
    return WorkerPool(executor, workers, extra)

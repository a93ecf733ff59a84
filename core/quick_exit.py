"""End a process without tearing down its interpreter.

Freeing torch's and coremltools' modules object by object takes a second or more when a
process exits (measured: 1.0 s for a process that imported them, 0.07 s without the
teardown). Nobody waits for that usefully: the ``sora-export`` command has written and
printed everything, a worker process has sent its last result -- and the parent waits for
its workers in ``shutdown``.

:func:`arm` registers an ``atexit`` handler that ends the process with ``os._exit``. It is
meant to be called first thing (before torch or coremltools are imported), so that, ``atexit``
running handlers last-registered first, every handler registered later -- coremltools
removing its temporary packages, multiprocessing and concurrent.futures joining their
threads, ``tempfile`` finalizers -- still runs before it. Only the module teardown is
skipped.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys

_state = {"code": 1, "armed": False}


def arm(code: int = 1) -> None:
    """Register the handler (once per process); the process will exit with ``code``
    unless :func:`set_code` says otherwise (so an uncaught exception still exits 1)."""
    _state["code"] = code
    if not _state["armed"]:
        _state["armed"] = True
        atexit.register(_exit_now)


def set_code(code: int) -> None:
    """The exit status the handler will use."""
    _state["code"] = code


def _exit_now() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(int(_state["code"]))

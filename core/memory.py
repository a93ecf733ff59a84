"""Resident-memory measurement (Linux /proc; falls back to getrusage elsewhere)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import sys
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS.

    A worker that converted a big part keeps the freed memory in glibc's arenas; without
    ``malloc_trim`` its resident size stays at that peak while it goes on to other tasks,
    and the workers' peaks add up. Elsewhere only the garbage collection happens.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or the last reset, in bytes."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _rss_and_ppid(pid: str) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # fields after the command: state ppid ... rss is field 24 overall (index 21 here)
    return int(fields[21]) * _PAGE, int(fields[1])


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def tree_rss_bytes(root: int | None = None) -> int:
    """Current resident memory of a process and all its descendants (Linux /proc)."""
    root = os.getpid() if root is None else root
    table: dict[int, tuple[int, int]] = {}
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return peak_rss_bytes()
    for pid in pids:
        info = _rss_and_ppid(pid)
        if info is not None:
            table[int(pid)] = info
    children: dict[int, list[int]] = {}
    for pid, (_, ppid) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += table.get(pid, (0, 0))[0]
        stack.extend(children.get(pid, ()))
    return total


class TreePeakSampler:
    """Samples the whole process tree's RSS in a background thread; ``peak`` is the max.

    Worker processes' peaks add up only when they coincide; sampling the tree measures
    exactly that (to the sampling interval), unlike summing per-process peaks.
    """

    def __init__(self, interval: float = 0.2, root: int | None = None) -> None:
        self.interval = interval
        self.root = root  # None: this process
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.root))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreePeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_bytes(self.root))

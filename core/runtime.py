"""Process settings for exports, which allocate and free gigabytes of weights.

An export builds modules, captures and lowers them, binds and copies weights: it keeps
asking the kernel for fresh memory, and every 4 KiB page it touches first costs a fault
and a zeroing. A cold STDiT3-XL/2 fp16 export on the 2-core VM took 1.4 million minor
page faults (``--jobs 1``; 2.1 million with two workers) and 20-28 s of kernel time
(``/usr/bin/time -f "%S s %R faults" sora-export ...``); with the settings below, 0.29
million and 12 s at ``--jobs 1``. ``perf`` put another ~6% of the run's CPU in Python's
cyclic garbage collector, walking the objects of the imported modules (torch,
coremltools) again and again.

- ``THP_MEM_ALLOC_ENABLE=1``: torch's CPU allocator aligns blocks of 2 MiB and more to
  2 MiB and asks for transparent huge pages for them (``madvise``), one fault per 2 MiB;
- ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: glibc's ``malloc`` (numpy, protobuf,
  coremltools) does the same for the memory it maps.

Both are environment variables their allocators read themselves: torch at its first
allocation, so :func:`tune_environment` must run before torch allocates anything;
glibc when a process starts, so in the ``sora-export`` process itself only torch's
applies, and worker processes (started after it) get both. A value the user set is kept.
"""

from __future__ import annotations

import gc
import os

TORCH_THP = "THP_MEM_ALLOC_ENABLE"
GLIBC_TUNABLES = "GLIBC_TUNABLES"
GLIBC_HUGETLB = "glibc.malloc.hugetlb"


def tune_environment(environ: dict[str, str] | None = None) -> None:
    """Ask torch's and glibc's allocators for transparent huge pages (see the module
    docstring), leaving any setting of these already in ``environ`` (``os.environ``)."""
    env = os.environ if environ is None else environ
    env.setdefault(TORCH_THP, "1")
    tunables = env.get(GLIBC_TUNABLES, "")
    if GLIBC_HUGETLB not in tunables:
        env[GLIBC_TUNABLES] = ":".join(t for t in (tunables, f"{GLIBC_HUGETLB}=1") if t)


def settle_imports() -> None:
    """Move every object alive now (the imported modules') out of the garbage collector's
    reach: later collections walk only what the export itself allocates. Call once the
    heavy imports are done; objects created later are collected as usual."""
    gc.collect()
    gc.freeze()

"""A worker hands the memory of finished batches back to the system when it idles (glibc ``malloc_trim``).

torch allocates a CPU batch's activations with malloc. glibc keeps what is freed: above the
mmap threshold it raises the threshold to the size of the freed block (so the next batch's
activations come from the arena, not a fresh mmap), and it shrinks an arena only from its top.
After the largest batch a worker has run, it keeps that batch's working set for good: about
130 MiB per worker for DenseNet-121 at batch 8 (docs/ARCHITECTURE.md, "Memory").

``malloc_trim(0)`` gives every free page of every arena back (``MADV_DONTNEED``) in a few
milliseconds. It runs on the event loop when the worker has had nothing outstanding at two checks
0.5 s apart and its resident size has grown by ``worker_malloc_trim`` (64 MiB) since the last trim,
and once after the warm-up. Under load nothing changes (the pages are reused batch after batch);
the price is paid once per idle period: the next batch faults its pages in again. A fixed mmap
threshold (``mallopt``) was measured instead and rejected: every large tensor then is a fresh mmap
and DenseNet-121's batch of 8 took twice as long.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

CHECK_EVERY = 0.5  # seconds between two looks at the worker's load


def resident() -> int:
    """This process's resident size in bytes (/proc/self/statm: one read)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc; musl and other libcs have none
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


class MallocTrim:
    """``check(idle)`` every ``CHECK_EVERY`` seconds; it trims when the rule above says so."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold  # bytes; 0: never
        self.fn = _malloc_trim() if threshold > 0 else None
        self.baseline = resident()
        self.was_idle = False
        self.trims = 0

    @property
    def enabled(self) -> bool:
        return self.fn is not None

    def trim(self) -> tuple[int, int, float]:
        """Trim now: (resident before, resident after, seconds it took)."""
        assert self.fn is not None
        before, started = resident(), time.perf_counter()
        self.fn(0)
        took = time.perf_counter() - started
        self.baseline = after = resident()
        self.trims += 1
        return before, after, took

    def check(self, idle: bool) -> tuple[int, int, float] | None:
        """One look: trim if idle now and at the last look, and grown by ``threshold`` since the last trim."""
        due = idle and self.was_idle and self.enabled and resident() - self.baseline >= self.threshold
        self.was_idle = idle
        return self.trim() if due else None

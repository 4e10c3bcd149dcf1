"""Each worker's outstanding requests per model, in a small shared file that peers read directly.

A worker deciding whether to hand a request to a less loaded peer needs that peer's queue depth
now, not as of the last heartbeat; a memory-mapped array of counters costs one memory read and
no message. The writer is the worker's event loop (one writer per file); readers tolerate a
torn read, since the value only steers balancing.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np


class LoadBoard:
    """This worker's counters: ``run/worker-PID.load``, one int64 per model, in ``models`` order."""

    def __init__(self, path: Path, models: list[str]) -> None:
        self.path = Path(path)
        self.index = {name: i for i, name in enumerate(models)}
        size = 8 * max(1, len(models))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.values: np.ndarray | None = np.ndarray((max(1, len(models)),), dtype=np.int64, buffer=self.map)

    def set(self, model: str, value: int) -> None:
        if self.values is not None:  # requests still finishing after close() (a terminated worker) count nothing
            self.values[self.index[model]] = value

    def close(self) -> None:
        self.values = None  # the ndarray must go before the mmap it views can close
        self.map.close()
        try:
            self.path.unlink()
        except OSError:
            pass


class PeerLoad:
    """A read-only view of a peer's board; a board that is gone reads as "very busy"."""

    UNKNOWN = 1 << 30

    def __init__(self, path: str, models: list[str]) -> None:
        self.index = {name: i for i, name in enumerate(models)}
        self.values: np.ndarray | None = None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            size = os.fstat(fd).st_size
            if size >= 8 * len(models) > 0:
                self.map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
                self.values = np.ndarray((size // 8,), dtype=np.int64, buffer=self.map)
        finally:
            os.close(fd)

    def get(self, model: str) -> int:
        if self.values is None or model not in self.index:
            return self.UNKNOWN
        return int(self.values[self.index[model]])

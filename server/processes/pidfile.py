"""The pid file: how ``-s`` and operators find the master, and how a binary upgrade hands over.

Written atomically (write a temporary file, rename), removed only by the master it names, so a
new master that already replaced it (USR2) keeps its own.
"""

from __future__ import annotations

import os
from pathlib import Path


def read_pid(path: Path) -> int | None:
    """The pid in ``path``, or None if there is no readable pid."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def write_pid(path: Path, pid: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(f"{os.getpid() if pid is None else pid}\n")
    os.replace(tmp, path)


def remove_own(*paths: Path) -> None:
    """Remove each of ``paths`` that names this process (and no other)."""
    me = os.getpid()
    for path in paths:
        if read_pid(path) == me:
            try:
                path.unlink()
            except OSError:
                pass


def oldbin(path: Path) -> Path:
    """Where a master that started a new binary keeps its pid (nginx: ``nginx.pid.oldbin``)."""
    return Path(str(path) + ".oldbin")

"""Pin a peer's worker process to one core when the peer gives its workers no index (uvicorn, TorchServe).

Each worker takes the first core whose lock file in ``lock_dir`` it can ``flock``, and keeps the
lock (and so the core) for its life: 2 workers on 2 cores get one core each, whatever order they
start in, and a restarted worker takes the core its dead predecessor freed. Stdlib only: imported
by the peers in .venv-bench.
"""

from __future__ import annotations

import fcntl
import os

_held: list[int] = []  # lock descriptors kept open for the life of the process


def pin_to_free_core(lock_dir: str) -> int | None:
    """Pin this process to a core no other live worker of the same ``lock_dir`` holds; return it (None: all taken)."""
    cores = sorted(os.sched_getaffinity(0))
    os.makedirs(lock_dir, exist_ok=True)
    for core in cores:
        fd = os.open(os.path.join(lock_dir, f"core-{core}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _held.append(fd)
        os.sched_setaffinity(0, [core])
        return core
    return None

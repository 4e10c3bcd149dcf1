"""``daemon on;``: detach from the terminal as nginx does (fork, setsid, fork, stdio to /dev/null)."""

from __future__ import annotations

import os


def daemonize() -> None:
    """Return in the grandchild, detached; the original process and the first child exit."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    fd = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    os.close(fd)

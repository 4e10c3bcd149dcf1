"""systemd readiness: the sd_notify protocol, spoken by the master itself (no libsystemd).

The protocol is one datagram of ``KEY=VALUE`` lines to the unix socket named by
``NOTIFY_SOCKET`` (``@name`` is a socket in the abstract namespace). Without that variable
(not under systemd, ``Type=simple``) nothing is sent. A failure to send is logged once and
never takes the master down.

What the master says, and when (``ServiceNotifier.update`` runs at the top of each turn of the
master cycle; ``reloading`` where a HUP is acted on):

- ``READY=1`` + ``MAINPID=`` once the first generation is up: every worker of it has reported
  ready or is gone for good (could not load its models), at least one is ready, and none is due
  for a respawn. ``systemctl start`` returns then (``Type=notify``).
- ``RELOADING=1`` + ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC in µs, which ``Type=notify-reload``
  requires to tie the message to its signal) when a HUP is acted on, then ``READY=1`` when the
  reload is over: the new generation serves, or the reload was refused (bad config) or aborted
  (new workers could not load) and the old one serves on; ``STATUS=`` says which.
- ``STOPPING=1`` on QUIT or TERM.
- Binary upgrade (USR2). The new master is a child of the old one, in the same cgroup; once its
  first generation is ready it sends ``MAINPID=<its pid>`` with ``READY=1`` (so the unit needs
  ``NotifyAccess=all``: the message does not come from the main pid yet). From the moment it
  starts a new binary the old master says nothing about the service: it is about to stop being
  the main process, and its ``STOPPING=1`` at the final QUIT would make systemd stop the whole
  service (the new master included). If the new binary exits (rolled back, or died), the old
  master is the service again and says ``MAINPID=<its pid>`` + ``READY=1``.
  A new master that stops while its parent is still a live master (a rollback: QUIT to the new
  master) hands the service back with ``MAINPID=<parent>`` instead of ``STOPPING=1``: systemd
  must not see its main process exit without a successor, or it would stop the unit and kill the
  old master with it.

The notifier reads the master's table (``workers``, ``generation``, ``pending_generation``,
``reconfigure``, ``quit``, ``terminate``, ``new_binary_pid``) and never changes it.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from server.logs import log

ENV = "NOTIFY_SOCKET"


def address(value: str | None) -> str | None:
    """The socket address ``NOTIFY_SOCKET`` names: a path, or ``\\0name`` for ``@name``; None if unusable."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock:... and other transports of newer systemd: not spoken here


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def notify(fields: dict[str, Any], env: str | None = None) -> bool:
    """Send one message; True if a datagram went out. ``env`` defaults to ``$NOTIFY_SOCKET``."""
    addr = address(os.environ.get(ENV) if env is None else env)
    if addr is None:
        return False
    message = "".join(f"{key}={value}\n" for key, value in fields.items()).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message, addr)
    return True


def _is_master(pid: int) -> bool:
    try:
        return b"modelsrv: master process" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class ServiceNotifier:
    """What the master tells systemd; every method is a no-op without ``NOTIFY_SOCKET``."""

    def __init__(self, env: str | None = None) -> None:
        self.env = os.environ.get(ENV) if env is None else env
        self.enabled = address(self.env) is not None
        self.ready_sent = False  # the first generation was announced
        self.reloading_from: int | None = None  # the serving generation when a reload started
        self.stopping_sent = False
        self.new_binary = 0  # the new binary's pid as last seen
        self.failed = False

    def send(self, **fields: Any) -> None:
        if not self.enabled:
            return
        try:
            notify(fields, self.env)
        except OSError as exc:
            if not self.failed:  # once: a missing socket would otherwise log on every change
                log.warning("sd_notify to %s failed: %s", self.env, exc)
            self.failed = True

    # -- the hooks the master calls ----------------------------------------------------------------
    def reloading(self, master: Any) -> None:
        """A HUP is being acted on (called before the new configuration is read)."""
        if not self.enabled or master.new_binary_pid or self.stopping_sent:
            return
        self.reloading_from = master.generation
        self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS="reloading the configuration")

    def update(self, master: Any) -> None:
        """Compare the master's state with what systemd was told; say what changed."""
        if not self.enabled:
            return
        if master.new_binary_pid != self.new_binary:
            self._new_binary(master)
        if master.new_binary_pid:
            return  # handed over (or about to be): the new master speaks for the service
        if master.quit or master.terminate:
            if not self.stopping_sent:
                self.stopping_sent = True
                self._stopping(master)
            return
        if not self.ready_sent:
            if _generation_up(master):
                self.ready_sent = True
                self.send(READY=1, MAINPID=os.getpid(), STATUS=_serving(master))
            return
        if self.reloading_from is not None and master.pending_generation is None and not master.reconfigure:
            outcome = "reloaded" if master.generation != self.reloading_from else "reload failed (see the error log)"
            self.reloading_from = None
            self.send(READY=1, STATUS=f"{outcome}; {_serving(master)}")

    # -- the binary upgrade ------------------------------------------------------------------------
    def _new_binary(self, master: Any) -> None:
        before, self.new_binary = self.new_binary, master.new_binary_pid
        if master.new_binary_pid:
            self.send(STATUS=f"binary upgrade: new master {master.new_binary_pid} starting")
            self.reloading_from = None  # a reload in flight is no longer ours to finish
        elif before and not (master.quit or master.terminate):
            # the new master exited (rollback, or it died): this master is the service again
            self.send(MAINPID=os.getpid(), READY=1, STATUS=f"new master {before} exited; {_serving(master)}")

    def _stopping(self, master: Any) -> None:
        parent = os.getppid()
        if _is_master(parent):  # a rollback: the master that started us serves on
            self.send(MAINPID=parent, STATUS=f"new master exiting: master {parent} serves again")
            return
        how = "fast shutdown" if master.terminate else "graceful shutdown: draining the workers"
        self.send(STOPPING=1, STATUS=how)


def _generation_up(master: Any) -> bool:
    mine = [w for w in master.workers.values() if w.generation == master.generation]
    if any(w.state == "starting" for w in mine):
        return False
    if any(generation == master.generation for _, generation in getattr(master, "respawn_at", {})):
        return False
    return any(w.state == "ready" for w in mine)


def _serving(master: Any) -> str:
    ready = sum(1 for w in master.workers.values() if w.generation == master.generation and w.state == "ready")
    return f"serving: {ready} worker(s) ready (generation {master.generation})"

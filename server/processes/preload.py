"""The preload process: workers forked from a process that has already imported torch.

``import torch`` leaves about 143 MiB of private memory in a process (libtorch's static
initialisation and the Python objects of the package), and a worker that imports it after the
fork pays all of it alone. The master must never import torch, so one child of the master, the
*preload process* (gunicorn's ``preload_app``, Android's zygote), imports torch, numpy and the
model code once, runs ``gc.freeze()`` and from then on only forks workers: each starts as a
copy-on-write copy of it and shares those pages with the others (docs/ARCHITECTURE.md, "Memory").

The master stays the parent of every worker. It is a child subreaper (``PR_SET_CHILD_SUBREAPER``)
and the preload process forks twice, so each worker is reparented to the master before the
master learns its pid: waitpid/SIGCHLD, respawn, the pid-keyed process table, metrics folding
and signals work exactly as for a worker the master forked itself. The master also keeps the
listening sockets and channels: for each worker it passes the worker's channel end, its
listening sockets and its tensor-parallel rendezvous socket (rank 0) with SCM_RIGHTS.

Over a SOCK_SEQPACKET socketpair, one msgpack map per packet:

- preload -> master, once, when the imports are done: ``{"event": "preloaded", "seconds", "failed",
  "threads"}`` (``failed``: module -> error; such a module is imported by each worker instead);
- master -> preload: ``{"slot", "generation", "cfg" (the Config, pickled), "listeners": [key, ...],
  "gpu", "cores", "tp"}`` with the descriptors ``[channel end, listeners..., tp socket (rank 0)]``;
- preload -> master: ``{"pid": N}`` or ``{"error": "..."}``.

The preload process must never touch CUDA, start a thread (no tensor op runs in it, so torch's
OpenMP/MKL pools do not exist yet; numpy's OpenBLAS is imported with one thread), create a
ZeroMQ context or an event loop: a forked copy of any of these is broken in every worker. It
checks its own thread count before saying it is ready. It exits when the master closes the
socket (or dies), on TERM and on QUIT; it ignores HUP, USR1, USR2, WINCH and INT.

Code is loaded once per master: a reload (HUP) forks the new workers from the same preloaded
modules, so new model code needs a binary upgrade (USR2) or a restart, as with gunicorn's
``preload_app``. ``worker_preload off`` forks workers from the master, importing everything after
the fork (the way before this process existed).
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgpack

from server.logs import ReopenableFileHandler, log

MAX_PACKET = 1 << 20
READY_TIMEOUT = 120.0  # seconds the imports may take (torch on a cold page cache, a loaded host)
FORK_TIMEOUT = 10.0  # seconds a fork request may take (a fork takes milliseconds)
PR_SET_CHILD_SUBREAPER = 36

# What every worker imports anyway; the model modules are added from models.catalog (by name: the
# master must not import them).
BASE_MODULES = ("numpy", "torch", "safetensors.torch", "models.base", "models.weights")


class PreloadError(Exception):
    """The preload process did not answer as it should; the master forks workers itself instead."""


def set_child_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux >= 3.4); False if it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_with(pid: int) -> None:
    """Exit this process when process ``pid`` does (Linux >= 5.3: a pidfd; else nothing).

    For the worker's helpers that are not its children: a ProcessPoolExecutor process started by a
    forkserver is the forkserver's child, and the forkserver lives as long as any such process
    holds its "alive" pipe, so with the worker killed both would wait for ever (the pool process on
    a call queue whose write end it holds itself). A parent-death signal would watch the wrong
    parent.
    """
    if not hasattr(os, "pidfd_open"):  # not Linux
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # it has gone already
        os._exit(0)
    except OSError:  # a kernel without pidfds (before 5.3)
        return

    def wait() -> None:
        select.select([fd], [], [])
        os._exit(0)

    threading.Thread(target=wait, name=f"exit-with-{pid}", daemon=True).start()


def preload_modules() -> list[str]:
    from models.catalog import MODEL_TYPES

    return [*BASE_MODULES, *sorted({path.partition(":")[0] for path in MODEL_TYPES.values()})]


class Preloader:
    """The master's handle on its preload process: start it, ask it for workers, stop it."""

    def __init__(self) -> None:
        self.pid = 0
        self.sock: socket.socket | None = None
        self.ready = False  # its "preloaded" message has been read
        self.failed = False  # it failed: the master forks workers itself until the next reload

    def start(self, close_inherited: Callable[[], None]) -> None:
        """Fork the preload process; ``close_inherited`` closes, in the child, what belongs to the master."""
        master_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            master_end.close()
            child_end.close()
            raise
        if pid == 0:
            code = 1
            try:
                master_end.close()
                close_inherited()
                code = _serve(child_end)
            except BaseException:  # noqa: B036 - never return into the master's code
                traceback.print_exc()
            finally:
                os._exit(code)
        child_end.close()
        self.pid, self.sock, self.ready = pid, master_end, False
        log.info("start preload process %d", pid)

    def spawn(self, request: dict[str, Any], fds: list[int]) -> int:
        """Have a worker forked; return its pid (by then a child of the master). Raises PreloadError."""
        if self.sock is None:
            raise PreloadError("not running")
        try:
            if not self.ready:
                hello = self._recv(READY_TIMEOUT)
                if hello.get("event") != "preloaded":
                    raise PreloadError(hello.get("error", f"unexpected message {hello!r}"))
                self.ready = True
                log.info("preload process %d ready: imported %s in %.1fs", self.pid,
                         ", ".join(m for m in preload_modules() if m not in hello.get("failed", {})), hello["seconds"])
                for module, error in hello.get("failed", {}).items():
                    log.warning("preload process could not import %s (each worker will try): %s", module, error)
            socket.send_fds(self.sock, [msgpack.packb(request)], fds)
            reply = self._recv(FORK_TIMEOUT)
        except (OSError, TypeError, ValueError) as exc:  # a timeout, the process gone, a request msgpack cannot carry
            raise PreloadError(f"{type(exc).__name__}: {exc}") from None
        if "pid" not in reply:
            raise PreloadError(reply.get("error", f"unexpected reply {reply!r}"))
        return int(reply["pid"])

    def _recv(self, timeout: float) -> dict[str, Any]:
        assert self.sock is not None
        self.sock.settimeout(timeout)
        data = self.sock.recv(MAX_PACKET)
        if not data:
            raise PreloadError("it exited")
        return msgpack.unpackb(data)

    def exited(self) -> None:
        """It was reaped (``_reap_children``): forget it; the next spawn starts a new one."""
        self.pid, self.ready = 0, False
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def stop(self) -> None:
        """Stop it and reap it (TERM; KILL if it is still there after two seconds)."""
        pid = self.pid
        self.exited()
        if not pid:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 2.0
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.01)

    def close_in_child(self) -> None:
        """In a worker the master forks itself: the preload process's socket is the master's, not ours."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# -- inside the preload process -------------------------------------------------------------------

def _exit_now(signum: int, frame: object) -> None:
    os._exit(0)


def _serve(sock: socket.socket) -> int:
    import setproctitle

    setproctitle.setproctitle("modelsrv: preload process")
    for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGQUIT):
        signal.signal(signum, _exit_now)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for h in list(log.handlers):  # the master's log files: not kept open here (USR1 could not reopen them)
        log.removeHandler(h)
        if isinstance(h, ReopenableFileHandler):
            h.stream.close()

    started = time.perf_counter()
    failed: dict[str, str] = {}
    blas = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # numpy's OpenBLAS starts its threads at import otherwise
    for name in preload_modules():
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
    if blas is None:
        del os.environ["OPENBLAS_NUM_THREADS"]
    else:
        os.environ["OPENBLAS_NUM_THREADS"] = blas
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    torch = sys.modules.get("torch")
    if threads != 1 or (torch is not None and torch.cuda.is_initialized()):
        why = f"{threads} threads" if threads != 1 else "CUDA initialised"
        sock.send(msgpack.packb({"error": f"unsafe to fork after the imports ({why})"}))
        return 1
    gc.collect()
    gc.freeze()  # the collector of a worker never touches (so never copies) the preloaded objects
    sock.send(msgpack.packb({"event": "preloaded", "seconds": round(time.perf_counter() - started, 2),
                             "failed": failed, "threads": threads}))
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_PACKET, 64)
        except ConnectionError:
            return 0
        if not data:  # the master closed its end, or died
            return 0
        sock.send(msgpack.packb(_fork_worker(sock, msgpack.unpackb(data), fds)))


def _fork_worker(sock: socket.socket, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """Fork twice: the middle process exits at once, so the worker is reparented to the master."""
    r, w = os.pipe()
    try:
        middle = os.fork()
    except OSError as exc:
        for fd in (r, w, *fds):
            os.close(fd)
        return {"error": f"fork() failed: {exc}"}
    if middle == 0:
        code = 1
        try:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _worker(sock, request, fds)  # never returns
            os.write(w, str(pid).encode())
            code = 0
        except BaseException:  # noqa: B036 - never return into the preload loop
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    for fd in fds:
        os.close(fd)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    os.waitpid(middle, 0)
    return {"pid": int(data)} if data else {"error": "fork() of the worker failed (see the master's stderr)"}


def _worker(sock: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    code = 1
    try:
        sock.close()
        from server.processes.channel import Channel
        from server.processes.worker import worker_main

        keys = request["listeners"]
        channel = Channel(socket.socket(fileno=fds[0]))
        listeners = {key: socket.socket(fileno=fd) for key, fd in zip(keys, fds[1:1 + len(keys)])}
        for s in listeners.values():
            s.setblocking(False)  # as the master's: a worker that loses an accept race must not block
        tp = request["tp"]
        if tp and tp.get("fd") is not None:
            tp["fd"] = fds[1 + len(keys)]
        cfg = pickle.loads(request["cfg"])
        code = worker_main(cfg, request["slot"], request["generation"], channel, listeners, request["gpu"],
                           request["cores"], tp)
    except BaseException:  # noqa: B036 - never return into the preload process's code
        traceback.print_exc()
    finally:
        os._exit(code)

"""The master process: nginx's ``ngx_master_process_cycle`` in Python.

Signal handlers only set flags; ``Master.cycle`` waits on a wake-up fd and the workers'
channels, then acts on the flags in nginx's order: reap, terminate, quit, reconfigure,
restart, reopen, change_binary, noaccept. The process table (``self.workers``) is the master's
whole state. The master never imports torch and never touches CUDA: a process forked after
CUDA initialisation misbehaves. Workers are forked by the preload process (server/processes/
preload.py), a child of the master that has imported torch once so that every worker shares those
pages; they are reparented to the master (a child subreaper), which reaps and respawns them as its
own children. With ``worker_preload off`` (or when the preload process fails) the master forks
them itself.

Reload differs from nginx in one way that matters for models: loading weights takes seconds,
so new workers are started first, and the old ones are sent QUIT only once every new one has
reported ready. A new generation that fails to load is retired and the old one keeps serving.
"""

from __future__ import annotations

import errno
import os
import pickle
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from server import __version__
from server.config import Config, ConfigError, listener_keys, load_config, slot_cores, slot_gpu
from server.logs import EMERG, Logs, log
from server.processes import listeners, pidfile, sdnotify
from server.processes.channel import EXIT_FATAL, HEARTBEAT_EVERY, Channel
from server.processes.daemon import daemonize
from server.processes.preload import Preloader, PreloadError, set_child_subreaper
from server.processes.tpgroups import TensorParallelGroups


@dataclass
class Worker:
    """One row of the process table."""

    slot: int
    generation: int
    pid: int
    channel: Channel
    started: float
    state: str = "starting"  # starting -> ready -> exiting
    last_heartbeat: float = 0.0
    kill_at: float | None = None  # when a worker told to exit gets SIGKILL
    term_delay: float = 0.0  # nginx's escalating TERM back-off
    respawn: bool = True
    ipc: str = ""
    load: str = ""
    models: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    tp: str = ""  # the tensor-parallel group it is a member of ("model/index"), if any


class Master(TensorParallelGroups):
    def __init__(self, config_path: Path, prefix: Path | None, cfg: Config, argv: list[str]) -> None:
        self.config_path = config_path
        self.prefix = prefix
        self.cfg = cfg
        self.argv = argv
        self.generation = 0  # the generation that serves
        self.generations = 0  # the last generation number handed out
        self.pending_cfg: Config | None = None
        self.exit_code = 0
        self.workers: dict[int, Worker] = {}  # pid -> Worker
        self.listeners: dict[str, socket.socket] = {}  # "http:host:port" / "zmq:host:port" -> socket
        self.pending_generation: int | None = None  # a reload waiting for its workers to be ready
        self.respawn_at: dict[tuple[int, int], float] = {}  # (slot, generation) -> when to respawn
        self.failures: dict[int, int] = {}  # slot -> quick deaths in a row
        self.new_binary_pid = 0
        self.noaccepting = False
        self.quitting_since: float | None = None
        self.terminating_since: float | None = None
        # the flags, as ngx_process_cycle.c names them
        self.reap = self.terminate = self.quit = self.reconfigure = False
        self.reopen = self.change_binary = self.noaccept = self.restart = False
        self.logs: Logs | None = None
        self.selector = selectors.DefaultSelector()
        self.sd = sdnotify.ServiceNotifier()  # systemd readiness (NOTIFY_SOCKET); a no-op without it
        self.preloader = Preloader()  # started at the first spawn that wants it (worker_preload on)
        self.subreaper = False  # PR_SET_CHILD_SUBREAPER: the preload process's workers are reparented to us
        self._tp_setup()

    # -- start -----------------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        running = pidfile.read_pid(cfg.pid)
        if running is not None and running != os.getpid() and _is_master(running):
            print(f"modelsrv: [emerg] {cfg.pid} names a running master (pid {running}): not starting a second one",
                  file=sys.stderr)
            return 1
        self.logs = Logs(cfg.error_log, cfg.error_log_level, "-", stderr=not cfg.daemon)
        if cfg.daemon:
            daemonize()
            self.logs = Logs(cfg.error_log, cfg.error_log_level, "-", stderr=False)  # stderr is gone: the file only
        self._set_title()
        self.subreaper = set_child_subreaper()
        if cfg.worker_preload and not self.subreaper:
            log.warning("worker_preload: this system cannot make the master a child subreaper: the master forks the workers")
        try:
            listeners.open_listeners(cfg, self.listeners)
        except OSError as exc:
            log.log(EMERG, "bind() failed: %s", exc)
            return 1
        self._prepare_metrics_dir()
        pidfile.write_pid(cfg.pid)
        self._install_signals()
        log.info("modelsrv/%s master started, %d worker(s)", __version__, cfg.worker_processes)
        try:
            self.generation = self._new_generation()
            for slot in range(cfg.worker_processes):
                self._spawn(slot, self.generation, cfg)
            return self.cycle()
        except Exception:
            # A bug in the master: say so where operators look (stderr may be /dev/null), and take
            # the workers down with us rather than leave them serving with nobody to respawn them.
            log.log(EMERG, "master process failed: terminating the workers", exc_info=True)
            self._kill_workers()
            return 1
        finally:
            self._cleanup()
            log.info("exit")

    def _kill_workers(self) -> None:
        """TERM every worker, wait a little, KILL what is left, reap them all (the master is going away)."""
        for w in self.workers.values():
            self._signal(w, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while self.workers and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == self.preloader.pid:
                self.preloader.exited()
            elif pid:
                self.workers.pop(pid, None)
            else:
                time.sleep(0.05)
        for w in self.workers.values():
            self._signal(w, signal.SIGKILL)

    # -- the cycle -------------------------------------------------------------------------------
    def cycle(self) -> int:
        while True:
            self.sd.update(self)  # tell systemd what changed in the last turn (READY, STOPPING, ...)
            self._wait(self._next_timeout())
            code = self.step(time.monotonic())
            if code is not None:
                return code

    def step(self, now: float) -> int | None:
        """One turn of the cycle, after the wait: act on the flags in nginx's order.

        Returns the master's exit status when the cycle is over, else None. Tests drive a Master
        through it with fake workers (``_spawn``, ``_signal`` and ``_reap_children`` replaced).
        """
        if self.reap:
            self.reap = False
            self._reap_children()
            if self._live_workers() == 0 and (self.terminate or self.quit):
                return self.exit_code
            if self._nothing_can_serve():
                log.log(EMERG, "no worker can serve: every worker failed to load its models")
                self.terminate = True
                self.exit_code = 1

        if self.terminate:  # also when it comes during a graceful quit: TERM overrides QUIT
            if self.terminating_since is None:
                self.terminating_since = now
                log.info("terminating")
                self.pending_generation = None
                for w in self.workers.values():
                    w.respawn = False
                    w.state = "exiting"
                    w.term_delay = 0.05
                    w.kill_at = now + 0.05
                    self._signal(w, signal.SIGTERM)
            self._escalate_terminate(now)
            if self._live_workers() == 0:
                return self.exit_code
            return None

        if self.quit:
            if self.quitting_since is None:
                self.quitting_since = now
                log.info("gracefully shutting down")
                self.pending_generation = None
                self._quit_workers(list(self.workers.values()))
                self._close_listeners()
            if self._live_workers() == 0:
                return 0
            self._kill_overdue(now)
            return None

        if self.reconfigure and self.pending_generation is None:
            self.reconfigure = False
            log.info("reconfiguring")
            self.sd.reloading(self)  # RELOADING=1 before the new config is read; READY=1 when it is over
            self._reconfigure()

        if self.restart:  # after noaccept, a HUP brings workers back (rollback of an upgrade)
            self.restart = False
            self.noaccepting = False
            self.generation = self._new_generation()
            for slot in range(self.cfg.worker_processes):
                self._spawn(slot, self.generation, self.cfg)

        if self.reopen:
            self.reopen = False
            self.logs.reopen()
            for w in self.workers.values():
                w.channel.send({"cmd": "reopen"}) or self._signal(w, signal.SIGUSR1)

        if self.change_binary:
            self.change_binary = False
            log.info("changing binary")
            self._exec_new_binary()

        if self.noaccept:
            self.noaccept = False
            self.noaccepting = True
            log.info("gracefully shutting down workers (noaccept)")
            self.pending_generation = None
            self._quit_workers(list(self.workers.values()))

        self._check_pending_generation()
        self._tp_check(now)
        self._respawn_due(now)
        self._check_heartbeats(now)
        self._kill_overdue(now)
        return None

    def _next_timeout(self) -> float:
        timeout = HEARTBEAT_EVERY
        now = time.monotonic()
        for when in self.respawn_at.values():
            timeout = min(timeout, max(0.0, when - now))
        for w in self.workers.values():
            if w.kill_at is not None:
                timeout = min(timeout, max(0.0, w.kill_at - now))
        return timeout

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal, a channel message or the timeout (nginx: sigsuspend)."""
        for key, _ in self.selector.select(timeout):
            if key.data == "signal":
                try:
                    while os.read(self._wakeup_r, 512):
                        pass
                except BlockingIOError:
                    pass
            else:
                self._on_channel(key.data)

    # -- signals ---------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, "signal")
        handlers = {
            signal.SIGCHLD: "reap",
            signal.SIGTERM: "terminate",
            signal.SIGINT: "terminate",
            signal.SIGQUIT: "quit",
            signal.SIGHUP: "reconfigure",
            signal.SIGUSR1: "reopen",
            signal.SIGUSR2: "change_binary",
            signal.SIGWINCH: "noaccept",
        }
        for signum, flag in handlers.items():
            signal.signal(signum, self._flag_setter(flag))

    def _flag_setter(self, flag: str):
        def handler(signum: int, frame: object) -> None:
            if flag == "reconfigure" and self.noaccepting:
                self.restart = True  # nginx: HUP after WINCH restarts workers, old config
                return
            setattr(self, flag, True)

        return handler

    def _signal(self, w: Worker, signum: int) -> None:
        try:
            os.kill(w.pid, signum)
        except ProcessLookupError:
            pass

    # -- channels --------------------------------------------------------------------------------
    def _on_channel(self, w: Worker) -> None:
        try:
            msg = w.channel.recv()
        except OSError:
            msg = None
        if msg is None:  # the worker exited; CHLD will reap it
            self.selector.unregister(w.channel)
            return
        event = msg.get("event")
        w.last_heartbeat = time.monotonic()
        if event == "ready":
            w.state = "ready" if w.state == "starting" else w.state
            w.ipc = msg.get("ipc", "")
            w.load = msg.get("load", "")
            w.models = msg.get("models", [])
            w.meta = msg.get("meta", {})
            self.failures.pop(w.slot, None)
            log.info("worker process %d #%d (generation %d) ready: %s", w.pid, w.slot, w.generation, ", ".join(w.models) or "no models")
            self._broadcast_peers()
        elif event == "load_failed":
            log.error("worker process %d #%d cannot load its models: %s", w.pid, w.slot, msg.get("error"))
            w.respawn = False

    def _broadcast_peers(self) -> None:
        """Tell every worker which ready workers host which models, for forwarding (nginx passes channels).

        Draining workers stay listed (``accepting: false``) until they exit: a request already
        forwarded to one is answered by it (a tensor-parallel rank 0 draining on QUIT, say), not failed.
        """
        peers = [
            {"slot": w.slot, "generation": w.generation, "pid": w.pid, "ipc": w.ipc, "load": w.load, "models": w.models,
             "meta": w.meta, "accepting": w.state == "ready"}
            for w in self.workers.values()
            if w.state in ("ready", "exiting") and w.ipc
        ]
        for w in self.workers.values():  # exiting ones too: they may still wait on a peer
            w.channel.send({"cmd": "peers", "peers": peers})

    # -- children --------------------------------------------------------------------------------
    def _new_generation(self) -> int:
        self.generations += 1
        return self.generations

    def _spawn(self, slot: int, generation: int, cfg: Config) -> Worker | None:
        try:
            tp = self._tp_spawn_info(slot, generation, cfg)
        except OSError as exc:
            log.error("worker #%d: no rendezvous socket for its tensor-parallel group: %s", slot, exc)
            self.respawn_at[(slot, generation)] = time.monotonic() + 1.0
            return None
        preload = self._preload_ready(cfg)  # first: a preload process started now must not inherit the channel
        parent_end, child_end = Channel.pair()
        try:
            pid = self._fork_worker(slot, generation, cfg, parent_end, child_end, tp, preload)
        except OSError as exc:
            log.error("fork() failed for worker #%d: %s", slot, exc)
            parent_end.close()
            child_end.close()
            self.respawn_at[(slot, generation)] = time.monotonic() + 1.0
            return None
        child_end.close()
        now = time.monotonic()
        w = Worker(slot=slot, generation=generation, pid=pid, channel=parent_end, started=now, last_heartbeat=now,
                   tp=tp["key"] if tp else "")
        self.workers[pid] = w
        self.selector.register(parent_end, selectors.EVENT_READ, w)
        gpu = slot_gpu(cfg, slot)
        log.info("start worker process %d #%d (%s)", pid, slot, f"cuda:{gpu}" if gpu is not None else "cpu")
        return w

    def _fork_worker(self, slot: int, generation: int, cfg: Config, parent_end: Channel, child_end: Channel,
                     tp: dict | None, preload: bool) -> int:
        """Start worker ``slot``; its pid. Forked by the preload process (the worker shares its pages of
        torch), else here. Either way it is the master's child, holding ``child_end``, the listening
        sockets its configuration names and its tensor-parallel rendezvous socket (rank 0)."""
        keep = {key: self.listeners[key] for key in listener_keys(cfg)}
        gpu, cores = slot_gpu(cfg, slot), slot_cores(cfg, slot)
        if preload:
            fds = [child_end.fileno(), *(sock.fileno() for sock in keep.values())]
            if tp and tp.get("fd") is not None:
                fds.append(tp["fd"])
            try:
                request = {"slot": slot, "generation": generation, "cfg": pickle.dumps(cfg), "listeners": list(keep),
                           "gpu": gpu, "cores": cores, "tp": tp}
                return self.preloader.spawn(request, fds)
            except (PreloadError, pickle.PicklingError, TypeError) as exc:
                log.error("preload process %d failed: %s: the master forks the workers until the next reload",
                          self.preloader.pid, exc)
                self.preloader.stop()
                self.preloader.failed = True
        pid = os.fork()
        if pid == 0:  # the worker; it never returns
            code = 1
            try:
                parent_end.close()
                self._close_inherited(keep, tp)
                from server.processes.worker import worker_main

                code = worker_main(cfg, slot, generation, child_end, keep, gpu, cores, tp)
            except BaseException:  # noqa: B036 - the child must never return into the master's loop
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        return pid

    def _preload_ready(self, cfg: Config) -> bool:
        """Whether workers of ``cfg`` are forked by the preload process (started here if it is not running)."""
        if not cfg.worker_preload or not self.subreaper or self.preloader.failed:
            return False
        if not self.preloader.pid:
            try:
                self.preloader.start(self._close_inherited)
            except OSError as exc:
                log.error("fork() failed for the preload process: %s: the master forks the workers", exc)
                self.preloader.failed = True
                return False
        return True

    def _close_inherited(self, keep: dict[str, socket.socket] | None = None, tp: dict | None = None) -> None:
        """In a child just forked (a worker, the preload process): close what is the master's."""
        for w in self.workers.values():
            w.channel.close()
        self.selector.close()
        signal.set_wakeup_fd(-1)
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)
        for key, sock in self.listeners.items():  # another generation's, or all of them: not ours to keep open
            if keep is None or key not in keep:
                sock.close()
        self._tp_child_fds(tp)
        self.preloader.close_in_child()

    def _reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.new_binary_pid:
                self._new_binary_exited(status)
            elif pid == self.preloader.pid:
                self.preloader.exited()
                stopping = self.terminate or self.quit
                (log.info if stopping else log.warning)("preload process %d %s%s", pid, self._describe_status(status),
                                                         "" if stopping else ": a new one starts with the next worker")
            else:
                self._worker_exited(pid, status)  # an orphan we adopted as subreaper is not in the table: ignored

    def _worker_exited(self, pid: int, status: int) -> None:
        """A child reaped with ``status`` (as waitpid gives it): clean up after it, decide whether it comes back."""
        w = self.workers.pop(pid, None)
        if w is None:
            return
        try:
            self.selector.unregister(w.channel)
        except (KeyError, ValueError):
            pass
        w.channel.close()
        self._forget_metrics(pid)
        self._remove_worker_files(w)
        self._broadcast_peers()  # peers waiting on it learn at once, and retry elsewhere
        how = self._describe_status(status)
        expected = w.state == "exiting"
        (log.info if expected else log.error)("worker process %d #%d %s", pid, w.slot, how)
        fatal = os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_FATAL
        if fatal:
            w.respawn = False
            if w.generation == self.pending_generation:
                log.error("new workers failed to load: reload aborted, the old configuration keeps serving")
                self._abort_pending_generation()
                return
        stopping = self.terminate or self.quit or self.noaccepting
        if (not expected and not stopping and w.generation in (self.generation, self.pending_generation)
                and self._tp_member_exited(w, fatal)):
            return  # its group goes down and comes back as one (server/processes/tpgroups.py)
        if expected or not w.respawn or stopping:
            if fatal:
                log.error("worker #%d is not respawned: it cannot load its models (see above)", w.slot)
            return
        if w.generation != self.generation and w.generation != self.pending_generation:
            return  # an old generation is being retired
        quick = time.monotonic() - w.started < 10
        n = self.failures.get(w.slot, 0) + 1 if quick else 0
        self.failures[w.slot] = n
        delay = min(10.0, 0.1 * (2**n)) if n else 0.0
        if delay:
            log.warning("worker #%d died %d time(s) in a row shortly after start: respawn in %.1fs", w.slot, n, delay)
        self.respawn_at[(w.slot, w.generation)] = time.monotonic() + delay

    def _respawn_due(self, now: float) -> None:
        for (slot, generation), when in list(self.respawn_at.items()):
            if when > now:
                continue
            del self.respawn_at[(slot, generation)]
            if self.terminate or self.quit or self.noaccepting:
                continue
            if generation == self.generation:
                self._spawn(slot, generation, self.cfg)
            elif generation == self.pending_generation:
                self._spawn(slot, generation, self.pending_cfg)

    @staticmethod
    def _describe_status(status: int) -> str:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return f"exited on signal {sig} ({signal.Signals(sig).name})"
        return f"exited with code {os.WEXITSTATUS(status)}"

    def _live_workers(self) -> int:
        return len(self.workers)

    def _nothing_can_serve(self) -> bool:
        """True when no worker is alive or on its way back: the server would serve nothing forever."""
        if self.terminate or self.quit or self.noaccepting:
            return False
        return not self.workers and not self.respawn_at and not self.tp_restarting

    def _quit_workers(self, workers: list[Worker]) -> None:
        deadline = time.monotonic() + self.cfg.worker_shutdown_timeout + 5.0
        for w in workers:
            if w.state == "exiting":
                continue
            w.state = "exiting"
            w.respawn = False
            w.kill_at = deadline
            if not w.channel.send({"cmd": "quit"}):
                self._signal(w, signal.SIGQUIT)
        self._broadcast_peers()

    def _escalate_terminate(self, now: float) -> None:
        """nginx: TERM again with a doubling delay; past a second, KILL."""
        for w in self.workers.values():
            if w.kill_at is not None and now >= w.kill_at:
                w.term_delay = max(w.term_delay, 0.05) * 2
                if w.term_delay > 1.0:
                    log.warning("worker process %d #%d did not exit: sending KILL", w.pid, w.slot)
                    self._signal(w, signal.SIGKILL)
                    w.kill_at = None
                else:
                    self._signal(w, signal.SIGTERM)
                    w.kill_at = now + w.term_delay

    def _kill_overdue(self, now: float) -> None:
        for w in self.workers.values():
            if w.kill_at is not None and now >= w.kill_at:
                log.warning("worker process %d #%d exceeded its shutdown timeout: sending KILL", w.pid, w.slot)
                self._signal(w, signal.SIGKILL)
                w.kill_at = None

    def _check_heartbeats(self, now: float) -> None:
        """A worker whose event loop stopped answering is killed; CHLD then respawns it."""
        for w in self.workers.values():
            if w.state == "exiting":
                continue
            limit = self.cfg.worker_load_timeout if w.state == "starting" else self.cfg.worker_timeout
            if now - w.last_heartbeat > limit:
                log.error("worker process %d #%d sent no heartbeat for %.0fs: killing it", w.pid, w.slot, now - w.last_heartbeat)
                self._signal(w, signal.SIGKILL)
                w.last_heartbeat = now  # do not kill twice while waiting for CHLD

    # -- reload ----------------------------------------------------------------------------------
    def _reconfigure(self) -> None:
        try:
            cfg = load_config(self.config_path, self.prefix)
        except ConfigError as exc:
            log.log(EMERG, "%s: reload refused, keeping the running configuration", exc)
            return
        self.preloader.failed = False  # a reload tries the preload process again
        try:
            listeners.open_listeners(cfg, self.listeners)
        except OSError as exc:
            log.log(EMERG, "bind() failed on reload: %s: keeping the running configuration", exc)
            return
        self._start_generation(cfg)

    def _start_generation(self, cfg: Config) -> None:
        """Start the workers of a reload; the old ones serve until every new one is ready."""
        self.pending_cfg = cfg
        self.pending_generation = self._new_generation()
        log.info("starting generation %d: %d worker(s)", self.pending_generation, cfg.worker_processes)
        for slot in range(cfg.worker_processes):
            self._spawn(slot, self.pending_generation, cfg)

    def _check_pending_generation(self) -> None:
        gen = self.pending_generation
        if gen is None:
            return
        new = [w for w in self.workers.values() if w.generation == gen]
        if len(new) < self.pending_cfg.worker_processes or any(w.state != "ready" for w in new):
            return
        old = [w for w in self.workers.values() if w.generation != gen and w.state != "exiting"]
        log.info("generation %d ready: retiring %d old worker(s)", gen, len(old))
        self.cfg, self.generation = self.pending_cfg, gen
        self.pending_generation = self.pending_cfg = None
        self._quit_workers(old)
        self._close_unused_listeners()
        if not self.cfg.worker_preload:  # reloaded with worker_preload off: nothing will be forked from it
            self.preloader.stop()

    def _abort_pending_generation(self) -> None:
        gen = self.pending_generation
        self.pending_generation = self.pending_cfg = None
        for w in self.workers.values():
            if w.generation == gen:
                w.respawn = False
                w.state = "exiting"
                w.kill_at = time.monotonic() + 5.0
                w.channel.send({"cmd": "terminate"}) or self._signal(w, signal.SIGTERM)
        for key in [k for k in self.respawn_at if k[1] == gen]:
            del self.respawn_at[key]
        self._close_unused_listeners()

    # -- listening sockets -----------------------------------------------------------------------
    def _close_unused_listeners(self) -> None:
        listeners.close_unused(self.cfg, self.listeners)

    def _close_listeners(self) -> None:
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()

    # -- binary upgrade --------------------------------------------------------------------------
    def _exec_new_binary(self) -> None:
        if self.new_binary_pid:
            log.warning("a new binary is already running (pid %d): USR2 ignored", self.new_binary_pid)
            return
        pid_path = self.cfg.pid
        oldbin = pidfile.oldbin(pid_path)
        try:
            os.rename(pid_path, oldbin)
        except OSError as exc:
            log.error("rename() %s to %s failed: %s", pid_path, oldbin, exc)
            return
        env = {**os.environ, **listeners.inherit_env(self.listeners)}
        fds = [sock.fileno() for sock in self.listeners.values()]
        try:
            pid = os.fork()
        except OSError as exc:  # nginx: the new binary never started, so the pid file is ours again
            log.error("fork() for the new binary failed: %s", exc)
            self._rename_oldbin_back()
            return
        if pid == 0:
            try:
                for fd in fds:
                    os.set_inheritable(fd, True)
                signal.set_wakeup_fd(-1)
                for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                               signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH):
                    signal.signal(signum, signal.SIG_DFL)
                os.execve(sys.executable, [sys.executable, *self.argv], env)
            finally:
                os._exit(1)
        self.new_binary_pid = pid
        log.info("started new binary process %d", pid)

    def _new_binary_exited(self, status: int) -> None:
        log.warning("new binary process %d %s", self.new_binary_pid, self._describe_status(status))
        self.new_binary_pid = 0
        self._rename_oldbin_back()

    def _rename_oldbin_back(self) -> None:
        oldbin = pidfile.oldbin(self.cfg.pid)
        try:
            os.rename(oldbin, self.cfg.pid)
        except OSError as exc:
            log.error("rename() %s back to %s failed: %s", oldbin, self.cfg.pid, exc)

    # -- odds and ends ---------------------------------------------------------------------------
    def _set_title(self) -> None:
        import setproctitle

        args = self.argv[2:] if self.argv[:2] == ["-m", "server.cli"] else self.argv
        setproctitle.setproctitle(f"modelsrv: master process modelsrv {' '.join(args)}")

    def _prepare_metrics_dir(self) -> None:
        """Prometheus multiprocess files live in run/metrics-<master pid>, wiped at start.

        Folders of masters that are gone (killed with -9: nothing removed them) go too; a live
        master's (the old one during a binary upgrade) stays.
        """
        import shutil

        for stale in self.cfg.run_dir.glob("metrics-*"):
            pid = stale.name.removeprefix("metrics-")
            if pid.isdigit() and not _is_master(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        path = self.cfg.run_dir / f"metrics-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
        self.metrics_dir = path

    def _forget_metrics(self, pid: int) -> None:
        from server.metrics import worker_died

        try:
            worker_died(self.metrics_dir, pid)
        except Exception as exc:  # metrics must never take the master down
            log.warning("cleaning metrics of worker %d failed: %s", pid, exc)

    @staticmethod
    def _remove_worker_files(w: Worker) -> None:
        """A worker killed with -9 leaves its ipc socket and load board behind."""
        for path in (w.ipc.removeprefix("ipc://"), w.load):
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def _cleanup(self) -> None:
        import shutil

        self.preloader.stop()
        if getattr(self, "metrics_dir", None):
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self._tp_close_all()
        pidfile.remove_own(self.cfg.pid, pidfile.oldbin(self.cfg.pid))


def _is_master(pid: int) -> bool:
    """True if ``pid`` is a live modelsrv master (a stale pid file may name a reused pid)."""
    try:
        return b"modelsrv: master process" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def run_master(config_path: Path, prefix: Path | None, argv: list[str]) -> int:
    try:
        cfg = load_config(config_path, prefix)
    except ConfigError as exc:
        print(f"modelsrv: [emerg] {exc}", file=sys.stderr)
        return 1
    try:
        return Master(config_path, prefix, cfg, argv).run()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"modelsrv: [emerg] {exc}", file=sys.stderr)
            return 1
        raise

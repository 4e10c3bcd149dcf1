"""A worker process: nginx's ``ngx_worker_process_cycle`` around a uvloop event loop.

Forked by the preload process (torch imported, never used: no CUDA context, no thread pool yet)
or by the master (no torch at all), it pins itself first — GPU list in the environment before
CUDA initialises (lazily, at the first CUDA call), CPU affinity, torch threads = its cores — then
loads and warms up its models, reports ready over the channel, and serves HTTP and ZeroMQ until told
to quit (graceful: stop accepting, answer what it holds, exit within worker_shutdown_timeout)
or terminate (fast). The flags ``terminate quit exiting reopen`` are set by channel commands or,
as a fallback, by signals, and acted on by one task.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from typing import Any

from server.config import Config, ModelConf, slot_device, slot_threads, split_listener_key
from server.logs import Logs, log
from server.processes.channel import EXIT_FATAL, HEARTBEAT_EVERY, Channel
from server.serving.loadboard import LoadBoard

_loop_errors_logged: dict[str, float] = {}


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Errors the event loop reports itself (an accept() failing for lack of descriptors, say) go
    to the error log, at most once a second per message, instead of stderr alone."""
    message = str(context.get("message", "event loop error"))
    now = time.monotonic()
    if now - _loop_errors_logged.get(message, -1.0) < 1.0:
        return
    _loop_errors_logged[message] = now
    exc = context.get("exception")
    log.error("event loop: %s%s", message, f": {exc!r}" if exc is not None else "")


def worker_main(cfg: Config, slot: int, generation: int, channel: Channel, listeners: dict[str, socket.socket],
                gpu: int | None, cores: list[int] | None, tp: dict[str, Any] | None = None) -> int:
    """``tp``: this slot's tensor-parallel group as the master set it up (model, rank, size, slots, port, fd)."""
    device_label = f"cuda:{gpu}" if gpu is not None else "cpu"
    import setproctitle

    group = f" tp {tp['model']} rank {tp['rank']}/{tp['size']}" if tp else ""
    setproctitle.setproctitle(f"modelsrv: worker process #{slot} ({device_label}){group}")
    for signum in (signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR2, signal.SIGWINCH):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C reaches the master, which tells us

    # Pinning, before CUDA or a thread pool starts (torch may be imported already: the preload process's):
    # CUDA reads the GPU list at its first call; the pools get their size from torch.set_num_threads below.
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu) if gpu is not None else ""
    if cores:
        os.sched_setaffinity(0, cores)
    threads = slot_threads(cfg, slot)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)

    logs = Logs(cfg.error_log, cfg.error_log_level, str(slot), cfg.access_log)
    from server.metrics import WORKER_STARTS

    WORKER_STARTS.labels(str(slot)).inc()
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    if gpu is not None:  # fp32 means fp32: the fixtures' tolerances assume it
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    followers: dict[str, Any] = {}
    try:
        loaded = _load_models(cfg, slot, tp, followers)
    except Exception as exc:
        log.error("cannot load models: %s", exc)
        channel.send({"event": "load_failed", "error": str(exc)})
        return EXIT_FATAL

    import uvloop

    w = WorkerProcess(cfg, slot, generation, channel, listeners, loaded, logs, cores, device_label, tp, followers)
    return uvloop.run(w.run())


def _load_models(cfg: Config, slot: int, tp: dict[str, Any] | None = None,
                 followers: dict[str, Any] | None = None) -> dict[str, tuple[ModelConf, Any, float]]:
    """This slot's models, loaded and warmed up; a tensor-parallel model is loaded as this rank's shard
    (rank 0: served here; another rank: a follower thread in ``followers``, not served here)."""
    from models.base import load_model
    from server.metrics import LOAD_SECONDS

    loaded = {}
    for mc in cfg.models_on(slot):
        started = time.perf_counter()
        try:
            if tp and mc.name == tp["model"]:
                from server.serving.tensor_parallel import load_sharded

                model, follower = load_sharded(mc, slot_device(cfg, mc, slot), tp)
                if follower is not None:
                    followers[mc.name] = follower
                    log.info('model "%s" rank %d/%d shard loaded: following rank 0', mc.name, tp["rank"], tp["size"])
                    continue
            else:
                options = {"max_image_pixels": mc.max_image_pixels} if mc.max_image_pixels is not None else None
                model = load_model(mc.path, slot_device(cfg, mc, slot), options)
                model.warmup()
        except Exception as exc:
            raise RuntimeError(f'model "{mc.name}" ({mc.path}): {exc}') from exc
        seconds = time.perf_counter() - started
        LOAD_SECONDS.labels(mc.name).set(seconds)
        log.info('model "%s" (%s) loaded and warmed up in %.2fs', mc.name, model.model_type, seconds)
        loaded[mc.name] = (mc, model, seconds)
    return loaded


def model_metadata(name: str, mc: ModelConf, model: Any, tp: dict[str, Any] | None = None) -> dict[str, Any]:
    """KServe model metadata, with the Triton-style config under "config" (and its tensor-parallel group)."""
    meta = {
        "name": name,
        "versions": ["1"],
        "platform": f"modelsrv_{model.model_type}",
        "inputs": [s.metadata() for s in model.inputs],
        "outputs": [s.metadata() for s in model.outputs],
        "config": {
            "name": name,
            "platform": f"modelsrv_{model.model_type}",
            "max_batch_size": mc.max_batch_size,
            "input": [{"name": s.name, "data_type": f"TYPE_{s.datatype}", "dims": list(s.shape[1:]), "optional": s.optional}
                      for s in model.inputs],
            "output": [{"name": s.name, "data_type": f"TYPE_{s.datatype}", "dims": list(s.shape[1:])} for s in model.outputs],
            "dynamic_batching": {"max_queue_delay_microseconds": int(mc.batch_timeout * 1e6),
                                 "default_queue_policy": {"max_queue_size": mc.max_queue_size}},
        },
    }
    if tp and tp["model"] == name:
        from server.serving.tensor_parallel import tp_metadata

        meta["config"]["tensor_parallel"] = tp_metadata(mc, tp)
    return meta


class WorkerProcess:
    def __init__(self, cfg: Config, slot: int, generation: int, channel: Channel, listeners: dict[str, socket.socket],
                 loaded: dict[str, tuple[ModelConf, Any, float]], logs: Logs, cores: list[int] | None, device: str,
                 tp: dict[str, Any] | None = None, followers: dict[str, Any] | None = None) -> None:
        self.cfg, self.slot, self.generation = cfg, slot, generation
        self.channel, self.listeners, self.loaded, self.logs = channel, listeners, loaded, logs
        self.cores, self.device = cores, device
        self.tp, self.followers = tp, followers or {}
        self.failed = False  # a tensor-parallel group this worker belongs to broke: exit 1, the master restarts it
        # the flags of ngx_worker_process_cycle
        self.terminate = self.quit = self.exiting = self.reopen = False
        self.wake = asyncio.Event()
        self.ready = False

    def _flag(self, name: str) -> None:
        setattr(self, name, True)
        self.wake.set()

    async def run(self) -> int:
        import zmq.asyncio

        from server.frontends.http import HttpServer
        from server.frontends.zeromq import ZmqServer
        from server.serving.batcher import INLINE_BELOW, Batcher, Device
        from server.serving.engine import Engine

        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_loop_exception)
        for signum, flag in ((signal.SIGQUIT, "quit"), (signal.SIGTERM, "terminate"), (signal.SIGUSR1, "reopen")):
            loop.add_signal_handler(signum, self._flag, flag)
        loop.add_reader(self.channel.fileno(), self._on_channel)
        for f in self.followers.values():
            f.on_done = lambda: loop.call_soon_threadsafe(self.wake.set)
            if f.done.is_set():
                self.wake.set()

        import torch

        # tiny batches on the loop where that is cheaper: a CPU worker with one torch thread (Device)
        device = Device(inline_below=INLINE_BELOW if self.device == "cpu" and torch.get_num_threads() == 1 else 0.0)
        models = {name: model for name, (_, model, _) in self.loaded.items()}
        self.board = LoadBoard(self.cfg.run_dir / f"worker-{os.getpid()}.load", sorted(models))
        me = f"{self.generation}:{self.slot}"
        batchers = {name: Batcher(name, model, mc, device, self.board, me) for name, (mc, model, _) in self.loaded.items()}
        meta = {name: model_metadata(name, mc, model, self.tp) for name, (mc, model, _) in self.loaded.items()}
        from server.config import GENERATIVE_TYPES
        from server.serving.generation import GenerationEngine

        generators = {name: GenerationEngine(name, model, mc, device, me)
                      for name, (mc, model, _) in self.loaded.items() if model.model_type in GENERATIVE_TYPES}
        for name, g in generators.items():
            meta[name]["generation"] = g.info()
            g.start()
        for b in batchers.values():
            b.start()
        self.ctx = zmq.asyncio.Context()
        # libzmq's I/O thread shares the worker's core with the loop. As SCHED_BATCH it does not
        # preempt the loop at every reply the loop queues: it runs when the loop waits (or its slice
        # ends) and sends the turn's replies together (tiny model, 2 workers: 253 -> 213 us of CPU
        # per request, bench/ab.py).
        self.ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_BATCH)
        self.engine = Engine(self.slot, self.generation, models, batchers, meta, self.ctx, generators,
                             peer_timeout=self.cfg.peer_timeout,
                             peer_timeouts={n: mc.peer_timeout for n, mc in self.cfg.models.items() if mc.peer_timeout})
        access = self.logs.access_line
        self.http = HttpServer(self.engine, self.cfg, access, lambda: self.ready)
        curve = None
        if self.cfg.zmq_curve_server_key is not None and self.cfg.zmq_curve_allowed is not None:
            import zmq.auth

            from server.config import curve_allowed_keys

            public, secret = zmq.auth.load_certificate(self.cfg.zmq_curve_server_key)
            curve = (public, secret, curve_allowed_keys(self.cfg.zmq_curve_allowed))
        self.zmq = ZmqServer(self.engine, self.ctx, access, lambda: self.ready, self.cfg.client_max_body_size, curve)
        if not await self._wait_for_rank0():  # the group broke, or we were told to stop, before it served
            self.zmq.close()
            self.engine.close()
            self.ctx.destroy(linger=0)
            self.board.close()
            log.info("exit")
            self.logs.close()
            return 0 if self.terminate or self.quit else 1
        self.http_servers = []
        for key, sock in self.listeners.items():
            kind, host, port = split_listener_key(key)
            if kind == "http":
                self.http_servers.append(await loop.create_server(self.http.protocol, sock=sock, backlog=1024))
            else:
                self.zmq.bind_inherited(sock, host, port)
        self.ipc = f"ipc://{self.cfg.run_dir}/worker-{os.getpid()}.sock"
        self.zmq.bind_internal(self.ipc)

        self.ready = True
        from server.metrics import WORKERS_READY

        WORKERS_READY.inc()
        self.channel.send({"event": "ready", "ipc": self.ipc, "load": str(self.board.path), "models": sorted(models), "meta": meta})
        log.info("worker #%d ready on %s, cores %s", self.slot, self.device, self.cores or "all")
        heartbeat = loop.create_task(self._heartbeat())
        trimming = loop.create_task(self._release_memory())
        code = await self._cycle()
        heartbeat.cancel()
        trimming.cancel()
        for g in generators.values():
            g.stop()
        self._close_groups()
        WORKERS_READY.dec()
        from server import metrics

        metrics.flush()  # what the last turn of the loop recorded
        self.zmq.close()
        from server.frontends.http import JsonParser

        JsonParser.close()
        self.engine.close()
        device.close(wait=False)  # a step still running (terminate) does not hold the exit: the thread is a daemon
        self.ctx.destroy(linger=0)
        self.board.close()
        try:
            os.unlink(self.ipc[len("ipc://"):])
        except OSError:
            pass
        log.info("exit")
        self.logs.close()
        sys.stdout.flush()
        return code

    async def _cycle(self) -> int:
        """Act on the flags until exiting is done (ngx_worker_process_cycle)."""
        deadline = None
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), 0.1 if self.exiting else None)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            if self.terminate:
                log.info("exiting (terminate)")
                return 0
            if self._group_failed():
                return 1
            if self.quit and not self.exiting:
                self.exiting = True
                self.ready = False
                log.info("gracefully shutting down")
                self._stop_accepting()
                self.http.drain()
                self.zmq.draining = True
                self.engine.draining = True
                # a follower outlives its rank 0's drain (rank 0 stops it when done; the master kills at +5 s)
                deadline = time.monotonic() + self.cfg.worker_shutdown_timeout + (2.0 if self.followers else 0.0)
            if self.reopen:
                self.reopen = False
                self.logs.reopen()
            if self.exiting:
                held = self.engine.outstanding + self.http.busy + self.zmq.inflight
                following = [f.name for f in self.followers.values() if not f.done.is_set()]
                if held == 0 and not self.http.connections and self.zmq.idle_for() > 0.5 and not following:
                    return 0
                if time.monotonic() > deadline:
                    log.warning("worker_shutdown_timeout: exiting with %d request(s) held", held)
                    return 0
                self.http.drain()

    async def _wait_for_rank0(self) -> bool:
        """A follower rank takes requests from the shared listeners only once a rank 0 serving the model it
        follows is in the peer table: before, it could only answer 404 (a new binary's group during a USR2,
        whose master lists no other worker). The group's warm-up runs on the follower thread meanwhile;
        the master bounds the wait with ``worker_load_timeout``. False: the group ended or we must stop."""
        while self.followers:
            if all(self.engine.hosts(name) for name in self.followers):
                return True
            if self.terminate or self.quit or any(f.done.is_set() for f in self.followers.values()):
                return False
            try:
                await asyncio.wait_for(self.wake.wait(), 0.2)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
        return True

    def _group_failed(self) -> bool:
        """A tensor-parallel group this worker is in cannot serve any more (see server/serving/tensor_parallel.py)."""
        for f in self.followers.values():
            if f.done.is_set() and (f.error or not self.exiting):
                log.error('tensor-parallel model "%s": the group ended (%s): exiting so that the master restarts it',
                          f.name, f.error or "rank 0 left")
                return True
        for name, (_, model, _) in self.loaded.items():
            broken = getattr(model, "broken", None)
            if broken and broken != "closed":
                log.error('tensor-parallel model "%s": %s: exiting so that the master restarts the group', name, broken)
                return True
        return False

    def _close_groups(self) -> None:
        """Rank 0 tells its followers the group is over (after the drain: nothing in flight needs them)."""
        for _, model, _ in self.loaded.values():
            if hasattr(model, "start_keepalive"):
                model.close()

    def _stop_accepting(self) -> None:
        """Close our copies of the HTTP listening sockets, first taking every connection already queued.

        A client whose connection completed its handshake has sent its request as far as it can
        tell; answering it is part of a graceful drain. New connections then go to the workers
        still accepting (on reload or upgrade) or are refused (on shutdown).
        """
        loop = asyncio.get_running_loop()
        for key, sock in self.listeners.items():
            if not key.startswith("http:"):
                continue
            while True:
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError, OSError):
                    break
                conn.setblocking(False)
                loop.create_task(loop.connect_accepted_socket(self.http.protocol, conn))
        for server in self.http_servers:
            server.close()

    def _on_channel(self) -> None:
        try:
            msg = self.channel.recv()
        except OSError:
            msg = None
        if msg is None:  # the master is gone: nobody would restart or retire us
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
            log.error("channel to the master closed: exiting")
            self._flag("quit")
            return
        cmd = msg.get("cmd")
        if cmd in ("quit", "terminate", "reopen"):
            self._flag(cmd)
        elif cmd == "peers":
            self.engine.set_peers(msg.get("peers", []))

    async def _release_memory(self) -> None:
        """Give freed batch memory back to the system when idle (server/processes/memory.py)."""
        from server.processes.memory import CHECK_EVERY, MallocTrim

        trimmer = MallocTrim(self.cfg.worker_malloc_trim)
        if not trimmer.enabled:
            return
        self._log_trim("after warm-up", trimmer.trim())
        while True:
            await asyncio.sleep(CHECK_EVERY)
            done = trimmer.check(self.engine.outstanding == 0)
            if done:
                self._log_trim("idle", done)

    @staticmethod
    def _log_trim(why: str, done: tuple[int, int, float]) -> None:
        before, after, took = done
        log.debug("malloc_trim (%s): resident %.0f -> %.0f MiB in %.1f ms", why, before / 2**20, after / 2**20, took * 1e3)

    async def _heartbeat(self) -> None:
        """Proof of a live event loop: a wedged loop sends nothing and the master kills it."""
        while True:
            wedged = [f.name for f in self.followers.values() if f.busy_for() > self.cfg.worker_timeout]
            if not wedged:  # a follower stuck in one step is a wedged rank: no heartbeat, the master restarts the group
                self.channel.send({"event": "heartbeat", "outstanding": self.engine.outstanding})
            if self._group_failed():
                self.wake.set()
            await asyncio.sleep(HEARTBEAT_EVERY)

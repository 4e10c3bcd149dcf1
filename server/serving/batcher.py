"""Dynamic batching: one queue per model, one inference thread per device.

A batch is dispatched as soon as the device is idle (no waiting for a lone request, the mistake
measured on LitServe and TorchServe); while the device is busy, requests accumulate and the
next batch takes up to ``max_batch_size`` items, waiting at most ``batch_timeout`` for more.
The inference thread runs ``prepare`` (validation, decoding) and ``forward``; torch releases
the GIL while it computes, so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from queue import SimpleQueue
from typing import Any

import numpy as np
import torch

from models.base import InputError, Model, RequestTensor
from server import metrics
from server.config import ModelConf
from server.errors import Overloaded, RequestTimeout
from server.logs import log
from server.serving.loadboard import LoadBoard


@dataclass
class Timing:
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0
    worker: str = ""  # "generation:slot" of the worker that ran it (ZMQ replies carry it, for operators)

    def to_wire(self) -> dict[str, Any]:
        """The ``timing`` map of a ZeroMQ reply (docs/PROTOCOL.md)."""
        return {"queue_ms": self.queue_ms, "compute_ms": self.compute_ms, "batch_size": self.batch_size,
                "worker": self.worker}

    @classmethod
    def from_wire(cls, t: Any) -> Timing:
        """The inverse of ``to_wire``, tolerant of a peer that sent none."""
        t = t if isinstance(t, dict) else {}
        return cls(t.get("queue_ms", 0.0), t.get("compute_ms", 0.0), t.get("batch_size", 0), t.get("worker", ""))


Done = Callable[[Any, "Timing | None"], None]


@dataclass(slots=True)
class _Pending:
    inputs: Mapping[str, RequestTensor]
    parameters: Mapping[str, Any]
    done: Done  # called once with (outputs, Timing) or (exception, None)
    size: int
    enqueued: float
    deadline: float
    finished: bool = False  # answered, expired or withdrawn


def _settle(future: asyncio.Future, result: Any, timing: Timing | None) -> None:
    if future.done():
        return
    if timing is None:
        future.set_exception(result)
    else:
        future.set_result((result, timing))


def request_size(inputs: Mapping[str, RequestTensor]) -> int:
    """Items in a request: dim 0 of its inputs (they must agree)."""
    sizes = {len(v) if isinstance(v, list) else (v.shape[0] if v.ndim else 0) for v in inputs.values()}
    if not sizes:
        raise InputError("the request has no inputs")
    if len(sizes) != 1:
        raise InputError(f"inputs disagree on the batch dimension: {sorted(sizes)}")
    return sizes.pop()


# A batch expected to take less CPU than this runs on the event loop itself, not the inference thread
# (see Device). Measured on the tiny model, 2 workers of one core and one torch thread each
# (bench/results, 2026-12-02, 4 alternating rounds): 5.9k -> 7.4k req/s, 274 -> 201 us of CPU per
# request; the loop is blocked for at most about this long, as by a garbage collection.
INLINE_BELOW = 0.002


class Device:
    """The one inference thread of a worker's device, shared by its models' batchers.

    ``inline_below`` (seconds, 0: never): a batch whose expected CPU time is below it runs on
    the event loop instead, when the device is idle. On a worker pinned to one core with one
    torch thread, handing a tiny batch to the inference thread costs more than the batch: the
    loop, the inference thread and libzmq's I/O thread share the core, and every hand-off of the
    GIL is a context switch. The worker enables it for a CPU device with one torch thread only
    (with an OpenMP pool, batches on the loop measured slower), and a batcher only passes an
    estimate once it has measured the model (CPU time per item, never wall time spent waiting).
    """

    def __init__(self, inline_below: float = 0.0) -> None:
        self.jobs: SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future, Callable[..., Any], tuple] | None] = SimpleQueue()
        # daemon: a worker that exits without close() (a fatal error) is not held by an idle thread
        self.thread = threading.Thread(target=self._serve, name="infer", daemon=True)
        self.thread.start()
        self.inline_below = inline_below
        self.busy = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def run(self, fn, *args, cost: float | None = None):
        """``fn(*args)`` on the inference thread, or on the loop when ``cost`` (expected seconds) is small.

        The device counts as busy until the job has ended, not until its waiter has: a waiter
        cancelled at shutdown leaves the job running, and nothing may start beside it.
        """
        inline = cost is not None and cost < self.inline_below and not self.busy
        self._begin()
        if inline:
            try:
                return fn(*args)
            finally:
                self._end()
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.jobs.put((loop, done, fn, args))
        return await done

    def close(self, wait: bool = True) -> None:
        """Stop the thread after the jobs already queued."""
        self.jobs.put(None)
        if wait:
            self.thread.join()

    def _begin(self) -> None:
        self.busy += 1
        self.idle.clear()

    def _end(self) -> None:
        self.busy -= 1
        if not self.busy:
            self.idle.set()

    def _job_done(self, done: asyncio.Future, result: Any, error: BaseException | None) -> None:
        """On the loop: the inference thread finished a job."""
        self._end()
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def _serve(self) -> None:
        """The inference thread: jobs in order; each result goes back with one ``call_soon_threadsafe``.

        Not a ThreadPoolExecutor: its concurrent future (a Condition, a lock, ``wrap_future``'s
        chaining callbacks) cost the loop twice the CPU of this hand-off per batch or decode step
        (bench/handoff.py: 53-65 against 29-36 us; streamed tokens of the small BLOOM at one
        stream, bench/tokencost.py: 455 -> 319 us of loop CPU per token with the SSE template).
        """
        import setproctitle

        # the OS thread name, so that `top -H`, `ps -L` and per-thread CPU accounting tell it apart
        setproctitle.setthreadtitle("modelsrv infer")
        while (job := self.jobs.get()) is not None:
            loop, done, fn, args = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(self._job_done, done, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
            del job, fn, args, result, error  # no reference to a batch outlives its job


class Batcher:
    """One model's queue and its dispatch loop.

    Requests come in two ways: ``enqueue`` with a callback (the ZeroMQ door's fast path: no task,
    no future, no timer per request) and ``submit``, an awaitable on top of it (HTTP, forwarding,
    scatter). Expiry (``request_timeout``) is one timer per batcher, armed for the oldest
    deadline: the queue is FIFO and every request of a model has the same timeout, so the
    running batch and the head of the queue are the first to expire.
    """

    def __init__(self, name: str, model: Model, conf: ModelConf, device: Device, board: LoadBoard | None = None,
                 worker: str = "") -> None:
        self.name, self.model, self.conf, self.device, self.board = name, model, conf, device, board
        self.worker = worker
        self.queue: deque[_Pending] = deque()
        self.running: list[_Pending] = []
        self.wakeup = asyncio.Event()
        self.inflight = 0
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        # CPU time of the inference thread per item, a moving average (None: no batch yet). CPU, not
        # wall time: on a loaded worker the thread waits for the GIL, and a tiny model's batch of 11
        # took 2.1 ms of wall time for ~0.25 ms of work (bench/spy.py, 2 workers, c=32)
        self.item_seconds: float | None = None
        self.batch_cpu = 0.0  # the last batch's, set by the inference thread
        # metric children looked up once (labels() costs a dict lookup and a lock per call), written
        # through server.metrics once per turn of the event loop
        self.m_inflight = metrics.INFLIGHT.labels(name)
        self.m_queued = metrics.QUEUED.labels(name)
        self.m_batch = metrics.BATCH_SIZE.labels(name)
        self.m_queue_s = metrics.QUEUE_SECONDS.labels(name)
        self.m_compute_s = metrics.COMPUTE_SECONDS.labels(name)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher:{self.name}")

    @property
    def outstanding(self) -> int:
        return self.inflight

    def check_room(self) -> None:
        if len(self.queue) >= self.conf.max_queue_size:
            raise Overloaded(f"model {self.name!r}: queue full ({self.conf.max_queue_size} requests)")

    def enqueue(self, inputs: Mapping[str, RequestTensor], parameters: Mapping[str, Any], done: Done,
                admitted: bool = False) -> _Pending:
        """Queue one request; ``done(outputs, timing)`` or ``done(exception, None)`` is called once, on the loop.

        Raises (without calling ``done``) when the request is refused at once: a full queue
        (Overloaded), inputs that disagree on their batch size (InputError). ``admitted``: a chunk
        of a request already let in (scatter), not checked against the queue limit again.
        """
        if not admitted:
            self.check_room()
        now = time.perf_counter()
        pending = _Pending(inputs, parameters, done, request_size(inputs), now, now + self.conf.request_timeout)
        self.queue.append(pending)
        self._count(+1)
        metrics.set_gauge(self.m_queued, len(self.queue))
        self.wakeup.set()
        if self.timer is None:
            self._arm(pending.deadline)
        return pending

    async def submit(self, inputs: Mapping[str, RequestTensor], parameters: Mapping[str, Any],
                     admitted: bool = False) -> tuple[dict[str, np.ndarray], Timing]:
        """Queue one request and wait for its outputs (cancelling the wait withdraws the request)."""
        future = asyncio.get_running_loop().create_future()
        pending = self.enqueue(inputs, parameters, partial(_settle, future), admitted)
        try:
            return await future
        except asyncio.CancelledError:
            self.withdraw(pending)
            raise

    def withdraw(self, pending: _Pending) -> None:
        """The client went away: a batch that has not started yet skips the request."""
        if not pending.finished:
            pending.finished = True
            self._count(-1)

    def _finish(self, pending: _Pending, result: Any, timing: Timing | None) -> None:
        if pending.finished:
            return
        pending.finished = True
        self._count(-1)
        try:
            pending.done(result, timing)
        except Exception:  # a front door's bug must not stop the batch's other replies
            log.exception("model %r: a reply callback failed", self.name)

    def _count(self, delta: int) -> None:
        self.inflight += delta
        metrics.set_gauge(self.m_inflight, self.inflight)
        if self.board is not None:
            self.board.set(self.name, self.inflight)

    # -- request_timeout ---------------------------------------------------------------------------
    def _arm(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        self.timer = loop.call_at(loop.time() + max(0.0, deadline - time.perf_counter()), self._expire)

    def _expire(self) -> None:
        """Answer every request past its deadline with a 504, then arm the timer for the next one."""
        self.timer = None
        now = time.perf_counter()
        error = f"model {self.name!r}: no result within {self.conf.request_timeout:g}s"
        for p in self.running:
            if not p.finished and p.deadline <= now:
                self._finish(p, RequestTimeout(error), None)  # it runs on; its result will be dropped
        while self.queue and (self.queue[0].finished or self.queue[0].deadline <= now):
            self._finish(self.queue.popleft(), RequestTimeout(error), None)
        metrics.set_gauge(self.m_queued, len(self.queue))
        waiting = [p.deadline for p in self.running if not p.finished]
        if self.queue:
            waiting.append(self.queue[0].deadline)
        if waiting:
            self._arm(min(waiting))

    # -- dispatch ----------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.queue:
                batch = self._take()
                if self.device.busy and self._items(batch) < self.conf.max_batch_size and self.conf.batch_timeout > 0:
                    # the device is busy anyway: give the batch a chance to fill up
                    try:
                        await asyncio.wait_for(self.device.idle.wait(), self.conf.batch_timeout)
                    except asyncio.TimeoutError:
                        pass
                    batch += self._take(self.conf.max_batch_size - self._items(batch))
                metrics.set_gauge(self.m_queued, len(self.queue))
                batch = [p for p in batch if not p.finished]
                if not batch:
                    continue
                self.running = batch
                started = time.perf_counter()
                try:
                    cost = None if self.item_seconds is None else self.item_seconds * self._items(batch)
                    results = await self.device.run(self._run_batch, batch, cost=cost)
                except Exception as exc:  # the model itself failed: every request of the batch learns why
                    results = [exc] * len(batch)
                finally:
                    self.running = []
                compute = time.perf_counter() - started
                items = self._items(batch)
                per_item = self.batch_cpu / max(1, items)
                self.item_seconds = per_item if self.item_seconds is None else 0.8 * self.item_seconds + 0.2 * per_item
                metrics.observe(self.m_batch, items)
                for pending, result in zip(batch, results):
                    if pending.finished:
                        continue
                    if isinstance(result, BaseException):
                        self._finish(pending, result, None)
                    else:
                        metrics.observe(self.m_queue_s, started - pending.enqueued)
                        metrics.observe(self.m_compute_s, compute)
                        timing = Timing((started - pending.enqueued) * 1000, compute * 1000, items, self.worker)
                        self._finish(pending, result, timing)

    @staticmethod
    def _items(batch: list[_Pending]) -> int:
        return sum(p.size for p in batch)

    def _take(self, room: int | None = None) -> list[_Pending]:
        """Queued requests, oldest first, up to ``room`` items (at least one request)."""
        room = self.conf.max_batch_size if room is None else room
        taken: list[_Pending] = []
        while self.queue and (not taken or self.queue[0].size <= room):
            if taken and room <= 0:
                break
            p = self.queue.popleft()
            if p.finished:  # withdrawn or expired
                continue
            taken.append(p)
            room -= p.size
        return taken

    def _run_batch(self, batch: list[_Pending]) -> list[dict[str, np.ndarray] | BaseException]:
        """On the inference thread: prepare the requests, run compatible ones together, split the outputs.

        Requests whose inputs agree on names, datatypes and shapes but dim 0 (and whose parameters
        are equal) are prepared as one: their inputs concatenated, one ``prepare`` call, which the
        model contract allows (``prepare`` treats items independently). If that fails, each is
        prepared alone, so only the faulty request fails.
        """
        cpu_started = time.thread_time()
        try:
            return self._prepare_and_forward(batch)
        finally:
            self.batch_cpu = time.thread_time() - cpu_started

    def _prepare_and_forward(self, batch: list[_Pending]) -> list[dict[str, np.ndarray] | BaseException]:
        results: list[dict[str, np.ndarray] | BaseException | None] = [None] * len(batch)
        units: list[tuple[list[int], dict[str, torch.Tensor]]] = []  # (requests, their prepared tensors)
        for indices in _alike(batch):
            first = batch[indices[0]]
            if len(indices) > 1:
                try:
                    joined = {k: _concat([batch[i].inputs[k] for i in indices]) for k in first.inputs}
                    units.append((indices, self.model.prepare(joined, first.parameters)))
                    continue
                except Exception:
                    pass  # one of them is at fault: prepare each alone below
            for i in indices:
                try:
                    units.append(([i], self.model.prepare(batch[i].inputs, batch[i].parameters)))
                except Exception as exc:  # InputError: the client's fault (4xx); anything else: a bug (500, logged)
                    results[i] = exc
        groups: dict[Any, list[tuple[list[int], dict[str, torch.Tensor]]]] = {}
        for indices, prepared in units:
            parameters = batch[indices[0]].parameters
            try:
                key = (self.model.batch_key(prepared, parameters), _freeze(parameters))
            except Exception as exc:
                for i in indices:
                    results[i] = exc
                continue
            groups.setdefault(key, []).append((indices, prepared))
        for members in groups.values():
            parameters = batch[members[0][0][0]].parameters
            try:
                if len(members) == 1:
                    joined = members[0][1]
                else:
                    joined = {k: torch.cat([p[k] for _, p in members]) for k in members[0][1]}
                outputs = {k: v.numpy() for k, v in self.model.forward(joined, parameters).items()}
                offset = 0
                for indices, _ in members:
                    for i in indices:
                        n = batch[i].size
                        results[i] = {k: v[offset : offset + n] for k, v in outputs.items()}
                        offset += n
            except Exception as exc:
                for indices, _ in members:
                    for i in indices:
                        results[i] = exc
        return results  # type: ignore[return-value]


def _alike(batch: list[_Pending]) -> list[list[int]]:
    """Indices of the requests of ``batch`` that can be prepared together, in arrival order."""
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(batch):
        try:
            signature = (tuple((k, "BYTES") if isinstance(v, list) else (k, v.dtype.str, v.shape[1:])
                               for k, v in sorted(p.inputs.items())), _freeze(p.parameters))
        except (AttributeError, TypeError):
            signature = ("alone", i)
        members = groups.setdefault(signature, [])
        if members and p.parameters != batch[members[0]].parameters:  # _freeze keeps only scalars
            groups[("alone", i)] = [i]
            continue
        members.append(i)
    return list(groups.values())


def _concat(values: list[RequestTensor]) -> RequestTensor:
    if isinstance(values[0], list):
        return [item for value in values for item in value]  # type: ignore[union-attr]
    return np.concatenate(values)


def _freeze(parameters: Mapping[str, Any]) -> Any:
    try:
        return tuple(sorted((k, v) for k, v in parameters.items() if isinstance(v, (str, int, float, bool))))
    except TypeError:
        return ()

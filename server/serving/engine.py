"""Where a request runs: this worker's batcher, a peer worker that hosts the model, or several.

Any worker can take any request. A model not placed here is forwarded to the peer hosting it
with the least outstanding work (as this worker counts it); a request larger than the model's
``max_batch_size`` is split into chunks spread over every worker hosting the model and gathered
back in order (DataParallel's scatter / gather, across processes). Peers talk the ZeroMQ wire
format over ipc endpoints in the run directory; the master keeps the peer table current.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from models.base import InputError, Model, RequestTensor
from server import wire
from server.errors import BadRequest, NotFound, PeerUnavailable, RemoteError, RequestTimeout, from_status
from server.logs import log
from server.serving.batcher import Batcher, Timing, request_size
from server.serving.loadboard import PeerLoad

# A forwarded or split request's deadline at a peer (the ``peer_timeout`` directive). A dead peer
# is noticed via the master; a frozen one (SIGSTOP, a stuck event loop) only by the heartbeat, 60 s
# later, so each request bounds its own wait: inference past it is retried elsewhere (idempotent);
# a generation is retried only if the peer never accepted it. 10 s: a full DenseNet-121 batch of 8
# takes 1.5 s on one CPU core (bench/results), so a live peer answers well within it unless its
# queue is several batches deep, and a false alarm costs one duplicate computation, not an error.
PEER_TIMEOUT = 10.0

# Queueing a forward for balance must save (see Engine._less_loaded_peer). A forwarded request costs
# ~0.1-0.2 ms of CPU on each worker and a round trip; and the batch time per item that the estimate
# uses is measured on a loaded worker, so it runs high for small models (tiny model, 2 workers: a
# 1 ms threshold still forwarded 16% of requests and gained nothing). 5 ms: any model whose items
# take a millisecond or more is balanced as soon as queues differ by a handful of requests.
FORWARD_GAIN = 0.005
# The same for a relay (ZeroMQ frames passed on untouched, Engine.relay): it costs each worker
# ~50 us, so it must save more than that. With 0 the tiny model's workers relayed at every
# fluctuation of their queues while both were busy anyway; 1 ms gave 5-20% less CPU per request
# (2 workers, bench/ab.py, 13 alternating rounds) and leaves every model whose items take 0.1 ms
# or more balanced as before.
RELAY_GAIN = 0.001


class PeerTimeout(PeerUnavailable):
    """A peer did not answer in time: the request is retried elsewhere when that is safe (503 if not)."""


@dataclass
class Peer:
    key: str  # "generation:slot"
    ipc: str
    models: set[str]
    meta: dict[str, Any] = field(default_factory=dict)
    load: PeerLoad | None = None  # the peer's own count of outstanding requests per model
    socket: zmq.asyncio.Socket | None = None
    outstanding: int = 0
    # what each request id sent to this peer waits for its reply: a Future (infer), a Queue (a
    # generation stream, one reply per chunk) or a _Relay (a client's request relayed as it came)
    waiting: dict[int, asyncio.Future | asyncio.Queue | _Relay] = field(default_factory=dict)
    accepting: bool = True  # False: draining (it answers what it holds, takes nothing new)
    stalled: bool = False  # it let a request time out and has sent nothing since: picked last
    reader: asyncio.Task | None = None


class _Relay:
    """A relayed request's reply callback and its peer_timeout timer."""

    __slots__ = ("done", "timer")

    def __init__(self, done: Callable[[Any, list[Any]], None], timer: asyncio.TimerHandle) -> None:
        self.done, self.timer = done, timer


class PeerStream:
    """A generation running on a peer: its replies, one per chunk, arrive on a queue (see Engine.generate)."""

    def __init__(self, engine: Engine, peer: Peer, request_id: int, queue: asyncio.Queue, prompt_tokens: int,
                 timeout: float = PEER_TIMEOUT) -> None:
        self.engine, self.peer, self.request_id, self.queue = engine, peer, request_id, queue
        self.timeout = timeout
        self.prompt_tokens = prompt_tokens
        self.done = False

    def __aiter__(self) -> PeerStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self.done:
            raise StopAsyncIteration
        try:
            item = await asyncio.wait_for(self.queue.get(), self.timeout)
        except asyncio.TimeoutError:
            self.peer.stalled = True
            self.cancel()  # tokens may have reached the client already: no retry, an error
            raise RequestTimeout(f"peer {self.peer.key} sent nothing for {self.timeout:g}s (peer_timeout)") from None
        except BaseException:
            self.cancel()
            raise
        if isinstance(item, BaseException):
            self._end()
            if isinstance(item, PeerUnavailable):  # the peer left mid-generation (killed: a drain lets it finish)
                raise RemoteError(503, f"worker {self.peer.key} left during the generation") from None
            raise item
        header = item
        if not header.get("ok"):
            self._end()
            raise from_status(int(header.get("code", 500)), str(header.get("error", "peer failed")))
        if header.get("final"):
            self._end()
        return {k: v for k, v in header.items() if k not in ("v", "id", "ok", "final", "closing")}

    def _end(self) -> None:
        if not self.done:
            self.done = True
            if self.peer.waiting.pop(self.request_id, None) is not None:
                self.peer.outstanding -= 1

    def cancel(self) -> None:
        """Tell the peer to stop (the client went away)."""
        if self.done:
            return
        self._end()
        if self.peer.socket is not None:
            try:
                self.peer.socket.send(wire.pack({"op": "cancel", "id": self.request_id, "fwd": True}), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    async def aclose(self) -> None:
        self.cancel()


class Engine:
    def __init__(self, slot: int, generation: int, models: dict[str, Model], batchers: dict[str, Batcher],
                 meta: dict[str, dict[str, Any]], ctx: zmq.asyncio.Context, generators: dict[str, Any] | None = None,
                 peer_timeout: float = PEER_TIMEOUT, peer_timeouts: Mapping[str, float] | None = None) -> None:
        self.slot, self.generation = slot, generation
        self.models = models
        self.meta = meta
        self.batchers = batchers
        self.generators = generators or {}  # name -> server.serving.generation.GenerationEngine
        self.ctx = ctx
        self.peers: dict[str, Peer] = {}
        self.ids = itertools.count()
        self.draining = False  # set when the worker quits: new work goes to peers that are not
        self.peer_timeout = peer_timeout  # the main context's peer_timeout ...
        self.peer_timeouts = dict(peer_timeouts or {})  # ... and the models' own

    def timeout_for(self, name: str) -> float:
        """How long a request for ``name`` may wait for a peer's answer (or a generation's next chunk)."""
        return self.peer_timeouts.get(name, self.peer_timeout)

    # -- the peer table ----------------------------------------------------------------------------
    def set_peers(self, table: list[dict[str, Any]]) -> None:
        me = f"{self.generation}:{self.slot}"
        wanted = {f"{p['generation']}:{p['slot']}": p for p in table if f"{p['generation']}:{p['slot']}" != me}
        for key in list(self.peers):
            if key not in wanted:
                self._drop_peer(self.peers.pop(key), PeerUnavailable("peer left"))
        for key, p in wanted.items():
            # a draining peer (accepting: false) takes no new work, but what it holds (a relayed
            # generation) still streams back; it is dropped, its pending requests failed, when it
            # leaves the table: exit or death
            if key in self.peers:
                self.peers[key].models = set(p["models"])
            else:
                self.peers[key] = Peer(key, p["ipc"], set(p["models"]), p.get("meta", {}),
                                       PeerLoad(p["load"], p["models"]) if p.get("load") else None)
            self.peers[key].accepting = p.get("accepting", True)

    def hosts(self, name: str) -> list[Peer]:
        """Peers that take new requests for ``name`` (a draining peer still answers what it holds)."""
        return [p for p in self.peers.values() if p.accepting and name in p.models]

    def _drop_peer(self, peer: Peer, exc: BaseException) -> None:
        relayed = sum(isinstance(w, _Relay) for w in peer.waiting.values())
        if relayed:  # the peer died (or froze past the master's heartbeat) holding clients' requests
            log.warning("peer %s left (%s) with %d relayed request(s) in flight: serving them another way",
                        peer.key, exc, relayed)
        for request_id, fut in list(peer.waiting.items()):
            if isinstance(fut, asyncio.Queue):
                fut.put_nowait(exc)
            elif isinstance(fut, _Relay):
                self._end_relay(peer, request_id, exc)
            elif not fut.done():
                fut.set_exception(exc)
        if peer.reader:
            peer.reader.cancel()
        if peer.socket is not None:
            peer.socket.close(linger=0)

    def close(self) -> None:
        for peer in self.peers.values():
            self._drop_peer(peer, PeerUnavailable("worker exiting"))
        self.peers.clear()

    @property
    def outstanding(self) -> int:
        return sum(b.outstanding for b in self.batchers.values()) + sum(g.outstanding for g in self.generators.values())

    def known_models(self) -> list[str]:
        names = set(self.models)
        for peer in self.peers.values():
            if peer.accepting:
                names |= peer.models
        return sorted(names)

    def metric_label(self, name: str) -> str:
        """The model label for metrics: client-chosen names of unknown models must not create series."""
        return name if self.metadata(name) is not None else "unknown"

    def metadata(self, name: str) -> dict[str, Any] | None:
        """KServe model metadata (+ its config under "config"), for local models and peers' alike."""
        if name in self.meta:
            return self.meta[name]
        for peer in self.peers.values():
            if peer.accepting and name in peer.meta and name in peer.models:  # not a draining peer's
                return peer.meta[name]
        return None

    def generation_models(self) -> list[str]:
        """Text generation models this worker serves or can forward to (the OpenAI routes' models)."""
        names = set(self.generators)
        for peer in self.peers.values():
            if peer.accepting:
                names |= {n for n in peer.models if "generation" in peer.meta.get(n, {})}
        return sorted(names)

    # -- generation --------------------------------------------------------------------------------
    async def generate(self, name: str, request: Mapping[str, Any], forwarded: bool = False):
        """Admit one generation here or on the peer hosting ``name``; returns an async iterator of chunks.

        Errors that concern the request (400, 404, 503) are raised here, before any chunk, so a
        front door can still answer with a status. Closing the iterator (``aclose``/``cancel``)
        stops the generation wherever it runs.
        """
        gen = self.generators.get(name)
        hosts = self.hosts(name)
        if gen is None and (forwarded or not hosts):
            if name in self.models or (self.metadata(name) is not None and name not in self.generation_models()):
                raise BadRequest(f"model {name!r} does not generate text")
            raise NotFound(f"unknown model {name!r}" + ("" if forwarded else f"; known: {', '.join(self.known_models())}"))
        if gen is not None and (forwarded or not (self.draining and hosts)):
            return gen.submit(request)
        last: BaseException = PeerUnavailable(f"no worker hosting {name!r} is reachable")
        for peer in sorted(hosts, key=lambda p: (p.stalled, p.outstanding)):
            try:
                return await self._generate_on_peer(peer, name, request)
            except PeerUnavailable as exc:
                last = exc
        if gen is not None:  # draining, and no peer could take it: run it here after all
            return gen.submit(request)
        raise last

    async def _generate_on_peer(self, peer: Peer, name: str, request: Mapping[str, Any]) -> PeerStream:
        self._connect(peer)
        request_id = next(self.ids)
        queue: asyncio.Queue = asyncio.Queue()
        peer.waiting[request_id] = queue
        peer.outstanding += 1
        timeout = self.timeout_for(name)
        stream = PeerStream(self, peer, request_id, queue, 0, timeout)
        try:
            header = wire.pack({"op": "generate", "id": request_id, "model": name, "parameters": dict(request), "fwd": True})
            try:
                await asyncio.wait_for(peer.socket.send_multipart([header]), 1.0)
            except (asyncio.TimeoutError, zmq.ZMQError) as exc:
                raise PeerUnavailable(f"peer {peer.key} not reachable: {exc}") from None
            try:
                first = await asyncio.wait_for(queue.get(), timeout)
            except asyncio.TimeoutError:  # not accepted: nothing streamed yet, safe to try elsewhere
                peer.stalled = True
                stream.cancel()
                raise PeerTimeout(f"peer {peer.key} did not accept the generation within {timeout:g}s (peer_timeout)") from None
            if isinstance(first, BaseException):
                raise first
            if not first.get("ok"):
                code, message = int(first.get("code", 500)), str(first.get("error", "peer failed"))
                if code == 404:
                    raise PeerUnavailable(message)  # placement changed under us: try elsewhere
                raise from_status(code, message)
            stream.prompt_tokens = int(first.get("prompt_tokens", 0))
            return stream
        except BaseException:
            stream._end()
            raise

    # -- serving -----------------------------------------------------------------------------------
    async def infer(self, name: str, inputs: Mapping[str, RequestTensor], parameters: Mapping[str, Any],
                    forwarded: bool = False) -> tuple[dict[str, np.ndarray | list[bytes]], Timing]:
        batcher = self.batchers.get(name)
        hosts = self.hosts(name)
        if batcher is None and (forwarded or not hosts):
            raise NotFound(f"unknown model {name!r}" + ("" if forwarded else f"; known: {', '.join(self.known_models())}"))
        size = request_size(inputs)
        if isinstance(self.route(name, size, forwarded), Batcher):
            return await batcher.submit(inputs, parameters)
        if batcher is None:
            return await self._on_peers(hosts, name, inputs, parameters)
        if self.draining and hosts:  # a retiring worker takes no new work it can hand on
            try:
                return await self._on_peers(hosts, name, inputs, parameters)
            except PeerUnavailable:
                pass
        limit = batcher.conf.max_batch_size
        if size <= limit:
            peer = self._less_loaded_peer(batcher, hosts)
            if peer is not None:
                try:
                    return await self._call_peer(peer, name, inputs, parameters)
                except PeerUnavailable:
                    pass
            return await batcher.submit(inputs, parameters)
        return await self._scatter_gather(batcher, hosts, name, inputs, parameters, size, limit)

    def route(self, name: str, size: int, forwarded: bool = False) -> Batcher | Peer | None:
        """Where a request goes, decided without waiting: this worker's batcher, a less loaded peer
        (balance), or None when ``infer`` must decide (no local model, a draining worker with
        peers, a split over workers).

        The ZeroMQ door calls this to serve the common cases without a task per request.
        """
        batcher = self.batchers.get(name)
        if batcher is None or forwarded:
            return batcher
        if size > batcher.conf.max_batch_size:
            return None
        hosts = self.hosts(name)
        if not hosts:
            return batcher
        if self.draining:
            return None
        return self._less_loaded_peer(batcher, hosts, min_gain=RELAY_GAIN) or batcher

    # -- relaying ----------------------------------------------------------------------------------
    def relay(self, peer: Peer, name: str, header: dict[str, Any], payload: list[Any],
              done: Callable[[Any, list[Any]], None]) -> bool:
        """Hand a client's inference request to ``peer`` as it came: its tensor frames untouched, only
        the header's id and ``fwd`` changed. ``done(reply_header, reply_frames)`` gets the peer's
        reply as it comes (the caller answers the client with it), or ``done(exception, [])`` if
        the peer leaves or lets ``peer_timeout`` pass (PeerUnavailable: serve it another way).

        Balancing this way costs the relaying worker two sends and a receive per request, against
        a decode, an encode and a task for ``_call_peer``. False: the peer cannot take it now.
        """
        self._connect(peer)
        assert peer.socket is not None
        request_id = next(self.ids)
        # through the asyncio socket, not a plain shadow of it: a send can consume the edge of its
        # FD, and only zmq.asyncio's own send then wakes the reader waiting for the peer's replies
        # (with a plain send, DenseNet relays stalled until some other event came)
        sent = peer.socket.send_multipart([wire.pack({**header, "id": request_id, "fwd": True}), *payload],
                                          flags=wire.NOBLOCK, copy=False)
        if not sent.done() or sent.exception() is not None:  # not connected (IMMEDIATE) or its pipe is full
            if not sent.done():
                sent.cancel()
            return False
        timeout = self.timeout_for(name)
        timer = asyncio.get_running_loop().call_later(timeout, self._relay_timeout, peer, request_id, timeout)
        peer.waiting[request_id] = _Relay(done, timer)
        peer.outstanding += 1
        return True

    def _relay_timeout(self, peer: Peer, request_id: int, timeout: float) -> None:
        if not peer.stalled:  # one line per stall, not one per request it held
            log.warning("peer %s did not answer a relayed request within %gs (peer_timeout): serving it another "
                        "way; the peer is picked last until it answers again", peer.key, timeout)
        peer.stalled = True
        self._end_relay(peer, request_id, PeerTimeout(f"peer {peer.key} did not answer within {timeout:g}s (peer_timeout)"))

    def _end_relay(self, peer: Peer, request_id: int, reply: Any, frames: list[Any] | None = None) -> None:
        relay = peer.waiting.pop(request_id, None)
        if not isinstance(relay, _Relay):
            return
        peer.outstanding -= 1
        relay.timer.cancel()
        relay.done(reply, frames or [])

    def _less_loaded_peer(self, batcher: Batcher, hosts: list[Peer], min_gain: float = FORWARD_GAIN) -> Peer | None:
        """A peer to hand this request to because our queue is much deeper than its, or None.

        Per-connection balancing (shared accept, keep-alive, one client holding one connection)
        can pile requests on one worker while another idles. With one thread per worker, two
        requests on two idle workers finish sooner than a batch of two on one, so the margin is
        small: a peer with less than half our load takes the request. But forwarding costs each
        side about as much CPU as serving the request (decode, encode, two more messages), so it
        must also save real time: at least ``min_gain`` of queueing, as estimated from the
        model's measured compute per item. A model that takes microseconds per item (where the
        per-request cost is the limit) is not forwarded that way; a relay (``relay``: frames
        passed on untouched) costs less and passes ``RELAY_GAIN``.
        """
        mine = batcher.outstanding + 1  # this request included
        hosts = [p for p in hosts if not p.stalled]
        if mine < 2 or not hosts:
            return None
        best = min(hosts, key=lambda p: self._peer_load(p, batcher.name))
        theirs = self._peer_load(best, batcher.name)
        if theirs * 2 >= mine:
            return None
        item = batcher.item_seconds
        return best if item is None or (mine - theirs) * item >= min_gain else None

    @staticmethod
    def _peer_load(peer: Peer, model: str) -> int:
        published = peer.load.get(model) if peer.load is not None else PeerLoad.UNKNOWN
        return max(published, peer.outstanding)

    async def _scatter_gather(self, batcher: Batcher, hosts: list[Peer], name: str, inputs: Mapping[str, RequestTensor],
                              parameters: Mapping[str, Any], size: int, limit: int):
        """Split a request larger than max_batch_size over this worker and its peers; gather in order."""
        batcher.check_room()  # the request is admitted once; its chunks then queue without a second check
        chunks = [{k: v[i : i + limit] for k, v in inputs.items()} for i in range(0, size, limit)]
        targets: list[Peer | None] = [None, *(p for p in hosts if not p.stalled)]

        async def run(chunk, where):
            if where is None:
                return await batcher.submit(chunk, parameters, admitted=True)
            try:
                return await self._call_peer(where, name, chunk, parameters)
            except PeerUnavailable:
                return await batcher.submit(chunk, parameters, admitted=True)

        parts = await asyncio.gather(*(run(c, targets[i % len(targets)]) for i, c in enumerate(chunks)))
        outputs: dict[str, Any] = {}
        for key in parts[0][0]:
            values = [p[0][key] for p in parts]
            outputs[key] = sum(values, []) if isinstance(values[0], list) else np.concatenate(values)
        timing = Timing(max(p[1].queue_ms for p in parts), max(p[1].compute_ms for p in parts), size,
                        ",".join(sorted({p[1].worker for p in parts})))
        return outputs, timing

    async def _on_peers(self, hosts: list[Peer], name: str, inputs, parameters):
        """Forward to the least busy host; if it cannot take it, try the next one.

        The next one is chosen from the peer table as it is then: a host that left with our request
        (a reload retiring it) has usually been replaced by a new generation's by the time we learn.
        """
        last: BaseException = PeerUnavailable(f"no worker hosting {name!r} is reachable")
        tried: set[str] = set()
        while True:
            left = [p for p in self.hosts(name) if p.key not in tried] if tried else hosts
            if not left:
                raise last
            peer = min(left, key=lambda p: (p.stalled, p.outstanding))
            tried.add(peer.key)
            try:
                return await self._call_peer(peer, name, inputs, parameters)
            except PeerUnavailable as exc:
                last = exc

    def _connect(self, peer: Peer) -> None:
        if peer.socket is None:
            peer.socket = self.ctx.socket(zmq.DEALER)
            peer.socket.setsockopt(zmq.LINGER, 0)
            peer.socket.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer that is not connected
            peer.socket.connect(peer.ipc)
            peer.reader = asyncio.get_running_loop().create_task(self._read_peer(peer))

    async def _call_peer(self, peer: Peer, name: str, inputs, parameters) -> tuple[dict[str, Any], Timing]:
        self._connect(peer)
        timeout = self.timeout_for(name)
        request_id = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        peer.waiting[request_id] = fut
        peer.outstanding += 1
        try:
            frames = wire.request("infer", request_id, name, inputs, parameters)
            header = wire.unpack(frames[0])
            header["fwd"] = True
            frames[0] = wire.pack(header)
            try:
                await asyncio.wait_for(peer.socket.send_multipart(frames, copy=False), 1.0)
            except (asyncio.TimeoutError, zmq.ZMQError) as exc:
                raise PeerUnavailable(f"peer {peer.key} not reachable: {exc}") from None
            try:
                header, outputs = await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:  # frozen, or far behind: inference is idempotent, the caller retries
                peer.stalled = True
                raise PeerTimeout(f"peer {peer.key} did not answer within {timeout:g}s (peer_timeout)") from None
            if not header.get("ok"):
                code = header.get("code", 500)
                message = header.get("error", "peer failed")
                if code == 400:
                    raise InputError(message)
                if code == 404:
                    raise PeerUnavailable(message)  # placement changed under us: try elsewhere
                raise RemoteError(code, message)
            return outputs, Timing.from_wire(header.get("timing"))
        finally:
            peer.waiting.pop(request_id, None)
            peer.outstanding -= 1

    async def _read_peer(self, peer: Peer) -> None:
        try:
            while True:
                frames = await peer.socket.recv_multipart(copy=False)
                try:
                    header = wire.unpack(frames[0].buffer)
                except wire.WireError as exc:
                    log.error("bad reply from peer %s: %s", peer.key, exc)
                    continue
                peer.stalled = False  # it answers again
                request_id = header.get("id")
                fut = peer.waiting.get(request_id)
                if isinstance(fut, _Relay):  # the client gets the reply as it is
                    self._end_relay(peer, request_id, header, frames[1:])
                elif isinstance(fut, asyncio.Queue):  # a generation: every reply is a chunk
                    fut.put_nowait(header)
                elif fut is not None and not fut.done():
                    try:
                        outputs = wire.decode_tensors(header.get("outputs", []), frames[1:]) if header.get("ok") else {}
                    except (wire.WireError, InputError) as exc:  # its peer_timeout will tell the caller
                        log.error("bad reply from peer %s: %s", peer.key, exc)
                        continue
                    fut.set_result((header, outputs))
        except (asyncio.CancelledError, zmq.ZMQError):
            return

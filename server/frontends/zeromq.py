"""The ZeroMQ front door: ROUTER sockets speaking the wire format of ``server.wire``.

Each worker binds a ROUTER on the master's listening socket with ``zmq.USE_FD``, so TCP
connections spread over workers as nginx's shared accept does and the socket survives a binary
upgrade. The same handler serves the worker's internal ipc endpoint, where peers forward
requests (marked ``fwd``, never forwarded again).

Draining happens in the protocol: a draining worker still answers, marks each reply
``closing`` so clients reconnect elsewhere, and closes once it has been idle for a moment.

``generate`` is answered with a sequence of replies to one request id: an acceptance
(``accepted: true``, ``prompt_tokens``), then one reply per chunk of text, the last with
``final: true`` (an error reply also ends the stream). ``cancel`` with the same id, from the
same connection, stops it (a ZeroMQ ROUTER cannot see a client go away).

With CURVE configured (``curve_server_key_file``, ``curve_allowed_clients``), the TCP sockets
encrypt and a ZAP handler on the worker's context (pyzmq's ThreadAuthenticator) admits only the
listed client keys; libzmq drops any other handshake without a word, so such a client just
times out. The internal ipc sockets stay plain (NULL, no ZAP domain: never asked).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import zmq
import zmq.asyncio

from server import metrics, wire
from server.errors import BadRequest, NotFound, PeerUnavailable, status_of
from server.logs import access_stamp, log
from server.serving.batcher import Batcher, Timing, request_size
from server.serving.engine import Engine

ZAP_DOMAIN = "modelsrv"
POLLIN = int(zmq.POLLIN)  # a plain int: enum.Flag arithmetic shows up in per-message profiles


class ZmqServer:
    def __init__(self, engine: Engine, ctx: zmq.asyncio.Context, access: Callable[[str], None],
                 is_ready: Callable[[], bool], max_message: int,
                 curve: tuple[bytes, bytes, set[bytes]] | None = None) -> None:
        self.engine = engine
        self.curve = curve  # (server public, server secret, allowed client public keys), Z85
        self.max_message = max_message
        # plain sockets on the worker's context: the front door reads them from the event loop
        # itself (add_reader + non-blocking receives), which costs far less per message than
        # zmq.asyncio's futures (measured in docs/BENCHMARKS.md)
        self.ctx = zmq.Context.shadow(ctx.underlying)
        self.access = access
        self.is_ready = is_ready
        self.sockets: list[zmq.Socket] = []
        self.inflight = 0
        self.last_request = time.monotonic()
        self.draining = False
        self.drops, self.drop_logged = 0, 0.0
        self.streams: dict[tuple[str, bytes, bytes], asyncio.Task] = {}  # (protocol, identity, packed id) -> generation
        self.auth: Any = None  # the ZAP handler (CURVE only)
        self.recheck: set[zmq.Socket] = set()  # routers to look at again after this turn's sends

    def bind_inherited(self, sock: socket.socket, host: str, port: int) -> None:
        router = self._router()
        if self.curve is not None:
            self._secure(router)
        router.setsockopt(zmq.USE_FD, os.dup(sock.fileno()))  # libzmq owns (and closes) the duplicate
        if ":" in host:
            router.setsockopt(zmq.IPV6, 1)
            host = f"[{host}]"
        router.bind(f"tcp://{host}:{port}")
        self._serve(router, "zmq")

    def _secure(self, router: zmq.Socket) -> None:
        """CURVE server with ZAP: the authenticator must run before the bind (without a ZAP handler,
        libzmq would let any CURVE client in)."""
        assert self.curve is not None
        public, secret, allowed = self.curve
        if self.auth is None:
            from zmq.auth.thread import ThreadAuthenticator

            self.auth = ThreadAuthenticator(self.ctx, log=log)
            self.auth.start()
            self.auth.certs[ZAP_DOMAIN] = dict.fromkeys(allowed, True)
        router.curve_server = True
        router.curve_publickey = public
        router.curve_secretkey = secret
        router.zap_domain = ZAP_DOMAIN.encode()

    def bind_internal(self, endpoint: str) -> None:
        router = self._router()
        router.bind(endpoint)
        self._serve(router, "peer")

    def _router(self) -> zmq.Socket:
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)
        # a reply to a client whose pipe is full (it sends without reading) fails loudly instead
        # of being dropped in silence, as a ROUTER does by default
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # libzmq buffers a whole message before we see it: a frame over twice the body limit
        # drops the connection (memory safety); anything up to that gets a clear 413 below
        router.setsockopt(zmq.MAXMSGSIZE, min(2 * self.max_message, (1 << 63) - 1))
        router.copy_threshold = wire.COPY_THRESHOLD
        self.sockets.append(router)
        return router

    def _serve(self, router: zmq.Socket, protocol: str) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(router.FD, self._drain, router, protocol)
        loop.call_soon(self._drain, router, protocol)

    def _drain(self, router: zmq.Socket, protocol: str) -> None:
        """Take every message waiting on ``router`` (its FD is edge-triggered: read until EAGAIN)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                frames = wire.recv_frames(router)
            except zmq.Again:
                return
            except zmq.ZMQError:  # closed
                return
            self.last_request = time.monotonic()
            if len(frames) < 2:
                continue  # not even an identity and a header: nothing to answer to
            self.inflight += 1
            if not self._infer_here(router, protocol, frames):
                loop.create_task(self._handle(router, protocol, frames))

    def _infer_here(self, router: zmq.Socket, protocol: str, frames: list[Any]) -> bool:
        """The fast path: an inference this worker runs itself, queued with a reply callback, or
        relays as it came to a less loaded peer.

        No task, no future, no timer per request: the batcher calls ``_answer`` when the batch is
        done (the peer's reply reaches ``_relayed``). Anything else (another op, a split, a
        draining worker, any error) returns False and goes the general way (``_handle``), which
        also writes the error replies.
        """
        started = time.perf_counter()
        try:
            header = wire.unpack(frames[1].buffer)
            model = header.get("model")
            if header.get("op") != "infer" or not isinstance(model, str) or header.get("v", 1) != wire.VERSION:
                return False
            if sum(map(len, frames)) - len(frames[0]) > self.max_message:
                return False
            params = header.get("parameters") or {}
            if not isinstance(params, dict):
                return False
            inputs = wire.decode_tensors(header.get("inputs"), frames[2:])
            where = self.engine.route(model, request_size(inputs), protocol == "peer" and bool(header.get("fwd")))
            closing = self.draining and protocol == "zmq"
            if isinstance(where, Batcher):
                where.enqueue(inputs, params, partial(self._answer, router, protocol, frames, header.get("id"), model,
                                                      started, closing))
                return True
            if where is None:
                return False
            return self.engine.relay(where, model, header, frames[2:],
                                     partial(self._relayed, router, protocol, frames, header.get("id"), model, started,
                                             closing))
        except Exception:
            return False

    def _answer(self, router: zmq.Socket, protocol: str, frames: list[Any], request_id: Any, model: str, started: float,
                closing: bool, result: Any, timing: Timing | None) -> None:
        """The batcher's callback for a request queued by ``_infer_here``."""
        self.inflight -= 1
        extra = {"closing": True} if closing else {}
        if timing is None:
            code, reply = self._error_reply(result, request_id, extra)
        else:
            code, reply = 200, wire.reply_ok(request_id, result, timing=timing.to_wire(), **extra)
        self._log(protocol, model, code, frames, reply, started, timing)
        self._send(router, [frames[0], *reply], protocol)

    def _relayed(self, router: zmq.Socket, protocol: str, frames: list[Any], request_id: Any, model: str, started: float,
                 closing: bool, reply: Any, reply_frames: list[Any]) -> None:
        """A peer's reply to a request relayed by ``_infer_here``: to the client, under the client's id."""
        if isinstance(reply, PeerUnavailable) or (isinstance(reply, dict) and reply.get("code") == 404):
            # the peer left, froze or no longer hosts the model: serve it the general way (here or elsewhere)
            asyncio.get_running_loop().create_task(self._handle(router, protocol, frames))
            return
        self.inflight -= 1
        if isinstance(reply, BaseException):
            code, out = self._error_reply(reply, request_id, {"closing": True} if closing else {})
            timing = None
        else:
            reply["id"] = request_id
            if closing:
                reply["closing"] = True
            code = 200 if reply.get("ok") else int(reply.get("code", 500))
            timing = Timing.from_wire(reply.get("timing"))
            out = [wire.pack(reply), *reply_frames]
        self._log(protocol, model, code, frames, out, started, timing)
        self._send(router, [frames[0], *out], protocol)

    def _send(self, router: zmq.Socket, frames: list[Any], protocol: str) -> bool:
        """Send one reply; False if it was dropped (the client is gone or not reading)."""
        try:
            wire.send_frames(router, frames)
        except zmq.ZMQError as exc:  # the client is gone, or its pipe is full (send high-water mark)
            self._dropped(exc)
            return False
        # a send can consume the FD's edge for messages that arrived meanwhile: look again, once
        # for all the replies sent in this turn of the loop
        if router not in self.recheck:
            self.recheck.add(router)
            asyncio.get_running_loop().call_soon(self._recheck, router, protocol)
        return True

    def _recheck(self, router: zmq.Socket, protocol: str) -> None:
        self.recheck.discard(router)
        try:
            if router.getsockopt(zmq.EVENTS) & POLLIN:
                self._drain(router, protocol)
        except zmq.ZMQError:  # closed meanwhile
            pass

    def _error_reply(self, exc: BaseException, request_id: Any, extra: dict[str, Any]) -> tuple[int, list[Any]]:
        code = status_of(exc)
        if code == 500:  # a bug: logged with its traceback, never shown to the client
            log.error("zmq request failed", exc_info=exc)
        message = "internal server error (logged by the server)" if code == 500 else str(exc) or type(exc).__name__
        return code, wire.reply_error(request_id, code, message, **extra)

    async def _handle(self, router: zmq.Socket, protocol: str, frames: list[Any]) -> None:
        started = time.perf_counter()
        identity, header_frame, payload = frames[0], frames[1], frames[2:]
        request_id: Any = None
        model = "-"
        extra: dict[str, Any] = {"closing": True} if self.draining and protocol == "zmq" else {}
        try:
            header = wire.unpack(header_frame.buffer)
            request_id = header.get("id")
            size = sum(len(f.buffer) for f in frames[1:])  # the header too: BYTES travel inline in it
            if size > self.max_message:
                raise wire.MessageTooLarge(f"message of {size} bytes exceeds client_max_body_size {self.max_message}")
            if isinstance(header.get("v"), int) and header["v"] > wire.VERSION:
                raise wire.WireError(f"protocol version {header['v']} is newer than this server's ({wire.VERSION})")
            op = header.get("op")
            if op == "generate":
                if not isinstance(header.get("model"), str):
                    raise wire.WireError("generate needs a 'model' name (a string)")
                model = header["model"]
                forwarded = protocol == "peer" and bool(header.get("fwd"))
                code = await self._generate(router, protocol, identity, header, forwarded, extra)
                self._log(protocol, model, code, frames, [], started, None, op="generate")
                return
            if op == "cancel":
                task = self.streams.get((protocol, bytes(identity.bytes), wire.pack({"id": request_id})))
                if task is not None:
                    task.cancel()
                return  # no reply
            if op == "infer":
                if not isinstance(header.get("model"), str):
                    raise wire.WireError("infer needs a 'model' name (a string)")
                model = header["model"]
                inputs = wire.decode_tensors(header.get("inputs"), payload)
                params = header.get("parameters") or {}
                if not isinstance(params, dict):
                    raise wire.WireError("'parameters' must be a map")
                forwarded = protocol == "peer" and bool(header.get("fwd"))  # clients cannot skip routing
                outputs, timing = await self.engine.infer(model, inputs, params, forwarded=forwarded)
                reply = wire.reply_ok(request_id, outputs, timing=timing.to_wire(), **extra)
                self._log(protocol, model, 200, frames, reply, started, timing)
            else:
                reply = wire.reply_ok(request_id, **self._control(op, header), **extra)
        except Exception as exc:
            code, reply = self._error_reply(exc, request_id, extra)
            if model != "-":
                self._log(protocol, model, code, frames, reply, started, None,
                          op="generate" if header_op(frames) == "generate" else "infer")
        finally:
            self.inflight -= 1
        self._send(router, [identity, *reply], protocol)

    async def _generate(self, router: zmq.Socket, protocol: str, identity: Any, header: dict[str, Any],
                        forwarded: bool, extra: dict[str, Any]) -> int:
        """Stream one generation as replies to its id. Errors before acceptance are raised (one error reply)."""
        request_id = header.get("id")
        request = header.get("parameters") or {}
        if not isinstance(request, dict):
            raise wire.WireError("'parameters' (the generation request) must be a map")
        stream = await self.engine.generate(header["model"], request, forwarded=forwarded)
        key = (protocol, bytes(identity.bytes), wire.pack({"id": request_id}))
        task = asyncio.current_task()
        assert task is not None
        self.streams[key] = task
        try:
            self._send(router, [identity, wire.pack({"id": request_id, "ok": True, "final": False, "accepted": True,
                                                     "prompt_tokens": stream.prompt_tokens, **extra})], protocol)
            async for chunk in stream:
                final = chunk.get("finish_reason") is not None
                closing = {"closing": True} if self.draining and protocol == "zmq" else {}  # a drain may begin mid-stream
                if not self._send(router, [identity, wire.pack({"id": request_id, "ok": True, "final": final, **chunk,
                                                                **closing})], protocol):
                    return 499  # a stream with a hole in it is no use: stop generating for a client gone
            return 200
        except asyncio.CancelledError:
            return 499  # cancelled by the client: nothing more to send
        finally:
            stream.cancel()
            self.streams.pop(key, None)

    def _control(self, op: Any, header: dict[str, Any]) -> dict[str, Any]:
        if op == "live":
            return {"live": True}
        if op == "ready":
            name = header.get("model")
            if name is None:
                return {"ready": self.is_ready() and not self.draining}
            return {"ready": self.engine.metadata(name) is not None}
        if op == "models":
            return {"models": self.engine.known_models()}
        if op == "metadata":
            meta = self.engine.metadata(str(header.get("model")))
            if meta is None:
                raise NotFound(f"unknown model {header.get('model')!r}")
            return {"metadata": meta}
        raise BadRequest(f"unknown op {op!r} (infer, generate, cancel, live, ready, models, metadata)")

    def _log(self, protocol: str, model: str, code: int, frames: list[Any], reply: list[Any], started: float, timing: Any,
             op: str = "infer") -> None:
        if protocol == "zmq" and code != 499:
            metrics.observe_request(self.engine.metric_label(model), "zmq", "ok" if code == 200 else str(code),
                                    time.perf_counter() - started)
        size_in = sum(map(len, frames)) - len(frames[0])  # zmq.Frame's len() is its size in bytes
        size_out = sum(map(len, reply))  # bytes, and memoryviews cast to bytes (wire.encode_tensors)
        q, c, b = (f"{timing.queue_ms:.2f}", f"{timing.compute_ms:.2f}", timing.batch_size) if timing else ("-", "-", "-")
        self.access(f'- [{access_stamp()}] {protocol} "{op} {model}" {code} model={model} in={size_in} out={size_out} '
                    f"queue_ms={q} compute_ms={c} batch={b} rt_ms={(time.perf_counter() - started) * 1000:.2f}")

    def _dropped(self, exc: zmq.ZMQError) -> None:
        """Log dropped replies, at most once a second (a flood of them must not flood the log)."""
        self.drops += 1
        now = time.monotonic()
        if now - self.drop_logged >= 1.0:
            log.warning("zmq: %d repl%s dropped (client gone or not reading: %s)", self.drops,
                        "y" if self.drops == 1 else "ies", exc)
            self.drops, self.drop_logged = 0, now

    def idle_for(self) -> float:
        return 0.0 if self.inflight else time.monotonic() - self.last_request

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for s in self.sockets:
            loop.remove_reader(s.FD)
            s.close(linger=500)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None


def header_op(frames: list[Any]) -> Any:
    """The op of a request whose handling failed (for its access-log line)."""
    try:
        return wire.unpack(frames[1].buffer).get("op")
    except Exception:
        return None

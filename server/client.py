"""The Python client for modelsrv's ZeroMQ front door (framing: docs/PROTOCOL.md).

``Client`` is synchronous (one request at a time per client; not thread-safe), ``AsyncClient``
is for asyncio and keeps many requests in flight. Both open ``connections`` DEALER sockets:
the server balances per TCP connection, so several connections spread one client's load over
the workers. Both retry what is safe to retry — overload (503), a reply that never came, a
worker that said it is draining — with a short back-off, and raise ``ModelsrvError`` otherwise.

    from server.client import Client
    with Client("tcp://127.0.0.1:5555") as c:
        logits = c.infer("densenet121", {"images": batch})["logits"]
        for chunk in c.generate("bloom", "Once upon a time", max_tokens=32, temperature=0):
            print(chunk["text"], end="", flush=True)

``generate`` yields the chunks of a text generation as the server produces them (op ``generate``,
docs/PROTOCOL.md); closing the iterator early (``break`` out of the loop, ``close()``) sends
``cancel``, so the server frees the sequence's slot and KV cache.

A server with CURVE (docs/PROTOCOL.md, "Encryption and client keys") needs its public key and
this client's key pair, as Z85 keys or as zmq.auth certificate files:

    Client(address, curve_server_key="certs/server.key",
           curve_client_keys="certs/client.key_secret")  # or (public, secret) Z85 bytes

A key the server does not list gets no answer at all (libzmq drops the handshake): a 504 after
``timeout``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from server import wire

RETRYABLE = {503}

def curve_options(server_key: Any = None, client_keys: Any = None) -> dict[int, bytes]:
    """Socket options for a CURVE client: ``server_key`` a Z85 public key or a certificate file,
    ``client_keys`` a (public, secret) pair of Z85 keys or a secret certificate file."""
    if server_key is None and client_keys is None:
        return {}
    if server_key is None or client_keys is None:
        raise ValueError("CURVE needs both the server's public key and this client's key pair")
    import zmq.auth

    if not _is_z85(server_key):
        server_key = zmq.auth.load_certificate(os.fspath(server_key))[0]
    if isinstance(client_keys, tuple | list):
        public, secret = (k.encode() if isinstance(k, str) else bytes(k) for k in client_keys)
    else:
        public, secret = zmq.auth.load_certificate(os.fspath(client_keys))
        if not secret:
            raise ValueError(f"{client_keys}: no secret key (give the .key_secret certificate)")
    server = server_key.encode() if isinstance(server_key, str) else bytes(server_key)
    return {zmq.CURVE_SERVERKEY: server, zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret}


def _is_z85(value: Any) -> bool:
    """A 40-character Z85 key (a file name of 40 characters without a path is unlikely enough)."""
    return isinstance(value, str | bytes) and len(value) == 40 and not os.path.exists(value)


def _socket(ctx: zmq.Context, address: str, curve: Mapping[int, bytes]) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    for option, value in curve.items():
        s.setsockopt(option, value)
    s.connect(address)
    return s


class ModelsrvError(Exception):
    """The server answered with an error (``code`` as in HTTP) or never answered (code 504)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


def _generation_request(prompt: str | list[int] | None, messages: list[dict[str, Any]] | None,
                        options: dict[str, Any]) -> dict[str, Any]:
    if (prompt is None) == (messages is None):
        raise ValueError("give a prompt (text or token ids) or chat messages")
    request = {k: v for k, v in options.items() if v is not None}
    if prompt is not None:
        request["prompt"] = prompt
    else:
        request["messages"] = messages
    return request


def _chunk(header: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in header.items() if k not in ("v", "id", "ok", "final", "closing")}


def _result(header: dict[str, Any], frames: list[Any]) -> dict[str, Any]:
    if not header.get("ok"):
        raise ModelsrvError(int(header.get("code", 500)), str(header.get("error", "unknown error")))
    if "outputs" in header:
        return wire.decode_tensors(header["outputs"], frames)
    return {k: v for k, v in header.items() if k not in ("v", "id", "ok", "closing", "timing")}


class Client:
    def __init__(self, address: str = "tcp://127.0.0.1:5555", timeout: float = 30.0, retries: int = 3,
                 connections: int = 1, backoff: float = 0.05, curve_server_key: Any = None,
                 curve_client_keys: Any = None) -> None:
        self.address, self.timeout, self.retries, self.backoff = address, timeout, retries, backoff
        self.curve = curve_options(curve_server_key, curve_client_keys)
        self.ctx = zmq.Context.instance()
        self.sockets = [self._connect() for _ in range(max(1, connections))]
        self.turn = itertools.cycle(range(len(self.sockets)))
        self.ids = itertools.count()

    def _connect(self) -> zmq.Socket:
        return _socket(self.ctx, self.address, self.curve)

    def _replace(self, i: int) -> None:
        self.sockets[i].close(linger=0)
        self.sockets[i] = self._connect()

    def call(self, op: str, model: str | None = None, inputs: Mapping[str, Any] | None = None,
             parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
        last: ModelsrvError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * (2 ** (attempt - 1)))
            i = next(self.turn)
            request_id = next(self.ids)
            sock = self.sockets[i]
            sock.send_multipart(wire.request(op, request_id, model, inputs, parameters), copy=False)
            deadline = time.monotonic() + self.timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(left * 1000):
                    last = ModelsrvError(504, f"no reply from {self.address} within {self.timeout:g}s")
                    self._replace(i)  # the reply may still come: a fresh socket never sees it
                    break
                frames = sock.recv_multipart(copy=False)
                header = wire.unpack(frames[0].buffer)
                if header.get("id") != request_id:
                    continue  # a late reply to a request we gave up on
                if header.get("closing"):
                    self._replace(i)
                if not header.get("ok") and header.get("code") in RETRYABLE:
                    last = ModelsrvError(int(header["code"]), str(header.get("error")))
                    break
                return _result(header, frames[1:])
        assert last is not None
        raise last

    def infer(self, model: str, inputs: Mapping[str, np.ndarray | list[bytes]],
              parameters: Mapping[str, Any] | None = None) -> dict[str, np.ndarray | list[bytes]]:
        return self.call("infer", model, inputs, parameters)

    def generate(self, model: str, prompt: str | list[int] | None = None, *, messages: list[dict[str, Any]] | None = None,
                 **options: Any) -> Iterator[dict[str, Any]]:
        """Chunks of a generation (``text``, ``token_ids``, ``finish_reason`` on the last, ...), as produced.

        options: max_tokens, temperature, top_p, top_k, seed, repetition_penalty, stop, logprobs,
        ignore_eos, skip_special_tokens. A 503 before the generation is admitted is retried; closing
        the iterator early cancels the generation on the server. ``timeout`` bounds each wait for a chunk.
        """
        request = _generation_request(prompt, messages, options)
        last: ModelsrvError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * (2 ** (attempt - 1)))
            i = next(self.turn)
            request_id = next(self.ids)
            sock = self.sockets[i]
            sock.send_multipart([wire.pack({"op": "generate", "id": request_id, "model": model, "parameters": request})])
            header = self._next(i, request_id)
            if not header.get("ok"):
                last = ModelsrvError(int(header.get("code", 500)), str(header.get("error")))
                if header.get("code") in RETRYABLE:
                    continue
                raise last
            return self._stream(i, request_id, header)
        assert last is not None
        raise last

    def _next(self, i: int, request_id: int) -> dict[str, Any]:
        """The next reply to ``request_id`` on socket ``i`` (a timeout is a 504 reply)."""
        sock = self.sockets[i]
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(left * 1000):
                self._replace(i)
                return {"ok": False, "code": 504, "error": f"no reply from {self.address} within {self.timeout:g}s"}
            frames = sock.recv_multipart(copy=False)
            header = wire.unpack(frames[0].buffer)
            if header.get("id") == request_id:
                return header

    def _stream(self, i: int, request_id: int, first: dict[str, Any]) -> Iterator[dict[str, Any]]:
        sock = self.sockets[i]
        done = closing = False
        try:
            header = first
            while True:
                closing = closing or bool(header.get("closing"))
                if not header.get("ok"):
                    done = True
                    raise ModelsrvError(int(header.get("code", 500)), str(header.get("error")))
                if not header.get("accepted"):
                    done = bool(header.get("final"))
                    yield _chunk(header)
                    if done:
                        return
                header = self._next(i, request_id)
                if header.get("code") == 504 and not header.get("ok"):
                    done = True  # the socket was replaced: nothing to cancel on
        finally:
            if not done and self.sockets[i] is sock:
                try:
                    sock.send(wire.pack({"op": "cancel", "id": request_id}), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            if closing and self.sockets[i] is sock:
                self._replace(i)

    def live(self) -> bool:
        return bool(self.call("live").get("live"))

    def ready(self, model: str | None = None) -> bool:
        return bool(self.call("ready", model).get("ready"))

    def models(self) -> list[str]:
        return list(self.call("models")["models"])

    def metadata(self, model: str) -> dict[str, Any]:
        return self.call("metadata", model)["metadata"]

    def close(self) -> None:
        for s in self.sockets:
            s.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Connection:
    """One DEALER socket and the requests waiting on it."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, curve: Mapping[int, bytes] | None = None) -> None:
        self.socket = _socket(ctx, address, curve or {})
        self.waiting: dict[int, asyncio.Future] = {}
        self.retired = False
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                frames = await self.socket.recv_multipart(copy=False)
                header = wire.unpack(frames[0].buffer)
                if header.get("closing"):
                    self.retired = True
                target = self.waiting.get(header.get("id"))
                if isinstance(target, asyncio.Queue):  # a generation: every reply until the final one
                    target.put_nowait(header)
                    if header.get("final") or not header.get("ok"):
                        self.waiting.pop(header.get("id"), None)
                else:
                    fut = self.waiting.pop(header.get("id"), None)
                    if fut is not None and not fut.done():
                        fut.set_result((header, frames[1:]))
                if self.retired and not self.waiting:
                    break
        except (asyncio.CancelledError, zmq.ZMQError):
            pass
        finally:
            self.socket.close(linger=0)

    def close(self) -> None:
        self.reader.cancel()


class AsyncClient:
    def __init__(self, address: str = "tcp://127.0.0.1:5555", timeout: float = 30.0, retries: int = 3,
                 connections: int = 4, backoff: float = 0.05, curve_server_key: Any = None,
                 curve_client_keys: Any = None) -> None:
        self.address, self.timeout, self.retries, self.backoff = address, timeout, retries, backoff
        self.curve = curve_options(curve_server_key, curve_client_keys)
        self.n = max(1, connections)
        self.ctx = zmq.asyncio.Context.instance()
        self.conns: list[_Connection] = []
        self.ids = itertools.count()
        self.turn = itertools.count()

    def _pick(self) -> _Connection:
        if len(self.conns) < self.n:
            self.conns.append(_Connection(self.ctx, self.address, self.curve))
        i = next(self.turn) % len(self.conns)
        conn = self.conns[i]
        if conn.retired:  # the worker behind it is draining: open a new connection instead
            conn = self.conns[i] = _Connection(self.ctx, self.address, self.curve)
        return conn

    async def call(self, op: str, model: str | None = None, inputs: Mapping[str, Any] | None = None,
                   parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
        last: ModelsrvError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * (2 ** (attempt - 1)))
            conn = self._pick()
            request_id = next(self.ids)
            fut = asyncio.get_running_loop().create_future()
            conn.waiting[request_id] = fut
            await conn.socket.send_multipart(wire.request(op, request_id, model, inputs, parameters), copy=False)
            try:
                header, frames = await asyncio.wait_for(fut, self.timeout)
            except asyncio.TimeoutError:
                conn.waiting.pop(request_id, None)
                conn.retired = True
                if not conn.waiting:  # nothing else expects a reply on it: close it now
                    conn.close()
                last = ModelsrvError(504, f"no reply from {self.address} within {self.timeout:g}s")
                continue
            if not header.get("ok") and header.get("code") in RETRYABLE:
                last = ModelsrvError(int(header["code"]), str(header.get("error")))
                continue
            return _result(header, frames)
        assert last is not None
        raise last

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray | list[bytes]],
                    parameters: Mapping[str, Any] | None = None) -> dict[str, np.ndarray | list[bytes]]:
        return await self.call("infer", model, inputs, parameters)

    async def generate(self, model: str, prompt: str | list[int] | None = None, *,
                       messages: list[dict[str, Any]] | None = None, **options: Any) -> AsyncIterator[dict[str, Any]]:
        """As ``Client.generate``, an async iterator; ``aclose()`` (or leaving ``async for`` early) cancels."""
        request = _generation_request(prompt, messages, options)
        last: ModelsrvError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * (2 ** (attempt - 1)))
            conn = self._pick()
            request_id = next(self.ids)
            queue: asyncio.Queue = asyncio.Queue()
            conn.waiting[request_id] = queue
            await conn.socket.send_multipart([wire.pack({"op": "generate", "id": request_id, "model": model,
                                                         "parameters": request})])
            done = admitted = False
            try:
                while True:
                    try:
                        header = await asyncio.wait_for(queue.get(), self.timeout)
                    except asyncio.TimeoutError:
                        header = {"ok": False, "code": 504, "error": f"no reply from {self.address} within {self.timeout:g}s"}
                    if not header.get("ok"):
                        done = True
                        last = ModelsrvError(int(header.get("code", 500)), str(header.get("error")))
                        if header.get("code") in RETRYABLE and attempt < self.retries and not admitted:
                            break
                        raise last
                    if header.get("accepted"):
                        admitted = True  # from here on an error is the answer: tokens may have been seen
                        continue
                    done = bool(header.get("final"))
                    yield _chunk(header)
                    if done:
                        return
            finally:
                conn.waiting.pop(request_id, None)
                if not done:
                    try:
                        await conn.socket.send_multipart([wire.pack({"op": "cancel", "id": request_id})])
                    except zmq.ZMQError:
                        pass
        assert last is not None
        raise last

    async def live(self) -> bool:
        return bool((await self.call("live")).get("live"))

    async def models(self) -> list[str]:
        return list((await self.call("models"))["models"])

    async def ready(self, model: str | None = None) -> bool:
        return bool((await self.call("ready", model)).get("ready"))

    async def metadata(self, model: str) -> dict[str, Any]:
        return (await self.call("metadata", model))["metadata"]

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.conns.clear()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

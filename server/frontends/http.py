"""The HTTP front door: KServe v2 (+ Triton's binary extension), OpenAI-compatible generation, health, metadata, /metrics.

An ``asyncio.Protocol`` with httptools for parsing (measured fastest here: 59k req/s against
24k for aiohttp and 11k for Starlette on uvicorn); the routes are ours. Keep-alive and
pipelining (answered in order), ``client_max_body_size`` (413), gzip/deflate both ways. Hostile
or broken clients are bounded as nginx bounds them (docs/OPERATIONS.md, "Limits"): a head that
never ends (431 at 88 KiB, counted while it is fed, since httptools buffers an unfinished header
line), ``client_header_timeout``, ``client_body_timeout`` and ``keepalive_timeout`` (408 or a
close), ``send_timeout`` for a client that stops reading (the transport's flow control pauses
reading and replies meanwhile), ``worker_connections`` (idle connections reused), large JSON
parsed off the event loop after admission, and Bearer tokens (``auth_token_file``, 401).

Streamed replies (OpenAI ``stream: true``) go out with chunked transfer encoding, one chunk per
server-sent event, written as each is produced; the connection stays usable afterwards. A
client that disconnects while a generation runs for it (streamed or not) cancels it: the
sequence leaves the batch and its KV blocks are freed at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import signal
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httptools

from server import metrics
from server.errors import (
    BadRequest,
    ClientTimeout,
    HeadersTooLarge,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServeError,
    Unauthorized,
    UriTooLong,
    status_of,
)
from server.frontends import kserve, openai
from server.logs import access_stamp, log
from server.serving.engine import Engine

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           413: "Payload Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout"}
MAX_URL = 8 << 10  # bytes of request target
MAX_HEADERS = 64 << 10  # bytes of header names and values together
MAX_HEAD = MAX_URL + MAX_HEADERS + (16 << 10)  # bytes fed while a request line and headers are unfinished
HEAD_SLICE = 16 << 10  # unfinished heads are fed to the parser in slices of this, counted between slices
PIPELINE_MAX = 16  # requests read ahead of their answers before reading pauses
BIG_JSON = 8 << 20  # JSON bodies at least this large are parsed in the helper process, one at a time per worker
BIG_REPLY = 1 << 18  # replies of at least this many values are serialized on a thread
FD_RESERVE = 32  # descriptors kept free beside HTTP connections (ZeroMQ, peers, logs, the JSON helper)
CONNECTIONS_LOG_EVERY = 10.0  # seconds between two "worker_connections are not enough" lines
HEALTH_PREFIX = "/v2/health/"  # open to probes without a token
FIRST_REQUEST_GRACE = 1.0  # seconds a just-accepted connection may stay silent while draining
MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/config)?$")
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    client: str
    started: float
    error: ServeError | None = None  # found while reading it: answered in its turn, then the connection closes
    model: str = "-"  # the model a generation route names in its body


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    model: str = "-"
    timing: Any = None
    stream: AsyncIterator[bytes] | None = None  # a chunked reply: body is ignored, each item is written as it comes


def json_response(status: int, doc: Any, **kw: Any) -> Response:
    return Response(status, json.dumps(doc, separators=(",", ":")).encode(), **kw)


def error_response(status: int, message: str, openai_shape: bool = False, **kw: Any) -> Response:
    headers: tuple[tuple[str, str], ...] = ()
    if status == 503:
        headers = (("Retry-After", "1"),)
    elif status == 401:
        headers = (("WWW-Authenticate", 'Bearer realm="modelsrv"'),)
    doc = openai.error_body(status, message) if openai_shape else {"error": message}
    return json_response(status, doc, headers=headers, **kw)


class JsonParser:
    """Large KServe JSON bodies are parsed in a helper process, not on the worker's threads.

    ``json.loads`` holds the GIL for a whole document (seconds for tens of MB), so a thread would
    not spare the event loop: health checks would wait behind it. The helper (forkserver: a fresh
    interpreter importing only kserve and numpy, never torch) parses one body at a time and sends
    back the tensors; it is replaced after ``RECYCLE`` bodies so that its memory is returned. If
    it cannot run, bodies are parsed on a thread instead.
    """

    RECYCLE = 32
    pool: Any = None

    @classmethod
    def close(cls) -> None:
        """Stop the helper (the worker exits with os._exit: no atexit would)."""
        if cls.pool is not None:
            cls.pool.shutdown(wait=False, cancel_futures=True)
            cls.pool = None
            # multiprocessing's forkserver outlives the worker otherwise (found orphaned after test
            # runs): stop it too. Private attribute, so look it up defensively.
            from multiprocessing import forkserver

            pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    @classmethod
    async def parse(cls, body: bytes, length: int | None) -> kserve.InferRequest:
        loop = asyncio.get_running_loop()
        from concurrent.futures.process import BrokenProcessPool

        if cls.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["server.frontends.kserve"])
            from server.processes.preload import exit_with

            cls.pool = ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=cls.RECYCLE,
                                           initializer=exit_with, initargs=(os.getpid(),))
        try:
            return await loop.run_in_executor(cls.pool, kserve.parse_request, body, length)
        except (BrokenProcessPool, OSError) as exc:
            log.warning("JSON parser process failed (%s): parsing on a thread", exc)
            cls.pool = None
            return await loop.run_in_executor(None, kserve.parse_request, body, length)


class HttpServer:
    """Routes of one worker; one HttpConnection per TCP connection."""

    def __init__(self, engine: Engine, config, access: Callable[[str], None], is_ready: Callable[[], bool]) -> None:
        self.engine = engine
        self.max_body = config.client_max_body_size
        self.body_timeout = config.client_body_timeout
        self.header_timeout = config.client_header_timeout
        self.send_timeout = config.send_timeout
        self.keepalive_timeout = config.keepalive_timeout
        self.worker_connections = self._connection_cap(config.worker_connections)
        self.tokens = tuple(t.encode() for t in config.auth_tokens)
        self.auth_metrics = config.auth_metrics
        self.parse_lock = asyncio.Lock()  # one large JSON body parsed at a time: bounded memory
        self.parsing: dict[str, int] = {}  # per model: large JSON bodies waiting for (or in) their parse
        self.connections_logged = {True: -CONNECTIONS_LOG_EVERY, False: -CONNECTIONS_LOG_EVERY}  # rate limit per kind
        self.access = access
        self.is_ready = is_ready
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self.started = int(time.time())

    def protocol(self) -> HttpConnection:
        return HttpConnection(self)

    def drain(self) -> None:
        """Stop keep-alive: idle connections close now, busy ones after their last answer."""
        self.draining = True
        for conn in list(self.connections):
            conn.close_if_idle()

    @property
    def busy(self) -> int:
        return sum(1 for c in self.connections if c.busy)

    @staticmethod
    def _connection_cap(wanted: int) -> int:
        """worker_connections, lowered to what the descriptor limit leaves (nginx warns the same way):
        past the limit libuv would accept and drop connections silently, probes included."""
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        try:
            held = len(os.listdir("/proc/self/fd"))
        except OSError:
            held = 64
        room = max(2, soft - held - FD_RESERVE) if soft != resource.RLIM_INFINITY else wanted
        if wanted > room:
            log.warning("%d worker_connections exceed open file resource limit: %d (%d descriptors in use): "
                        "serving at most %d connections", wanted, soft, held, room)
            return room
        return wanted

    def admit(self, conn: HttpConnection) -> bool:
        """Room for one more connection: past worker_connections, idle ones (keep-alive, or not yet
        sent a request) are closed, oldest first, as nginx reuses them; without any, refuse."""
        if len(self.connections) < self.worker_connections:
            return True
        idle = sorted((c for c in self.connections if not c.busy), key=lambda c: c.last_active)
        excess = len(self.connections) - self.worker_connections + 1
        for c in idle[:excess]:
            self.connections.discard(c)
            c._close()
        ok = len(self.connections) < self.worker_connections
        now = time.monotonic()
        if now - self.connections_logged[ok] >= CONNECTIONS_LOG_EVERY:
            self.connections_logged[ok] = now
            if ok:
                log.warning("%d worker_connections are not enough, reusing connections", self.worker_connections)
            else:
                log.error("%d worker_connections are not enough: a connection from %s was closed",
                          self.worker_connections, conn.client)
        return ok

    def authorized(self, path: str, authorization: str) -> bool:
        """Whether a request may go on: no tokens configured, an open route, or a known Bearer token."""
        if not self.tokens or path.startswith(HEALTH_PREFIX) or (path == "/metrics" and not self.auth_metrics):
            return True
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode("latin-1")
        found = False
        for t in self.tokens:  # every token compared, in constant time: no early exit tells which one is close
            found |= hmac.compare_digest(t, given)
        return found

    # -- routes ---------------------------------------------------------------------------------
    async def handle(self, req: Request) -> Response:
        path = req.path.split("?", 1)[0]
        if path == "/v2/health/live":
            return json_response(200, {"live": True})
        if path == "/v2/health/ready":
            ready = self.is_ready() and not self.draining
            return json_response(200 if ready else 503, {"ready": ready})
        if path == "/v2":
            from server import __version__

            return json_response(200, {"name": "modelsrv", "version": __version__,
                                       "extensions": ["binary_tensor_data", "model_configuration"]})
        if path == "/metrics":
            return Response(200, metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")
        if path in ("/v2/models", "/v2/repository/index"):
            return json_response(200, [{"name": n, "state": "READY"} for n in self.engine.known_models()])
        if path == "/v1/models":
            return json_response(200, openai.models_list(self.engine.generation_models(), self.started))
        if path in GENERATION_ROUTES:
            if req.method != "POST":
                raise MethodNotAllowed(f"{path} takes POST")
            return await self.generate(path, req)
        m = MODEL_ROUTE.match(path)
        if not m:
            raise NotFound(f"no route for {req.method} {path}")
        name, version, action = m.group(1), m.group(2) or "1", m.group(3) or ""
        if action == "/infer":
            if req.method != "POST":
                raise MethodNotAllowed("infer takes POST")
            return await self.infer(name, version, req)
        if req.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"{path} takes GET")
        meta = self.engine.metadata(name)
        if meta is None:
            raise NotFound(f"unknown model {name!r}")
        if action == "/ready":
            return json_response(200, {"name": name, "ready": True}, model=name)
        if action == "/config":
            return json_response(200, meta["config"], model=name)
        return json_response(200, {k: v for k, v in meta.items() if k not in ("config", "generation")}, model=name)

    async def generate(self, path: str, req: Request) -> Response:
        """OpenAI completions / chat completions: every prompt admitted first (errors before any byte), then run."""
        doc = openai.parse_json(req.body)
        parsed = openai.parse_chat(doc) if path == "/v1/chat/completions" else openai.parse_completion(doc)
        req.model = parsed.model
        streams: list[Any] = []
        try:
            for r in parsed.requests:
                streams.append(await self.engine.generate(parsed.model, r))
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        if parsed.stream:
            return Response(200, b"", content_type="text/event-stream; charset=utf-8", model=parsed.model,
                            headers=(("Cache-Control", "no-cache"),), stream=openai.stream_events(parsed, streams))
        return json_response(200, await openai.complete(parsed, streams), model=parsed.model)

    async def infer(self, name: str, version: str, req: Request) -> Response:
        header_length = req.headers.get("inference-header-content-length")
        try:
            length = int(header_length) if header_length is not None else None
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length {header_length!r} is not a number") from None
        # admission first: an unknown model or a full queue is refused before the (costly) parse
        if self.engine.metadata(name) is None:
            raise NotFound(f"unknown model {name!r}; known: {', '.join(self.engine.known_models())}")
        batcher = self.engine.batchers.get(name)
        local_only = batcher is not None and not self.engine.hosts(name)
        if local_only:
            batcher.check_room()
        loop = asyncio.get_running_loop()
        if (length if length is not None else len(req.body)) >= BIG_JSON:
            # a large JSON document costs seconds of CPU and several times its size in memory: in the
            # helper process (the loop keeps answering), one at a time; requests waiting for their
            # parse count against the model's queue, so a flood still gets its 503s at once
            if batcher is not None and len(batcher.queue) + self.parsing.get(name, 0) >= batcher.conf.max_queue_size:
                raise Overloaded(f"model {name!r}: queue full ({batcher.conf.max_queue_size} requests, "
                                 f"{self.parsing[name]} waiting for their JSON to be parsed)")
            self.parsing[name] = self.parsing.get(name, 0) + 1
            try:
                async with self.parse_lock:
                    parsed = await JsonParser.parse(req.body, length)
            finally:
                self.parsing[name] -= 1
        else:
            parsed = kserve.parse_request(req.body, length)
        outputs, timing = await self.engine.infer(name, parsed.inputs, parsed.parameters)
        values = sum(getattr(v, "size", 0) if not isinstance(v, list) else len(v) for v in outputs.values())
        if values >= BIG_REPLY:
            body, json_length = await loop.run_in_executor(None, kserve.build_response, name, version, parsed, outputs)
        else:
            body, json_length = kserve.build_response(name, version, parsed, outputs)
        headers = (("Inference-Header-Content-Length", str(json_length)),) if json_length is not None else ()
        content_type = "application/octet-stream" if json_length is not None else "application/json"
        return Response(200, body, content_type=content_type, headers=headers, model=name, timing=timing)


class HttpConnection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[Request] = deque()
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.client = "-"
        self.opened = time.monotonic()
        self.served = 0
        self.callback_error: ServeError | None = None
        self.generating = False  # a generation runs for the request being served: a disconnect cancels it
        self.writable = asyncio.Event()
        self.writable.set()
        self.send_timer: asyncio.TimerHandle | None = None
        self.failed = False  # the parser gave up: nothing more is read on this connection
        self.last_active = self.opened
        self.head_done = False  # the current request's line and headers are complete
        self.head_bytes = 0  # bytes fed while they were not
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.header_bytes = 0
        self.head_bytes = 0
        self.head_done = False
        self.body = bytearray()
        self.in_message = False

    @property
    def busy(self) -> bool:
        return self.in_message or bool(self.pending) or (self.task is not None and not self.task.done())

    # -- transport events -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else "-"
        if not self.server.admit(self):
            self.closing = True
            transport.abort()
            return
        self.server.connections.add(self)
        self._arm(self.server.header_timeout, self._idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        self._disarm()
        self._disarm_send()
        self.parser = None  # type: ignore[assignment]  # what httptools holds of an unfinished head
        self.body = bytearray()
        self.writable.set()
        # a request already handed to a batcher still runs to completion; its answer is dropped. A
        # generation is cancelled instead: it would hold a slot and KV blocks for nobody
        if self.generating and self.task is not None and not self.task.done():
            self.task.cancel()

    def pause_writing(self) -> None:
        """The transport's buffer is above its high-water mark: the client reads slower than we write.
        Stop reading (no more requests pile up), stop writing (streams wait), and start send_timeout."""
        self.writable.clear()
        self._update_reading()
        self._arm_send()

    def resume_writing(self) -> None:
        self.writable.set()
        self._disarm_send()
        self._update_reading()

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        want = not self.failed and self.writable.is_set() and len(self.pending) < PIPELINE_MAX
        if want and not t.is_reading():
            t.resume_reading()
        elif not want and t.is_reading():
            t.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self.failed or self.parser is None:
            return
        self.last_active = time.monotonic()
        try:
            if self.head_done:
                self.parser.feed_data(data)
                return
            # an unfinished head is fed in slices and counted: httptools keeps a header line that has
            # not ended yet in memory, so the bound must hold before any callback could check it
            view = memoryview(data)
            for start in range(0, len(view), HEAD_SLICE):
                if self.failed:
                    return
                if self.head_done:
                    self.parser.feed_data(view[start:])
                    return
                piece = view[start : start + HEAD_SLICE]
                self.parser.feed_data(piece)
                if not self.head_done and not self.failed:
                    self.head_bytes += len(piece)
                    if self.head_bytes > MAX_HEAD:
                        self._fail(HeadersTooLarge(f"request line and headers longer than {MAX_HEAD} bytes"))
                        return
        except httptools.HttpParserUpgrade:
            self._fail(BadRequest("protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            # an error raised in a callback reaches us wrapped by the parser
            self._fail(self.callback_error or BadRequest(f"malformed HTTP: {exc}"))

    # -- parser callbacks -------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._reset()
        self.in_message = True
        self._arm(self.server.header_timeout, self._header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL:
            self.url = self.url[:200] + b"..."
            self._callback_fails(UriTooLong(f"request target longer than {MAX_URL} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADERS:
            self._callback_fails(HeadersTooLarge(f"request headers longer than {MAX_HEADERS} bytes"))
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.head_bytes = 0
        self._arm(self.server.body_timeout, self._body_timeout)
        if self.server.tokens and not self.server.authorized(self.url.decode("latin-1").split("?", 1)[0],
                                                             self.headers.get("authorization", "")):
            # refused before its body is read: an unauthenticated client cannot make us buffer anything
            self._callback_fails(Unauthorized("a valid 'Authorization: Bearer <token>' header is required"))
        length = self.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body:
            self._callback_fails(PayloadTooLarge(f"body of {length} bytes exceeds client_max_body_size {self.server.max_body}"))
        if self.headers.get("expect", "").lower() == "100-continue":  # curl asks this for large bodies
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > self.server.max_body:
            self._callback_fails(PayloadTooLarge(f"body exceeds client_max_body_size {self.server.max_body}"))

    def _callback_fails(self, error: ServeError) -> None:
        self.callback_error = error
        raise error

    def on_message_complete(self) -> None:
        self._disarm()
        self.in_message = False
        self.head_done = False  # what follows is the next request's head
        body = bytes(self.body)
        self.body = bytearray()  # one copy of a large body held, not two
        encoding = self.headers.get("content-encoding", "").lower()
        req = Request(self.parser.get_method().decode(), self.url.decode("latin-1"), self.headers, body,
                      self.parser.should_keep_alive() and self.server.keepalive_timeout > 0, self.client,
                      time.perf_counter())
        if encoding in ("gzip", "deflate"):
            try:
                req.body = self._decompress(body, encoding)
            except zlib.error as exc:
                req.error = BadRequest(f"cannot decode the body: {exc}")
            except ServeError as exc:
                req.error = exc
        elif encoding not in ("", "identity"):
            req.error = BadRequest(f"unsupported Content-Encoding {encoding!r}")
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        if req.error is not None:  # nothing after it on this connection will be read
            req.keep_alive = False
            self.failed = True
        self.pending.append(req)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._serve())
        self._update_reading()  # a client pipelining too far ahead waits for its answers

    def _decompress(self, body: bytes, encoding: str) -> bytes:
        d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        out = d.decompress(body, self.server.max_body + 1)
        if len(out) > self.server.max_body or d.unconsumed_tail:
            raise PayloadTooLarge(f"decompressed body exceeds client_max_body_size {self.server.max_body}")
        return out

    # -- serving ---------------------------------------------------------------------------------
    async def _serve(self) -> None:
        while self.pending and not self.closing:
            if not self.writable.is_set():  # the client is not reading its answers: none are added meanwhile
                await self.writable.wait()
                if self.closing:
                    break
            req = self.pending.popleft()
            self._update_reading()
            self.generating = req.path.split("?", 1)[0] in GENERATION_ROUTES
            try:
                response = await self._respond(req)
                close = not req.keep_alive or (self.server.draining and not self.pending)
                if response.stream is not None:
                    await self._write_stream(req, response, close)
                    if self.server.draining and not self.closing and not self.pending:
                        self._close()
                else:
                    self._write(req, response, close=close)
            except asyncio.CancelledError:
                return  # the client went away mid-generation: nothing to answer
            finally:
                self.generating = False
        if not self.closing:
            if self.in_message:  # the next request is arriving: its header or body timeout, not the idle one
                self._arm_message()
            elif self.server.draining:
                self._close()
            else:
                self._arm(self.server.keepalive_timeout or self.server.body_timeout, self._idle_timeout)

    async def _respond(self, req: Request) -> Response:
        model = "-"
        path = req.path.split("?", 1)[0]
        try:
            m = MODEL_ROUTE.match(path)
            model = m.group(1) if m else "-"
            if req.error is not None:
                raise req.error
            response = await self.server.handle(req)
        except Exception as exc:
            response = self._error(req, exc, model if model != "-" else req.model)
        if (model != "-" and req.path.endswith("/infer")) or path in GENERATION_ROUTES:
            outcome = "ok" if response.status == 200 else str(response.status)
            label = self.server.engine.metric_label(model if model != "-" else req.model)
            metrics.observe_request(label, "http", outcome, time.perf_counter() - req.started)
        return response

    @staticmethod
    def _error(req: Request, exc: Exception, model: str) -> Response:
        """The one place an HTTP request's exception becomes a reply; a 500 is a bug: logged, not shown."""
        status = status_of(exc)
        shape = req.path.startswith("/v1/")
        if status == 500:
            log.error("request %s %s failed", req.method, req.path, exc_info=exc)
            return error_response(500, "internal server error (logged by the server)", shape, model=model)
        return error_response(status, str(exc) or type(exc).__name__, shape, model=model)

    def _write(self, req: Request, response: Response, close: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        body = response.body
        headers = [("Content-Type", response.content_type), *response.headers]
        accept = req.headers.get("accept-encoding", "")
        if len(body) > 1024 and ("gzip" in accept or "deflate" in accept):
            gzip = "gzip" in accept
            c = zlib.compressobj(wbits=31 if gzip else 15)
            body = c.compress(body) + c.flush()
            headers.append(("Content-Encoding", "gzip" if gzip else "deflate"))
        headers.append(("Content-Length", str(len(body))))
        if close:
            headers.append(("Connection", "close"))
        head = f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        self.transport.write(head.encode("latin-1") + (b"" if req.method == "HEAD" else body))
        self.served += 1
        self._access(req, response, len(body))
        if close:
            self._close()

    async def _write_stream(self, req: Request, response: Response, close: bool) -> None:
        """A chunked reply: each item of ``response.stream`` goes out as one chunk as soon as it is produced."""
        stream = response.stream
        assert stream is not None
        sent = 0
        try:
            if self.transport is None or self.transport.is_closing():
                return
            headers = [("Content-Type", response.content_type), *response.headers, ("Transfer-Encoding", "chunked")]
            if close:
                headers.append(("Connection", "close"))
            head = f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
            self.transport.write(head.encode("latin-1"))
            if req.method == "HEAD":
                return
            async for data in stream:
                if self.closing:
                    break
                if data:
                    self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
                    sent += len(data)
                if not self.writable.is_set():  # a slow reader: wait instead of buffering its events
                    await self.writable.wait()
            if not self.closing:
                self.transport.write(b"0\r\n\r\n")
        finally:
            await stream.aclose()
            self.served += 1
            self._access(req, response, sent)
        if close:
            self._close()

    def _access(self, req: Request, response: Response, sent: int) -> None:
        t = response.timing
        queue_ms, compute_ms, batch = (f"{t.queue_ms:.2f}", f"{t.compute_ms:.2f}", t.batch_size) if t else ("-", "-", "-")
        rt = (time.perf_counter() - req.started) * 1000
        self.server.access(
            f'{req.client} [{access_stamp()}] http "{req.method} {req.path}" {response.status} model={response.model} '
            f"in={len(req.body)} out={sent} queue_ms={queue_ms} compute_ms={compute_ms} batch={batch} rt_ms={rt:.2f}"
        )

    def _fail(self, error: ServeError) -> None:
        """The parser cannot go on: answer after what is already queued, then close."""
        self._disarm()
        self.in_message = False
        self.failed = True
        self.body = bytearray()
        self.parser = None  # type: ignore[assignment]  # and with it what it held of an unfinished head
        req = Request("-", self.url.decode("latin-1") or "-", self.headers, b"", False, self.client,
                      time.perf_counter(), error)
        self._enqueue(req)

    # -- timers and closing ----------------------------------------------------------------------
    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(delay, callback)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _arm_message(self) -> None:
        if self.head_done:
            self._arm(self.server.body_timeout, self._body_timeout)
        else:
            self._arm(self.server.header_timeout, self._header_timeout)

    def _arm_send(self) -> None:
        self._disarm_send()
        if self.transport is not None:
            size = self.transport.get_write_buffer_size()
            self.send_timer = asyncio.get_running_loop().call_later(self.server.send_timeout, self._send_check, size)

    def _disarm_send(self) -> None:
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def _send_check(self, size: int) -> None:
        """send_timeout: the reply made no progress (its buffer did not shrink) for that long: drop it."""
        self.send_timer = None
        t = self.transport
        if t is None or self.transport.get_write_buffer_size() == 0:
            return
        now = t.get_write_buffer_size()
        if now < size:
            self._arm_send()
            return
        log.info("client %s timed out (send_timeout %gs): %d bytes of reply unsent, connection closed",
                 self.client, self.server.send_timeout, now)
        self.closing = True
        self._disarm()
        self.server.connections.discard(self)
        t.abort()  # frees the buffered reply now; connection_lost cancels a generation that runs for it

    def _idle_timeout(self) -> None:
        if self.in_message:  # a request started meanwhile: hold it to its header or body timeout
            self._arm_message()
        elif not self.busy:
            self._close()

    def _header_timeout(self) -> None:
        if self.in_message and not self.head_done:
            self._fail(ClientTimeout(f"request line and headers not received within client_header_timeout "
                                     f"({self.server.header_timeout:g}s)"))

    def _body_timeout(self) -> None:
        if self.in_message:
            self._fail(ClientTimeout(f"request not received within client_body_timeout ({self.server.body_timeout:g}s)"))

    def close_if_idle(self) -> None:
        """Close unless busy; a connection that has not sent its first request yet gets a second to do so."""
        fresh = not self.served and time.monotonic() - self.opened < FIRST_REQUEST_GRACE
        if not self.busy and not fresh:
            self._close()

    def _close(self) -> None:
        self.closing = True
        self._disarm()
        if self.transport is not None and not self.transport.is_closing():
            if self.transport.get_write_buffer_size() and self.send_timer is None:
                self._arm_send()  # close() waits for the buffer to drain: bounded by send_timeout
            self.transport.close()

"""The load generator: a separate process, driven by JSON lines on stdin, one result line per command.

    {"op": "run", "kind": "zmq" | "zmq-raw" | "http", ...}  ->  {"rps": ..., "ips": ..., "p50_ms": ..., ...}

Closed loop: ``concurrency`` requests are kept in flight for ``warmup + duration`` seconds; only
requests that complete inside the measured window count (throughput and latency percentiles).
Every run is bounded by ``max_requests`` and by a drain timeout. The client's own CPU use over
the window (``client_cpu``, in cores) is reported, so a saturated client shows.

- ``zmq``: server/client.py's AsyncClient with ``connections`` DEALER sockets (the product's client).
- ``zmq-raw``: bare pyzmq DEALER sockets in one synchronous poll loop (the lightest possible
  client; tells the server's ceiling apart from the Python client's).
- ``http``: keep-alive HTTP/1.1 over raw asyncio protocols (uvloop), one connection per
  in-flight request; body either KServe v2 binary (``format: kserve``, modelsrv) or JSON with
  base64 tensor data (``format: json``, alias ``litserve``; the peers: LitServe, FastAPI,
  TorchServe), POSTed to ``path`` (default ``/predict``).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import resource
import sys
import time
import traceback
from typing import Any

import msgpack
import numpy as np
import zmq

KSERVE = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32",
          np.dtype(np.uint8): "UINT8", np.dtype(np.float64): "FP64"}


def cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_inputs(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: np.ascontiguousarray(z[k]) for k in z.files}


class Window:
    """Counts completions inside [start, end] and the client's CPU seconds over it."""

    def __init__(self, warmup: float, duration: float, items: int) -> None:
        self.t0 = time.perf_counter()
        self.start = self.t0 + warmup
        self.end = self.start + duration
        self.items = items
        self.latencies: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self.issued = 0
        self.cpu_start: float | None = None
        self.cpu_end: float | None = None

    def mark_start(self) -> None:
        self.cpu_start = cpu_now()

    def mark_end(self) -> None:
        self.cpu_end = cpu_now()

    def tick(self, now: float) -> None:
        if self.cpu_start is None and now >= self.start:
            self.cpu_start = cpu_now()
        if self.cpu_end is None and now >= self.end:
            self.cpu_end = cpu_now()

    def done(self, sent: float, now: float, ok: bool, why: str = "") -> None:
        if not ok:
            self.errors += 1
            if len(self.error_samples) < 3:
                self.error_samples.append(why[:300])
            return
        if self.start <= now <= self.end:
            self.latencies.append(now - sent)

    def result(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        n = len(lat)
        window = self.end - self.start

        def pct(q: float) -> float:
            if not n:
                return float("nan")
            return lat[max(0, min(n - 1, int(round(q / 100 * n + 0.5)) - 1))] * 1000

        cpu = (self.cpu_end - self.cpu_start) if self.cpu_start is not None and self.cpu_end is not None else float("nan")
        return {"requests": n, "rps": n / window, "ips": n * self.items / window, "p50_ms": pct(50),
                "p99_ms": pct(99), "mean_ms": (sum(lat) / n * 1000) if n else float("nan"),
                "errors": self.errors, "error_samples": self.error_samples, "issued": self.issued,
                "window_s": window, "client_cpu": cpu / window}


# -- ZeroMQ with the product's AsyncClient ---------------------------------------------------------
async def run_zmq(cmd: dict[str, Any], inputs: dict[str, np.ndarray], items: int) -> dict[str, Any]:
    from server.client import AsyncClient, ModelsrvError

    w = Window(cmd["warmup"], cmd["duration"], items)
    limit = cmd["max_requests"]
    model = cmd["model"]
    client = AsyncClient(cmd["address"], timeout=cmd.get("timeout", 60.0), retries=3, connections=cmd["connections"])
    loop = asyncio.get_running_loop()
    loop.call_later(w.start - time.perf_counter(), w.mark_start)
    loop.call_later(w.end - time.perf_counter(), w.mark_end)

    async def one() -> None:
        while w.issued < limit:
            sent = time.perf_counter()
            if sent >= w.end:
                return
            w.issued += 1
            try:
                await client.infer(model, inputs)
                w.done(sent, time.perf_counter(), True)
            except ModelsrvError as exc:
                w.done(sent, time.perf_counter(), False, str(exc))

    tasks = [asyncio.ensure_future(one()) for _ in range(cmd["concurrency"])]
    _, pending = await asyncio.wait(tasks, timeout=w.end - time.perf_counter() + cmd.get("drain_timeout", 60.0))
    for t in pending:
        t.cancel()
    client.close()
    res = w.result()
    res["unfinished"] = len(pending)
    return res


# -- ZeroMQ with bare pyzmq sockets ----------------------------------------------------------------
def run_zmq_raw(cmd: dict[str, Any], inputs: dict[str, np.ndarray], items: int) -> dict[str, Any]:
    from server import wire

    ctx = zmq.Context.instance()
    socks = []
    for _ in range(cmd["connections"]):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(cmd["address"])
        socks.append(s)
    descs, frames = wire.encode_tensors(inputs)
    frames = [bytes(f) for f in frames]
    base = {"v": 1, "op": "infer", "model": cmd["model"], "inputs": descs}
    ids = itertools.count()
    sent_at: dict[int, float] = {}
    w = Window(cmd["warmup"], cmd["duration"], items)
    limit = cmd["max_requests"]
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)

    def send(s: zmq.Socket) -> None:
        i = next(ids)
        sent_at[i] = time.perf_counter()
        w.issued += 1
        s.send_multipart([msgpack.packb({**base, "id": i}, use_bin_type=True), *frames])

    for k in range(cmd["concurrency"]):
        send(socks[k % len(socks)])
    drain_deadline = w.end + cmd.get("drain_timeout", 60.0)
    while sent_at and time.perf_counter() < drain_deadline:
        for s, _ in poller.poll(1000):
            while True:
                try:
                    reply = s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                now = time.perf_counter()
                w.tick(now)
                header = msgpack.unpackb(reply[0].bytes, raw=False)
                sent = sent_at.pop(header.get("id"), None)
                if sent is None:
                    continue
                w.done(sent, now, bool(header.get("ok")), str(header.get("error")))
                if now < w.end and w.issued < limit:
                    send(s)
    w.tick(time.perf_counter())
    for s in socks:
        s.close(linger=0)
    res = w.result()
    res["unfinished"] = len(sent_at)
    return res


# -- HTTP/1.1 keep-alive over raw asyncio protocols ------------------------------------------------
class HttpConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.fut: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None
        self.need: int | None = None
        self.hlen = 0
        self.status = 0
        self.closed = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need is None:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            lines = bytes(self.buf[:i]).decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            length = 0
            for line in lines[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            self.hlen = i + 4
            self.need = self.hlen + length
        if len(self.buf) >= self.need:
            body = bytes(self.buf[self.hlen : self.need])
            del self.buf[: self.need]
            self.need = None
            fut, self.fut = self.fut, None
            if fut is not None and not fut.done():
                fut.set_result((self.status, body))

    async def request(self, data: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.fut = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.fut


def http_body(cmd: dict[str, Any], inputs: dict[str, np.ndarray]) -> bytes:
    host = f"127.0.0.1:{cmd['port']}"
    if cmd["format"] == "kserve":
        descs, raw = [], []
        for name, arr in inputs.items():
            b = arr.tobytes()
            descs.append({"name": name, "datatype": KSERVE[arr.dtype], "shape": list(arr.shape),
                          "parameters": {"binary_data_size": len(b)}})
            raw.append(b)
        head = json.dumps({"inputs": descs, "parameters": {"binary_data_output": True}}).encode()
        body = head + b"".join(raw)
        return (f"POST /v2/models/{cmd['model']}/infer HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(head)}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    if cmd["format"] in ("json", "litserve"):  # the peers' body: LitServe, FastAPI and TorchServe alike
        doc = {"inputs": {name: {"shape": list(a.shape), "dtype": str(a.dtype), "data": base64.b64encode(a.tobytes()).decode()}
                          for name, a in inputs.items()}}
        body = json.dumps(doc).encode()
        return (f"POST {cmd.get('path', '/predict')} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    raise ValueError(f"unknown http format {cmd['format']!r}")


async def run_http(cmd: dict[str, Any], inputs: dict[str, np.ndarray], items: int) -> dict[str, Any]:
    request = http_body(cmd, inputs)
    w = Window(cmd["warmup"], cmd["duration"], items)
    limit = cmd["max_requests"]
    loop = asyncio.get_running_loop()
    loop.call_later(w.start - time.perf_counter(), w.mark_start)
    loop.call_later(w.end - time.perf_counter(), w.mark_end)
    conns: list[HttpConn] = []

    async def connect() -> HttpConn:
        _, conn = await loop.create_connection(HttpConn, "127.0.0.1", cmd["port"])
        conns.append(conn)
        return conn

    async def one() -> None:
        conn = await connect()
        while w.issued < limit:
            sent = time.perf_counter()
            if sent >= w.end:
                return
            w.issued += 1
            try:
                if conn.closed:
                    conn = await connect()
                status, body = await conn.request(request)
                w.done(sent, time.perf_counter(), status == 200, f"HTTP {status}: {body[:200]!r}")
            except (ConnectionError, OSError) as exc:
                w.done(sent, time.perf_counter(), False, f"{type(exc).__name__}: {exc}")
                conn = await connect()

    tasks = [asyncio.ensure_future(one()) for _ in range(cmd["concurrency"])]
    _, pending = await asyncio.wait(tasks, timeout=w.end - time.perf_counter() + cmd.get("drain_timeout", 60.0))
    for t in pending:
        t.cancel()
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    res = w.result()
    res["unfinished"] = len(pending)
    return res


def run(cmd: dict[str, Any], runner) -> dict[str, Any]:
    inputs = load_inputs(cmd["npz"])
    items = next(iter(inputs.values())).shape[0]
    cmd.setdefault("max_requests", 1_000_000)
    kind = cmd["kind"]
    if kind == "zmq":
        return runner(run_zmq(cmd, inputs, items))
    if kind == "zmq-raw":
        return run_zmq_raw(cmd, inputs, items)
    if kind == "http":
        return runner(run_http(cmd, inputs, items))
    raise ValueError(f"unknown kind {kind!r}")


def main() -> int:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            reply = run(cmd, runner)
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hostile and broken HTTP clients against a real server (issue 10, the HTTP half): each case was
reproduced here before it was fixed.

Every socket goes to 127.0.0.1; every loop is bounded; every wait has a deadline.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BIN, Server, alive, children, fixture_path, http, wait_for

TINY = fixture_path("densenet_tiny", "model")
AFNO = fixture_path("afno_small", "model")
TOKENS = ("s3cret-token-one", "another.token_2")


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def read_until_closed(s: socket.socket, limit: float = 10.0) -> tuple[bytes, str]:
    """Everything the server sends until it closes: (data, "eof" | "reset"); fails if still open after ``limit``."""
    s.settimeout(limit)
    data = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(1 << 20)
        except ConnectionResetError:
            return data, "reset"
        except TimeoutError:
            break
        if not chunk:
            return data, "eof"
        data += chunk
    raise AssertionError(f"the server kept the connection open for {limit}s ({len(data)} bytes received)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("hostile_http")
    s = Server(prefix, models={"tiny": {"path": str(TINY), "max_queue_size": 4}, "afno": {"path": str(AFNO)}},
               workers=1, extra="events {\n    worker_connections 16;\n}\n",
               http_extra="    client_header_timeout 1s;\n    client_body_timeout 20s;\n    send_timeout 1s;\n")
    s.start()
    yield s
    s.stop()


def assert_serving(server) -> None:
    status, _, body = http("GET", server.url + "/v2/health/live", timeout=10)
    assert status == 200, body


# -- 1. unfinished request heads ----------------------------------------------------------------------

def test_header_line_that_never_ends_is_cut_off_with_bounded_memory(server) -> None:
    """Before: httptools kept the value of an unterminated header line, 32 MB here, and never answered."""
    worker = server.worker_pids()[0]
    before = rss(worker)
    sent = 0
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        chunk = b"a" * 65536
        try:
            for _ in range(512):  # 32 MB at most
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:  # the server answered 431 and closed: the rest of our header is refused
            pass
        reply, _ = read_until_closed(s)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 431"), reply[:100]
    grown = rss(worker) - before
    assert grown < 16 << 20, f"the worker grew by {grown >> 20} MB for one unfinished header ({sent} bytes sent)"
    assert_serving(server)


def test_request_line_that_never_ends_is_refused(server) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"GET /" + b"a" * 200_000)
        reply, _ = read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 414")


def test_slow_head_gets_408_after_client_header_timeout(server) -> None:
    """A head trickling in (slowloris) is bounded by client_header_timeout (1s here), not the body's 20s."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        t0 = time.monotonic()
        reply, _ = read_until_closed(s, 8)
    assert reply.startswith(b"HTTP/1.1 408") and b"client_header_timeout" in reply
    assert 0.8 < time.monotonic() - t0 < 6


# -- 2. clients that do not read their replies --------------------------------------------------------

def afno_binary_request() -> bytes:
    header = json.dumps({"inputs": [{"name": "fields", "datatype": "FP32", "shape": [1, 5, 40, 80],
                                     "parameters": {"binary_data_size": 16000 * 4}}]}).encode()
    body = header + np.zeros(16000, np.float32).tobytes()
    return (b"POST /v2/models/afno/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: %d\r\n"
            b"Content-Length: %d\r\n\r\n" % (len(header), len(body))) + body


def test_client_that_never_reads_is_dropped_after_send_timeout(server) -> None:
    """40 pipelined requests whose JSON replies (~300 KB each) the client never reads. Before: every
    reply was buffered in the worker and the connection was held forever; now reading pauses while
    replies pile up and the connection is closed once its reply makes no progress for send_timeout."""
    request = afno_binary_request()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", server.http_port))
    s.settimeout(20)

    def send() -> None:
        try:
            for _ in range(40):
                s.sendall(request)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        wait_for(lambda: "send_timeout" in server.log_text(), 20, 0.1, "the send_timeout to close the connection")
        data, how = read_until_closed(s, 10)
    finally:
        s.close()
        sender.join(10)
    assert data.count(b"HTTP/1.1 200") < 40
    assert_serving(server)


# -- 3. large JSON bodies ------------------------------------------------------------------------------

def test_health_stays_fast_while_large_json_bodies_are_parsed(server) -> None:
    """Four ~25 MB JSON requests at once: the event loop still answers /v2/health/live (generous bound),
    and the requests are answered (200, or 503 from a full queue before their body is parsed)."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal(3 * 640 * 640).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 640, 640],
                                   "data": data.tolist()}]}).encode()
    assert len(body) > 20 << 20
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(http, "POST", server.url + "/v2/models/tiny/infer", body, None, 120) for _ in range(4)]
        worst = 0.0
        deadline = time.monotonic() + 120
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            t0 = time.monotonic()
            status, _, _ = http("GET", server.url + "/v2/health/live", timeout=30)
            worst = max(worst, time.monotonic() - t0)
            assert status == 200
            time.sleep(0.05)
        statuses = [f.result()[0] for f in futures]
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    assert worst < 2.5, f"a health check waited {worst:.2f}s behind JSON parsing"


def test_json_parser_helper_does_not_outlive_its_worker(make_server) -> None:
    """The helper that parses large JSON bodies (a forkserver and its pool process) goes with its
    worker, whether the worker is killed or exits on TERM (found orphaned after test runs, blocked
    for ever on a queue whose write end it held itself)."""
    data = np.random.default_rng(0).standard_normal(3 * 400 * 400).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 400, 400],
                                   "data": data.tolist()}]}).encode()
    assert len(body) > 8 << 20  # parsed in the helper

    def helpers_after_a_large_body(s: Server) -> list[int]:
        status, _, _ = http("POST", s.url + "/v2/models/tiny/infer", body, None, 60)
        assert status == 200
        (worker,) = s.worker_pids()
        found = [p for server in children(worker) for p in (server, *children(server))]
        # the forkserver, its pool process and multiprocessing's resource tracker
        assert any(children(p) for p in children(worker)), f"no pool process under worker {worker}: {found}"
        return found

    s = make_server(models={"tiny": {"path": str(TINY)}}, workers=1).start()
    helpers = helpers_after_a_large_body(s)
    (worker,) = s.worker_pids()
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in helpers), 10, 0.05, "the helpers of a killed worker to exit")
    wait_for(lambda: s.worker_pids() and s.worker_pids() != [worker], 30, 0.1, "the replacement worker")
    wait_for(lambda: http("GET", s.url + "/v2/health/ready")[0] == 200, 30, 0.1, "ready")
    helpers = helpers_after_a_large_body(s)
    s.signal(signal.SIGTERM)
    assert s.wait_exit(30) == 0
    wait_for(lambda: not any(alive(p) for p in helpers), 10, 0.05, "the helpers of a stopped worker to exit")


def test_unknown_model_and_full_queue_refused_before_the_body_is_parsed(server) -> None:
    status, _, body = http("POST", server.url + "/v2/models/nope/infer", b"{" * 10, None, 30)
    assert status == 404 and b"nope" in body  # not a 400 for the malformed JSON: admission comes first


# -- 4. worker_connections ------------------------------------------------------------------------------

def test_idle_connections_make_room_past_worker_connections(server) -> None:
    """worker_connections 16: 30 idle keep-alive connections, then a probe. Before: no cap and nothing logged
    (and descriptors running out made probes fail); now idle connections are closed, oldest first."""
    socks = []
    try:
        for _ in range(30):
            s = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
            socks.append(s)
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        assert_serving(server)
        closed = 0
        for s in socks:
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed >= 14, f"only {closed} of 30 idle connections were closed past worker_connections 16"
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: "worker_connections are not enough" in server.log_text(), 10, what="the log line")
    assert server.log_text().count("worker_connections are not enough") <= 2  # rate-limited


def test_busy_connections_past_worker_connections_refuse_new_ones_and_log_it(server) -> None:
    socks = []
    try:
        for _ in range(16):  # each holds an unfinished head: busy, not reusable
            s = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
            s.sendall(b"GET /v2 HTTP/1.1\r\n")
            socks.append(s)
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as extra:
            extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                got = extra.recv(100)
            except ConnectionResetError:
                got = b""
        assert got == b""
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: "a connection from 127.0.0.1 was closed" in server.log_text(), 15, what="the log line")
    time.sleep(1.5)  # the busy ones time out (client_header_timeout 1s) or are gone: room again
    assert_serving(server)


# -- 5. authentication ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("auth")
    (prefix / "conf").mkdir()
    tokens = prefix / "conf" / "tokens"
    tokens.write_text(f"# who may call\n{TOKENS[0]}\n\n  {TOKENS[1]}   # the second\n")
    s = Server(prefix, workers=1, http_extra=f"    auth_token_file {tokens};\n")
    s.tokens = tokens
    s.start()
    yield s
    s.stop()


def infer_body() -> bytes:
    return json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                   "data": [0.0] * 3072}]}).encode()


def test_auth_token_required_except_for_health(auth_server) -> None:
    url = auth_server.url + "/v2/models/tiny/infer"
    status, headers, body = http("POST", url, infer_body())
    assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer") and b"Bearer" in body
    assert http("POST", url, infer_body(), {"Authorization": "Bearer wrong"})[0] == 401
    assert http("POST", url, infer_body(), {"Authorization": f"Basic {TOKENS[0]}"})[0] == 401
    for token in TOKENS:
        assert http("POST", url, infer_body(), {"Authorization": f"Bearer {token}"})[0] == 200
    assert http("GET", auth_server.url + "/v2/health/live")[0] == 200
    assert http("GET", auth_server.url + "/v2/health/ready")[0] == 200
    assert http("GET", auth_server.url + "/metrics")[0] == 401
    assert http("GET", auth_server.url + "/metrics", headers={"Authorization": f"Bearer {TOKENS[1]}"})[0] == 200
    assert http("GET", auth_server.url + "/v2/models")[0] == 401
    # refused before the body is read: a 40 MB upload without a token gets its 401 at once
    with socket.create_connection(("127.0.0.1", auth_server.http_port), timeout=10) as s:
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 40000000\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 401")


def test_openai_client_sends_the_token_as_api_key(auth_server) -> None:
    import openai

    good = openai.OpenAI(base_url=auth_server.url + "/v1", api_key=TOKENS[0], max_retries=0)
    assert good.models.list().data == []  # no generation model here; the route answered
    bad = openai.OpenAI(base_url=auth_server.url + "/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_tokens_are_reread_on_reload(auth_server) -> None:
    url = auth_server.url + "/v2/models/tiny/infer"
    auth_server.tokens.write_text("rotated-token\n")
    ready = auth_server.ready_count()
    auth_server.signal(signal.SIGHUP)
    wait_for(lambda: auth_server.ready_count() > ready, 60, 0.1, "the new generation")
    wait_for(lambda: http("POST", url, infer_body(), {"Authorization": f"Bearer {TOKENS[0]}"})[0] == 401, 30, 0.2,
             "the old token to be refused")
    assert http("POST", url, infer_body(), {"Authorization": "Bearer rotated-token"})[0] == 200


def test_auth_config_errors_name_file_and_line(tmp_path) -> None:
    from server.config import ConfigError, load_config

    conf = tmp_path / "conf" / "srv.conf"
    conf.parent.mkdir()
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    for path, fragment in ((tmp_path / "missing", "cannot read"), (empty, "holds no token")):
        conf.write_text(f"http {{\n    listen 127.0.0.1:1;\n    auth_token_file {path};\n}}\n")
        with pytest.raises(ConfigError) as err:
            load_config(conf, check_models=False)
        assert fragment in str(err.value) and f"{conf}:3" in str(err.value)
    conf.write_text("events {\n    worker_connections 1;\n}\nhttp {\n    listen 127.0.0.1:1;\n    send_timeout 0;\n}\n")
    with pytest.raises(ConfigError, match=r"srv.conf:2"):
        load_config(conf, check_models=False)


def test_auth_metrics_off_opens_metrics_only() -> None:
    from types import SimpleNamespace

    from server.frontends.http import HttpServer

    cfg = SimpleNamespace(client_max_body_size=1, client_body_timeout=1, client_header_timeout=1, send_timeout=1,
                          keepalive_timeout=1, worker_connections=8, auth_tokens=("t",), auth_metrics=False)
    srv = HttpServer(None, cfg, print, lambda: True)  # type: ignore[arg-type]
    assert srv.authorized("/metrics", "") and srv.authorized("/v2/health/ready", "")
    assert not srv.authorized("/v2/models", "") and srv.authorized("/v2/models", "Bearer t")
    assert not srv.authorized("/v1/models", "Bearer t2") and not srv.authorized("/v1/models", "Bearer ")


def test_stream_to_a_client_that_stops_reading_pauses_then_is_cancelled() -> None:
    """In process, with a transport whose buffer never drains: a server-sent event stream pulls no
    more events once writing is paused, and send_timeout aborts the connection and closes the stream."""
    import asyncio
    from types import SimpleNamespace

    from server.frontends.http import HttpConnection, HttpServer, Response

    pulled, closed = [], []

    async def events():
        try:
            for i in range(10_000):
                pulled.append(i)
                yield b"data: %d\n\n" % i
                await asyncio.sleep(0)
        finally:
            closed.append(True)

    class Stuck(asyncio.Transport):
        """A peer that reads nothing: every write stays buffered."""

        def __init__(self, protocol) -> None:
            super().__init__()
            self.protocol, self.buffered, self.reading, self.closed = protocol, 0, True, False

        def get_extra_info(self, name, default=None):
            return ("127.0.0.1", 1) if name == "peername" else default

        def write(self, data) -> None:
            was = self.buffered
            self.buffered += len(data)
            if was <= 65536 < self.buffered:
                self.protocol.pause_writing()

        def get_write_buffer_size(self) -> int:
            return self.buffered

        def is_closing(self) -> bool:
            return self.closed

        def is_reading(self) -> bool:
            return self.reading

        def pause_reading(self) -> None:
            self.reading = False

        def resume_reading(self) -> None:
            self.reading = True

        def close(self) -> None:
            self.closed = True

        def abort(self) -> None:
            self.closed, self.buffered = True, 0
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    async def main() -> Stuck:
        cfg = SimpleNamespace(client_max_body_size=1 << 20, client_body_timeout=5, client_header_timeout=5,
                              send_timeout=0.3, keepalive_timeout=5, worker_connections=8, auth_tokens=(),
                              auth_metrics=True)
        srv = HttpServer(SimpleNamespace(metric_label=lambda name: "unknown"), cfg, lambda line: None, lambda: True)

        async def handle(req):
            return Response(200, b"", content_type="text/event-stream", stream=events())

        srv.handle = handle  # type: ignore[method-assign]
        conn = HttpConnection(srv)
        t = Stuck(conn)
        conn.connection_made(t)
        conn.data_received(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}')
        for _ in range(200):  # 2 s at most
            if closed:
                break
            await asyncio.sleep(0.01)
        return t

    t = asyncio.run(main())
    assert closed and t.closed, "the stream was not closed after send_timeout"
    assert len(pulled) < 10_000 and len(pulled) * 12 < 200_000, f"{len(pulled)} events pulled for a client reading none"
    assert not t.reading  # and nothing more was read from it meanwhile



def test_worker_connections_follow_the_descriptor_limit(make_server) -> None:
    """Before: with descriptors short, libuv accepted and dropped connections silently (health probes
    failed, nothing logged). Now worker_connections is lowered to what the limit leaves, with a
    warning, and the connections past it go through the worker_connections path (logged)."""
    s = make_server(workers=1)
    s.start(command=["sh", "-c", f"ulimit -n 160 && exec {BIN} -c {s.conf}"])
    assert "worker_connections exceed open file resource limit" in s.log_text()
    socks = []
    try:
        for _ in range(200):
            c = socket.create_connection(("127.0.0.1", s.http_port), timeout=10)
            socks.append(c)
            c.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.recv(65536).startswith(b"HTTP/1.1 200")
        assert http("GET", s.url + "/v2/health/live", timeout=10)[0] == 200
    finally:
        for c in socks:
            c.close()
    assert "worker_connections are not enough, reusing connections" in s.log_text()

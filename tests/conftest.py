"""Shared test harness: real ``bin/modelsrv`` processes on 127.0.0.1, real sockets and signals.

Every server a test starts is stopped by PID at the end (TERM, then KILL), and every wait is
bounded, so a broken build fails fast instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # reference cases, described in tests/fixtures/README.md
BIN = REPO / "bin" / "modelsrv"


def fixture_path(*parts: str) -> Path:
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"reference fixture {path} is missing (tests/fixtures/README.md lists them)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes; the state follows the ")" closing the process name
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30.0):
    """(status, headers, body) of one request; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class Server:
    """One modelsrv instance in a temporary prefix."""

    def __init__(self, prefix: Path, models: dict[str, dict] | None = None, workers: int = 2, extra: str = "",
                 http_extra: str = "") -> None:
        self.prefix = prefix
        self.http_port, self.zmq_port = free_port(), free_port()
        self.workers = workers
        (prefix / "conf").mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "conf" / "srv.conf"
        self.models = models if models is not None else {"tiny": {"path": str(fixture_path("densenet_tiny", "model"))}}
        self.extra, self.http_extra = extra, http_extra
        self.write_conf()
        self.proc: subprocess.Popen | None = None
        self.started_pids: set[int] = set()

    # -- configuration -------------------------------------------------------------------------
    def conf_text(self, models: dict[str, dict] | None = None) -> str:
        models = self.models if models is None else models
        blocks = []
        for name, opts in models.items():
            lines = "".join(f"        {k} {v};\n" for k, v in {"max_batch_size": 8, "batch_timeout": "2ms", **opts}.items())
            blocks.append(f"    model {name} {{\n{lines}    }}\n")
        return (
            f"worker_processes {self.workers};\n"
            "worker_shutdown_timeout 20s;\n"
            "pid run/modelsrv.pid;\n"
            "error_log logs/error.log info;\n"
            f"{self.extra}\n"
            f"http {{\n    listen 127.0.0.1:{self.http_port};\n    access_log logs/access.log;\n{self.http_extra}}}\n"
            f"zmq {{\n    listen tcp://127.0.0.1:{self.zmq_port};\n}}\n"
            + "".join(blocks)
        )

    def write_conf(self, models: dict[str, dict] | None = None, text: str | None = None) -> None:
        self.conf.write_text(text if text is not None else self.conf_text(models))

    # -- processes -------------------------------------------------------------------------------
    def start(self, wait: bool = True, command: list[str] | None = None) -> Server:
        """Run ``bin/modelsrv -c CONF`` (or ``command``, from the repository root) and wait until it serves."""
        self.stdout = self.prefix / "stdout.log"  # a file, not a pipe: a full pipe would block the master
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.stdout, "ab") as out:
            self.proc = subprocess.Popen(command or [str(BIN), "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT,
                                         cwd=REPO, env=env)
        self.started_pids.add(self.proc.pid)
        if wait:
            self.wait_ready()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def zmq_address(self) -> str:
        return f"tcp://127.0.0.1:{self.zmq_port}"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "run" / "modelsrv.pid"

    @property
    def error_log(self) -> Path:
        return self.prefix / "logs" / "error.log"

    @property
    def access_log(self) -> Path:
        return self.prefix / "logs" / "access.log"

    def master_pid(self) -> int:
        return int(self.pid_file.read_text())

    def worker_pids(self, master: int | None = None) -> list[int]:
        return [p for p in children(master or self.master_pid()) if "worker process" in title(p)]

    def log_text(self) -> str:
        return self.error_log.read_text() if self.error_log.exists() else ""

    def ready_count(self, master: int | None = None) -> int:
        """How many times the master logged a worker ready."""
        master = master or self.master_pid()
        return sum(1 for line in self.log_text().splitlines() if f" {master}#-: worker process" in line and ") ready:" in line)

    def wait_ready(self, timeout: float = 60.0, workers: int | None = None, master: int | None = None) -> None:
        n = self.workers if workers is None else workers

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None and master is None:
                out = self.stdout.read_text()
                raise AssertionError(f"modelsrv exited with {self.proc.returncode}:\n{out}\n{self.log_text()}")
            try:
                pid = master or self.master_pid()
            except (OSError, ValueError):
                return False
            workers_now = self.worker_pids(pid)
            self.started_pids.update(workers_now)
            if len(workers_now) < n:
                return False
            try:
                status, _, _ = http("GET", self.url + "/v2/health/ready", timeout=5)
            except OSError:  # accepted by the kernel, but no worker is serving yet
                return False
            return status == 200 and self.ready_count(pid) >= n

        wait_for(ready, timeout, 0.1, "modelsrv to be ready")

    def signal(self, sig: int, pid: int | None = None) -> None:
        os.kill(pid or self.master_pid(), sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        pids = set(self.started_pids)
        if self.proc is not None:
            pids.add(self.proc.pid)
        for pid in list(pids):
            pids.update(children(pid))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.05)
        for pid in pids:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(**kw) -> Server:
        prefix = tmp_path / f"srv{len(servers)}"
        prefix.mkdir()
        s = Server(prefix, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def metric(url: str, name: str, **labels: str) -> float:
    """The sum over workers of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    import re

    text = http("GET", url + "/metrics")[2].decode()
    total = 0.0
    for found, value in re.findall(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', found))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def infer_json(url: str, model: str, inputs: list[dict], timeout: float = 30.0, **kw):
    body = json.dumps({"inputs": inputs, **kw}).encode()
    status, headers, data = http("POST", f"{url}/v2/models/{model}/infer", body, {"Content-Type": "application/json"}, timeout)
    return status, json.loads(data) if data else None


class Load:
    """Bounded background load: ``threads`` clients, each sending until stopped (or ``limit`` requests).

    ``kind`` "http" uses keep-alive connections and, as HTTP clients do for a request that died
    with a reused connection (RFC 9112 section 9.3.1), retries it once on a fresh connection;
    "zmq" uses the project's client with its retries. Every other failure is recorded.
    """

    def __init__(self, server: Server, model: str, kind: str = "http", threads: int = 4, limit: int = 2000,
                 shape: tuple[int, ...] = (1, 3, 32, 32), input_name: str = "images") -> None:
        import threading

        import numpy as np

        self.server, self.model, self.kind, self.limit = server, model, kind, limit
        self.data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        self.input_name = input_name
        self.ok = 0
        self.failures: list[str] = []
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)

    def wait_served(self, more: int = 5, timeout: float = 60.0) -> None:
        """Wait until ``more`` further requests have succeeded: the load is flowing now (not a fixed sleep)."""
        target = self.ok + more
        wait_for(lambda: self.ok >= target, timeout, 0.02,
                 f"{more} more {self.kind} requests served (failures: {self.failures[:3]})")

    def _record(self, ok: bool, why: str = "") -> None:
        with self.lock:
            if ok:
                self.ok += 1
            else:
                self.failures.append(why)

    def _run(self) -> None:
        if self.kind == "zmq":
            self._run_zmq()
        else:
            self._run_http()

    def _run_zmq(self) -> None:
        from server.client import Client, ModelsrvError

        with Client(self.server.zmq_address, timeout=10, retries=5) as c:
            for _ in range(self.limit):
                if self.stop_event.is_set():
                    return
                try:
                    out = c.infer(self.model, {self.input_name: self.data})
                    self._record(next(iter(out.values())).shape[0] == self.data.shape[0], "bad shape")
                except ModelsrvError as exc:
                    self._record(False, str(exc))

    def _run_http(self) -> None:
        import http.client

        body = json.dumps({"inputs": [{"name": self.input_name, "datatype": "FP32", "shape": list(self.data.shape),
                                       "data": self.data.ravel().tolist()}]}).encode()
        conn = None
        for _ in range(self.limit):
            if self.stop_event.is_set():
                return
            for attempt in (0, 1):
                reused = conn is not None
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=30)
                try:
                    conn.request("POST", f"/v2/models/{self.model}/infer", body, {"Content-Type": "application/json"})
                    r = conn.getresponse()
                    data = r.read()
                    if r.getheader("Connection", "").lower() == "close":
                        conn.close()
                        conn = None
                    self._record(r.status == 200, f"{r.status} {data[:200]!r}")
                    break
                except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine, OSError) as exc:
                    conn.close()
                    conn = None
                    if attempt == 1 or not reused:
                        self._record(False, f"{type(exc).__name__}: {exc}")
                        break


try:  # property-based tests (tests/test_fuzz_http.py): few examples by default, many with HYPOTHESIS_PROFILE=fuzz
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
    _hypothesis_settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "2000")), deadline=None)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # the test extra is not installed: those tests fail to import, the others run
    pass

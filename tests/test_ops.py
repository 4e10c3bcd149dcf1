"""Operations (issue 12): systemd readiness through a real bin/modelsrv, the Prometheus rules and
the Grafana dashboard against the exported metrics, nginx in front of two servers, the
Kubernetes manifests against the API schemas.

The tools come from Debian and PyPI (docs/OPERATIONS.md, "Tools"); a test whose tool is missing
skips and says which package brings it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from server.processes import sdnotify
from tests.conftest import REPO, alive, free_port, http, wait_for

DEPLOY = REPO / "deploy"


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed: apt-get install -y --no-install-recommends {package}")
    return path


# -- systemd readiness (sd_notify) -----------------------------------------------------------------

class NotifySocket:
    """A fake systemd: a unix datagram socket that records each message with its sender's pid."""

    def __init__(self, directory: Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the kernel adds the sender's pid
        if abstract:
            name = f"modelsrv-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            path = directory / "notify.sock"
            if len(str(path)) > 100:  # sun_path is 108 bytes
                path = Path(tempfile.mkdtemp(prefix="sdn")) / "notify.sock"
            self.sock.bind(str(path))
            self.env = str(path)

    def recv(self, timeout: float = 60.0) -> tuple[int, dict[str, str]]:
        """(sender pid, fields) of the next message."""
        self.sock.settimeout(timeout)
        data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("iII")))
        pid = next(struct.unpack("iII", d[:12])[0] for level, kind, d in anc
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        return pid, fields

    def until(self, key: str, timeout: float = 60.0) -> list[tuple[int, dict[str, str]]]:
        """Every message up to and including the first that has ``key``."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            pid, fields = self.recv(max(0.1, deadline - time.monotonic()))
            seen.append((pid, fields))
            if key in fields:
                return seen

    def quiet(self, seconds: float) -> list[tuple[int, dict[str, str]]]:
        """What arrives within ``seconds`` (expected: nothing)."""
        seen = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                seen.append(self.recv(left))
            except TimeoutError:
                break
        return seen

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch):
    sockets = []

    def make(abstract: bool = False) -> NotifySocket:
        s = NotifySocket(tmp_path, abstract)
        sockets.append(s)
        monkeypatch.setenv("NOTIFY_SOCKET", s.env)  # the Server helper's Popen inherits it
        return s

    yield make
    for s in sockets:
        s.close()


def test_sdnotify_addresses_and_no_socket(tmp_path: Path, notify_socket) -> None:
    assert sdnotify.address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.address("@abc") == "\0abc"
    assert sdnotify.address("") is None and sdnotify.address(None) is None
    assert sdnotify.address("vsock:2:1234") is None  # not spoken: nothing is sent
    assert not sdnotify.notify({"READY": 1}, "")
    assert not sdnotify.ServiceNotifier("").enabled
    for abstract in (False, True):
        fake = notify_socket(abstract)
        assert sdnotify.notify({"READY": 1, "STATUS": "x y"}, fake.env)
        assert fake.recv(5) == (os.getpid(), {"READY": "1", "STATUS": "x y"})
    broken = sdnotify.ServiceNotifier(str(tmp_path / "nobody-listens"))
    broken.send(READY=1)  # logged once, never raised
    assert broken.failed


def test_sdnotify_start_reload_refused_reload_quit(make_server, notify_socket) -> None:
    fake = notify_socket()
    s = make_server()
    s.start(wait=False)
    (pid, ready), = fake.until("READY")
    master = s.proc.pid  # bin/modelsrv execs python: the pid systemd started is the master
    assert pid == master and ready["MAINPID"] == str(master), ready
    assert "2 worker(s) ready" in ready["STATUS"]
    # READY=1 means serving: both workers ready, and the models answer at once
    assert http("GET", s.url + "/v2/health/ready", timeout=5)[0] == 200
    assert s.ready_count() == 2

    # a reload refused by the config check: RELOADING=1 then READY=1, the old config serves on
    good = s.conf.read_text()
    s.write_conf(text=good + "\nnot_a_directive on;\n")
    before = sdnotify.monotonic_usec()
    s.signal(signal.SIGHUP)
    (pid, reloading), (_, done) = fake.until("READY", 30)
    assert pid == master and reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= sdnotify.monotonic_usec()  # CLOCK_MONOTONIC µs
    assert "reload failed" in done["STATUS"], done

    # a real reload: READY=1 only once the new generation serves
    s.write_conf(text=good)
    s.signal(signal.SIGHUP)
    (_, reloading), (_, done) = fake.until("READY", 60)
    assert reloading["RELOADING"] == "1" and done["STATUS"].startswith("reloaded"), done
    assert "generation 2" in done["STATUS"]
    assert "generation 2 ready" in s.log_text()

    s.signal(signal.SIGQUIT)
    (pid, stopping), = fake.until("STOPPING", 10)
    assert pid == master and "graceful" in stopping["STATUS"]
    assert s.wait_exit(30) == 0
    assert fake.quiet(0.2) == []


def test_sdnotify_term_says_stopping(make_server, notify_socket) -> None:
    fake = notify_socket(abstract=True)  # "@name": the abstract namespace, as systemd's own socket may be
    s = make_server(workers=1)
    s.start(wait=False)
    fake.until("READY")
    s.signal(signal.SIGTERM)
    (_, stopping), = fake.until("STOPPING", 10)
    assert stopping["STATUS"] == "fast shutdown"
    assert s.wait_exit(30) == 0


def test_sdnotify_binary_upgrade_rollback_then_commit(make_server, notify_socket) -> None:
    """MAINPID follows the master that serves; the master that hands over never says STOPPING=1."""
    from tests.test_process import start_new_binary

    fake = notify_socket(abstract=True)
    s = make_server(workers=1)
    s.start(wait=False)
    fake.until("READY")
    old = s.proc.pid

    # 1. USR2, then roll back by QUIT to the new master (the old workers never stopped)
    _, new, _ = start_new_binary(s)
    msgs = fake.until("READY", 60)
    assert msgs[-1][0] == new and msgs[-1][1]["MAINPID"] == str(new), msgs  # the new master claims the service
    assert all(pid == old and set(f) == {"STATUS"} for pid, f in msgs[:-1]), msgs  # the old one only says so
    s.signal(signal.SIGQUIT, new)
    msgs = fake.until("READY", 30)
    assert not any("STOPPING" in f for _, f in msgs), msgs  # systemd must not stop the unit
    assert (new, str(old)) in [(pid, f.get("MAINPID")) for pid, f in msgs], msgs  # handed back by the leaver
    assert msgs[-1][0] == old and msgs[-1][1]["MAINPID"] == str(old), msgs  # and confirmed by the old master
    wait_for(lambda: not alive(new), 30, what="the new master to exit")
    wait_for(lambda: s.pid_file.exists() and s.master_pid() == old, 10, what="the pid file back")

    # 2. USR2 again and commit: WINCH + QUIT to the old master, which says nothing more
    _, new, _ = start_new_binary(s)
    msgs = fake.until("READY", 60)
    assert msgs[-1][0] == new and msgs[-1][1]["MAINPID"] == str(new), msgs
    s.signal(signal.SIGWINCH, old)
    s.signal(signal.SIGQUIT, old)
    assert s.wait_exit(30) == 0
    assert fake.quiet(0.5) == []  # no STOPPING=1 from the old master: the service goes on
    assert http("GET", s.url + "/v2/health/ready", timeout=5)[0] == 200
    s.signal(signal.SIGQUIT, new)
    (pid, stopping), = fake.until("STOPPING", 10)
    assert pid == new  # its parent is gone: this stop is the service's
    wait_for(lambda: not alive(new), 30, what="the new master to exit")

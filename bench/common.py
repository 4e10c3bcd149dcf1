"""Shared pieces of the benchmark: processes started and stopped by PID, /proc readings, statistics.

Nothing here imports torch: the orchestrator (bench/run.py) only starts and measures processes.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
BENCH_VENV = REPO / ".venv-bench"
BENCH_PY = str(BENCH_VENV / "bin" / "python")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def env_with_repo(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes ---------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(p) for p in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    seen: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for c in children(p):
            if c not in seen:
                seen.append(c)
                todo.append(c)
    return seen


def signal_tree(pids: Sequence[int], sig: int) -> None:
    """Send ``sig`` to each of ``pids`` (those gone already are skipped)."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_tree(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Stop a process we started and every descendant of it, by PID: ``sig``, then KILL."""
    if proc is None:
        return
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids += [d for p in list(pids) for d in descendants(p) if d not in pids]
        if proc.poll() is not None and not any(alive(p) for p in pids if p != proc.pid):
            break
        time.sleep(0.05)
    for pid in pids:
        if pid == proc.pid and proc.poll() is not None:
            continue
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of the processes (all their threads)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def cpu_per_request(loadgen: Any, pids: Sequence[int], cmd: dict[str, Any], timeout: float) -> tuple[dict[str, Any], float]:
    """Run one load point: the load generator's result and the CPU microseconds ``pids`` spent per request.

    CPU time over the whole call divided by the requests answered in it (``rps`` times the wall
    time, warm-up included): on a shared, noisy machine it moves far less than req/s does.
    """
    before, started = cpu_seconds(pids), time.perf_counter()
    res = loadgen.call(cmd, timeout=timeout)
    wall, cpu = time.perf_counter() - started, cpu_seconds(pids) - before
    return res, cpu / (res["rps"] * wall) * 1e6


def pss_mib(pids: Sequence[int]) -> float:
    """Proportional set size of the processes together (shared pages counted once overall)."""
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:
            pass
    return total_kb / 1024


def http_get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1, proc: subprocess.Popen | None = None,
             log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        time.sleep(interval)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}\n{tail}")


class JsonProc:
    """A long-lived helper process speaking JSON lines on stdin/stdout (stderr to a log file)."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None, name: str = "helper") -> None:
        self.name = name
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         env=env or env_with_repo(), cwd=str(REPO))
        self.buf = b""

    def call(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        reply = self.read(timeout, cmd.get("op", "?"))
        return reply

    def read(self, timeout: float, what: str = "startup") -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name}: no answer to {what} within {timeout:g}s")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    tail = self.log.read_text()[-3000:] if self.log.exists() else ""
                    raise RuntimeError(f"{self.name} exited ({self.proc.poll()}):\n{tail}")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}\n{reply.get('trace', '')}")
        return reply

    def pids(self) -> list[int]:
        return [self.proc.pid, *descendants(self.proc.pid)]

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        stop_tree(self.proc)


# -- statistics ----------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    v = sorted(x for x in values if x is not None)
    if not v:
        return float("nan")
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = max(0, min(len(v) - 1, int(round(q / 100 * len(v) + 0.5)) - 1))
    return v[k]


def machine_description() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // (1024 * 1024)
    except OSError:
        pass
    return f"{len(os.sched_getaffinity(0))} cores ({model}), {mem} GiB RAM, Linux {os.uname().release}"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"

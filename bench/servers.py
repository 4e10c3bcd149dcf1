"""The servers under test, each started in a temporary prefix on 127.0.0.1 free ports, stopped by PID."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.common import (
    BENCH,
    BENCH_PY,
    PY,
    REPO,
    descendants,
    env_with_repo,
    free_port,
    http_get,
    pss_mib,
    stop_tree,
    wait_for,
)


class _Process:
    """A server process tree started by ``start()``: its pids, its memory, and stopping it by PID."""

    proc: subprocess.Popen | None = None

    def pids(self) -> list[int]:
        return [self.proc.pid, *descendants(self.proc.pid)] if self.proc else []

    def pss(self) -> float:
        return pss_mib(self.pids())

    def stop(self) -> None:
        stop_tree(self.proc)
        self.proc = None


class ModelsrvServer(_Process):
    """bin/modelsrv with ``workers`` workers (worker_cpu_affinity auto: one core each on 2 cores)."""

    def __init__(self, prefix: Path, models: dict[str, dict], workers: int = 2, access_log: bool = True) -> None:
        self.prefix = prefix
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "conf").mkdir(exist_ok=True)
        self.http_port, self.zmq_port = free_port(), free_port()
        self.workers = workers
        blocks = []
        for name, opts in models.items():
            lines = "".join(f"        {k} {v};\n" for k, v in opts.items())
            blocks.append(f"    model {name} {{\n{lines}    }}\n")
        access = "access_log logs/access.log;" if access_log else "access_log off;"
        self.conf = prefix / "conf" / "srv.conf"
        self.conf.write_text(
            f"worker_processes {workers};\nworker_cpu_affinity auto;\nworker_shutdown_timeout 10s;\n"
            "pid run/modelsrv.pid;\nerror_log logs/error.log info;\n"
            f"http {{\n    listen 127.0.0.1:{self.http_port};\n    {access}\n}}\n"
            f"zmq {{\n    listen tcp://127.0.0.1:{self.zmq_port};\n}}\n" + "".join(blocks))
        self.proc: subprocess.Popen | None = None

    @property
    def zmq_address(self) -> str:
        return f"tcp://127.0.0.1:{self.zmq_port}"

    @property
    def error_log(self) -> Path:
        return self.prefix / "logs" / "error.log"

    def start(self, timeout: float = 180.0) -> ModelsrvServer:
        out = self.prefix / "stdout.log"
        with open(out, "ab") as f:
            self.proc = subprocess.Popen([str(REPO / "bin" / "modelsrv"), "-c", str(self.conf)], stdout=f,
                                         stderr=subprocess.STDOUT, cwd=str(self.prefix))
        pid_file = self.prefix / "run" / "modelsrv.pid"

        def ready() -> bool:
            if not pid_file.exists() or len(self.worker_pids()) < self.workers:
                return False
            log = self.error_log.read_text() if self.error_log.exists() else ""
            if log.count(") ready:") < self.workers:
                return False
            return http_get(f"http://127.0.0.1:{self.http_port}/v2/health/ready") == 200

        wait_for(ready, timeout, "modelsrv to be ready", 0.2, self.proc, self.error_log)
        return self

    def worker_pids(self) -> list[int]:
        if self.proc is None:
            return []
        out = []
        for pid in descendants(self.proc.pid):
            try:
                if b"worker process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(pid)
            except OSError:
                pass
        return sorted(out)



class EchoServer(_Process):
    def __init__(self, prefix: Path) -> None:
        self.port = free_port()
        self.log = prefix / "echo.log"
        self.proc: subprocess.Popen | None = None

    @property
    def zmq_address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> EchoServer:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([PY, str(BENCH / "echo.py"), self.zmq_address, "--max-seconds", "1800"],
                                         stdout=f, stderr=subprocess.STDOUT, env=env_with_repo())
        wait_for(lambda: "ready" in self.log.read_text(), 30, "echo server", 0.05, self.proc, self.log)
        return self



class LitServeServer(_Process):
    """bench/litserve_app.py in .venv-bench (LitServe), 2 inference workers of 1 thread, pinned."""

    def __init__(self, prefix: Path, folder: str, workers: int = 2, max_batch_size: int = 32,
                 batch_timeout: float = 0.002, fast_queue: bool = False) -> None:
        self.port = free_port()
        prefix.mkdir(parents=True, exist_ok=True)
        self.log = prefix / f"litserve-{self.port}.log"
        self.argv = [BENCH_PY, str(BENCH / "litserve_app.py"), "--folder", folder, "--port", str(self.port),
                     "--workers", str(workers), "--max-batch-size", str(max_batch_size),
                     "--batch-timeout", str(batch_timeout)] + (["--fast-queue"] if fast_queue else [])
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        if not Path(BENCH_PY).exists():
            return False
        return subprocess.run([BENCH_PY, "-c", "import litserve, torch"], capture_output=True).returncode == 0

    def start(self, timeout: float = 240.0) -> LitServeServer:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO),
                                         env=env_with_repo({"PYTHONWARNINGS": "ignore"}))
        wait_for(lambda: http_get(f"http://127.0.0.1:{self.port}/health") == 200, timeout, "LitServe to be ready",
                 0.25, self.proc, self.log)
        return self


"""The servers under test, each started in a temporary prefix on 127.0.0.1 free ports, stopped by PID."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from bench.common import (
    BENCH,
    BENCH_PY,
    BENCH_VENV,
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
    """bin/modelsrv with ``workers`` workers (worker_cpu_affinity auto: one core each on 2 cores).

    ``affinity``: the ``worker_cpu_affinity`` directive's argument(s); "10" pins a lone worker to
    core 1 (one torch thread, small batches on its event loop, as the model loop runs them).
    """

    def __init__(self, prefix: Path, models: dict[str, dict], workers: int = 2, access_log: bool = True,
                 repo: Path = REPO, affinity: str = "auto", env: dict[str, str] | None = None) -> None:
        self.prefix = prefix
        self.repo = Path(repo)  # whose bin/modelsrv: another checkout for a before/after comparison (bench/ab.py)
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "conf").mkdir(exist_ok=True)
        self.http_port, self.zmq_port = free_port(), free_port()
        self.workers = workers
        self.env = env  # extra environment for the master (and so its preload process and workers)
        blocks = []
        for name, opts in models.items():
            lines = "".join(f"        {k} {v};\n" for k, v in opts.items())
            blocks.append(f"    model {name} {{\n{lines}    }}\n")
        access = "access_log logs/access.log;" if access_log else "access_log off;"
        self.conf = prefix / "conf" / "srv.conf"
        self.conf.write_text(
            f"worker_processes {workers};\nworker_cpu_affinity {affinity};\nworker_shutdown_timeout 10s;\n"
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
            self.proc = subprocess.Popen([str(self.repo / "bin" / "modelsrv"), "-c", str(self.conf)], stdout=f,
                                         stderr=subprocess.STDOUT, cwd=str(self.prefix),
                                         env={**os.environ, **self.env} if self.env else None)
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
    """bench/echo.py: the bare echo loop, or with ``model`` (a folder) the model loop."""

    def __init__(self, prefix: Path, model: str | None = None) -> None:
        self.port = free_port()
        self.model = model
        self.log = prefix / ("model-loop.log" if model else "echo.log")
        self.proc: subprocess.Popen | None = None

    @property
    def zmq_address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> EchoServer:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([PY, str(BENCH / "echo.py"), self.zmq_address, "--max-seconds", "1800",
                                          *(["--model", self.model] if self.model else [])],
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



def _ready_pids(run_dir: Path) -> list[int]:
    """The workers that wrote ``ready-<pid>`` into ``run_dir`` and are still alive (their model loaded)."""
    out = []
    for f in run_dir.glob("ready-*"):
        try:
            pid = int(f.name.split("-", 1)[1])
        except ValueError:
            continue
        if Path(f"/proc/{pid}").exists():
            out.append(pid)
    return sorted(out)


def _bench_venv_has(modules: str) -> bool:
    if not Path(BENCH_PY).exists():
        return False
    return subprocess.run([BENCH_PY, "-c", f"import {modules}"], capture_output=True).returncode == 0


class FastAPIServer(_Process):
    """bench/fastapi_app.py in .venv-bench: uvicorn --workers 2, the model inline in each, no batching, pinned."""

    def __init__(self, prefix: Path, folder: str, workers: int = 2, style: str = "def") -> None:
        self.port = free_port()
        self.workers = workers
        self.run_dir = prefix / f"fastapi-{self.port}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = prefix / f"fastapi-{self.port}.log"
        self.argv = [BENCH_PY, str(BENCH / "fastapi_app.py"), "--folder", folder, "--port", str(self.port),
                     "--workers", str(workers), "--style", style, "--run-dir", str(self.run_dir)]
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return _bench_venv_has("fastapi, uvicorn, torch")

    def worker_pids(self) -> list[int]:
        return _ready_pids(self.run_dir)

    def start(self, timeout: float = 240.0) -> FastAPIServer:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO),
                                         env=env_with_repo({"PYTHONWARNINGS": "ignore"}))
        wait_for(lambda: len(_ready_pids(self.run_dir)) >= self.workers
                 and http_get(f"http://127.0.0.1:{self.port}/health") == 200,
                 timeout, "FastAPI peer to be ready", 0.25, self.proc, self.log)
        return self


# TorchServe's own log4j2.xml (in its jar) less the per-request DEBUG/INFO lines of the frontend
# (to ts_log.log and stdout) and the per-request metric lines (metrics_mode=prometheus keeps them
# in memory, as modelsrv's metrics are): the access log stays, as modelsrv's does.
TORCHSERVE_QUIET_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <File name="access_log" fileName="logs/access_log.log"><PatternLayout pattern="%d{ISO8601} - %m%n"/></File>
    <File name="ts_log" fileName="logs/ts_log.log"><PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/></File>
    <File name="model_log" fileName="logs/model_log.log"><PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/></File>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="info" additivity="false"><AppenderRef ref="access_log"/></Logger>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="MODEL_LOG" level="warn" additivity="false"><AppenderRef ref="model_log"/></Logger>
    <Logger name="MODEL_METRICS" level="warn" additivity="false"><AppenderRef ref="model_log"/></Logger>
    <Logger name="TS_METRICS" level="warn" additivity="false"><AppenderRef ref="ts_log"/></Logger>
    <Logger name="org.pytorch.serve" level="warn" additivity="false"><AppenderRef ref="ts_log"/></Logger>
    <Root level="warn"><AppenderRef ref="ts_log"/></Root>
  </Loggers>
</Configuration>
"""


class TorchServeServer(_Process):
    """TorchServe (.venv-bench, Java frontend) with bench/torchserve_handler.py; batching on; 2 workers, pinned.

    Everything it writes (the .mar, config.properties, logs/, its pid file, the workers' unix
    sockets) goes under ``prefix``; stopped by PID with its whole process tree (launcher, JVM, workers).
    """

    def __init__(self, prefix: Path, name: str, folder: str, workers: int = 2, batch_size: int = 8,
                 max_batch_delay_ms: int = 2, quiet: bool = True) -> None:
        self.name = name
        self.port, self.management_port, self.metrics_port = free_port(), free_port(), free_port()
        self.workers = workers
        self.prefix = prefix / f"torchserve-{self.port}"
        self.store = self.prefix / "store"
        self.tmp = self.prefix / "tmp"
        self.pin_dir = self.prefix / "cores"
        for d in (self.store, self.tmp, self.pin_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.log = self.prefix / "torchserve.log"
        (self.prefix / "model-config.yaml").write_text(
            f"minWorkers: {workers}\nmaxWorkers: {workers}\nbatchSize: {batch_size}\n"
            f"maxBatchDelay: {max_batch_delay_ms}\nresponseTimeout: 300\n"
            f"handler:\n  folder: {folder}\n  threads: 1\n  pin_dir: {self.pin_dir}\n  repo: {REPO}\n")
        self.config = self.prefix / "config.properties"
        self.config.write_text(
            f"inference_address=http://127.0.0.1:{self.port}\n"
            f"management_address=http://127.0.0.1:{self.management_port}\n"
            f"metrics_address=http://127.0.0.1:{self.metrics_port}\n"
            f"model_store={self.store}\nload_models={name}.mar\ndefault_workers_per_model={workers}\n"
            f"initial_worker_port={free_port()}\n"
            "disable_token_authorization=true\nenable_model_api=false\ninstall_py_dep_per_model=false\n"
            "disable_system_metrics=true\n" + ("metrics_mode=prometheus\n" if quiet else ""))
        self.log_config: Path | None = None
        if quiet:
            self.log_config = self.prefix / "log4j2.xml"
            self.log_config.write_text(TORCHSERVE_QUIET_LOG4J2)
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return (_bench_venv_has("ts, model_archiver, torch") and (BENCH_VENV / "bin" / "torchserve").exists()
                and shutil.which("java") is not None)

    def _env(self) -> dict[str, str]:
        # TEMP: the JVM's java.io.tmpdir (the workers' unix sockets); TMPDIR: the launcher's pid file
        return env_with_repo({"PYTHONWARNINGS": "ignore", "TEMP": str(self.tmp), "TMPDIR": str(self.tmp)})

    def archive(self) -> Path:
        r = subprocess.run([str(BENCH_VENV / "bin" / "torch-model-archiver"), "--model-name", self.name,
                            "--version", "1.0", "--handler", str(BENCH / "torchserve_handler.py"),
                            "--config-file", str(self.prefix / "model-config.yaml"),
                            "--export-path", str(self.store), "--force"],
                           capture_output=True, cwd=str(self.prefix), env=self._env(), timeout=300)
        if r.returncode:
            raise RuntimeError(f"torch-model-archiver failed:\n{(r.stdout + r.stderr).decode()[-3000:]}")
        return self.store / f"{self.name}.mar"

    def worker_pids(self) -> list[int]:
        return _ready_pids(self.pin_dir)

    def start(self, timeout: float = 300.0) -> TorchServeServer:
        self.archive()
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([str(BENCH_VENV / "bin" / "torchserve"), "--start", "--foreground",
                                          "--ts-config", str(self.config), "--model-store", str(self.store),
                                          "--ncs", "--disable-token-auth"]
                                         + (["--log-config", str(self.log_config)] if self.log_config else []),
                                         stdout=f, stderr=subprocess.STDOUT, cwd=str(self.prefix), env=self._env())
        wait_for(lambda: len(_ready_pids(self.pin_dir)) >= self.workers
                 and http_get(f"http://127.0.0.1:{self.port}/ping") == 200,
                 timeout, "TorchServe to be ready", 0.25, self.proc, self.log)
        return self

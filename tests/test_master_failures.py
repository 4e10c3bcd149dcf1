"""The master failing, through the real entry point: a bug in its cycle, a second master on the same pid file.

(A USR2 whose fork fails is tested in-process: tests/unit/test_master.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.conftest import BIN, alive, infer_json

SMALL_IMAGE = [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.5] * (3 * 32 * 32)}]


def test_an_exception_escaping_the_master_cycle_takes_the_workers_down(make_server) -> None:
    s = make_server()
    # the real entry point, with one Master method made to fail once the workers serve (on USR2)
    script = (
        "import sys\n"
        "from server.processes.master import Master\n"
        "def fail(self):\n"
        "    raise RuntimeError('injected master failure')\n"
        "Master._exec_new_binary = fail\n"
        "from server.cli import main\n"
        f"sys.exit(main(['-c', {str(s.conf)!r}]))\n"
    )
    s.start(command=[sys.executable, "-c", script])
    master, workers = s.master_pid(), s.worker_pids()
    assert master == s.proc.pid and len(workers) == 2
    s.signal(signal.SIGUSR2)
    assert s.wait_exit(30) == 1
    log = s.log_text()
    assert "[emerg]" in log and "master process failed: terminating the workers" in log
    assert "Traceback (most recent call last)" in log and "RuntimeError: injected master failure" in log
    assert not any(alive(p) for p in workers)  # reaped by the master before it exited
    assert not s.pid_file.exists()
    assert not list(s.pid_file.parent.glob("metrics-*"))


def test_a_second_master_on_the_same_pid_file_refuses_to_start(make_server) -> None:
    s = make_server(workers=1)
    s.pid_file.parent.mkdir(parents=True)
    s.pid_file.write_text(f"{os.getpid()}\n")  # stale: a live process, but no master
    s.start()
    master, workers = s.master_pid(), s.worker_pids()
    assert master == s.proc.pid
    before = s.pid_file.read_bytes()
    r = subprocess.run([str(BIN), "-c", str(s.conf)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"names a running master (pid {master})" in r.stderr and "not starting a second one" in r.stderr
    assert s.pid_file.read_bytes() == before and alive(master) and s.worker_pids() == workers
    assert infer_json(s.url, "tiny", SMALL_IMAGE)[0] == 200
    assert "master process failed" not in s.log_text()
    s.signal(signal.SIGTERM)
    assert s.wait_exit(20) == 0
    assert not s.pid_file.exists()

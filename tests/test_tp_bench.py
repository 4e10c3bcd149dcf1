"""bench/tp.py and bench/gpu_check.sh: the parts that run without a GPU.

bench/tp.py --device cpu --backend gloo --check is the GPU check's code path on CPU (a gloo group of
2 against the unsharded model, the collectives counted); bench/gpu_check.sh must refuse clearly,
exit status 2, where no CUDA GPU is visible.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def test_tp_bench_cpu_check(tmp_path, capsys):
    """In this process (k=1 runs here; the group's 2 ranks are spawned): equal to k=1, collectives counted."""
    from bench import tp  # the spawned ranks import it by this name, from the repository root

    threads = torch.get_num_threads()
    try:
        rc = tp.main(["--device", "cpu", "--backend", "gloo", "--world", "2", "--check", "--config", "small", "--batch", "1",
                      "--steps", "1", "--context", "4", "--micro-reps", "1", "--models-dir", str(tmp_path), "--deadline", "120"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    report = json.loads(out.out)
    assert report["check"] == "ok" and report["world"] == 2
    (step,) = report["k2"]["steps"]
    assert step["collectives_per_step"]["all_reduce"] == 2 * 4 + 2  # 2 per layer, the embedding, the sum of exp
    assert step["collectives_per_step"]["broadcast"] == 2  # rank 0's header and payload
    assert 0.45 < report["k2"]["param_bytes"] / report["k1"]["param_bytes"] < 0.55
    assert set(report["k2"]["allreduce_only_s_per_step"]) == {"1"}


def test_tp_bench_help_and_refusals(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "bench" / "tp.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--backend" in r.stdout and "gpu_check.sh" in r.stdout
    r = subprocess.run([sys.executable, str(REPO / "bench" / "tp.py"), "--world", "3", "--models-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not divide the 8 heads" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: gpu_check.sh would run for real")
def test_gpu_check_refuses_without_gpu(tmp_path):
    script = REPO / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run([str(script)], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "TMPDIR": str(tmp_path)})
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "gpu_check: FAILED: no" in r.stderr and "nothing was checked" in r.stderr

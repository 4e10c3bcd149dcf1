"""Where a worker's time goes: py-spy samples one modelsrv worker while the load generator runs.

    .venv/bin/python bench/spy.py [--model tiny|densenet121] [--kind zmq-raw|zmq|http]
                                      [--workers 1] [--concurrency 32] [--seconds 8] [--no-access-log]
                                      [--affinity 10]

Needs py-spy (``.venv-bench/bin/py-spy``, or on PATH). Prints the functions with the most samples,
self and inclusive, for each thread of the worker (event loop, inference thread).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BENCH, BENCH_VENV, PY, REPO, JsonProc, env_with_repo  # noqa: E402
from bench.servers import ModelsrvServer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--kind", default="zmq-raw", choices=("zmq", "zmq-raw", "http"))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--no-access-log", action="store_true")
    ap.add_argument("--affinity", default="auto", help='worker_cpu_affinity, e.g. "10" (one worker on core 1)')
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--native", action="store_true", help="py-spy --native: C frames too (slows the worker a lot)")
    ap.add_argument("--gil", action="store_true", help="py-spy --gil: only samples of the thread holding the GIL")
    args = ap.parse_args()
    pyspy = str(BENCH_VENV / "bin" / "py-spy") if (BENCH_VENV / "bin" / "py-spy").exists() else shutil.which("py-spy")
    if not pyspy:
        raise SystemExit("py-spy not found: pip install py-spy into .venv-bench")
    work = Path(tempfile.mkdtemp(prefix="modelsrv-profile-"))
    srv = lg = None
    try:
        r = subprocess.run([PY, str(BENCH / "prepare.py"), str(work / "models"), args.model], capture_output=True,
                           env=env_with_repo(), cwd=str(REPO), check=True, timeout=600)
        import json

        m = json.loads(r.stdout.decode().strip().splitlines()[-1])[args.model]
        conf = {"path": m["folder"], "max_batch_size": args.max_batch_size, "batch_timeout": "2ms", "max_queue_size": 1024}
        srv = ModelsrvServer(work / "srv", {args.model: conf}, workers=args.workers,
                             access_log=not args.no_access_log, affinity=args.affinity).start()
        lg = JsonProc([PY, str(BENCH / "loadgen.py")], work / "loadgen.log", name="loadgen")
        cmd = {"op": "run", "kind": args.kind, "npz": m["npz"], "model": args.model, "concurrency": args.concurrency,
               "connections": 8, "warmup": 1.0, "duration": args.seconds + 1, "address": srv.zmq_address,
               "port": srv.http_port, "format": "kserve"}
        lg.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        lg.proc.stdin.flush()
        time.sleep(1.0)
        worker = srv.worker_pids()[0]
        out = work / "profile.txt"
        spy = subprocess.run([pyspy, "record", "-p", str(worker), "-d", str(int(args.seconds)), "-r", "200", "--format", "raw",
                        "-o", str(out), "--threads", *(["--native"] if args.native else ["--nonblocking"]),
                              *(["--gil"] if args.gil else [])], capture_output=True,
                            timeout=args.seconds + 60)
        if not out.exists():
            print(f"py-spy failed: {spy.stderr.decode()[-2000:]}")
        res = lg.read(args.seconds + 120)
        print(f"load: {res['rps']:.0f} req/s, p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, "
              f"client CPU {res['client_cpu']:.2f}")
        selfc: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        totals: collections.Counter = collections.Counter()
        for line in (out.read_text() if out.exists() else "").splitlines():
            stack, _, n = line.rpartition(" ")
            frames = stack.split(";")
            thread = frames[0] if frames else "?"
            count = int(n)
            totals[thread] += count
            fr = [re.sub(r":\d+\)$", ")", f) for f in frames[1:]]  # per function, not per line
            if fr:
                selfc[thread][fr[-1]] += count
            for f in set(fr):
                incl[thread][f] += count
        access = srv.prefix / "logs" / "access.log"
        if access.exists():
            batches: collections.Counter = collections.Counter()
            queue, compute = [], []
            for line in access.read_text().splitlines():
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                if fields.get("batch", "-") != "-":
                    batches[int(fields["batch"])] += 1
                    queue.append(float(fields["queue_ms"]))
                    compute.append(float(fields["compute_ms"]))
            if batches:
                n = sum(batches.values())
                print("requests by the size of the batch they ran in: " +
                      ", ".join(f"{b}: {100 * c / n:.0f}%" for b, c in sorted(batches.items())))
                queue.sort()
                compute.sort()
                print(f"median queue {queue[len(queue) // 2]:.2f} ms, median batch compute {compute[len(compute) // 2]:.2f} ms")
        for thread, total in totals.most_common():
            print(f"\n== {thread}: {total} samples")
            print("  self:")
            for f, c in selfc[thread].most_common(args.top):
                print(f"    {100 * c / total:5.1f}%  {f}")
            print("  inclusive:")
            for f, c in incl[thread].most_common(args.top):
                print(f"    {100 * c / total:5.1f}%  {f}")
    finally:
        if lg is not None:
            lg.close()
        if srv is not None:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

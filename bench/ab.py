"""Before/after: the server's CPU per request and req/s for two checkouts, in alternating rounds.

    .venv/bin/python bench/ab.py /path/to/checkout-before /path/to/checkout-after \\
        [--kind zmq-raw|zmq|http] [--workers 1] [--seconds 4] [--rounds 3] [--concurrency 32] [--affinity 10]

Each checkout's bin/modelsrv serves the tiny model (bench/prepare.py) with the same config; the
load generator (bench/loadgen.py, concurrency 32, 8 connections) alternates between them. One
checkout alone measures its CPU per request at a given concurrency (batch sizes follow it). CPU per
request: bench/common.py's cpu_per_request (the workers' CPU time over the call, from /proc).
Used for issue 11's "before".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BENCH, PY, JsonProc, cpu_per_request, env_with_repo, median  # noqa: E402
from bench.servers import ModelsrvServer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkouts", nargs="+", type=lambda p: Path(p).resolve())
    ap.add_argument("--kind", default="zmq-raw", choices=("zmq-raw", "zmq", "http"))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--affinity", default="auto", help='worker_cpu_affinity, e.g. "10": one worker on core 1')
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelsrv-ab-"))
    r = subprocess.run([PY, str(BENCH / "prepare.py"), str(work / "models"), "tiny"], capture_output=True,
                       env=env_with_repo(), check=True)
    model = json.loads(r.stdout.decode().strip().splitlines()[-1])["tiny"]
    conf = {"path": model["folder"], "max_batch_size": 32, "batch_timeout": "2ms", "max_queue_size": 1024}
    servers = [ModelsrvServer(work / f"ms{i}", {"tiny": conf}, workers=args.workers, repo=c, affinity=args.affinity)
               for i, c in enumerate(args.checkouts)]
    loadgen = JsonProc([PY, str(BENCH / "loadgen.py")], work / "loadgen.log", name="loadgen")
    results: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(servers))}
    try:
        for s in servers:
            s.start()
        base = {"op": "run", "npz": model["npz"], "model": "tiny", "warmup": 0.5, "duration": args.seconds,
                "max_requests": 400_000, "connections": min(8, args.concurrency), "concurrency": args.concurrency,
                "kind": args.kind}
        for rnd in range(args.rounds):
            for i, s in enumerate(servers):
                cmd = {**base, "port": s.http_port, "format": "kserve"} if args.kind == "http" else {
                    **base, "address": s.zmq_address}
                res, us = cpu_per_request(loadgen, s.worker_pids(), cmd, args.seconds + 60)
                results[i].append((res["rps"], us))
                print(f"round {rnd + 1}: {args.checkouts[i]}: {res['rps']:.0f} req/s, {us:.0f} us CPU per request",
                      flush=True)
        for i, c in enumerate(args.checkouts):
            print(f"median {c}: {median([x[0] for x in results[i]]):.0f} req/s, "
                  f"{median([x[1] for x in results[i]]):.0f} us CPU per request")
    finally:
        loadgen.close()
        for s in servers:
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

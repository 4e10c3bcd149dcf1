"""CPU per request against concurrency: the echo loop, the model loop and one modelsrv worker.

    .venv/bin/python bench/cost.py [--concurrency 1,4,32] [--rounds 3] [--seconds 2.5]

The tiny model (bench/prepare.py) over ZeroMQ with the bare pyzmq client (bench/loadgen.py
``zmq-raw``). Each server's CPU time (all its threads, from /proc) over a load point divided by
the requests answered: what one request costs the server at the batch sizes that concurrency
forms. The servers: the echo loop and the model loop (bench/echo.py: one process, one thread,
unpinned) and modelsrv with one worker pinned to core 1 (one torch thread, batches on the event
loop), with its access log and without. The difference between the model loop and modelsrv is
the server's own cost per request; the model loop's excess over the echo loop is the model's.
Interleaved rounds, medians.
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
from bench.servers import EchoServer, ModelsrvServer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,4,32", help="comma list")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.5)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="modelsrv-cost-"))
    r = subprocess.run([PY, str(BENCH / "prepare.py"), str(work / "models"), "tiny"], capture_output=True,
                       env=env_with_repo(), check=True)
    model = json.loads(r.stdout.decode().strip().splitlines()[-1])["tiny"]
    conf = {"path": model["folder"], "max_batch_size": 32, "batch_timeout": "2ms", "max_queue_size": 1024}
    servers = {
        "echo loop": EchoServer(work),
        "model loop": EchoServer(work, model["folder"]),
        "modelsrv 1 worker": ModelsrvServer(work / "ms", {"tiny": conf}, workers=1, affinity="10"),
        "modelsrv 1 worker, no access log": ModelsrvServer(work / "ms-nolog", {"tiny": conf}, workers=1, affinity="10",
                                                          access_log=False),
    }
    loadgen = JsonProc([PY, str(BENCH / "loadgen.py")], work / "loadgen.log", name="loadgen")
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        for s in servers.values():
            s.start()
        for rnd in range(args.rounds):
            for c in levels:
                for name, s in servers.items():
                    pids = s.worker_pids() if isinstance(s, ModelsrvServer) else [s.proc.pid]
                    cmd = {"op": "run", "npz": model["npz"], "model": "tiny", "warmup": 0.3, "duration": args.seconds,
                           "max_requests": 400_000, "connections": min(8, c), "concurrency": c, "kind": "zmq-raw",
                           "address": s.zmq_address}
                    res, us = cpu_per_request(loadgen, pids, cmd, args.seconds + 60)
                    results.setdefault((name, c), []).append((res["rps"], us))
                    print(f"round {rnd + 1}: c={c} {name}: {res['rps']:.0f} req/s, {us:.0f} us CPU per request",
                          flush=True)
        print("\n| server | " + " | ".join(f"c={c}: req/s, us CPU per request" for c in levels) + " |")
        print("|---|" + "---:|" * len(levels))
        for name in servers:
            cells = [f"{median([x[0] for x in results[(name, c)]]):.0f}, {median([x[1] for x in results[(name, c)]]):.0f}"
                     for c in levels]
            print(f"| {name} | " + " | ".join(cells) + " |")
    finally:
        loadgen.close()
        for s in servers.values():
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

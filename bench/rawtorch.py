"""The limit: the model's own forward in plain torch processes, no server, driven by JSON lines.

    python bench/rawtorch.py --folder F --npz X --procs 2 --threads 1 --pin
    stdin:  {"op": "run", "batch": 8, "duration": 5}
    stdout: {"ips": ..., "per_proc": [...], "batch_ms": ...}

``--procs`` processes with ``--threads`` torch threads each; ``--pin`` pins process i to core i
(as modelsrv's ``worker_cpu_affinity auto`` does with 2 workers on 2 cores). The processes start
each measurement together (a barrier) and each reports items / elapsed; the limit is the sum.
The forward is the model's own ``forward`` (what a modelsrv worker runs per batch) on one
prepared batch made by repeating the example request.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback


def worker(rank: int, args: argparse.Namespace, barrier, conn) -> None:
    if args.pin:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, [cores[rank % len(cores)]])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from models.base import load_model

    model = load_model(args.folder, "cpu")
    model.warmup()
    with np.load(args.npz) as z:
        example = {k: np.ascontiguousarray(z[k]) for k in z.files}
    conn.send({"ready": True})
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        try:
            b = int(cmd["batch"])
            inputs = {k: np.concatenate([v] * b) for k, v in example.items()}
            prepared = model.prepare(inputs, {})
            model.forward(prepared, {})  # a first run at this shape (oneDNN primitive creation)
            barrier.wait()
            start = time.perf_counter()
            n = 0
            batches = []
            while True:
                t = time.perf_counter()
                model.forward(prepared, {})
                now = time.perf_counter()
                batches.append(now - t)
                n += b * next(iter(example.values())).shape[0]
                if now - start >= cmd["duration"]:
                    break
            elapsed = time.perf_counter() - start
            batches.sort()
            conn.send({"items": n, "elapsed": elapsed, "ips": n / elapsed, "batch_ms": batches[len(batches) // 2] * 1000})
        except Exception as exc:
            conn.send({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True)
    ap.add_argument("--npz", required=True)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pin", action="store_true")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(args.procs)
    pipes, procs = [], []
    for rank in range(args.procs):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker, args=(rank, args, barrier, child), daemon=True)
        p.start()
        pipes.append(parent)
        procs.append(p)
    for parent in pipes:
        if not parent.poll(300):
            raise SystemExit("raw torch worker did not load its model within 300 s")
        parent.recv()
    sys.stdout.write(json.dumps({"ready": True, "pids": [p.pid for p in procs]}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        for parent in pipes:
            parent.send(cmd)
        parts = []
        for parent in pipes:
            if not parent.poll(cmd["duration"] + 300):
                parts.append({"error": "no answer"})
            else:
                parts.append(parent.recv())
        errors = [p for p in parts if "error" in p]
        if errors:
            reply = {"error": errors[0]["error"], "trace": errors[0].get("trace", "")}
        else:
            reply = {"ips": sum(p["ips"] for p in parts), "per_proc": [p["ips"] for p in parts],
                     "batch_ms": max(p["batch_ms"] for p in parts), "batch": cmd["batch"]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    for parent in pipes:
        parent.send(None)
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())

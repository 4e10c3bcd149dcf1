"""Memory under load, per process: modelsrv against LitServe on DenseNet-121, sampled during the load.

    .venv/bin/python bench/memory.py [--rounds 3] [--seconds 10] [--concurrency 32] [--peers litserve|none]
                                     [--variants ENV=VALUE[,ENV=VALUE] ...]

bench/run.py reads each server's PSS once, right at the end of a load point; this samples every
process of each server every 0.25 s during the load, so the peak is the peak, and keeps the
per-process figures (master, preload, each worker; LitServe's every process). Configurations, in
interleaved rounds, each alone (LitServe frozen while the others run; modelsrv idles at ~0 CPU):
modelsrv as configured by default, modelsrv with each ``--variants`` environment (by default glibc's
``MALLOC_ARENA_MAX=1`` and ``=2``: every thread of a worker allocating from one or two malloc arenas
instead of one per thread, so the inference thread's activations and the loop's request buffers
reuse the same free memory; ``MALLOC_MMAP_THRESHOLD_=N`` fixes the size above which a block is
mapped on its own and unmapped at its free), and LitServe (max_batch_size 32,
as in bench/run.py). HTTP, KServe binary for modelsrv, JSON for LitServe (the only body it takes).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median, pss_mib  # noqa: E402
from bench.run import Bench  # noqa: E402
from bench.servers import LitServeServer, ModelsrvServer  # noqa: E402


def sample_load(bench: Bench, srv, cmd: dict) -> dict:
    """Run one load point on ``srv`` while sampling its processes' PSS; figures in MiB."""
    idle = {p: pss_mib([p]) for p in srv.pids()}
    samples: list[dict[int, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append({p: pss_mib([p]) for p in srv.pids()})
            time.sleep(0.25)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        res = bench.start_loadgen().call({"op": "run", **cmd}, timeout=cmd["warmup"] + cmd["duration"] + 120)
        end = {p: pss_mib([p]) for p in srv.pids()}
    finally:
        done.set()
        t.join()
    return {"ips": res["ips"], "errors": res.get("errors", 0), "idle": sum(idle.values()),
            "peak": max((sum(s.values()) for s in samples), default=0.0), "end": sum(end.values()),
            "per_process_peak": {str(p): max(s.get(p, 0.0) for s in samples) for p in idle}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--peers", default="litserve", help="litserve or none")
    ap.add_argument("--variants", nargs="*", default=["MALLOC_ARENA_MAX=1", "MALLOC_ARENA_MAX=2"],
                    help="modelsrv configurations to add, each a comma-separated list of ENV=VALUE")
    args = ap.parse_args()
    bench = Bench(argparse.Namespace(quick=False, rounds=args.rounds, out="/tmp", peers=args.peers, only=""))
    try:
        bench.prepare(["densenet121"])
        m = bench.models["densenet121"]
        conf = {"path": m["folder"], "max_batch_size": 8, "batch_timeout": "2ms", "max_queue_size": 256}  # = conf/srv.conf
        servers = {"modelsrv": bench.server(ModelsrvServer(bench.work / "ms", {"densenet121": conf}))}
        for i, variant in enumerate(args.variants):
            env = dict(kv.split("=", 1) for kv in variant.split(","))
            servers[f"modelsrv {variant}"] = bench.server(ModelsrvServer(bench.work / f"ms-{i}", {"densenet121": conf},
                                                                         env=env))
        if "litserve" in bench.peers:
            ls = bench.server(LitServeServer(bench.work / "ls", m["folder"], 2, 32, 0.002))
            bench.freezable.append(ls)
            servers["LitServe"] = ls
        base = {"npz": m["npz"], "model": "densenet121", "concurrency": args.concurrency, "warmup": 2.0,
                "duration": args.seconds, "max_requests": 5000, "kind": "http"}
        results: dict[str, list[dict]] = {name: [] for name in servers}
        names = list(servers)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                srv = servers[name]
                bench.alone(srv)
                cmd = ({**base, "port": srv.http_port, "format": "kserve"} if isinstance(srv, ModelsrvServer)
                       else {**base, "port": srv.port, "format": "json", "path": "/predict"})
                res = sample_load(bench, srv, cmd)
                results[name].append(res)
                bench.log(f"round {r + 1}/{args.rounds} {name}: {res['ips']:.1f} images/s, PSS MiB idle "
                          f"{res['idle']:.0f}, peak {res['peak']:.0f}, end {res['end']:.0f}; per process peak "
                          f"{sorted(round(v) for v in res['per_process_peak'].values())}")
        print("\n| configuration | images/s | PSS idle | peak during load | at load end | rounds |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, rs in results.items():
            print(f"| {name} | {median([x['ips'] for x in rs]):.1f} | {median([x['idle'] for x in rs]):.0f} | "
                  f"{median([x['peak'] for x in rs]):.0f} ({min(x['peak'] for x in rs):.0f}-"
                  f"{max(x['peak'] for x in rs):.0f}) | {median([x['end'] for x in rs]):.0f} | {len(rs)} |")
    finally:
        bench.close()  # thaws LitServe first
    return 0


if __name__ == "__main__":
    sys.exit(main())

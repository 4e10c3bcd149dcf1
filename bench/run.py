"""modelsrv benchmarks: the serving path against raw torch, a bare ZeroMQ echo loop and the peers.

    .venv/bin/python bench/run.py                 # everything, 3 rounds (10.5 minutes on 2 cores before the
                                                  # FastAPI and TorchServe peers: 6 more points in densenet, 4 in tiny)
    .venv/bin/python bench/run.py --quick         # 1 round, shorter points (a smoke run)
    .venv/bin/python bench/run.py --only tiny     # one section: densenet | tiny | models (comma list)
    .venv/bin/python bench/run.py --peers fastapi # peers: litserve,fastapi,torchserve (default all) or none

Sections (docs/BENCHMARKS.md says what each measures and why):
- densenet: DenseNet-121 1x3x224x224. The limit (raw torch, 2 processes x 1 thread pinned, and 1
  process x 2 threads, at the best batch size of a sweep) against modelsrv over HTTP (KServe
  binary) and ZeroMQ (AsyncClient) at concurrency 1, 8, 32, and the peers (.venv-bench) the same:
  LitServe, a hand-rolled FastAPI + uvicorn server, TorchServe.
- tiny: per-request overhead. A minimal DenseNet on 1x3x8x8 over ZeroMQ at concurrency 32, with 1
  and 2 workers, against a bare pyzmq ROUTER echo loop in one process answering the same payload
  and the same loop running the model on each batch of waiting requests (the model loop: the
  model's own cost included, nothing of a server); each with the product's AsyncClient and with a
  bare pyzmq client. Also modelsrv against the peers over HTTP at concurrency 1 and 32.
- models: AFNO, MaskFormer, DETR3D (small configs): modelsrv over ZeroMQ against raw torch.

Every configuration of a section is started once and measured in interleaved rounds (so a noisy
neighbour hits all of them alike); figures are medians over rounds, ratios are medians of the
per-round ratios. The load generator is a separate process (bench/loadgen.py). Results:
bench/results/<section>.json and bench/results/summary.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    BENCH,
    PY,
    REPO,
    JsonProc,
    cpu_seconds,
    env_with_repo,
    loadavg,
    machine_description,
    median,
    signal_tree,
)
from bench.servers import EchoServer, FastAPIServer, LitServeServer, ModelsrvServer, TorchServeServer  # noqa: E402

SECTIONS = ("densenet", "tiny", "models")
# The peers, in .venv-bench (make bench-env): name on the command line -> (label in the tables, server class)
PEERS = {"litserve": ("LitServe", LitServeServer), "fastapi": ("FastAPI", FastAPIServer),
         "torchserve": ("TorchServe", TorchServeServer)}
CLIENT_BOUND = 0.8  # client CPU (cores) from which a point is marked client-bound in the tables


class Point:
    """One configuration measured once per round."""

    def __init__(self, name: str, measure, group: str = "", server: Any = None, **info: Any) -> None:
        self.name, self.measure, self.group, self.info = name, measure, group, info
        self.server = server  # the server under load (None: raw torch, no server)
        self.rounds: list[dict[str, Any]] = []

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.rounds if "error" not in r]
        out: dict[str, Any] = {"name": self.name, "group": self.group, **self.info, "rounds": len(ok)}
        for key in ("ips", "rps", "p50_ms", "p99_ms", "client_cpu", "batch_ms", "errors", "worker_cpu_max",
                    "worker_cpu_min", "server_cpu"):
            vals = [r[key] for r in ok if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
            if vals:
                out[key] = median(vals)
                if key in ("ips", "rps"):
                    out[key + "_min"], out[key + "_max"] = min(vals), max(vals)
        return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.rounds = args.rounds or (1 if args.quick else 3)
        self.work = Path(tempfile.mkdtemp(prefix="modelsrv-bench-"))
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cleanup: list[Any] = []
        # peers are frozen (SIGSTOP) while anything else is measured: their idle processes (a JVM,
        # polling loops) otherwise take core time from whatever runs beside them (docs: "Idle peers")
        self.freezable: list[Any] = []
        self.frozen: set[int] = set()
        self.loadgen: JsonProc | None = None
        self.peaks: dict[int, float] = {}  # id(server) -> PSS right after its heaviest load point, MiB
        self.models: dict[str, dict] = {}
        wanted = [p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none"]
        self.peers = [p for p in PEERS if p in wanted and PEERS[p][1].available()]
        for p in wanted:
            if p not in self.peers:
                print(f"note: {PEERS[p][0]} not available in .venv-bench (make bench-env; TorchServe also needs "
                      "java): its points are skipped (see docs/BENCHMARKS.md)")
        self.peer_errors: dict[str, str] = {}

    # -- helpers ------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def prepare(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.models]
        if not missing:
            return
        r = subprocess.run([PY, str(BENCH / "prepare.py"), str(self.work / "models"), *missing], capture_output=True,
                           env=env_with_repo(), cwd=str(REPO), timeout=600)
        if r.returncode:
            raise RuntimeError(f"prepare.py failed:\n{r.stderr.decode()[-3000:]}")
        self.models.update(json.loads(r.stdout.decode().strip().splitlines()[-1]))

    def start_loadgen(self) -> JsonProc:
        if self.loadgen is None:
            self.loadgen = JsonProc([PY, str(BENCH / "loadgen.py")], self.work / "loadgen.log", name="loadgen")
            self.cleanup.append(self.loadgen)
        return self.loadgen

    def raw_group(self, model: str, procs: int, threads: int) -> JsonProc:
        m = self.models[model]
        argv = [PY, str(BENCH / "rawtorch.py"), "--folder", m["folder"], "--npz", m["npz"], "--procs", str(procs),
                "--threads", str(threads)] + (["--pin"] if procs > 1 else [])
        p = JsonProc(argv, self.work / f"raw-{model}-{procs}x{threads}.log", name=f"raw {model} {procs}x{threads}")
        self.cleanup.append(p)
        p.read(300)
        return p

    def raw_point(self, name: str, group: JsonProc, batch: int, duration: float, **info: Any) -> Point:
        def measure() -> dict[str, Any]:
            pids = group.pids()
            before, t = cpu_seconds(pids), time.perf_counter()
            res = group.call({"op": "run", "batch": batch, "duration": duration}, timeout=duration + 300)
            res["server_cpu"] = (cpu_seconds(pids) - before) / (time.perf_counter() - t)  # no client: the processes' own
            return res

        return Point(name, measure, group="raw", batch=batch, **info)

    def load_point(self, name: str, server: Any, cmd: dict[str, Any], group: str, **info: Any) -> Point:
        lg = self.start_loadgen()

        def measure() -> dict[str, Any]:
            # server CPU: every process of the server (master, frontend, supervisor...); worker CPU: each
            # model worker's, where the server can tell its workers apart (modelsrv, FastAPI, TorchServe)
            pids = server.pids()
            workers = server.worker_pids() if hasattr(server, "worker_pids") else []
            before = {p: cpu_seconds([p]) for p in pids + workers}
            t = time.perf_counter()
            res = lg.call({"op": "run", **cmd}, timeout=cmd["warmup"] + cmd["duration"] + 120)
            wall = time.perf_counter() - t
            use = {p: (cpu_seconds([p]) - b) / wall for p, b in before.items()}
            # memory right at the end of the load (the largest batch's activations still held): the peak
            self.peaks[id(server)] = max(self.peaks.get(id(server), 0.0), server.pss())
            if pids:
                res["server_cpu"] = sum(use[p] for p in pids)
            if workers:
                res["worker_cpu"] = [use[p] for p in workers]
                res["worker_cpu_max"], res["worker_cpu_min"] = max(res["worker_cpu"]), min(res["worker_cpu"])
            if res.get("errors"):
                self.log(f"  {name}: {res['errors']} errors, e.g. {res.get('error_samples')}")
            return res

        return Point(name, measure, group=group, server=server, concurrency=cmd["concurrency"], kind=cmd["kind"], **info)

    def alone(self, server: Any) -> None:
        """Freeze every peer but ``server`` (modelsrv and the echo loop idle at ~0 CPU and stay up)."""
        for srv in self.freezable:
            frozen = id(srv) in self.frozen
            if srv is server and frozen:
                signal_tree(srv.pids(), signal.SIGCONT)
                self.frozen.discard(id(srv))
            elif srv is not server and not frozen:
                signal_tree(srv.pids(), signal.SIGSTOP)
                self.frozen.add(id(srv))

    def thaw(self) -> None:
        self.alone(None)
        for srv in self.freezable:
            signal_tree(srv.pids(), signal.SIGCONT)
        self.frozen.clear()

    def run_rounds(self, points: list[Point]) -> None:
        try:
            self._run_rounds(points)
        finally:
            self.thaw()

    def _run_rounds(self, points: list[Point]) -> None:
        for r in range(self.rounds):
            order = points[r % len(points):] + points[: r % len(points)]  # rotate: no point always first
            for p in order:
                try:
                    self.alone(p.server)
                    res = p.measure()
                except Exception as exc:  # one failed point must not lose the others
                    res = {"error": str(exc)[-2000:]}
                    self.log(f"  {p.name}: FAILED {str(exc)[:300]}")
                res["round"] = r
                p.rounds.append(res)
                if "error" not in res:
                    fig = f"{res['ips']:.1f}/s" if "ips" in res else ""
                    lat = f" p50 {res['p50_ms']:.1f} ms p99 {res['p99_ms']:.1f} ms" if "p50_ms" in res else ""
                    self.log(f"  round {r + 1}/{self.rounds} {p.name}: {fig}{lat}")

    @staticmethod
    def paired_ratio(a: Point, b: Point, key: str = "ips") -> float:
        """Median over rounds of a/b measured in the same round."""
        rb = {r["round"]: r for r in b.rounds if "error" not in r}
        ratios = [r[key] / rb[r["round"]][key] for r in a.rounds
                  if "error" not in r and r["round"] in rb and rb[r["round"]][key]]
        return median(ratios) if ratios else float("nan")

    def save(self, section: str, points: list[Point], extra: dict[str, Any]) -> dict[str, Any]:
        doc = {"section": section, "meta": self.meta(), "points": [p.summary() for p in points],
               "raw": {p.name: p.rounds for p in points}, **extra}
        (self.out / f"{section}.json").write_text(json.dumps(doc, indent=1, default=str))
        return doc

    def meta(self) -> dict[str, Any]:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip()
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                        capture_output=True, text=True).stdout.strip())
        except OSError:
            commit, dirty = "?", False
        return {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine_description(),
                "loadavg": loadavg(), "commit": commit + ("+dirty" if dirty else ""), "rounds": self.rounds,
                "quick": self.quick, "command": " ".join(["bench/run.py", *sys.argv[1:]])}

    def close(self) -> None:
        self.thaw()  # a stopped process does not act on SIGTERM
        for thing in reversed(self.cleanup):
            try:
                if hasattr(thing, "close"):
                    thing.close()
                else:
                    thing.stop()
            except Exception as exc:  # keep stopping the rest
                print(f"cleanup: {exc}")
        shutil.rmtree(self.work, ignore_errors=True)

    def server(self, srv: Any) -> Any:
        self.cleanup.append(srv)
        return srv.start()

    def start_peers(self, section: str, model: str, folder: str, max_batch_size: int) -> dict[str, tuple[Any, str]]:
        """Start every chosen peer on ``folder``: {label: (server, URL path)}; a peer that fails to start is skipped."""
        out: dict[str, tuple[Any, str]] = {}
        for key in self.peers:
            label = PEERS[key][0]
            prefix = self.work / f"{key}-{section}"
            if key == "litserve":  # batching as modelsrv's earlier default (max_batch_size 32, 2 ms)
                srv, path = LitServeServer(prefix, folder, 2, 32, 0.002), "/predict"
            elif key == "fastapi":  # no batching: the model inline in each of 2 uvicorn workers
                srv, path = FastAPIServer(prefix, folder, 2), "/predict"
            else:  # batching as modelsrv's section config: batch size = its max_batch_size, 2 ms
                srv, path = TorchServeServer(prefix, model, folder, 2, max_batch_size, 2), f"/predictions/{model}"
            try:
                t = time.monotonic()
                out[label] = (self.server(srv), path)
                self.freezable.append(srv)
                self.log(f"  {label} ready in {time.monotonic() - t:.0f} s")
            except Exception as exc:  # the other servers' points still run
                self.peer_errors[f"{section}: {label}"] = str(exc)[-2000:]
                self.log(f"  {label}: FAILED to start, its points are skipped: {str(exc)[:500]}")
                srv.stop()
        return out

    def peer_memory(self, peers: dict[str, tuple[Any, str]]) -> dict[str, float]:
        what = {"LitServe": "all processes", "FastAPI": "uvicorn supervisor + 2 workers",
                "TorchServe": "launcher + JVM frontend + 2 workers"}
        out = {f"{label} ({what.get(label, 'all processes')})": srv.pss() for label, (srv, _) in peers.items()}
        out.update({f"{label}, peak (at the end of a load point)": self.peaks.get(id(srv), 0.0)
                    for label, (srv, _) in peers.items()})
        return out

    # -- sections ---------------------------------------------------------------------------------
    def densenet(self) -> dict[str, Any]:
        q = self.quick
        # (warm-up, window) per concurrency: at c=32 a request waits ~2 s, a CPU batch of 16 takes seconds
        timing = {1: (1.0, 3.0), 8: (2.0, 4.0), 32: (4.0, 5.0)} if q else {1: (1.0, 5.0), 8: (2.0, 6.0), 32: (4.0, 8.0)}
        raw_dur = 3.0 if q else 6.0
        self.prepare(["densenet121"])
        m = self.models["densenet121"]
        self.log("densenet: loading raw torch processes")
        raw21 = self.raw_group("densenet121", 2, 1)
        raw12 = self.raw_group("densenet121", 1, 2)
        sweep = {}
        for bs in ((1, 4, 8) if q else (1, 2, 4, 8, 16)):
            res = raw21.call({"op": "run", "batch": bs, "duration": 2.0 if q else 3.0}, timeout=400)
            sweep[bs] = res
            self.log(f"  sweep 2x1 batch {bs}: {res['ips']:.2f} images/s (batch {res['batch_ms']:.0f} ms)")
        best = max(sweep, key=lambda b: sweep[b]["ips"])
        self.log(f"densenet: best raw batch size {best}; starting servers")
        conf = {"path": m["folder"], "max_batch_size": 8, "batch_timeout": "2ms", "max_queue_size": 256}  # = conf/srv.conf
        ms = self.server(ModelsrvServer(self.work / "ms-densenet", {"densenet121": conf}, workers=2))
        ms32 = self.server(ModelsrvServer(self.work / "ms-densenet-32", {"densenet121": {**conf, "max_batch_size": 32}},
                                          workers=2))
        # batching off (max_batch_size 1): what batching costs a lone request at c=1
        ms1 = self.server(ModelsrvServer(self.work / "ms-densenet-1", {"densenet121": {**conf, "max_batch_size": 1}},
                                         workers=2))
        peers = self.start_peers("densenet", "densenet121", m["folder"], conf["max_batch_size"])
        points = [self.raw_point("raw torch 2 proc x 1 thread", raw21, best, raw_dur, procs=2, threads=1),
                  self.raw_point("raw torch 1 proc x 2 threads", raw12, best, raw_dur, procs=1, threads=2)]
        for c in (1, 8, 32):
            warm, dur = timing[c]
            base = {"npz": m["npz"], "model": "densenet121", "concurrency": c, "warmup": warm, "duration": dur,
                    "max_requests": 5000}
            http = {**base, "kind": "http", "format": "kserve"}
            zmq = {**base, "kind": "zmq", "connections": 8}
            points.append(self.load_point(f"modelsrv HTTP c={c}", ms, {**http, "port": ms.http_port}, "modelsrv-http"))
            points.append(self.load_point(f"modelsrv ZMQ c={c}", ms, {**zmq, "address": ms.zmq_address}, "modelsrv-zmq"))
            if c == 1:
                points.append(self.load_point("modelsrv batching off (mbs1) HTTP c=1", ms1, {**http, "port": ms1.http_port},
                                              "modelsrv-mbs1-http"))
            for label, (srv, path) in peers.items():
                points.append(self.load_point(f"{label} HTTP c={c}", srv, {**base, "kind": "http", "port": srv.port,
                                                                            "format": "json", "path": path},
                                              f"{label.lower()}-http"))
            if c == 32:  # the same server with max_batch_size 32 (LitServe's setting here; the earlier default)
                points.append(self.load_point(f"modelsrv mbs32 HTTP c={c}", ms32, {**http, "port": ms32.http_port},
                                              "modelsrv-mbs32-http"))
                points.append(self.load_point(f"modelsrv mbs32 ZMQ c={c}", ms32, {**zmq, "address": ms32.zmq_address},
                                              "modelsrv-mbs32-zmq"))
        self.log(f"densenet: {len(points)} points x {self.rounds} rounds")
        self.run_rounds(points)
        by = {p.name: p for p in points}
        limit = by["raw torch 2 proc x 1 thread"]
        targets = {}
        for proto in ("HTTP", "ZMQ"):
            for variant in ("", "mbs32 "):
                targets[f"modelsrv {variant}{proto} c=32 / raw 2x1 limit"] = self.paired_ratio(
                    by[f"modelsrv {variant}{proto} c=32"], limit)
        targets["modelsrv HTTP c=1, batching on (mbs8) / off (mbs1)"] = self.paired_ratio(
            by["modelsrv HTTP c=1"], by["modelsrv batching off (mbs1) HTTP c=1"])
        for label in peers:
            for proto in ("HTTP", "ZMQ"):
                for c in (1, 8, 32):
                    targets[f"modelsrv {proto} / {label} c={c}"] = self.paired_ratio(by[f"modelsrv {proto} c={c}"],
                                                                                    by[f"{label} HTTP c={c}"])
                targets[f"modelsrv mbs32 {proto} / {label} c=32"] = self.paired_ratio(by[f"modelsrv mbs32 {proto} c=32"],
                                                                                      by[f"{label} HTTP c=32"])
        time.sleep(2.0)  # idle: a modelsrv worker gives its allocator's free memory back (worker_malloc_trim)
        memory = {"modelsrv mbs8 (master + 2 workers)": ms.pss(), "modelsrv mbs32 (master + 2 workers)": ms32.pss(),
                  **self.peer_memory(peers),
                  "modelsrv mbs8, peak (at the end of a load point)": self.peaks.get(id(ms), 0.0),
                  "modelsrv mbs32, peak (at the end of a load point)": self.peaks.get(id(ms32), 0.0)}
        for s in (ms, ms32, *(srv for srv, _ in peers.values())):
            s.stop()
        return self.save("densenet", points, {"sweep_2x1": {str(k): v for k, v in sweep.items()}, "best_batch": best,
                                              "targets": targets, "pss_mib": memory,
                                              "peer_errors": {k: v for k, v in self.peer_errors.items()
                                                              if k.startswith("densenet:")}})

    def tiny(self) -> dict[str, Any]:
        q = self.quick
        dur, warm = (2.0, 0.75) if q else (2.5, 0.75)
        self.prepare(["tiny"])
        m = self.models["tiny"]
        conf = {"path": m["folder"], "max_batch_size": 32, "batch_timeout": "2ms", "max_queue_size": 1024}
        self.log("tiny: starting echo, the model loop, modelsrv (2 workers; 1 worker on 1 core), the peers")
        echo = self.server(EchoServer(self.work))
        model_loop = self.server(EchoServer(self.work, m["folder"]))
        ms2 = self.server(ModelsrvServer(self.work / "ms-tiny-2", {"tiny": conf}, workers=2))
        # one worker on one core (CPU 1): one torch thread and its batches on the event loop, as the
        # model loop runs them; the load generator has the other core
        ms1 = self.server(ModelsrvServer(self.work / "ms-tiny-1", {"tiny": conf}, workers=1, affinity="10"))
        peers = self.start_peers("tiny", "tiny", m["folder"], conf["max_batch_size"])
        base = {"npz": m["npz"], "model": "tiny", "warmup": warm, "duration": dur, "max_requests": 200_000,
                "connections": 8}
        points = []
        for client in ("zmq", "zmq-raw"):
            label = "AsyncClient" if client == "zmq" else "bare pyzmq client"
            for name, srv, grp in (("echo loop", echo, "echo"), ("model loop", model_loop, "model-loop"),
                                   ("modelsrv 2 workers", ms2, "modelsrv-2w"), ("modelsrv 1 worker", ms1, "modelsrv-1w")):
                points.append(self.load_point(f"{name} ZMQ c=32 ({label})", srv,
                                              {**base, "kind": client, "address": srv.zmq_address, "concurrency": 32},
                                              f"{grp}-{client}"))
        for c in (1, 32):
            points.append(self.load_point(f"modelsrv 2 workers HTTP c={c}", ms2,
                                          {**base, "kind": "http", "port": ms2.http_port, "format": "kserve",
                                           "concurrency": c}, "modelsrv-http"))
            for label, (srv, path) in peers.items():
                points.append(self.load_point(f"{label} HTTP c={c}", srv,
                                              {**base, "kind": "http", "port": srv.port, "format": "json", "path": path,
                                               "concurrency": c}, f"{label.lower()}-http"))
        self.log(f"tiny: {len(points)} points x {self.rounds} rounds")
        self.run_rounds(points)
        by = {p.name: p for p in points}
        targets = {}
        for label in ("AsyncClient", "bare pyzmq client"):
            echo_p = by[f"echo loop ZMQ c=32 ({label})"]
            for w in ("2 workers", "1 worker"):
                targets[f"modelsrv {w} / echo ({label})"] = self.paired_ratio(by[f"modelsrv {w} ZMQ c=32 ({label})"],
                                                                             echo_p, "rps")
                targets[f"modelsrv {w} / model loop ({label})"] = self.paired_ratio(
                    by[f"modelsrv {w} ZMQ c=32 ({label})"], by[f"model loop ZMQ c=32 ({label})"], "rps")
        for label in peers:
            for c in (1, 32):
                targets[f"modelsrv HTTP / {label} c={c}"] = self.paired_ratio(by[f"modelsrv 2 workers HTTP c={c}"],
                                                                             by[f"{label} HTTP c={c}"], "rps")
        time.sleep(2.0)  # idle: a modelsrv worker gives its allocator's free memory back (worker_malloc_trim)
        memory = {"modelsrv 2 workers (master + 2 workers)": ms2.pss(), "modelsrv 1 worker (master + 1 worker)": ms1.pss(),
                  "echo loop": echo.pss(), "model loop": model_loop.pss(), **self.peer_memory(peers),
                  "modelsrv 2 workers, peak (at the end of a load point)": self.peaks.get(id(ms2), 0.0)}
        if "FastAPI" in peers:  # the memory target: modelsrv <= 0.75 of the FastAPI peer on this model
            fa = [v for k, v in memory.items() if k.startswith("FastAPI")][0]
            targets["PSS modelsrv 2 workers / FastAPI"] = memory["modelsrv 2 workers (master + 2 workers)"] / fa
            fa_peak = memory.get("FastAPI, peak (at the end of a load point)")
            if fa_peak:
                targets["PSS peak modelsrv 2 workers / FastAPI"] = (
                    memory["modelsrv 2 workers, peak (at the end of a load point)"] / fa_peak)
        for s in (echo, model_loop, ms2, ms1, *(srv for srv, _ in peers.values())):
            s.stop()
        return self.save("tiny", points, {"targets": targets, "pss_mib": memory,
                                          "peer_errors": {k: v for k, v in self.peer_errors.items()
                                                          if k.startswith("tiny:")}})

    def models_section(self) -> dict[str, Any]:
        q = self.quick
        dur, warm = (2.0, 1.0) if q else (3.0, 1.0)
        names = ["afno", "maskformer", "detr3d"]
        self.prepare(names)
        raws, sweeps, best = {}, {}, {}
        for n in names:
            self.log(f"models: raw torch {n}")
            raws[n] = self.raw_group(n, 2, 1)
            sweeps[n] = {}
            for bs in ((1, 8) if q else (1, 4, 8, 16)):
                sweeps[n][bs] = raws[n].call({"op": "run", "batch": bs, "duration": 1.5}, timeout=300)
            best[n] = max(sweeps[n], key=lambda b: sweeps[n][b]["ips"])
            self.log(f"  {n}: " + ", ".join(f"bs {b}: {r['ips']:.0f}/s" for b, r in sweeps[n].items()))
        confs = {n: {"path": self.models[n]["folder"], "max_batch_size": 16, "batch_timeout": "2ms"} for n in names}
        ms = self.server(ModelsrvServer(self.work / "ms-models", confs, workers=2))
        points = []
        for n in names:
            points.append(self.raw_point(f"{n}: raw torch 2x1", raws[n], best[n], dur, model=n))
            points.append(self.load_point(f"{n}: modelsrv ZMQ c=32", ms,
                                          {"npz": self.models[n]["npz"], "model": n, "kind": "zmq",
                                           "address": ms.zmq_address, "connections": 8, "concurrency": 32,
                                           "warmup": warm, "duration": dur, "max_requests": 100_000},
                                          "modelsrv-zmq", model=n))
        self.log(f"models: {len(points)} points x {self.rounds} rounds")
        self.run_rounds(points)
        by = {p.name: p for p in points}
        targets = {f"{n}: modelsrv ZMQ c=32 / raw 2x1": self.paired_ratio(by[f"{n}: modelsrv ZMQ c=32"],
                                                                           by[f"{n}: raw torch 2x1"]) for n in names}
        ms.stop()
        return self.save("models", points, {"targets": targets, "best_batch": best,
                                            "sweep_2x1": {n: {str(b): r for b, r in s.items()} for n, s in sweeps.items()},
                                            "shapes": {n: self.models[n]["shapes"] for n in names}})


# -- report --------------------------------------------------------------------------------------------
def fmt(v: Any, digits: int = 1) -> str:
    if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def markdown(docs: dict[str, dict[str, Any]]) -> str:
    out: list[str] = []
    meta = next(iter(docs.values()))["meta"] if docs else {}
    out.append(f"Run {meta.get('date')} on {meta.get('machine')}; commit {meta.get('commit')}; "
               f"{meta.get('rounds')} round(s); load average at the end {meta.get('loadavg')}.\n")
    out.append(f"client CPU: the load generator's CPU over the window, in cores; '(client-bound)' from {CLIENT_BOUND}: "
               "there the client, not the server, may be the limit. server CPU: all the server's processes.\n")
    for section, doc in docs.items():
        per = "images/s" if section != "tiny" else "req/s"
        key = "ips" if section != "tiny" else "rps"
        out.append(f"### {section}\n")
        if "best_batch" in doc:
            out.append(f"Best raw batch size (2x1 sweep): {doc['best_batch']}\n")
        out.append(f"| configuration | {per} (median) | min-max | p50 ms | p99 ms | client CPU | server CPU | "
                   "busiest/idlest worker |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for p in doc["points"]:
            rng = f"{fmt(p.get(key + '_min'))}-{fmt(p.get(key + '_max'))}" if key + "_min" in p else "-"
            if p["group"] == "raw":
                lat = f"batch {p.get('batch')}: {fmt(p.get('batch_ms'))}"
                out.append(f"| {p['name']} | {fmt(p.get(key, p.get('ips')))} | {rng} | {lat} | - | no client | "
                           f"{fmt(p.get('server_cpu'), 2)} | - |")
            else:
                wc = f"{fmt(p.get('worker_cpu_max'), 2)}/{fmt(p.get('worker_cpu_min'), 2)}" if "worker_cpu_max" in p else "-"
                err = f" ({p['errors']:.0f} errors)" if p.get("errors") else ""
                ccpu = fmt(p.get("client_cpu"), 2)
                if isinstance(p.get("client_cpu"), float) and p["client_cpu"] >= CLIENT_BOUND:
                    ccpu += " (client-bound)"
                out.append(f"| {p['name']}{err} | {fmt(p.get(key))} | {rng} | {fmt(p.get('p50_ms'))} | "
                           f"{fmt(p.get('p99_ms'))} | {ccpu} | {fmt(p.get('server_cpu'), 2)} | {wc} |")
        out.append("")
        if any(r.get("error") for rounds in doc.get("raw", {}).values() for r in rounds):
            failed = sorted({n for n, rounds in doc["raw"].items() for r in rounds if r.get("error")})
            out.append("Failed measurements (see the JSON): " + ", ".join(failed) + "\n")
        for peer, err in doc.get("peer_errors", {}).items():
            out.append(f"Peer not measured: {peer}: {err.splitlines()[0] if err else '?'}\n")
        if doc.get("targets"):
            out.append("| ratio (median of per-round ratios) | value |")
            out.append("|---|---:|")
            for k, v in doc["targets"].items():
                out.append(f"| {k} | {fmt(v, 2)} |")
            out.append("")
        if doc.get("pss_mib"):
            out.append("Memory (PSS, MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in doc["pss_mib"].items()) + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round, shorter points")
    ap.add_argument("--only", default="", help=f"comma list of sections: {', '.join(SECTIONS)}")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per point (default 3, --quick 1)")
    ap.add_argument("--peers", "--peer", dest="peers", default=",".join(PEERS),
                    help=f"comma list of peers to measure beside modelsrv: {', '.join(PEERS)} (default all), or none")
    ap.add_argument("--out", default=str(BENCH / "results"))
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    bad = [p for p in args.peers.split(",") if p.strip() and p.strip() not in (*PEERS, "none")]
    if bad:
        ap.error(f"unknown peer(s) {bad}; choose from {', '.join(PEERS)} or none")
    bench = Bench(args)
    docs: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    try:
        for section in only:
            t = time.monotonic()
            docs[section] = {"densenet": bench.densenet, "tiny": bench.tiny, "models": bench.models_section}[section]()
            bench.log(f"{section} done in {time.monotonic() - t:.0f} s")
    finally:
        bench.close()
    text = markdown(docs)
    (Path(args.out) / "summary.md").write_text(text + "\n")
    print(text)
    print(f"total {time.monotonic() - started:.0f} s; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

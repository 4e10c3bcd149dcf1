"""Generation benchmark (issue 7): BLOOM behind modelsrv's OpenAI API against transformers.

    make bench-env                                  # .venv-bench: torch 2.13.0 + transformers[serving]
    .venv/bin/python bench/generate.py              # bloom-560m's architecture, 3 interleaved rounds
    .venv/bin/python bench/generate.py --config small --quick   # CI-sized smoke run (~2 minutes)

Same method as bench/run.py (whose Bench and Point it reuses): every configuration is started once
and measured in interleaved rounds (the order rotated each round); figures are medians over rounds,
ratios medians of per-round ratios. Results: bench/results/generate-<config>.json and a markdown
table on stdout (also bench/results/generate-<config>.md).

Configurations (one model folder, random weights, seed 0: bench/genprep.py; each process reads its
own copy of the folder so that no two share page-cache pages and PSS is each one's own):
- ``generate()``: transformers' ``BloomForCausalLM.generate()`` in one process, 1 torch thread,
  pinned to one core (bench/genraw.py --impl hf): single stream (TTFT, decode tokens/s) and
  batched with left padding at 8 and 32 (aggregate tokens/s, prefill included).
- ``model step loop``: modelsrv's own ``Bloom.step`` in a bare loop, same pinning (bench/genraw.py
  --impl bloom): what the engine's forward costs per token; the server's cost per streamed token is
  modelsrv's time per output token minus this step time.
- ``modelsrv``: bin/modelsrv, ``--workers`` workers (``worker_cpu_affinity auto``: one core and
  one torch thread each; the BLOOM engine lives in one of them), streamed through
  ``POST /v1/chat/completions`` by bench/sseload.py at concurrency 1, 8, 32.
- ``transformers serve``: transformers' OpenAI-compatible server (.venv-bench), the same folder as
  the model id, offline, 1 torch thread (OMP_NUM_THREADS=1) on the same 2 cores; with
  ``--continuous-batching`` when that works for the model (probed at start: a streamed request
  must come back with its tokens), else its default (one ``generate()`` per request). Same load
  generator, same requests.

Every request: the chat template from tokenizer_config.json over a user message of exactly
``--prompt-len`` single-token words (different words per request), greedy, ``max_tokens`` N and
generation forced to N tokens (modelsrv: ``ignore_eos``, vLLM's extension; transformers serve: its
``generation_config`` with ``min_new_tokens``), so every server produces the same token counts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    BENCH,
    BENCH_PY,
    BENCH_VENV,
    PY,
    REPO,
    JsonProc,
    cpu_seconds,
    env_with_repo,
    free_port,
    http_get,
    median,
    pss_mib,
)
from bench.run import Bench, Point, fmt  # noqa: E402
from bench.servers import ModelsrvServer, _Process  # noqa: E402

# Per model size: new tokens per request, prompt words, and (warm-up, window, stagger) seconds per
# concurrency. On one core a bloom-560m decode step takes ~0.2 s at batch 1, ~0.6 s at 8 and ~1 s
# at 32 and a 46-token prefill ~0.4 s, so a 32-token request takes ~7 s alone, ~20 s among 8 and
# ~45 s among 32: the stagger spreads the streams' starts over about one request, the warm-up
# lets them all start before the window opens.
PLANS: dict[str, dict[str, Any]] = {
    "560m": {"new_tokens": 32, "prompt_len": 32,
             "timing": {1: (1.0, 15.0, 0.0), 8: (20.0, 30.0, 15.0), 32: (40.0, 40.0, 30.0)},
             "quick": {1: (1.0, 10.0, 0.0), 8: (12.0, 20.0, 10.0), 32: (25.0, 25.0, 20.0)}},
    "small": {"new_tokens": 32, "prompt_len": 32,
              "timing": {1: (1.0, 5.0, 0.0), 8: (2.0, 6.0, 0.5), 32: (3.0, 8.0, 1.0)},
              "quick": {1: (1.0, 3.0, 0.0), 8: (1.5, 4.0, 0.5), 32: (2.0, 5.0, 1.0)}},
}
CONCURRENCY = (1, 8, 32)
# The model on worker 0 only: one engine, one core, one torch thread (the other worker takes HTTP
# connections too and hands generations to worker 0). A KV pool for 32 full requests and more.
MODELSRV_CONF: dict[str, Any] = {"workers": 0, "kv_cache_tokens": 4096, "max_num_seqs": 32}


def tserve_available() -> bool:
    exe = BENCH_VENV / "bin" / "transformers"
    return exe.exists() and subprocess.run([BENCH_PY, "-c", "import fastapi, uvicorn, openai, transformers"],
                                           capture_output=True).returncode == 0


class TransformersServe(_Process):
    """``transformers serve FOLDER`` from .venv-bench on a 127.0.0.1 free port, offline, 1 torch thread."""

    def __init__(self, prefix: Path, folder: str, continuous_batching: bool) -> None:
        self.port = free_port()
        self.folder = folder
        self.cb = continuous_batching
        prefix.mkdir(parents=True, exist_ok=True)
        self.log = prefix / f"transformers-serve-{self.port}.log"
        self.argv = [str(BENCH_VENV / "bin" / "transformers"), "serve", folder, "--host", "127.0.0.1",
                     "--port", str(self.port), "--device", "cpu", "--dtype", "float32", "--log-level", "warning"]
        if continuous_batching:
            self.argv.append("--continuous-batching")
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(prefix / "hf-home"),
                         "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                         "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> TransformersServe:
        from bench.common import wait_for

        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT, cwd=str(self.log.parent),
                                         env=self.env)
        wait_for(lambda: http_get(f"http://127.0.0.1:{self.port}/health") == 200, timeout,
                 "transformers serve to be ready", 0.25, self.proc, self.log)
        return self


class GenPoint(Point):
    KEYS = ("ttft_ms", "step_ms", "decode_tps", "tps", "tpot_ms", "tpot_p99_ms", "ttft_max_ms", "ttft_n",
            "requests", "tokens_per_request", "token_mismatch", "short_requests")

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        ok = [r for r in self.rounds if "error" not in r]
        for key in self.KEYS:
            vals = [r[key] for r in ok if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
            if vals:
                out[key] = median(vals)
        ratios = [r["p99_ms"] / r["p50_ms"] for r in ok if r.get("p50_ms") and not math.isnan(r.get("p99_ms", math.nan))]
        if ratios:
            out["ttft_p99_over_p50"] = median(ratios)
        return out


class GenBench(Bench):
    def __init__(self, args: argparse.Namespace) -> None:
        args.peers = "none"  # Bench's serving peers: none here (generate.py starts its own)
        super().__init__(args)
        self.plan = PLANS[args.config]
        self.timing = self.plan["quick" if self.quick else "timing"]
        if args.timing:  # e.g. on a loaded machine, where steps are several times slower than planned
            self.timing = {int(c): tuple(v) for c, v in json.loads(args.timing).items()}
        self.n = args.new_tokens or self.plan["new_tokens"]
        self.sse: JsonProc | None = None
        self.notes: list[str] = []
        self.deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else math.inf

    def run_rounds(self, points: list[Point]) -> None:
        """As bench/run.py's (order rotated each round), but no round starts that would end past --max-minutes."""
        try:
            self._run_planned_rounds(points)
        finally:
            self.thaw()

    def _run_planned_rounds(self, points: list[Point]) -> None:
        planned, last = self.rounds, 0.0
        self.rounds = 0
        for r in range(planned):
            if r and self.deadline - time.monotonic() < last * 1.1:
                self.log(f"stopping after {r} round(s): the next would end past --max-minutes")
                self.notes.append(f"{r} of {planned} rounds: the time budget (--max-minutes) allowed no more")
                break
            t = time.monotonic()
            for p in points[r % len(points):] + points[: r % len(points)]:
                try:
                    self.alone(p.server)  # transformers serve frozen unless it is the one measured
                    res = p.measure()
                except Exception as exc:  # one failed point must not lose the others
                    res = {"error": str(exc)[-2000:]}
                    self.log(f"  {p.name}: FAILED {str(exc)[:300]}")
                res["round"] = r
                p.rounds.append(res)
                if "error" not in res:
                    self.log(f"  round {r + 1}/{planned} {p.name}: {res['ips']:.1f} tokens/s, TTFT p50 "
                             f"{res['p50_ms']:.0f} ms p99 {res['p99_ms']:.0f} ms, decode {res['decode_tps']:.1f} tok/s")
            last = time.monotonic() - t
            self.rounds = r + 1
            self.log(f"round {r + 1}/{planned} took {last:.0f} s")

    def meta(self) -> dict[str, Any]:
        m = super().meta()
        m["command"] = " ".join(["bench/generate.py", *sys.argv[1:]])
        return m

    def prepare_bloom(self) -> dict[str, Any]:
        root = Path(self.args.models_dir) if self.args.models_dir else self.work / "models"
        argv = [PY, str(BENCH / "genprep.py"), str(root), "--config", self.args.config,
                "--prompt-len", str(self.args.prompt_len or self.plan["prompt_len"]), "--prompts", "256"]
        r = subprocess.run(argv, capture_output=True, env=env_with_repo(), cwd=str(REPO), timeout=900)
        if r.returncode:
            raise RuntimeError(f"genprep.py failed:\n{r.stderr.decode()[-3000:]}")
        info = json.loads(r.stdout.decode().strip().splitlines()[-1])
        src = Path(info["folder"])
        info["copies"] = {}
        for who in ("hf", "raw", "modelsrv", "tserve"):  # one copy each: no page cache shared between them
            dst = src.parent / f"{src.name}-{who}"
            if not dst.exists():
                shutil.copytree(src, dst)
            info["copies"][who] = str(dst)
        return info

    def start_sse(self) -> JsonProc:
        if self.sse is None:
            self.sse = JsonProc([PY, str(BENCH / "sseload.py")], self.work / "sseload.log", name="sseload")
            self.cleanup.append(self.sse)
        return self.sse

    def helper(self, impl: str, folder: str) -> JsonProc:
        # generate() runs with the transformers of .venv-bench when there is one: the same as transformers serve's
        py = BENCH_PY if impl == "hf" and tserve_available() else PY
        argv = [py, str(BENCH / "genraw.py"), "--impl", impl, "--folder", folder, "--core", "0", "--threads", "1"]
        p = JsonProc(argv, self.work / f"genraw-{impl}.log", name=f"genraw {impl}")
        self.cleanup.append(p)
        ready = p.read(900)
        if impl == "hf":
            self.notes.append(f"generate(): transformers {ready.get('transformers')}, torch {ready.get('torch')} "
                              f"({'.venv-bench' if py == BENCH_PY else '.venv'})")
        return p

    def helper_point(self, name: str, proc: JsonProc, prompts: list[list[int]], group: str) -> GenPoint:
        n = self.n

        def measure() -> dict[str, Any]:
            res = proc.call({"op": "run", "prompts": prompts, "max_new_tokens": n}, timeout=1800)
            res["ips"] = res["tps"]
            res["p50_ms"], res["p99_ms"] = res["ttft_ms"], float("nan")
            res["decode_tps"] = res["decode_tps"] / len(prompts)  # per stream, as the servers' column
            return res

        return GenPoint(name, measure, group=group, batch=len(prompts))

    def settle(self, server: Any, limit: float = 60.0) -> None:
        """Wait until the server is idle (a stream closed at the end of a window may still be generating)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            pids = server.pids()
            a = cpu_seconds(pids)
            time.sleep(0.5)
            if (cpu_seconds(pids) - a) / 0.5 < 0.15:
                return
        self.log(f"  note: server still busy {limit:g} s after the window")

    def sse_point(self, name: str, server: Any, port: int, model: str, extra: dict[str, Any], prompts: list[str],
                  c: int, group: str) -> GenPoint:
        warm, dur, stagger = self.timing[c]
        cmd = {"op": "run", "port": port, "model": model, "prompts": prompts, "max_tokens": self.n, "extra": extra,
               "concurrency": c, "warmup": warm, "duration": dur, "stagger": stagger, "max_requests": 20 * c + 50}

        def measure() -> dict[str, Any]:
            self.settle(server)
            lg = self.start_sse()
            pids = server.pids()
            before = cpu_seconds(pids)
            t = time.perf_counter()
            res = lg.call(cmd, timeout=warm + dur + 120)
            res["server_cpu"] = (cpu_seconds(pids) - before) / (time.perf_counter() - t)
            if res.get("errors"):
                self.log(f"  {name}: {res['errors']} errors, e.g. {res.get('error_samples')}")
            return res

        return GenPoint(name, measure, group=group, server=server, concurrency=c)

    def probe(self, port: int, model: str, extra: dict[str, Any], prompt: str) -> dict[str, Any]:
        """One streamed request, to check a server end to end before measuring it."""
        lg = self.start_sse()
        return lg.call({"op": "run", "port": port, "model": model, "prompts": [prompt], "max_tokens": 4,
                        "extra": {**extra, **self.force(4, extra)}, "concurrency": 1, "warmup": 0.0,
                        "duration": 120.0, "max_requests": 1}, timeout=300)

    @staticmethod
    def force(n: int, extra: dict[str, Any]) -> dict[str, Any]:
        if "generation_config" in extra:  # transformers serve: a whole GenerationConfig as a JSON string
            return {"generation_config": json.dumps({"max_new_tokens": n, "min_new_tokens": n, "do_sample": False})}
        return {}  # modelsrv: ignore_eos (in extra) with max_tokens

    # -- the section --------------------------------------------------------------------------------
    def bloom(self) -> dict[str, Any]:
        a = self.args
        self.notes.append("load average at the start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        info = self.prepare_bloom()
        self.log(f"bloom-{a.config}: {info['arch']}, prompt {info['prompt_tokens']} tokens, {self.n} new tokens, "
                 f"{info['live_ids']} live token ids")
        ids, texts = info["prompt_ids"], info["prompts"]
        points: list[GenPoint] = []
        memory: dict[str, float] = {}
        hf = self.helper("hf", info["copies"]["hf"])
        raw = self.helper("bloom", info["copies"]["raw"])
        for b in CONCURRENCY:
            points.append(self.helper_point(f"generate() batch {b}" if b > 1 else "generate() single stream", hf,
                                            ids[:b], "hf"))
            points.append(self.helper_point(f"model step loop batch {b}", raw, ids[:b], "raw"))
        n = self.n
        servers: list[tuple[str, Any, int, str, dict[str, Any]]] = []
        if a.modelsrv != "none":
            conf = {"path": info["copies"]["modelsrv"], **json.loads(a.modelsrv_conf)}
            ms = self.server(ModelsrvServer(self.work / "ms-bloom", {"bloom": conf}, workers=a.workers))
            extra = {"ignore_eos": True, "stream_options": {"include_usage": True}, **json.loads(a.modelsrv_extra)}
            servers.append(("modelsrv", ms, ms.http_port, "bloom", extra))
        if a.tserve != "none":
            if not tserve_available():
                self.notes.append("transformers serve: .venv-bench lacks transformers[serving] (make bench-env): skipped")
            else:
                extra = {"generation_config": json.dumps({"max_new_tokens": n, "min_new_tokens": n, "do_sample": False})}
                ts = None
                for cb in ((True, False) if a.tserve == "auto" else (a.tserve == "cb",)):
                    ts = self.server(TransformersServe(self.work / "tserve", info["copies"]["tserve"], cb))
                    res = self.probe(ts.port, info["copies"]["tserve"], extra, texts[0])
                    if res.get("requests") == 1 and res.get("tokens_per_request") == 4:
                        self.notes.append(f"transformers serve: continuous batching {'on' if cb else 'off'}")
                        break
                    why = (res.get("error_samples") or ["no tokens"])[0]
                    self.notes.append(f"transformers serve{' --continuous-batching' if cb else ''} failed a "
                                      f"streamed request: {why}")
                    self.log(f"  {self.notes[-1]}")
                    ts.stop()
                    ts = None
                if ts is not None:
                    servers.append(("transformers serve", ts, ts.port, info["copies"]["tserve"], extra))
                    # frozen (SIGSTOP) while anything else runs, as bench/run.py's peers: an idle
                    # uvicorn process and its batching thread must not take core time from the others
                    self.freezable.append(ts)
        for label, srv, port, model, extra in servers:
            if label == "modelsrv":
                res = self.probe(port, model, extra, texts[0])
                if res.get("requests") != 1:
                    self.notes.append(f"modelsrv failed a streamed request: {res.get('error_samples')}")
                    self.log(f"  {self.notes[-1]}")
            for c in CONCURRENCY:
                points.append(self.sse_point(f"{label} c={c}", srv, port, model, extra, texts, c, label))
        self.log(f"bloom-{a.config}: {len(points)} points x {self.rounds} rounds")
        self.run_rounds(points)
        by = {p.name: p for p in points}
        targets: dict[str, float] = {}
        ratio = self.paired_ratio
        if "modelsrv c=1" in by:
            ms1, ms8, ms32 = by["modelsrv c=1"], by["modelsrv c=8"], by["modelsrv c=32"]
            targets["single stream decode tokens/s: modelsrv / generate() (>= 1.0)"] = ratio(
                ms1, by["generate() single stream"], "decode_tps")
            targets["single stream TTFT: generate() / modelsrv (>= 1.0 is as fast)"] = ratio(
                by["generate() single stream"], ms1, "p50_ms")
            targets["aggregate tokens/s: modelsrv c=8 / modelsrv c=1 (>= 3)"] = ratio(ms8, ms1)
            targets["aggregate tokens/s: modelsrv c=32 / modelsrv c=1"] = ratio(ms32, ms1)
            for c, p in ((8, ms8), (32, ms32)):
                targets[f"aggregate tokens/s: modelsrv c={c} / batched generate() {c}"] = ratio(p, by[f"generate() batch {c}"])
                if f"transformers serve c={c}" in by:
                    targets[f"aggregate tokens/s: modelsrv c={c} / transformers serve c={c} (>= 1.5)"] = ratio(
                        p, by[f"transformers serve c={c}"])
                targets[f"aggregate tokens/s: modelsrv c={c} / model step loop batch {c}"] = ratio(
                    p, by[f"model step loop batch {c}"])
            p8 = [r["p99_ms"] / r["p50_ms"] for r in ms8.rounds if "error" not in r and r.get("p50_ms")]
            targets["TTFT p99 / p50 at c=8 (< 2)"] = median(p8) if p8 else float("nan")
            step1 = by["model step loop batch 1"]
            targets["time per output token c=1: modelsrv / model step (1.0 = no server cost)"] = self.cross_ratio(
                ms1, "tpot_ms", step1, "step_ms")
            targets["server cost per token c=1, ms (modelsrv TPOT - model step)"] = self.cross_diff(
                ms1, "tpot_ms", step1, "step_ms")
            for c, p in ((8, ms8), (32, ms32)):  # the server's steps also carry the prefills of joining requests
                targets[f"time per output token c={c}: modelsrv / model step batch {c}"] = self.cross_ratio(
                    p, "tpot_ms", by[f"model step loop batch {c}"], "step_ms")
        if "transformers serve c=1" in by:
            targets["single stream decode tokens/s: transformers serve / generate()"] = ratio(
                by["transformers serve c=1"], by["generate() single stream"], "decode_tps")
        for label, srv, *_ in servers:
            memory[f"{label} (all processes)"] = srv.pss()
        memory["generate() process"] = pss_mib(hf.pids())
        memory["model step loop process"] = pss_mib(raw.pids())
        for _label, srv, *_ in servers:
            srv.stop()
        extra_doc = {"targets": targets, "pss_mib": memory, "notes": self.notes, "plan": {
            "config": a.config, "arch": info["arch"], "prompt_tokens": info["prompt_tokens"], "new_tokens": n,
            "timing": {str(c): self.timing[c] for c in CONCURRENCY}, "workers": a.workers,
            "modelsrv_conf": a.modelsrv_conf}}
        return self.save(f"generate-{a.config}", points, extra_doc)

    @staticmethod
    def _pairs(a: Point, ka: str, b: Point, kb: str) -> list[tuple[float, float]]:
        rb = {r["round"]: r for r in b.rounds if "error" not in r}
        return [(r[ka], rb[r["round"]][kb]) for r in a.rounds if "error" not in r and r["round"] in rb
                and isinstance(r.get(ka), (int, float)) and isinstance(rb[r["round"]].get(kb), (int, float))]

    def cross_ratio(self, a: Point, ka: str, b: Point, kb: str) -> float:
        v = [x / y for x, y in self._pairs(a, ka, b, kb) if y and not math.isnan(x)]
        return median(v) if v else float("nan")

    def cross_diff(self, a: Point, ka: str, b: Point, kb: str) -> float:
        v = [x - y for x, y in self._pairs(a, ka, b, kb) if not math.isnan(x) and not math.isnan(y)]
        return median(v) if v else float("nan")


def markdown(doc: dict[str, Any]) -> str:
    meta, plan = doc["meta"], doc["plan"]
    out = [f"Run {meta['date']} on {meta['machine']}; commit {meta['commit']}; {meta['rounds']} round(s); "
           f"load average at the end {meta['loadavg']}. `{meta['command']}`\n",
           f"BLOOM {plan['config']} {plan['arch']}, prompt {plan['prompt_tokens']} tokens, {plan['new_tokens']} new "
           f"tokens per request, modelsrv {plan['workers']} worker(s).\n",
           "| configuration | tokens/s (median) | min-max | TTFT p50 ms | TTFT p99 ms | TPOT / step ms | "
           "decode tok/s per stream | requests | server CPU | client CPU |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in doc["points"]:
        rng = f"{fmt(p.get('ips_min'))}-{fmt(p.get('ips_max'))}" if "ips_min" in p else "-"
        step = p.get("tpot_ms", p.get("step_ms"))
        err = f" ({p['errors']:.0f} errors)" if p.get("errors") else ""
        out.append(f"| {p['name']}{err} | {fmt(p.get('ips'))} | {rng} | {fmt(p.get('p50_ms'))} | "
                   f"{fmt(p.get('p99_ms')) if p['group'] not in ('hf', 'raw') else '-'} | {fmt(step)} | "
                   f"{fmt(p.get('decode_tps'))} | {fmt(p.get('requests'), 0)} | {fmt(p.get('server_cpu'), 2)} | "
                   f"{fmt(p.get('client_cpu'), 2)} |")
    out.append("")
    out.append("| ratio (median of per-round ratios) | value |")
    out.append("|---|---:|")
    for k, v in doc["targets"].items():
        out.append(f"| {k} | {fmt(v, 2)} |")
    out.append("")
    out.append("Memory (PSS, MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in doc["pss_mib"].items()) + "\n")
    for note in doc["notes"]:
        out.append(f"- {note}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(PLANS), default="560m")
    ap.add_argument("--quick", action="store_true", help="one round, shorter windows")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per point (default 3, --quick 1)")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="start no round that would end later than this many minutes after the start")
    ap.add_argument("--new-tokens", type=int, default=0, help="tokens per request (default: the config's plan)")
    ap.add_argument("--prompt-len", type=int, default=0, help="words (= tokens) of the user message")
    ap.add_argument("--timing", default="", help='JSON: (warm-up, window, stagger) seconds per concurrency, '
                    'e.g. \'{"1": [3, 25, 0], "8": [25, 40, 15], "32": [45, 45, 30]}\' (default: the plan\'s)')
    ap.add_argument("--workers", type=int, default=2, help="modelsrv workers (one core and one thread each)")
    ap.add_argument("--modelsrv", choices=("on", "none"), default="on")
    ap.add_argument("--modelsrv-conf", default=json.dumps(MODELSRV_CONF),
                    help="JSON: directives of the model block besides path (default: %(default)s)")
    ap.add_argument("--modelsrv-extra", default="{}", help="JSON: extra request fields for modelsrv")
    ap.add_argument("--tserve", choices=("auto", "cb", "plain", "none"), default="auto",
                    help="transformers serve: continuous batching if it works (auto), forced on/off, or not at all")
    ap.add_argument("--models-dir", default="", help="keep the model folders here and reuse them (default: a "
                    "temporary directory, removed at the end)")
    ap.add_argument("--out", default=str(BENCH / "results"))
    args = ap.parse_args(argv)
    bench = GenBench(args)
    started = time.monotonic()
    try:
        doc = bench.bloom()
    finally:
        bench.close()
    text = markdown(doc)
    (Path(args.out) / f"generate-{args.config}.md").write_text(text + "\n")
    print(text)
    print(f"total {time.monotonic() - started:.0f} s; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

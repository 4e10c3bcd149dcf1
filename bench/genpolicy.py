"""Prefill policy at N streams: the generation engine with ``prefill_policy`` "mixed" and "separate".

    .venv/bin/python bench/genpolicy.py --config 560m            # 8 streams, 2 interleaved rounds
    .venv/bin/python bench/genpolicy.py --config small --quick   # smoke run

``mixed`` (the default, ``generation.PREFILL_POLICY``): a newly admitted prompt is prefilled in
the same ``model.step`` as the running sequences' decodes; ``separate``: in a step of its own,
the others waiting. This drives ``GenerationEngine`` in one process (the engine and its inference
thread exactly as a worker runs them, without the HTTP front door, whose cost is the same for
both policies), pinned to one core with one torch thread, on the model folder and prompts of
bench/generate.py (bench/genprep.py: random weights, chat-templated prompts of equal length,
greedy, ``ignore_eos``).

Closed loop, as bench/sseload.py: ``--concurrency`` streams, each submitting its next request
when the previous one ends (stream i starts ``i * stagger / C`` s late). Measured over the
window only: aggregate tokens/s, time to first token (p50/p99, submit -> first chunk), time per
output token (median over finished requests). The two policies alternate, order rotated each
round; figures are medians over rounds. Results: bench/results/genpolicy-<config>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PLANS = {  # (warm-up, window, stagger) seconds; see bench/generate.py's PLANS for the step times
    "560m": {"timing": (20.0, 40.0, 15.0), "quick": (12.0, 20.0, 10.0)},
    "small": {"timing": (2.0, 6.0, 0.5), "quick": (1.5, 4.0, 0.5)},
}


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    return v[max(0, min(len(v) - 1, int(round(q / 100 * len(v) + 0.5)) - 1))]


async def scenario(model: Any, policy: str, prompts: list[list[int]], args: argparse.Namespace,
                   timing: tuple[float, float, float]) -> dict[str, float]:
    from server.config import ModelConf
    from server.serving import generation
    from server.serving.batcher import Device

    warm, dur, stagger = timing
    conf = ModelConf(name="m", path=Path("."))
    conf.kv_cache_tokens, conf.max_num_seqs = args.kv_cache_tokens, max(32, args.concurrency)
    e = generation.GenerationEngine("m", model, conf, Device())
    e.prefill_policy = policy
    e.start()
    t0 = time.perf_counter()
    start, end = t0 + warm, t0 + warm + dur
    token_times: list[float] = []
    ttft: list[float] = []
    tpot: list[float] = []
    issued = 0

    async def stream(k: int) -> None:
        nonlocal issued
        await asyncio.sleep(k * stagger / args.concurrency)
        while time.perf_counter() < end and issued < 20 * args.concurrency + 50:
            i = issued
            issued += 1
            sent = time.perf_counter()
            s = e.submit({"prompt": prompts[i % len(prompts)], "max_tokens": args.new_tokens, "temperature": 0,
                          "ignore_eos": True})
            stamps: list[float] = []
            try:
                async for chunk in s:
                    if chunk.get("token_ids"):
                        now = time.perf_counter()
                        if not stamps and start <= now <= end:  # at once: the window may end mid-stream
                            ttft.append((now - sent) * 1000)
                        stamps.append(now)
                        token_times.append(now)
            finally:
                await s.aclose()
            if len(stamps) == args.new_tokens and start <= stamps[-1] <= end:
                tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000)

    tasks = [asyncio.ensure_future(stream(k)) for k in range(args.concurrency)]
    await asyncio.wait(tasks, timeout=max(0.0, end - time.perf_counter()))
    for t in tasks:  # the window is over: cancel what runs (the engine drops those sequences)
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    while e.outstanding:  # let the cancellations land before the engine goes
        await asyncio.sleep(0.05)
    e.stop()
    steps = e.stats["steps"]
    tokens = sum(1 for t in token_times if start <= t <= end)
    return {"tps": tokens / dur, "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "ttft_n": len(ttft),
            "tpot_ms": statistics.median(tpot) if tpot else float("nan"), "finished": len(tpot), "steps": steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(PLANS), default="560m")
    ap.add_argument("--quick", action="store_true", help="one round, shorter windows")
    ap.add_argument("--rounds", type=int, default=0, help="rounds (default 2, --quick 1)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32, help="words (= tokens) of the user message")
    ap.add_argument("--kv-cache-tokens", type=int, default=4096)
    ap.add_argument("--core", type=int, default=0, help="pin to this core (index into the allowed cores)")
    ap.add_argument("--models-dir", default="", help="where bench/genprep.py's folder is (or is written)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, [cores[args.core % len(cores)]])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)
    from bench import genprep
    from models import load_model

    tmp = None
    if not args.models_dir:
        tmp = tempfile.TemporaryDirectory()
        args.models_dir = tmp.name
    info = genprep.write(Path(args.models_dir), args.config, args.prompt_len, 64)
    model = load_model(info["folder"], "cpu")
    model.warmup()
    timing = PLANS[args.config]["quick" if args.quick else "timing"]
    rounds = args.rounds or (1 if args.quick else 2)
    policies = ["mixed", "separate"]
    rows: dict[str, list[dict[str, float]]] = {p: [] for p in policies}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for r in range(rounds):
        order = policies[r % 2:] + policies[:r % 2]
        for policy in order:
            res = asyncio.run(scenario(model, policy, info["prompt_ids"], args, timing))
            res["round"] = r
            rows[policy].append(res)
            print(f"[{time.strftime('%H:%M:%S')}] round {r} {policy}: " +
                  ", ".join(f"{k} {v:.1f}" for k, v in res.items() if isinstance(v, float)), file=sys.stderr)
    med = {p: {k: statistics.median(x[k] for x in v) for k in v[0] if k != "round"} for p, v in rows.items()}
    doc = {"date": started, "command": " ".join(["bench/genpolicy.py", *sys.argv[1:]]), "config": args.config,
           "arch": info["arch"], "prompt_tokens": info["prompt_tokens"], "new_tokens": args.new_tokens,
           "concurrency": args.concurrency, "timing": timing, "rounds": rows, "median": med,
           "loadavg": os.getloadavg()}
    lines = [f"Run {started}, `{doc['command']}`, {rounds} round(s), load average at the end "
             f"{' '.join(f'{x:.1f}' for x in doc['loadavg'])}; BLOOM {args.config}, prompt {info['prompt_tokens']} "
             f"tokens, {args.new_tokens} new tokens, {args.concurrency} streams, one core, one torch thread.\n",
             "| prefill policy | tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT ms | steps in the run |",
             "|---|---:|---:|---:|---:|---:|"]
    for p in policies:
        m = med[p]
        lines.append(f"| {p}{' (default)' if p == 'mixed' else ''} | {m['tps']:.2f} | {m['ttft_p50_ms']:.0f} | "
                     f"{m['ttft_p99_ms']:.0f} | {m['tpot_ms']:.0f} | {m['steps']:.0f} |")
    text = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"genpolicy-{args.config}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"genpolicy-{args.config}.md").write_text(text + "\n")
    print(text)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

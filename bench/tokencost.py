"""CPU per streamed token of a modelsrv worker, split by thread: the event loop against the model.

    .venv/bin/python bench/tokencost.py [--concurrency 1,8,32] [--rounds 3] [--seconds 6]

The small BLOOM of bench/genprep.py (``--config small``: a few ms per step on one core) behind
one modelsrv worker pinned to core 1 (one torch thread), streamed chat completions from
bench/sseload.py at each concurrency. Per point: tokens generated (the worker's
``modelsrv_generation_tokens`` counter), the CPU time of the worker's event-loop thread and of its
inference thread over the point, each divided by the tokens. The loop thread's share is the
server's own cost per streamed token (SSE encoding, HTTP writes, detokenizing, the engine's
bookkeeping); the inference thread's is the model step and sampling. On a GPU the step leaves the
CPU, and the loop's cost per token is what bounds tokens/s of many streams. Interleaved rounds,
medians.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BENCH, CLK_TCK, PY, JsonProc, env_with_repo, median  # noqa: E402
from bench.servers import ModelsrvServer  # noqa: E402


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of one process's threads: ``loop`` (the main thread, the event loop; ``loop_sys``
    its part in the kernel), ``infer`` (the thread named ``modelsrv infer``), ``other`` (libzmq's
    I/O threads, executor threads, and the inference thread of a checkout that does not name it)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        key = "infer" if name == "modelsrv infer" else "loop" if task.name == str(pid) else "other"
        out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
        if key == "loop":
            out["loop_sys"] = int(fields[12]) / CLK_TCK
    return out


def tokens_generated(port: int) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(r'^modelsrv_generation_tokens_total\{[^}]*\} (\S+)$', text, re.M))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32", help="comma list")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repo", action="append", default=[],
                    help="NAME=PATH: another checkout's bin/modelsrv, measured in the same rounds (repeatable)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="modelsrv-tokencost-"))
    r = subprocess.run([PY, str(BENCH / "genprep.py"), str(work), "--config", "small", "--prompt-len", "32",
                        "--prompts", "64"], capture_output=True, env=env_with_repo(), check=True)
    info = json.loads(r.stdout.decode().strip().splitlines()[-1])
    conf = {"path": info["folder"], "kv_cache_tokens": 8192, "max_num_seqs": 32}
    repos = {"modelsrv": None, **dict(x.split("=", 1) for x in args.repo)}
    servers = {name: ModelsrvServer(work / f"ms-{name}", {"bloom": conf}, workers=1, affinity="10",
                                    **({"repo": Path(path)} if path else {})) for name, path in repos.items()}
    sse = JsonProc([PY, str(BENCH / "sseload.py")], work / "sseload.log", name="sseload")
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for s in servers.values():
            s.start()
        for rnd in range(args.rounds):
            for c in levels:
                for name, s in servers.items():
                    pid = s.worker_pids()[0]
                    cmd = {"op": "run", "port": s.http_port, "model": "bloom", "prompts": info["prompts"],
                           "max_tokens": args.new_tokens, "extra": {"ignore_eos": True}, "concurrency": c,
                           "warmup": 1.0, "duration": args.seconds, "stagger": 0.5, "max_requests": 100 * c + 100}
                    tok0, cpu0 = tokens_generated(s.http_port), thread_cpu(pid)
                    res = sse.call(cmd, timeout=args.seconds + 120)
                    time.sleep(0.5)  # streams closed at the window's end stop within a step
                    tok1, cpu1 = tokens_generated(s.http_port), thread_cpu(pid)
                    n = tok1 - tok0
                    row = {"tokens_s": res["ips"], "tpot_ms": res.get("tpot_ms", float("nan")),
                           **{f"{k}_us": (cpu1.get(k, 0) - cpu0.get(k, 0)) / n * 1e6 for k in ("loop", "loop_sys", "infer", "other")}}
                    results.setdefault((name, c), []).append(row)
                    print(f"round {rnd + 1}: c={c} {name}: {row['tokens_s']:.0f} tokens/s, loop {row['loop_us']:.0f} us, "
                          f"inference {row['infer_us']:.0f} us CPU per token (loop in the kernel: {row['loop_sys_us']:.0f})", flush=True)
        print("\n| server | concurrency | tokens/s | TPOT ms | loop thread, us CPU per token | inference thread | other threads |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in servers:
            for c in levels:
                rows = results[(name, c)]
                cell = {k: median([r[k] for r in rows]) for k in rows[0]}
                print(f"| {name} | {c} | {cell['tokens_s']:.0f} | {cell['tpot_ms']:.2f} | {cell['loop_us']:.0f} | "
                      f"{cell['infer_us']:.0f} | {cell['other_us']:.0f} |")
    finally:
        sse.close()
        for s in servers.values():
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tensor parallelism on the CPU: what the collectives cost per decode step (gloo, 2 ranks on 127.0.0.1).

    .venv/bin/python bench/tp_collectives.py             # ~1 minute on 2 cores
    .venv/bin/python bench/tp_collectives.py --hidden 1024 --heads 16 --layers 24 --vocab 250880   # bloom-560m's shape

Measures, on a random BLOOM of the given shape (fp32, one torch thread per process):
- k=1: ms per greedy decode step (``step_sample`` after a prefill), batch 1 and 8, in this process;
- k=2: the same through ``TensorParallelBloom`` with a follower process, each rank pinned to its own
  core when there are two; and on rank 0 the time spent inside collectives per step (every
  ``torch.distributed`` call wrapped with a timer: broadcasts of the step's inputs, the all-reduces
  of the embedding and the two row-parallel layers per block, the candidate all-gather and the
  log-sum-exp all-reduce);
- micro: median latency of one all-reduce of [batch, hidden] fp32 and of one header broadcast.

On two cores k=2 is not a speed-up (the same work, split, plus the collectives): the point is the
price of the collectives per step, which is what NCCL makes small on GPUs. Results: printed and
written to bench/results/tp.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_loop(model, batch: int, steps: int, prompt_len: int = 32) -> list[float]:
    """Prefill ``batch`` prompts, then ``steps`` greedy decode steps; seconds per decode step."""
    import torch

    from models.bloom import SeqStep
    from models.parallel import step_sample
    from models.sampling import SamplingParams

    bs = 16
    blocks_per = -(-(prompt_len + steps + 1) // bs)
    cache = model.allocate_kv_cache(batch * blocks_per, bs)
    tables = [list(range(b * blocks_per, (b + 1) * blocks_per)) for b in range(batch)]
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(4, 400, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = [SamplingParams(temperature=0)] * batch
    cached = [0] * batch
    times = []
    for i in range(steps + 1):
        seqs = [SeqStep(tokens[b][cached[b]:], cached[b], tables[b]) for b in range(batch)]
        t0 = time.perf_counter()
        ids, _, _ = step_sample(model, cache, seqs, params, tokens)
        if i:  # step 0 is the prefill
            times.append(time.perf_counter() - t0)
        for b in range(batch):
            cached[b] = len(tokens[b])
            tokens[b].append(ids[b])
    return times


def timed_collectives(counter: dict) -> None:
    """Wrap torch.distributed's collectives with a timer (seconds and calls into ``counter``)."""
    import torch.distributed as dist

    for name in ("all_reduce", "all_gather", "broadcast"):
        fn = getattr(dist, name)

        def wrapped(*a, _fn=fn, _name=name, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                counter[_name] = counter.get(_name, 0.0) + time.perf_counter() - t0
                counter[_name + "_n"] = counter.get(_name + "_n", 0) + 1

        setattr(dist, name, wrapped)


def rank_main(rank: int, port: int, folder: str, args: dict, out) -> None:
    try:
        if len(os.sched_getaffinity(0)) >= 2:
            os.sched_setaffinity(0, [sorted(os.sched_getaffinity(0))[rank]])
        import torch

        torch.set_num_threads(1)
        import torch.distributed as dist

        from models.bloom import Bloom
        from models.parallel import TensorParallelBloom, follow, init_group

        counter: dict = {}
        timed_collectives(counter)
        p = init_group(rank, 2, port, timeout=60)
        config = json.loads((Path(folder) / "config.json").read_text())
        model = Bloom.build(Path(folder), config, torch.device("cpu"), parallel=p)

        def micro_all_reduce() -> dict:  # both ranks, once the follower loop is over
            res = {}
            for batch in args["batches"]:
                x = torch.randn(batch, args["hidden"])
                lat = []
                for _ in range(200):
                    t0 = time.perf_counter()
                    p.all_reduce(x)
                    lat.append(time.perf_counter() - t0)
                res[f"all_reduce_{batch}x{args['hidden']}_us"] = 1e6 * statistics.median(lat)
            return res

        if rank != 0:
            follow(model, p)
            micro_all_reduce()
            out.put((rank, {}))
            return
        tp = TensorParallelBloom(model, p)
        tp.warmup()
        result = {}
        for batch in args["batches"]:
            decode_loop(tp, batch, 3)  # warm
            counter.clear()
            times = decode_loop(tp, batch, args["steps"])
            n = len(times) + 1  # collectives counted over the prefill too; per step = / (steps + 1)
            result[batch] = {"ms_per_step": 1000 * statistics.median(times),
                             "collective_ms_per_step": 1000 * sum(v for k, v in counter.items() if not k.endswith("_n")) / n,
                             "calls_per_step": {k[:-2]: round(v / n, 1) for k, v in counter.items() if k.endswith("_n")},
                             "ms_by_kind": {k: round(1000 * v / n, 3) for k, v in counter.items() if not k.endswith("_n")}}
        micro = {}
        hdr = []
        for _ in range(200):  # the follower answers these in its loop: a NOOP header is one broadcast + one payload
            t0 = time.perf_counter()
            with tp.lock:
                tp._send(4, [])  # OP_NOOP
            hdr.append(time.perf_counter() - t0)
        micro["noop_op_us (2 broadcasts)"] = 1e6 * statistics.median(hdr)
        tp.close()
        micro.update(micro_all_reduce())
        out.put((0, {"decode": result, "micro": micro}))
        dist.destroy_process_group()
    except BaseException:
        import traceback

        out.put((rank, {"error": traceback.format_exc()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batches", default="1,8")
    a = ap.parse_args()
    args = {"hidden": a.hidden, "steps": a.steps, "batches": [int(b) for b in a.batches.split(",")]}

    import torch

    torch.set_num_threads(1)
    from models import load_model
    from models.bloom import random_bloom_folder

    tmp = Path(tempfile.mkdtemp(prefix="tpbench"))
    folder = random_bloom_folder(tmp / "m", {"hidden_size": a.hidden, "n_head": a.heads, "n_layer": a.layers,
                                             "vocab_size": a.vocab, "tie_word_embeddings": False})
    ref = load_model(folder)
    k1 = {}
    for batch in args["batches"]:
        decode_loop(ref, batch, 3)
        k1[batch] = {"ms_per_step": 1000 * statistics.median(decode_loop(ref, batch, a.steps))}
    del ref

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, port, str(folder), args, q), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(2):
        rank, res = q.get(timeout=600)
        if "error" in res:
            raise SystemExit(f"rank {rank} failed:\n{res['error']}")
        got[rank] = res
    for p in procs:
        p.join(30)
    k2 = got[0]
    shape = f"hidden {a.hidden}, {a.heads} heads, {a.layers} layers, vocab {a.vocab}, fp32, 1 thread per rank"
    print(f"\nBLOOM {shape}; {a.steps} greedy decode steps after a 32-token prefill\n")
    print("| batch | k=1 ms/step | k=2 ms/step | k=2 in collectives ms/step | collective calls/step |")
    print("| --- | --- | --- | --- | --- |")
    for batch in args["batches"]:
        d = k2["decode"][batch]
        calls = ", ".join(f"{k} {v:g}" for k, v in sorted(d["calls_per_step"].items()))
        print(f"| {batch} | {k1[batch]['ms_per_step']:.2f} | {d['ms_per_step']:.2f} | {d['collective_ms_per_step']:.2f} | {calls} |")
    print()
    for k, v in k2["micro"].items():
        print(f"- {k}: {v:.0f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tp.json").write_text(json.dumps({"shape": shape, "k1": k1, "k2": k2, "cpus": os.cpu_count(),
                                                 "when": time.strftime("%Y-%m-%d %H:%M")}, indent=2) + "\n")


if __name__ == "__main__":
    main()

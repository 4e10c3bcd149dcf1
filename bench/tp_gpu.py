"""Tensor parallelism on GPUs (NCCL): equality with k=1 and tokens/s. Run by bench/gpu_check.sh.

For k = 1 and k = every visible GPU (and 2 when there are more than 2), it spawns k processes,
each seeing one GPU (``CUDA_VISIBLE_DEVICES=<rank>``, as modelsrv's workers do), joins an NCCL
group on 127.0.0.1 (control messages on gloo), loads a random BLOOM's shards (fp32, TF32 off),
and on rank 0 through ``TensorParallelBloom``:

- KServe logits of a left-padded batch (compared with k=1: max abs difference, must be < 1e-3);
- 64 greedy decode steps of a batch of 16 after a 64-token prefill (ids must equal k=1's);
- tokens/s of those steps and the median ms per step;
- median latency of one NCCL all-reduce of [16, hidden] fp32.

Prints one JSON line per k and a verdict; exit status 1 when a comparison fails.
``--cpu`` runs the same script over gloo on the CPU with k = 1 and 2 (a dry run of the script itself,
for hosts without a GPU; use small ``--hidden/--layers/--vocab`` there).
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

from bench.tp_collectives import decode_loop  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, k: int, port: int, folder: str, args: dict, out) -> None:
    try:
        cpu = args["cpu"]
        os.environ["CUDA_VISIBLE_DEVICES"] = "" if cpu else str(rank)
        import numpy as np
        import torch

        dev = "cpu" if cpu else "cuda:0"
        sync = (lambda: None) if cpu else torch.cuda.synchronize
        if cpu:
            torch.set_num_threads(1)
        else:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.cuda.set_device(0)
        from models.bloom import Bloom
        from models.parallel import TensorParallelBloom, follow, init_group

        p = init_group(rank, k, port, backend="gloo" if cpu else "nccl", timeout=120, device=dev)
        config = json.loads((Path(folder) / "config.json").read_text())
        model = Bloom.build(Path(folder), config, torch.device(dev), parallel=p)
        if rank != 0:
            follow(model, p)
            x = torch.randn(16, args["hidden"], device=dev)
            for _ in range(60):
                p.all_reduce(x)
            sync()
            out.put((rank, {}))
            return
        tp = TensorParallelBloom(model, p)
        tp.warmup()
        ids = np.random.default_rng(0).integers(4, 400, size=(4, 48), dtype=np.int64)
        mask = np.ones_like(ids)
        mask[1, :7] = 0
        mask[3, :20] = 0
        logits = tp.forward(tp.prepare({"input_ids": ids, "attention_mask": mask}, {}), {})["logits"]
        decode_loop(tp, 16, 4, 64)  # warm
        sync()
        t0 = time.perf_counter()
        times = decode_loop(tp, 16, args["steps"], 64)
        sync()
        wall = time.perf_counter() - t0
        greedy = _greedy_ids(tp, args["steps"])
        tp.close()
        x = torch.randn(16, args["hidden"], device=dev)
        lat = []
        for _ in range(60):
            sync()
            t1 = time.perf_counter()
            p.all_reduce(x)
            sync()
            lat.append(time.perf_counter() - t1)
        out.put((0, {"logits": logits.numpy(), "ids": greedy, "ms_per_step": 1000 * statistics.median(times),
                     "tokens_per_s": 16 * len(times) / wall, "all_reduce_us": 1e6 * statistics.median(lat),
                     "mem_gib": 0.0 if cpu else torch.cuda.max_memory_allocated() / 2**30}))
    except BaseException:
        import traceback

        out.put((rank, {"error": traceback.format_exc()}))


def _greedy_ids(model, steps: int) -> list[list[int]]:
    from models.bloom import SeqStep
    from models.parallel import step_sample
    from models.sampling import SamplingParams

    cache = model.allocate_kv_cache(64, 16)
    prompts = [[5, 17, 42, 8, 99, 3, 250], [7, 7, 300, 12], list(range(10, 40))]
    tables = [list(range(i * 20, (i + 1) * 20)) for i in range(3)]
    cached = [0, 0, 0]
    params = [SamplingParams(temperature=0)] * 3
    for _ in range(min(steps, 32)):
        seqs = [SeqStep(prompts[i][cached[i]:], cached[i], tables[i]) for i in range(3)]
        new, _, _ = step_sample(model, cache, seqs, params, prompts)
        for i in range(3):
            cached[i] = len(prompts[i])
            prompts[i].append(new[i])
    return prompts


def run_k(k: int, folder: Path, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, k, port, str(folder), args, q), daemon=True) for r in range(k)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(k):
            rank, res = q.get(timeout=240)
            if "error" in res:
                raise RuntimeError(f"k={k} rank {rank} failed:\n{res['error']}")
            got[rank] = res
    finally:
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.kill()
    return got[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--cpu", action="store_true", help="dry run over gloo on the CPU, k = 1 and 2")
    a = ap.parse_args()
    import torch

    n = 2 if a.cpu else torch.cuda.device_count()
    if n == 0:
        print("no CUDA device visible: nothing to check")
        return 2
    from models.bloom import random_bloom_folder

    folder = random_bloom_folder(Path(tempfile.mkdtemp(prefix="tpgpu")) / "m",
                                 {"hidden_size": a.hidden, "n_head": a.heads, "n_layer": a.layers, "vocab_size": a.vocab,
                                  "tie_word_embeddings": False, "seq_length": 1024})
    args = {"hidden": a.hidden, "steps": a.steps, "cpu": a.cpu}
    sizes = sorted({1, n} | ({2} if n > 2 else set()))
    sizes = [k for k in sizes if a.heads % k == 0 and a.vocab % k == 0]
    results, ok = {}, True
    for k in sizes:
        r = run_k(k, folder, args)
        results[k] = r
        line = {"k": k, "ms_per_step": round(r["ms_per_step"], 3), "tokens_per_s": round(r["tokens_per_s"], 1),
                "all_reduce_us": round(r["all_reduce_us"], 1), "max_mem_gib_rank0": round(r["mem_gib"], 3)}
        if k != 1:
            import numpy as np

            diff = float(np.abs(r["logits"] - results[1]["logits"]).max())
            same = r["ids"] == results[1]["ids"]
            line.update({"max_abs_logit_diff_vs_k1": diff, "greedy_ids_equal_k1": same})
            ok = ok and diff < 1e-3 and same
        print(json.dumps(line), flush=True)
    where = "gloo on the CPU (dry run)" if a.cpu else f"{n} GPU(s) visible"
    print("PASS" if ok else "FAIL", f"({len(sizes)} group sizes: {sizes}; {where})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

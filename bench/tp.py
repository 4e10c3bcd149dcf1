"""Tensor-parallel BLOOM: k ranks against the unsharded model, step time and the collectives' share.

    python bench/tp.py --config small --world 2                 # CPU, gloo: k=1 vs k=2 (docs/BENCHMARKS.md)
    python bench/tp.py --config 560m --world 2 --steps 5
    python bench/tp.py --device cuda --backend nccl --world 1 --check   # what bench/gpu_check.sh runs
    python bench/tp.py --device cpu --backend gloo --world 2 --check    # the same, on CPU (tests/test_tp_bench.py)

The model is ``models.bloom.random_bloom_folder`` (random weights, seed 0) with bloom-560m's
architecture (hidden 1024, 16 heads, 24 layers, vocabulary 250880) or a small one (hidden 256, 8
heads, 4 layers), written once under ``--models-dir``.

k=1 is the plain ``Bloom`` (no process group) in this process; k = ``--world`` is that many
processes (spawned, one thread each on CPU, ``cuda:rank`` on GPU) joined with
``models.parallel.init_group`` on 127.0.0.1, rank 0 driving a ``TensorParallelBloom`` and the
others in ``follow`` — the server's own set-up. For each batch size: a prefill of ``--context``
tokens per sequence, two warm-up decode steps, then ``--steps`` timed greedy decode steps
(``step_sample``). Reported per step: the median wall time, and on the group's rank 0 the number
of collectives, their bytes and their time (torch.distributed's all_reduce / all_gather /
broadcast wrapped with a counter: the time includes waiting for the slower rank), and a separate
micro-benchmark: the same all-reduces ([batch, hidden] fp32, 2 per layer + the embedding's) alone.

``--check``: also compare with k=1 (KServe logits of a padded batch within ``--atol``, 12 greedy
ids of 3 prompts identical) and exit 1 on a mismatch. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BLOOM_560M = {"hidden_size": 1024, "n_head": 16, "n_layer": 24, "vocab_size": 250880, "seq_length": 2048}
BLOOM_SMALL = {"hidden_size": 256, "n_head": 8, "n_layer": 4, "seq_length": 2048}
CONFIGS = {"560m": BLOOM_560M, "small": BLOOM_SMALL}
BLOCK = 16
CHECK_PROMPTS = [[5, 17, 42, 8, 99, 3, 250], [7, 7, 300, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
CHECK_STEPS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_folder(models_dir: Path, config: str) -> Path:
    from models.bloom import random_bloom_folder

    folder = models_dir / f"tp-bloom-{config}"
    if not (folder / "model.safetensors").exists():
        random_bloom_folder(folder, CONFIGS[config], seed=0)
    return folder


# ------------------------------------------------------------------------------------------------
# counting the collectives
# ------------------------------------------------------------------------------------------------
class Counter:
    """Wraps torch.distributed's collectives (as models.parallel calls them) with a count, bytes and time."""

    def __init__(self, sync) -> None:
        import torch.distributed as dist

        self.sync = sync  # torch.cuda.synchronize on GPU: a collective's time is its completion
        self.on = False
        self.n = {}
        self.bytes = {}
        self.s = {}
        for name in ("all_reduce", "all_gather", "broadcast"):
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def timed(*args, **kw):
            if not self.on:
                return fn(*args, **kw)
            t = args[0]
            size = sum(x.numel() * x.element_size() for x in t) if isinstance(t, list) else t.numel() * t.element_size()
            started = time.perf_counter()
            out = fn(*args, **kw)
            self.sync()
            self.n[name] = self.n.get(name, 0) + 1
            self.bytes[name] = self.bytes.get(name, 0) + size
            self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - started
            return out

        return timed

    def reset(self) -> None:
        self.n, self.bytes, self.s = {}, {}, {}


# ------------------------------------------------------------------------------------------------
# what every rank 0 (or the plain model) runs
# ------------------------------------------------------------------------------------------------
def check_script(model) -> dict:
    """KServe logits of a left-padded batch and 12 greedy ids of 3 prompts through the paged cache."""
    import torch

    from models.bloom import SeqStep
    from models.parallel import step_sample
    from models.sampling import SamplingParams

    ids = torch.tensor([[0, 0, 5, 17, 42, 8, 99], [3, 250, 7, 7, 300, 12, 1]])
    mask = (torch.arange(7)[None] >= torch.tensor([[2], [0]])).long()
    prepared = model.prepare({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, {})
    logits = model.forward(prepared, {})["logits"].float().cpu()
    cache = model.allocate_kv_cache(16, BLOCK)
    tokens = [list(p) for p in CHECK_PROMPTS]
    cached = [0] * len(tokens)
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(len(tokens))]
    greedy = [SamplingParams(temperature=0.0)] * len(tokens)
    out_ids: list[list[int]] = [[] for _ in tokens]
    for _ in range(CHECK_STEPS):
        seqs = [SeqStep(t[c:], c, tab) for t, c, tab in zip(tokens, cached, tables)]
        new, _, _ = step_sample(model, cache, seqs, greedy, tokens)
        for i, t in enumerate(new):
            cached[i] = len(tokens[i])
            tokens[i].append(t)
            out_ids[i].append(t)
    if hasattr(model, "free_kv_cache"):
        model.free_kv_cache(cache)
    return {"logits": logits.tolist(), "ids": out_ids}


def time_steps(model, batch: int, context: int, steps: int, counter: Counter | None, sync) -> dict:
    """Median seconds of a greedy decode step at ``batch`` (after a prefill of ``context`` tokens each)."""
    from models.bloom import SeqStep
    from models.parallel import step_sample
    from models.sampling import SamplingParams

    per_seq = -(-(context + steps + 3) // BLOCK)
    cache = model.allocate_kv_cache(batch * per_seq, BLOCK)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    tokens = [[(7 * i + j) % 300 + 4 for j in range(context)] for i in range(batch)]
    cached = [0] * batch
    greedy = [SamplingParams(temperature=0.0)] * batch

    def one() -> float:
        seqs = [SeqStep(t[c:], c, tab) for t, c, tab in zip(tokens, cached, tables)]
        started = time.perf_counter()
        new, _, _ = step_sample(model, cache, seqs, greedy, tokens)
        sync()
        took = time.perf_counter() - started
        for i, t in enumerate(new):
            cached[i] = len(tokens[i])
            tokens[i].append(t)
        return took

    prefill = one()
    one(), one()  # warm-up decodes
    if counter is not None:
        counter.reset()
        counter.on = True
    times = [one() for _ in range(steps)]
    out = {"batch": batch, "prefill_s": prefill, "step_s": statistics.median(times), "step_min_s": min(times),
           "step_mean_s": statistics.fmean(times),  # the collectives' times below are means too
           "tokens_per_s": batch / statistics.median(times)}
    if counter is not None:
        counter.on = False
        out["collectives_per_step"] = {k: v / steps for k, v in counter.n.items()}
        out["collective_bytes_per_step"] = {k: v / steps for k, v in counter.bytes.items()}
        out["collective_s_per_step"] = {k: v / steps for k, v in counter.s.items()}
    if hasattr(model, "free_kv_cache"):
        model.free_kv_cache(cache)
    return out


def allreduce_micro(parallel, hidden: int, n_layer: int, batch: int, device: str, sync, reps: int) -> float:
    """Seconds per step of the step's all-reduces alone: 2 per layer + the embedding's, [batch, hidden] fp32."""
    import torch
    import torch.distributed as dist

    t = torch.ones(batch, hidden, device=device)
    n = 2 * n_layer + 1
    for _ in range(3):
        dist.all_reduce(t, group=parallel.group)
    sync()
    dist.barrier(group=parallel.control)
    started = time.perf_counter()
    for _ in range(reps):
        for _ in range(n):
            dist.all_reduce(t, group=parallel.group)
    sync()
    return (time.perf_counter() - started) / reps


def measure(rank: int, world: int, port: int | None, args: dict) -> dict:
    """The plain model (``port`` None, in this process) or rank ``rank`` of a group of ``world``."""
    import torch

    torch.set_num_threads(args["threads"])
    from models.base import read_config
    from models.bloom import Bloom

    device = args["device"]
    if device == "cuda":
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons with k=1
        torch.backends.cudnn.allow_tf32 = False
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    folder = Path(args["folder"])
    config = read_config(folder)
    started = time.perf_counter()
    out: dict = {}
    if port is None:
        model = Bloom.build(folder, config, torch.device(device))
        parallel = None
    else:
        from models.parallel import TensorParallelBloom, follow, init_group

        counter = Counter(sync)
        parallel = init_group(rank, world, port, backend=args["backend"], timeout=args["timeout"], device=device)
        shard = Bloom.build(folder, config, torch.device(device), parallel=parallel)
        if rank != 0:
            follow(shard, parallel)
            if world > 1:
                for b in (1, max(args["batch"])):
                    allreduce_micro(parallel, config["hidden_size"], config["n_layer"], b, device, sync, args["micro_reps"])
            parallel.destroy()
            return {}
        model = TensorParallelBloom(shard, parallel)
    from models.parallel import parameter_bytes

    out["load_s"] = time.perf_counter() - started
    out["param_bytes"] = parameter_bytes(model.net if port is None else model.model.net)
    if device.startswith("cuda"):
        out["cuda_mem_bytes"] = torch.cuda.memory_allocated()
    with torch.inference_mode():
        if args["check"]:
            out["check"] = check_script(model)
        out["steps"] = [time_steps(model, b, args["context"], args["steps"], None if port is None else counter, sync)
                        for b in args["batch"]]
    if port is not None:
        out["broadcast_s"] = model.stats["broadcast_s"]
        model.close()
        if world > 1:
            out["allreduce_only_s_per_step"] = {
                str(b): allreduce_micro(parallel, config["hidden_size"], config["n_layer"], b, device, sync,
                                        args["micro_reps"]) for b in (1, max(args["batch"]))}
        parallel.destroy()
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def worker(rank: int, world: int, port: int, args: dict, results) -> None:
    """A spawned rank of the group."""
    try:
        results.put((rank, measure(rank, world, port, args)))
    except BaseException:
        results.put((rank, {"error": traceback.format_exc()}))


def run(world: int, args: dict) -> dict:
    """A group of ``world`` spawned processes; rank 0's results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    n = world
    procs = [ctx.Process(target=worker, args=(r, n, port, args, results), daemon=True) for r in range(n)]
    for p in procs:
        p.start()
    got: dict[int, dict] = {}
    try:
        deadline = time.monotonic() + args["deadline"]
        while len(got) < n:
            try:
                rank, out = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                if dead:
                    raise SystemExit(f"bench/tp.py: rank(s) {dead} exited (status {procs[dead[0]].exitcode}) "
                                     "without a result") from None
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench/tp.py: no result from the ranks within {args['deadline']:.0f}s") from None
                continue
            if "error" in out:
                raise SystemExit(f"bench/tp.py: rank {rank} failed:\n{out['error']}")
            got[rank] = out
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                os.kill(p.pid, 9)
                p.join(5)
    return got[0]


def compare(ref: dict, got: dict, atol: float) -> list[str]:
    import torch

    problems = []
    a, b = torch.tensor(got["logits"]), torch.tensor(ref["logits"])
    diff = float((a - b).abs().max())
    if not diff <= atol:
        problems.append(f"logits differ from k=1 by {diff:.3g} (> {atol})")
    if got["ids"] != ref["ids"]:
        problems.append(f"greedy ids differ from k=1: {got['ids']} != {ref['ids']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--models-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "modelsrv-tp-bench")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="default: gloo on cpu, nccl on cuda")
    ap.add_argument("--world", type=int, default=2, help="ranks of the group (k); 0 = every visible GPU")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, default=32, help="prompt tokens per sequence before the timed decodes")
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps per batch size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    ap.add_argument("--micro-reps", type=int, default=20)
    ap.add_argument("--check", action="store_true", help="compare logits and greedy ids with k=1; exit 1 on a mismatch")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--no-k1", action="store_true", help="skip the unsharded timings (not with --check)")
    ap.add_argument("--timeout", type=float, default=120.0, help="rendezvous and collective timeout, seconds")
    ap.add_argument("--deadline", type=float, default=600.0, help="give up on a run after this many seconds")
    ap.add_argument("--prepare", action="store_true", help="only write the model folder (if missing) and exit")
    a = ap.parse_args(argv)
    if a.prepare:
        print(ensure_folder(a.models_dir, a.config))
        return 0
    backend = a.backend or ("nccl" if a.device == "cuda" else "gloo")
    if a.device == "cuda" or backend == "nccl":
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            print("bench/tp.py: --device cuda / --backend nccl need a CUDA GPU, and torch sees none "
                  f"(torch {torch.__version__}, cuda {torch.version.cuda})", file=sys.stderr)
            return 2
        visible = torch.cuda.device_count()
        if a.world == 0:
            a.world = visible
        if a.world > visible:
            print(f"bench/tp.py: --world {a.world} but only {visible} GPU(s) visible", file=sys.stderr)
            return 2
    if a.world < 1:
        ap.error("--world must be at least 1 (0 only with --device cuda)")
    heads = CONFIGS[a.config]["n_head"]
    if heads % a.world:
        print(f"bench/tp.py: --world {a.world} does not divide the {heads} heads of --config {a.config}", file=sys.stderr)
        return 2
    folder = ensure_folder(a.models_dir, a.config)
    args = {"folder": str(folder), "device": a.device, "backend": backend, "threads": a.threads, "batch": a.batch,
            "context": a.context, "steps": a.steps, "check": a.check, "timeout": a.timeout, "deadline": a.deadline,
            "micro_reps": a.micro_reps}
    report: dict = {"config": a.config, "device": a.device, "backend": backend, "world": a.world,
                    "load_average": os.getloadavg(), "cpus": os.cpu_count(), "args": {k: v for k, v in args.items()
                                                                                      if k != "folder"}}
    if not a.no_k1 or a.check:
        report["k1"] = measure(0, 1, None, args)  # in this process: one spawn fewer
    report[f"k{a.world}"] = run(a.world, args)
    report["load_average_after"] = os.getloadavg()
    problems = compare(report["k1"]["check"], report[f"k{a.world}"]["check"], a.atol) if a.check else []
    if a.check:
        for r in ("k1", f"k{a.world}"):
            report[r].pop("check")
        report["check"] = "ok" if not problems else problems
    print(json.dumps(report, indent=1))
    if problems:
        print("bench/tp.py: MISMATCH: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prefill policy of the generation engine: a new prompt in the same step as the others' decodes
("mixed") or in a step of its own ("separate"). In-process, one thread, a random BLOOM.

Scenario: ``base`` long generations run; once they all decode, ``joiners`` new requests arrive
one by one, every ``gap`` seconds. Reported: wall time, the joiners' time to first token, and the
running sequences' mean time per output token.

    .venv/bin/python -m bench.prefill_policy [--hidden 256 --layers 4 --base 8 --joiners 8 --prompt 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from models import load_model
from models.bloom import random_bloom_folder
from server.config import ModelConf
from server.serving import generation
from server.serving.batcher import Device


async def scenario(model, policy: str, args) -> dict[str, float]:
    e = generation.GenerationEngine("m", model, ModelConf(name="m", path=Path(".")), Device())
    e.prefill_policy = policy
    e.start()
    rng = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(5, 300, (n,), generator=rng).tolist()

    first = asyncio.Semaphore(0)

    async def consume(stream, ttft: list[float], tpot: list[float]) -> None:
        t0 = time.perf_counter()
        stamps = []
        async for _ in stream:
            stamps.append(time.perf_counter())
            if len(stamps) == 1:
                first.release()
        ttft.append(stamps[0] - t0)
        if len(stamps) > 1:
            tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))

    started = time.perf_counter()
    base_ttft: list[float] = []
    base_tpot: list[float] = []
    tasks = [asyncio.create_task(consume(e.submit({"prompt": prompt(args.prompt), "max_tokens": args.tokens,
                                                   "temperature": 0, "ignore_eos": True}), base_ttft, base_tpot))
             for _ in range(args.base)]
    for _ in range(args.base):  # joiners arrive while the others decode, not during their first prefill
        await first.acquire()
    join_ttft: list[float] = []
    join_tpot: list[float] = []
    for _ in range(args.joiners):
        tasks.append(asyncio.create_task(consume(e.submit({"prompt": prompt(args.prompt), "max_tokens": args.tokens // 2,
                                                           "temperature": 0, "ignore_eos": True}), join_ttft, join_tpot)))
        await asyncio.sleep(args.gap)
    await asyncio.gather(*tasks)
    e.stop()
    return {"wall_s": time.perf_counter() - started, "joiner_ttft_ms": 1000 * statistics.mean(join_ttft),
            "running_tpot_ms": 1000 * statistics.mean(base_tpot), "steps": e.stats["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--base", type=int, default=8)
    ap.add_argument("--joiners", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--gap", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_bloom_folder(Path(tmp) / "m", config={"hidden_size": args.hidden, "n_layer": args.layers,
                                                              "n_head": 4, "seq_length": 1024,
                                                              "tie_word_embeddings": False})
        model = load_model(folder)
        model.warmup()
        results: dict[str, list[dict[str, float]]] = {"mixed": [], "separate": []}
        for _ in range(args.rounds):  # interleaved, so load drift hits both alike
            for policy in results:
                results[policy].append(asyncio.run(scenario(model, policy, args)))
    for policy, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"{policy:9s} " + "  ".join(f"{k}={v:.1f}" for k, v in med.items()))


if __name__ == "__main__":
    main()

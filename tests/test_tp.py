"""Tensor-parallel BLOOM (models/parallel.py): k=2 over gloo on 127.0.0.1 against the unsharded model.

Each test spawns two processes (rank 0 drives a ``TensorParallelBloom``, rank 1 runs ``follow``) and
compares what rank 0 computed with the k=1 model in this process: KServe logits, step logits,
greedy and seeded ids step by step through the paged cache, log-probabilities; and the bytes of
parameters each rank holds. Tiny configs: 4 heads (2 per rank) and 6 heads (3 per rank).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from pathlib import Path

import pytest
import torch

from models import load_model
from models.bloom import Bloom, SeqStep, random_bloom_folder
from models.sampling import SamplingParams, generator_for

torch.set_num_threads(1)
TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# the script both the k=1 model and the k=2 group run
# ------------------------------------------------------------------------------------------------
PROMPTS = [[5, 17, 42, 8, 99, 3, 250], [7, 7, 300, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
PARAMS = [
    dict(temperature=0.0, logprobs=3),  # greedy, with top log-probabilities (candidates path)
    dict(temperature=3.0, top_k=20, seed=7, logprobs=True),  # seeded top-k (candidates path)
    dict(temperature=3.0, top_p=0.95, seed=11),  # top-p: the gathered path
]


def script(model) -> dict:
    """KServe forward, then 10 generation steps mixing prefills and decodes, through ``step_sample``."""
    from models.parallel import step_sample

    out: dict = {}
    ids = torch.tensor([[0, 0, 5, 17, 42, 8, 99], [3, 250, 7, 7, 300, 12, 1], [0, 0, 0, 0, 9, 10, 11]])
    mask = (torch.arange(7)[None] >= torch.tensor([[2], [0], [4]])).long()
    prepared = model.prepare({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, {})
    out["logits"] = model.forward(prepared, {})["logits"]
    cache = model.allocate_kv_cache(32, 4)
    params = [SamplingParams(**p) for p in PARAMS]
    gens = [generator_for(p) for p in params]
    tokens = [list(p) for p in PROMPTS]
    tables: list[list[int]] = [[], [], []]
    cached = [0, 0, 0]
    free = list(range(31, -1, -1))
    out["ids"], out["logprobs"], out["tops"] = [[], [], []], [[], [], []], [[], [], []]
    schedule = [[0], [1, 0], [2, 1, 0]] + [[0, 1, 2]] * 7  # prefill alone, prefill + decode, ...
    for sids in schedule:
        steps = []
        for i in sids:
            while len(tables[i]) * 4 < len(tokens[i]):
                tables[i].append(free.pop())
            steps.append(SeqStep(tokens[i][cached[i]:], cached[i], list(tables[i])))
        new, lps, tops = step_sample(model, cache, steps, [params[i] for i in sids], [tokens[i] for i in sids],
                                     [gens[i] for i in sids])
        for i, t, lp, top in zip(sids, new, lps, tops):
            cached[i] = len(tokens[i])
            tokens[i].append(t)
            out["ids"][i].append(t)
            out["logprobs"][i].append(lp)
            out["tops"][i].append(top)
    # full logits of one more decode (``step``, gathered), then a fresh prefill in a second cache
    for i in range(3):
        while len(tables[i]) * 4 < len(tokens[i]):
            tables[i].append(free.pop())
    out["step_logits"] = model.step(cache, [SeqStep(tokens[i][cached[i]:], cached[i], list(tables[i])) for i in range(3)])
    other = model.allocate_kv_cache(4, 8)
    out["prefill_logits"] = model.step(other, [SeqStep(PROMPTS[2], 0, [3, 1, 0])])
    return out


GEN_REQUESTS = [
    {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "logprobs": 2},
    {"prompt": "The quick brown fox jumps over the lazy dog.", "max_tokens": 12, "temperature": 1.5, "top_k": 8,
     "seed": 5, "logprobs": True},
    {"prompt": "你好", "max_tokens": 20, "temperature": 0, "stop": ["zz"]},
    {"prompt": [5, 6, 7, 8, 9], "max_tokens": 10, "temperature": 2.0, "seed": 9},  # full-distribution sampling: gathered
]


def gen_script(model) -> dict:
    """The generation engine (continuous batching, streamed chunks) over ``model``, four requests at once."""
    import asyncio

    from server.config import ModelConf
    from server.serving.batcher import Device
    from server.serving.generation import GenerationEngine

    async def main():
        e = GenerationEngine("m", model, ModelConf(name="m", path=Path("."), kv_cache_tokens=512, max_num_seqs=4), Device())
        e.start()
        try:
            streams = [e.submit(r) for r in GEN_REQUESTS]

            async def collect(stream):
                return [c async for c in stream]

            return await asyncio.gather(*(collect(st) for st in streams))
        finally:
            e.stop()

    chunks = asyncio.run(asyncio.wait_for(main(), 60))
    return {"chunks": chunks}


def rank_main(rank: int, port: int, folder: str, results, which: str = "script") -> None:
    try:
        torch.set_num_threads(1)
        from models.bloom import Bloom
        from models.parallel import TensorParallelBloom, follow, init_group, parameter_bytes
        from models.text import Tokenizer  # noqa: F401 - imported here as the worker would

        p = init_group(rank, 2, port, timeout=60.0)
        import json

        config = json.loads((Path(folder) / "config.json").read_text())
        model = Bloom.build(Path(folder), config, torch.device("cpu"), parallel=p)
        nbytes = parameter_bytes(model.net)
        if rank == 0:
            tp = TensorParallelBloom(model, p)
            tp.warmup()
            out = (script if which == "script" else gen_script)(tp)
            out["bytes"] = nbytes
            out["stats"] = dict(tp.stats)
            tp.close()
            results.put((rank, {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}))
        else:
            follow(model, p)
            results.put((rank, {"bytes": nbytes}))
        p.destroy()
    except BaseException:
        results.put((rank, {"error": traceback.format_exc()}))


def run_group(folder: Path, which: str = "script") -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, port, str(folder), results, which), daemon=True) for r in range(2)]
    for pr in procs:
        pr.start()
    got: dict[int, dict] = {}
    try:
        while len(got) < 2:
            try:
                rank, out = results.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"tensor-parallel ranks gave no result within {TIMEOUT}s (have {sorted(got)})") from None
            assert "error" not in out, f"rank {rank} failed:\n{out['error']}"
            got[rank] = {k: torch.from_numpy(v) if hasattr(v, "dtype") else v for k, v in out.items()}
    finally:
        for pr in procs:
            pr.join(10)
            if pr.is_alive():
                os.kill(pr.pid, 9)
                pr.join(5)
    return got


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_head, hidden", [(4, 64), (6, 48)])
def test_k2_equals_k1(tmp_path, n_head, hidden):
    folder = random_bloom_folder(tmp_path / "m", {"n_head": n_head, "hidden_size": hidden, "n_layer": 2}, seed=3)
    ref: Bloom = load_model(folder)
    want = script(ref)
    got = run_group(folder)
    tp = got[0]
    torch.testing.assert_close(tp["logits"], want["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(tp["step_logits"], want["step_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(tp["prefill_logits"], want["prefill_logits"], atol=1e-4, rtol=0)
    assert tp["ids"] == want["ids"]  # greedy, seeded top-k and seeded top-p: token for token
    assert len(set(sum(want["ids"], []))) > 3  # not one token everywhere (the random model is peaky)
    for a, b in zip(tp["logprobs"], want["logprobs"]):
        assert a == pytest.approx(b, abs=1e-4)
    for row_tp, row_ref in zip(tp["tops"][0], want["tops"][0]):
        assert [t for t, _ in row_tp] == [t for t, _ in row_ref] and len(row_ref) == 3
        assert [v for _, v in row_tp] == pytest.approx([v for _, v in row_ref], abs=1e-4)
    # memory: each rank holds about half the parameters (LayerNorms and two biases are replicated)
    from models.parallel import parameter_bytes

    full = parameter_bytes(ref.net)
    for rank in (0, 1):
        assert 0.45 < got[rank]["bytes"] / full < 0.55, (rank, got[rank]["bytes"], full)
    assert tp["stats"]["steps"] == 10
    # greedy and top-k rows exchange candidates only: the logits were gathered only in the 8 steps
    # that held the top-p sequence (sequence 2 joins at the third step)
    assert tp["stats"]["gathered_steps"] == 8


def test_shard_layout_and_refusals(tmp_path):
    from models.bloom import BloomConfig, Parallel
    from models.parallel import shard_spec

    cfg = BloomConfig(vocab_size=448, hidden_size=48, n_head=6, n_layer=1)
    p = Parallel(size=2, rank=1)
    assert shard_spec("transformer.word_embeddings.weight", cfg, p) == (0, 224, 448)
    assert shard_spec("transformer.h.0.self_attention.query_key_value.weight", cfg, p) == (0, 72, 144)  # 3 heads x [q,k,v] x 8
    assert shard_spec("transformer.h.0.self_attention.dense.weight", cfg, p) == (1, 24, 48)
    assert shard_spec("transformer.h.0.self_attention.dense.bias", cfg, p) is None
    assert shard_spec("transformer.h.0.mlp.dense_4h_to_h.weight", cfg, p) == (1, 96, 192)
    assert shard_spec("transformer.h.0.input_layernorm.weight", cfg, p) is None
    with pytest.raises(ValueError, match="n_head 6 is not divisible"):
        shard_spec("transformer.h.0.mlp.dense_4h_to_h.weight", cfg, Parallel(size=4, rank=0))


def test_streamed_generation_k2_equals_k1(tmp_path):
    """The generation engine's streamed chunks (text, ids, log-probabilities, finish) are the same on k=2."""
    folder = random_bloom_folder(tmp_path / "m", {"tie_word_embeddings": False}, seed=0)  # untied head: sharded too
    want = gen_script(load_model(folder))["chunks"]
    got = run_group(folder, "gen")[0]["chunks"]
    assert len(got) == len(want) == len(GEN_REQUESTS)
    for g, w in zip(got, want):
        assert "".join(c["text"] for c in g) == "".join(c["text"] for c in w)
        assert [t for c in g for t in c["token_ids"]] == [t for c in w for t in c["token_ids"]]
        assert g[-1]["finish_reason"] == w[-1]["finish_reason"]
        for cg, cw in zip(g, w):
            if "logprobs" in cw:
                assert cg["logprobs"] == pytest.approx(cw["logprobs"], abs=1e-4)
            if "top_logprobs" in cw:
                assert [[t[0] for t in row] for row in cg["top_logprobs"]] == [[t[0] for t in row] for row in cw["top_logprobs"]]
    assert len({t for w in want for c in w for t in c["token_ids"]}) > 10

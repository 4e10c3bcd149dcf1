"""The generation engine in-process (server/serving/generation.py) on a tiny random BLOOM: continuous
batching, greedy equality with transformers, preemption with a tiny KV pool, stops, limits, queue
bounds, cancellation. Each test runs in well under a second or two on one CPU core."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import transformers

from models import load_model
from models.bloom import random_bloom_folder
from server.config import ModelConf
from server.errors import BadRequest, Overloaded, status_of
from server.serving.batcher import Device
from server.serving.generation import BlockAllocator, GenerationEngine

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

PROMPTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog.", "你好",
           "Emoji: 😀 🚀 and math α + β = γ, √2 ≈ 1.414 Emoji: 😀 🚀"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # untied head: a tied random BLOOM repeats one token forever, which makes every comparison weak
    return random_bloom_folder(tmp_path_factory.mktemp("gen") / "m", config={"tie_word_embeddings": False}, seed=0)


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder)


@pytest.fixture(scope="module")
def reference(folder, model):
    """transformers' greedy continuation (token ids, up to EOS) of each prompt, 24 new tokens."""
    ref = transformers.BloomForCausalLM.from_pretrained(folder).eval()
    out = {}
    for p in PROMPTS:
        ids = model.tokenizer.encode(p)
        with torch.no_grad():
            g = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=24, pad_token_id=3)
        out[p] = g[0, len(ids):].tolist()
    return out


def engine(model, **conf) -> GenerationEngine:
    mc = ModelConf(name="m", path=Path("."), **conf)
    e = GenerationEngine("m", model, mc, Device())
    e.start()
    return e


async def collect(stream) -> tuple[str, list[int], str, list[dict]]:
    chunks = [c async for c in stream]
    return ("".join(c["text"] for c in chunks), [t for c in chunks for t in c["token_ids"]],
            chunks[-1]["finish_reason"], chunks)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_block_allocator():
    a = BlockAllocator(4)
    x = a.allocate(3)
    assert sorted(x) == [0, 1, 2] and a.free == 1 and a.used == 3
    with pytest.raises(MemoryError):
        a.allocate(2)
    a.release(x)
    assert a.free == 4


def test_concurrent_greedy_equals_transformers(model, reference):
    async def main():
        e = engine(model)
        streams = [e.submit({"prompt": p, "max_tokens": 24, "temperature": 0}) for p in PROMPTS]
        results = await asyncio.gather(*(collect(s) for s in streams))
        for p, (text, ids, reason, _) in zip(PROMPTS, results):
            want = reference[p]
            assert ids == want, p
            assert text == model.tokenizer.decode(want, skip_special_tokens=True)
            assert reason == ("stop" if want[-1] == model.eos_token_id and len(want) < 24 else "length")
        assert e.stats["steps"] < 4 * 24, "the sequences were not batched"
        assert e.blocks.used == 0 and not e.running
        e.stop()

    run(main())


def test_late_joiner_and_preemption_keep_greedy_outputs(model, reference):
    async def main():
        # 6 blocks of 16 tokens: four prompts of up to ~30 tokens + 24 new ones cannot all fit at once
        e = engine(model, kv_cache_tokens=96)
        first = e.submit({"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0})
        await asyncio.sleep(0.01)  # a few steps later, the others join
        rest = [e.submit({"prompt": p, "max_tokens": 24, "temperature": 0}) for p in PROMPTS if p != PROMPTS[1]]
        results = await asyncio.gather(collect(first), *(collect(s) for s in rest))
        order = [PROMPTS[1]] + [p for p in PROMPTS if p != PROMPTS[1]]
        for p, (_, ids, _, _) in zip(order, results):
            assert ids == reference[p], p
        assert e.stats["preemptions"] > 0, "the pool was large enough: nothing tested"
        assert e.blocks.used == 0
        e.stop()

    run(main())


def test_seed_reproducible_and_sampling_options(model):
    async def main():
        e = engine(model)
        opts = {"prompt": "Once upon", "max_tokens": 12, "temperature": 3.0, "top_p": 0.99, "top_k": 200,
                "repetition_penalty": 1.3, "seed": 7, "ignore_eos": True}
        a, b, c = await asyncio.gather(collect(e.submit(opts)), collect(e.submit(opts)),
                                       collect(e.submit({**opts, "seed": 8})))
        assert a[1] == b[1] and len(a[1]) == 12
        assert a[1] != c[1]
        e.stop()

    run(main())


def test_stop_strings_never_leak_and_logprobs(model, reference):
    want = model.tokenizer.decode(reference[PROMPTS[0]], skip_special_tokens=True)
    at = next(i for i in range(3, len(want) - 2) if "\ufffd" not in want[i:i + 2] and want.index(want[i:i + 2]) == i)
    stop = want[at:at + 2]

    async def main():
        e = engine(model)
        text, ids, reason, chunks = await collect(e.submit({"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0,
                                                            "stop": [stop], "logprobs": 2}))
        assert text == want[:at] and reason == "stop"
        assert stop not in "".join(c["text"] for c in chunks)
        assert all(len(c["logprobs"]) == 1 and c["logprobs"][0] <= 0 for c in chunks)
        assert all(len(c["top_logprobs"][0]) == 2 for c in chunks)
        # greedy: the chosen token is the most likely one
        assert all(c["top_logprobs"][0][0][0] == c["token_ids"][0] for c in chunks)
        assert all(c["top_logprobs"][0][0][2] == c["tokens"][0] for c in chunks)
        assert chunks[-1]["completion_tokens"] == len(ids)
        assert e.blocks.used == 0
        e.stop()

    run(main())


def test_limits_queue_and_errors(model):
    async def main():
        e = engine(model, kv_cache_tokens=64, max_queue_size=2, max_num_seqs=1)
        with pytest.raises(BadRequest, match=r"at most 64 tokens .*context 256, KV cache 64"):
            e.submit({"prompt": list(range(100))})
        with pytest.raises(BadRequest, match="exceeds"):
            e.submit({"prompt": [5, 6, 7], "max_tokens": 62})
        for bad in ({"prompt": ""}, {"prompt": [1, 10**6]}, {"prompt": 5}, {"prompt": "x", "n": 2},
                    {"prompt": "x", "temperature": -1}, {"prompt": "x", "stop": [""]}):
            with pytest.raises(Exception) as info:
                e.submit(bad)
            assert status_of(info.value) == 400, bad
        streams = [e.submit({"prompt": [5, 6], "max_tokens": 40, "ignore_eos": True})]
        await asyncio.sleep(0.02)  # running now: max_num_seqs 1, so the next two wait
        streams += [e.submit({"prompt": [5, 6], "max_tokens": 40, "ignore_eos": True}) for _ in range(2)]
        with pytest.raises(Overloaded):  # one running, two waiting
            e.submit({"prompt": [5, 6], "max_tokens": 4})
        results = await asyncio.gather(*(collect(s) for s in streams))
        assert [len(r[1]) for r in results[:3]] == [40, 40, 40] and all(r[2] == "length" for r in results[:3])
        e.stop()

    run(main())


def test_cancel_frees_the_slot_and_the_blocks(model):
    async def main():
        e = engine(model, max_num_seqs=1)
        s = e.submit({"prompt": "Once upon", "ignore_eos": True})
        waiting = e.submit({"prompt": "Once upon", "max_tokens": 3, "ignore_eos": True})
        got = 0
        async for _ in s:
            got += 1
            if got == 3:
                break
        await s.aclose()
        assert e.blocks.used <= 1 + 1
        _, ids, reason, _ = await collect(waiting)
        assert len(ids) == 3 and reason == "length"
        assert e.blocks.used == 0 and not e.running and e.stats["cancelled"] == 1
        e.stop()

    run(main())


def test_chat_template(model, tmp_path):
    async def main():
        e = engine(model)
        text, ids, _, _ = await collect(e.submit({"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 5,
                                                  "temperature": 0}))
        assert len(ids) <= 5
        e.stop()

    run(main())

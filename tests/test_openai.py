"""Text generation through a real bin/modelsrv: the openai client (sync, async, streamed and not) on
/v1/completions and /v1/chat/completions, the project's ZeroMQ client, forwarding to the worker
that hosts the model, disconnects, preemption, limits, metrics and a graceful QUIT mid-generation.

One server for most tests (two workers): "gen" on worker 1 only (so worker 0 forwards to it),
"tinypool" with a KV pool too small for several requests at once, "nochat" without a chat template.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import openai
import pytest
import torch
import transformers

from models.bloom import random_bloom_folder
from server.client import AsyncClient, Client, ModelsrvError
from tests.conftest import Server, http, wait_for

transformers.logging.set_verbosity_error()

PROMPTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog.", "你好",
           "Emoji: 😀 🚀 and math α + β = γ, √2 ≈ 1.414 Emoji: 😀 🚀"]
NEW = 20


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    chat = random_bloom_folder(root / "chat", config={"tie_word_embeddings": False}, seed=0)
    nochat = Path(shutil.copytree(chat, root / "nochat"))
    cfg = json.loads((nochat / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (nochat / "tokenizer_config.json").write_text(json.dumps(cfg))
    return chat, nochat


@pytest.fixture(scope="module")
def reference(folders):
    """transformers' greedy ids for each prompt (NEW new tokens, or fewer at EOS) and their text."""
    from models.text import Tokenizer

    tok = Tokenizer.from_folder(folders[0])
    ref = transformers.BloomForCausalLM.from_pretrained(folders[0]).eval()
    out = {}
    for p in PROMPTS:
        ids = tok.encode(p)
        with torch.no_grad():
            g = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=NEW, pad_token_id=3)
        new = g[0, len(ids):].tolist()
        out[p] = (new, tok.decode(new, skip_special_tokens=True))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, folders):
    chat, nochat = folders
    s = Server(tmp_path_factory.mktemp("srv"), models={
        "gen": {"path": str(chat), "workers": 1, "max_queue_size": 64},
        "tinypool": {"path": str(chat), "workers": 0, "kv_cache_tokens": 96},
        "nochat": {"path": str(nochat), "workers": 0, "kv_cache_tokens": 512, "max_num_seqs": 1, "max_queue_size": 1},
    })
    s.start()
    yield s
    s.stop()


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", **kw)


def metric(server, name: str, model: str) -> float:
    _, _, body = http("GET", server.url + "/metrics")
    m = re.search(rf'^{name}{{model="{model}"}} (\S+)$', body.decode(), re.M)
    return float(m.group(1)) if m else 0.0


def test_models_and_greedy_completions_equal_transformers(server, reference):
    c = client(server)
    assert {m.id for m in c.models.list().data} >= {"gen", "tinypool", "nochat"}
    # several prompts of different lengths in one request; sent to both workers (one forwards)
    for _ in range(2):
        r = c.completions.create(model="gen", prompt=PROMPTS, max_tokens=NEW, temperature=0)
        for choice, p in zip(sorted(r.choices, key=lambda ch: ch.index), PROMPTS):
            ids, text = reference[p]
            assert choice.text == text, p
            assert choice.finish_reason == ("length" if len(ids) == NEW else "stop")
        assert r.usage.completion_tokens == sum(len(reference[p][0]) for p in PROMPTS)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_sync_and_async_equal_the_whole_text(server, reference):
    c = client(server)
    p = PROMPTS[1]
    events = list(c.completions.create(model="gen", prompt=p, max_tokens=NEW, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(e.choices[0].text for e in events if e.choices) == reference[p][1]
    assert events[-1].usage.completion_tokens == len(reference[p][0]) and not events[-1].choices
    assert sum(1 for e in events if e.choices) > 3, "not streamed"
    # several prompts in one streamed request: chunks interleave, each tagged with its choice index
    texts = ["", "", "", ""]
    for e in c.completions.create(model="gen", prompt=PROMPTS, max_tokens=NEW, temperature=0, stream=True):
        for ch in e.choices:
            texts[ch.index] += ch.text
    assert texts == [reference[q][1] for q in PROMPTS]

    async def many():
        a = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none")

        async def one(prompt):
            s = await a.completions.create(model="gen", prompt=prompt, max_tokens=NEW, temperature=0, stream=True)
            return "".join([e.choices[0].text async for e in s])

        texts = await asyncio.gather(*(one(q) for q in PROMPTS))
        plain = await a.completions.create(model="gen", prompt=PROMPTS[3], max_tokens=NEW, temperature=0)
        await a.close()
        return texts, plain

    texts, plain = asyncio.run(many())
    assert texts == [reference[q][1] for q in PROMPTS]
    assert plain.choices[0].text == reference[PROMPTS[3]][1]


def test_token_id_prompts_seed_stop_and_logprobs(server, reference):
    from models.text import Tokenizer

    c = client(server)
    want_ids, want = reference[PROMPTS[0]]
    ids = Tokenizer.from_folder(server.models["gen"]["path"]).encode(PROMPTS[0])
    r = c.completions.create(model="gen", prompt=[ids, ids], max_tokens=NEW, temperature=0, logprobs=2)
    assert [ch.text for ch in r.choices] == [want, want]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(want_ids) and all(v <= 0 for v in lp.token_logprobs) and len(lp.top_logprobs[0]) == 2
    # seeded sampling: same seed, same text
    kw = {"model": "gen", "prompt": "Once upon", "max_tokens": 12, "temperature": 1.5, "top_p": 0.95, "seed": 3}
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text
    # a stop string never leaks, streamed or not, even when split across tokens
    at = next(i for i in range(3, len(want) - 2) if "\ufffd" not in want[i:i + 2] and want.index(want[i:i + 2]) == i)
    stop = want[at:at + 2]
    r = c.completions.create(model="gen", prompt=PROMPTS[0], max_tokens=NEW, temperature=0, stop=[stop])
    assert r.choices[0].text == want[:at] and r.choices[0].finish_reason == "stop"
    s = c.completions.create(model="gen", prompt=PROMPTS[0], max_tokens=NEW, temperature=0, stop=stop, stream=True)
    assert "".join(e.choices[0].text for e in s) == want[:at]


def test_chat_completions_and_chat_without_template(server):
    c = client(server)
    msgs = [{"role": "user", "content": "Hello! How are you today?"}]
    r = c.chat.completions.create(model="gen", messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 8
    s = c.chat.completions.create(model="gen", messages=msgs, max_tokens=8, temperature=0, stream=True)
    assert "".join(e.choices[0].delta.content or "" for e in s if e.choices) == r.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="no chat template") as info:
        c.chat.completions.create(model="nochat", messages=msgs, max_tokens=4)
    assert info.value.body["type"] == "invalid_request_error"


def test_errors_in_openai_shape(server):
    c = client(server, max_retries=0)
    with pytest.raises(openai.BadRequestError, match=r"context 256, KV cache 96 tokens"):
        c.completions.create(model="tinypool", prompt=list(range(5, 105)), max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        c.completions.create(model="gen", prompt="x", n=2)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    status, _, body = http("POST", server.url + "/v1/completions", b"{", {"Content-Type": "application/json"})
    assert status == 400 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_preemption_with_a_tiny_pool_keeps_greedy_outputs(server, reference):
    async def main():
        a = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none")
        rs = await asyncio.gather(*(a.completions.create(model="tinypool", prompt=p, max_tokens=NEW, temperature=0)
                                    for p in PROMPTS))
        await a.close()
        return rs

    before = metric(server, "modelsrv_generation_preemptions_total", "tinypool")
    rs = asyncio.run(main())
    assert [r.choices[0].text for r in rs] == [reference[p][1] for p in PROMPTS]
    assert metric(server, "modelsrv_generation_preemptions_total", "tinypool") > before


def test_queue_full_is_503(server):
    # nochat: one running sequence, one waiting; the third is refused
    with Client(server.zmq_address, retries=0) as z1, Client(server.zmq_address, retries=0) as z2:
        long = z1.generate("nochat", [5, 6], max_tokens=250, ignore_eos=True)
        next(long)
        waiting = z2.generate("nochat", [5, 6], max_tokens=2)
        with pytest.raises(openai.APIStatusError) as info:
            client(server, max_retries=0).completions.create(model="nochat", prompt="x", max_tokens=2)
        assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "1"
        long.close()  # cancels: the waiting one runs now
        assert [c["finish_reason"] for c in waiting][-1] == "length"


def test_zmq_generate_equals_transformers_and_cancel_frees_the_slot(server, reference):
    ids_want, text_want = reference[PROMPTS[2]]
    with Client(server.zmq_address) as z:
        for model in ("gen", "tinypool"):  # on workers 1 and 0: whichever took the connection forwards one
            chunks = list(z.generate(model, PROMPTS[2], max_tokens=NEW, temperature=0))
            assert [t for c in chunks for t in c["token_ids"]] == ids_want
            assert "".join(c["text"] for c in chunks) == text_want
    wait_for(lambda: ' peer "generate ' in server.access_log.read_text(), 10, what="the forwarded generation's log line")

    async def run_async():
        async with AsyncClient(server.zmq_address) as az:
            chunks = [c async for c in az.generate("gen", PROMPTS[0], max_tokens=NEW, temperature=0)]
            it = az.generate("gen", PROMPTS[0], max_tokens=200, temperature=0, ignore_eos=True)
            await it.__anext__()
            await it.aclose()
            return chunks

    chunks = asyncio.run(run_async())
    assert [t for c in chunks for t in c["token_ids"]] == reference[PROMPTS[0]][0]
    wait_for(lambda: metric(server, "modelsrv_generation_running", "gen") == 0, 10, what="the cancelled sequence to leave")
    assert metric(server, "modelsrv_kv_cache_usage_ratio", "gen") == 0
    with Client(server.zmq_address) as z, pytest.raises(ModelsrvError) as info:
        list(z.generate("gen", "x", max_tokens=10**6))
    assert info.value.code == 400


def test_http_disconnect_cancels_the_generation(server):
    for stream in (True, False):
        body = json.dumps({"model": "gen", "prompt": "Once", "max_tokens": 230, "ignore_eos": True, "temperature": 0,
                           "stream": stream}).encode()
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
            wait_for(lambda: metric(server, "modelsrv_generation_running", "gen") >= 1, 10, 0.02, "the generation to run")
        wait_for(lambda: metric(server, "modelsrv_generation_running", "gen") == 0, 10, what="the slot to be freed")
        assert metric(server, "modelsrv_kv_cache_usage_ratio", "gen") == 0
    wait_for(lambda: '"POST /v1/completions"' in server.access_log.read_text(), 10, what="the access log line")
    for name in ("modelsrv_time_to_first_token_seconds_count", "modelsrv_prompt_tokens_total",
                 "modelsrv_generation_tokens_total"):
        assert metric(server, name, "gen") > 0, name


def test_config_directives_and_errors(tmp_path, folders):
    from server.config import ConfigError, load_config

    s = Server(tmp_path, models={"gen": {"path": str(folders[0]), "kv_cache_size": "1m", "max_num_seqs": 4}})
    cfg = load_config(s.conf)
    assert cfg.models["gen"].kv_cache_size == 1 << 20 and cfg.models["gen"].max_num_seqs == 4
    s.write_conf(models={"gen": {"path": str(folders[0]), "kv_cache_size": "1m", "kv_cache_tokens": 64}})
    with pytest.raises(ConfigError, match=r"not both in .*srv.conf:\d+"):
        load_config(s.conf)
    s.write_conf(models={"gen": {"path": str(folders[0]), "max_num_seqs": 0}})
    with pytest.raises(ConfigError, match=r"max_num_seqs.* in .*srv.conf:\d+"):
        load_config(s.conf)
    dense = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "densenet_tiny" / "model"
    if dense.exists():
        s.write_conf(models={"d": {"path": str(dense), "kv_cache_tokens": 64}})
        with pytest.raises(ConfigError, match="applies to text generation models"):
            load_config(s.conf)


def test_quit_lets_running_generations_finish(server):
    """Last: it stops the module's server. Generations over HTTP and ZeroMQ are in flight when QUIT
    arrives; all finish. The ZeroMQ pair shares one connection and asks for "gen" (worker 1) and
    "tinypool" (worker 0), so one of them is relayed by a draining worker from a draining peer."""
    s = server
    results: dict[str, object] = {}
    started = threading.Event()
    zmq_started = {"gen": threading.Event(), "tinypool": threading.Event()}
    last_chunk: list[float] = []

    def http_stream():
        try:
            n, reason = 0, None
            c = client(s, max_retries=0)
            for e in c.completions.create(model="gen", prompt="Once", max_tokens=250, temperature=0, stream=True,
                                          stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                started.set()
                if e.choices:
                    reason = e.choices[0].finish_reason
                else:
                    n = e.usage.completion_tokens
            last_chunk.append(time.monotonic())
            results["http"] = (n, reason)
        except Exception as exc:  # recorded, asserted below
            results["http"] = exc

    def zmq_streams():
        async def one(az, model, n):
            chunks = []
            async for c in az.generate(model, "Once", max_tokens=n, ignore_eos=True, temperature=0):
                chunks.append(c)
                zmq_started[model].set()
            last_chunk.append(time.monotonic())
            return chunks[-1]["completion_tokens"], chunks[-1]["finish_reason"]

        async def both():
            async with AsyncClient(s.zmq_address, connections=1) as az:
                return await asyncio.gather(one(az, "gen", 250), one(az, "tinypool", 90))

        try:
            results["zmq"] = asyncio.run(both())
        except Exception as exc:
            results["zmq"] = exc

    # The short "tinypool" stream starts last and QUIT follows its first chunk, so it is in flight
    # then (a scrape of /metrics was too slow to catch it on a loaded machine).
    threads = [threading.Thread(target=http_stream), threading.Thread(target=zmq_streams)]
    threads[0].start()
    assert started.wait(20)
    threads[1].start()
    assert zmq_started["gen"].wait(20) and zmq_started["tinypool"].wait(20), results
    quit_at = time.monotonic()
    s.signal(signal.SIGQUIT)
    for t in threads:
        t.join(60)
    assert results["http"] == (250, "length")
    assert results["zmq"] == [(250, "length"), (90, "length")]
    assert max(last_chunk) > quit_at, "everything had finished before the QUIT: nothing was tested"
    assert s.wait_exit(30) == 0

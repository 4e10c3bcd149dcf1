"""``tensor_parallel 2`` through bin/modelsrv: a BLOOM sharded over two worker slots (gloo on 127.0.0.1).

The master forks the group together; rank 0 serves the model, rank 1 follows in lockstep and
forwards what reaches it to rank 0. KServe logits equal the unsharded model's; the group is
restarted as a unit when a rank dies or wedges; HUP and QUIT handle it as one.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models import load_model
from models.bloom import random_bloom_folder
from tests.conftest import alive, http, infer_json, title, wait_for

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return random_bloom_folder(tmp_path_factory.mktemp("tpsrv") / "bloom", {"tie_word_embeddings": False}, seed=1)


@pytest.fixture(scope="module")
def reference(folder):
    return load_model(folder)


IDS = [[5, 17, 42, 8, 99, 3, 250, 12], [7, 7, 300, 12, 1, 2, 3, 4]]


def logits_of(server, ids=IDS, timeout: float = 30.0) -> np.ndarray:
    status, body = infer_json(server.url, "bloom", [{"name": "input_ids", "datatype": "INT64", "shape": [len(ids), len(ids[0])],
                                                     "data": sum(ids, [])}], timeout=timeout)
    assert status == 200, body
    out = body["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def want_logits(reference, ids=IDS) -> np.ndarray:
    prepared = reference.prepare({"input_ids": np.array(ids, dtype=np.int64)}, {})
    return reference.forward(prepared, {})["logits"].numpy()


def group_pids(server) -> dict[int, int]:
    """rank -> pid of the group's live workers, from their process titles."""
    out = {}
    for pid in server.worker_pids():
        t = title(pid)
        if " tp bloom rank " in t:
            out[int(t.split(" tp bloom rank ")[1].split("/")[0])] = pid
    return out


def tp_server(make_server, folder, workers: int = 2, extra: str = "worker_timeout 4s;\n", **opts):
    s = make_server(models={"bloom": {"path": str(folder), "tensor_parallel": 2, "max_batch_size": 4, **opts}},
                    workers=workers, extra=extra)
    s.start(wait=False)
    s.wait_ready(timeout=120)
    return s


def test_serves_logits_equal_to_k1(make_server, folder, reference):
    s = make_server(models={"bloom": {"path": str(folder), "tensor_parallel": 2, "workers": "0 1", "max_batch_size": 4}},
                    workers=3, extra="")
    s.start(wait=False)
    s.wait_ready(timeout=120)
    ranks = group_pids(s)
    assert sorted(ranks) == [0, 1]
    assert title(ranks[1]).endswith("(cpu) tp bloom rank 1/2") and "worker process #1" in title(ranks[1])
    want = want_logits(reference)
    for _ in range(6):  # any worker: rank 0 itself, rank 1 and worker #2 forward to it
        np.testing.assert_allclose(logits_of(s), want, atol=1e-4, rtol=0)
    status, _, body = http("GET", f"{s.url}/v2/models/bloom/config")
    tp = json.loads(body)["tensor_parallel"]
    assert status == 200 and tp["size"] == 2 and tp["slots"] == [0, 1] and tp["port"] > 0
    log = s.log_text()
    assert "rendezvous on 127.0.0.1:" in log and "rank 1/2 shard loaded" in log


def test_config_checks(tmp_path, folder):
    from server.config import ConfigError, load_config

    def conf(body: str) -> Path:
        p = tmp_path / "srv.conf"
        p.write_text(f"worker_processes 3;\nhttp {{ listen 127.0.0.1:1; }}\n{body}")
        return p

    with pytest.raises(ConfigError, match="tensor_parallel 2 does not divide its 3 worker"):
        load_config(conf(f"model b {{ path {folder}; tensor_parallel 2; }}\n"))
    with pytest.raises(ConfigError, match="does not divide its 4 attention heads"):
        load_config(conf(f"model b {{ path {folder}; tensor_parallel 3; }}\n"))
    cfg = load_config(conf(f"model b {{ path {folder}; tensor_parallel 2; workers 1 2; tensor_parallel_port 29500; }}\n"))
    (g,) = cfg.tp_groups()
    assert g.slots == (1, 2) and g.port_base == 29500 and cfg.tp_of(2) == (g, 1) and cfg.tp_of(0) is None
    with pytest.raises(ConfigError, match="two tensor-parallel groups"):
        load_config(conf(f"model a {{ path {folder}; tensor_parallel 2; workers 0 1; }}\n"
                         f"model b {{ path {folder}; tensor_parallel 2; workers 1 2; }}\n"))


class TokenLoad:
    """Bounded background KServe load on the TP model: ``threads`` keep-alive clients until stopped.

    As conftest.Load: a request that died with a reused keep-alive connection is retried once on a
    fresh one (RFC 9112 9.3.1); every other failure is recorded, with its kind.
    """

    def __init__(self, server, threads: int = 3, ids=IDS) -> None:
        import threading

        self.server = server
        self.body = json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [len(ids), len(ids[0])],
                                            "data": sum(ids, [])}]}).encode()
        self.ok, self.failures, self.durations = 0, [], []
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads), "a client hung"

    def _run(self) -> None:
        import http.client

        conn = None
        while not self.stop_event.is_set():
            for attempt in (0, 1):
                reused = conn is not None
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=30)
                started = time.monotonic()
                try:
                    conn.request("POST", "/v2/models/bloom/infer", self.body, {"Content-Type": "application/json"})
                    r = conn.getresponse()
                    data = r.read()
                    if r.getheader("Connection", "").lower() == "close":
                        conn.close()
                        conn = None
                    with self.lock:
                        self.durations.append(time.monotonic() - started)
                        if r.status == 200:
                            self.ok += 1
                        else:
                            self.failures.append(f"{r.status} {data[:160]!r}")
                    break
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    conn = None
                    if attempt == 1 or not reused:
                        with self.lock:
                            self.durations.append(time.monotonic() - started)
                            self.failures.append(f"{type(exc).__name__}: {exc}")
                        time.sleep(0.05)
                        break


def wait_group(server, old: dict[int, int], timeout: float = 120.0) -> dict[int, int]:
    """Both ranks replaced by new processes and the model answering again."""

    def fresh():
        now = group_pids(server)
        if sorted(now) != [0, 1] or set(now.values()) & set(old.values()):
            return None
        try:
            return now if http("GET", f"{server.url}/v2/models/bloom/ready", timeout=5)[0] == 200 else None
        except OSError:  # queued in the backlog while no worker accepts: not yet
            return None

    return wait_for(fresh, timeout, 0.2, "the tensor-parallel group to be restarted")


@pytest.mark.parametrize("how", ["kill", "wedge"])
def test_rank1_dies_or_wedges_group_restarts(make_server, folder, reference, how):
    s = tp_server(make_server, folder)
    old = group_pids(s)
    port = json.loads(http("GET", f"{s.url}/v2/models/bloom/config")[2])["tensor_parallel"]["port"]
    with TokenLoad(s) as load:
        wait_for(lambda: load.ok >= 3, 60, what="requests to succeed")
        os.kill(old[1], signal.SIGKILL if how == "kill" else signal.SIGSTOP)  # a stopped process sends no heartbeat
        new = wait_group(s, old)
        wait_for(lambda: not alive(old[0]) and not alive(old[1]), 30, what="the old group to be gone")
        before = load.ok
        wait_for(lambda: load.ok >= before + 3, 60, what="requests to succeed on the new group")
    assert max(load.durations) < 30, "a request waited for the whole client timeout"
    np.testing.assert_allclose(logits_of(s), want_logits(reference), atol=1e-4, rtol=0)
    new_port = json.loads(http("GET", f"{s.url}/v2/models/bloom/config")[2])["tensor_parallel"]["port"]
    assert new_port != port and sorted(new) == [0, 1]
    log = s.log_text()
    assert "lost worker #1: restarting the whole group" in log
    if how == "wedge":
        assert "sent no heartbeat" in log


def test_hup_and_quit_under_load(make_server, folder, reference):
    s = tp_server(make_server, folder)
    old = group_pids(s)
    master = s.master_pid()
    with TokenLoad(s) as load:
        wait_for(lambda: load.ok >= 3, 60, what="requests to succeed")
        s.signal(signal.SIGHUP)
        wait_for(lambda: "retiring 2 old worker(s)" in s.log_text(), 120, what="the new generation to be ready")
        wait_for(lambda: not alive(old[0]) and not alive(old[1]), 60, what="the old group to retire")
        before = load.ok
        wait_for(lambda: load.ok >= before + 3, 60, what="requests on the new generation")
    assert load.failures == [], load.failures[:5]
    new = group_pids(s)
    assert sorted(new) == [0, 1] and not set(new.values()) & set(old.values())
    # QUIT with requests in flight: every one is answered, the group drains as a unit
    with TokenLoad(s, threads=3) as load:
        wait_for(lambda: load.ok >= 2, 60, what="requests to succeed")
        s.signal(signal.SIGQUIT, master)
        assert s.wait_exit(60) == 0
    assert load.ok > 0
    refused = [f for f in load.failures if "Connection refused" not in f]
    assert refused == [], refused[:5]  # once the listening socket is gone, new connections are refused: nothing else
    log = s.log_text()
    assert "tensor-parallel model" not in log or "the group ended" not in log


PROMPTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog.", "你好"]


def engine_texts(model, requests: list[dict]) -> list[str]:
    """What the generation engine writes for ``requests`` on the unsharded model, in this process."""
    import asyncio

    from server.config import ModelConf
    from server.serving.batcher import Device
    from server.serving.generation import GenerationEngine

    async def main():
        e = GenerationEngine("m", model, ModelConf(name="m", path=Path("."), kv_cache_tokens=1024), Device())
        e.start()
        try:
            out = []
            for r in requests:  # one at a time: batch composition does not change greedy or seeded outputs
                out.append("".join([c["text"] async for c in e.submit(r)]))
            return out
        finally:
            e.stop()

    return asyncio.run(asyncio.wait_for(main(), 60))


def test_openai_streams_equal_k1_and_quit_lets_generations_finish(make_server, folder, reference):
    import openai

    from server.client import Client

    s = tp_server(make_server, folder, extra="", kv_cache_tokens=1024)
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
    greedy = engine_texts(reference, [{"prompt": p, "max_tokens": 16, "temperature": 0} for p in PROMPTS])
    sampled = engine_texts(reference, [{"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 1.5, "top_k": 8, "seed": 5}])
    for p, want in zip(PROMPTS, greedy):
        for _ in range(2):  # rank 0 itself or rank 1 forwarding the stream
            events = list(c.completions.create(model="bloom", prompt=p, max_tokens=16, temperature=0, stream=True))
            assert "".join(e.choices[0].text for e in events if e.choices) == want
            assert sum(1 for e in events if e.choices) > 3, "not streamed"
    r = c.completions.create(model="bloom", prompt=PROMPTS[0], max_tokens=16, temperature=1.5, seed=5,
                             extra_body={"top_k": 8})
    assert r.choices[0].text == sampled[0]
    assert len(set(greedy + sampled)) > 1
    # QUIT while an SSE stream and a ZeroMQ stream are generating: both run to their end
    results: dict[str, object] = {}
    started = [threading.Event(), threading.Event()]

    def sse():
        try:
            n, last = 0, None
            for e in c.completions.create(model="bloom", prompt="Once", max_tokens=120, temperature=0, stream=True,
                                          stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                started[0].set()
                if e.choices:
                    last = e.choices[0].finish_reason
                else:
                    n = e.usage.completion_tokens
            results["sse"] = (n, last)
        except Exception as exc:
            results["sse"] = exc
        finally:
            started[0].set()

    def zmq():
        try:
            with Client(s.zmq_address) as z:
                chunks = []
                for chunk in z.generate("bloom", "Once", max_tokens=120, ignore_eos=True):
                    started[1].set()
                    chunks.append(chunk)
            results["zmq"] = (sum(len(ch["token_ids"]) for ch in chunks), chunks[-1]["finish_reason"])
        except Exception as exc:
            results["zmq"] = exc
        finally:
            started[1].set()

    threads = [threading.Thread(target=sse), threading.Thread(target=zmq)]
    for t in threads:
        t.start()
    assert all(e.wait(30) for e in started)
    s.signal(signal.SIGQUIT)
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads)
    assert results["zmq"] == (120, "length"), results
    assert results["sse"] == (120, "length"), results
    assert s.wait_exit(60) == 0

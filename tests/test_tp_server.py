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


def group_pids(server, master: int | None = None) -> dict[int, int]:
    """rank -> pid of the group's live workers (of ``master``, default: the pid file's), from their process titles."""
    out = {}
    for pid in server.worker_pids(master):
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
    assert status == 200 and tp["size"] == 2 and tp["slots"] == [0, 1] and tp["port"] > 0 and tp["backend"] == "gloo"
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


class BackgroundLoad:
    """``threads`` client threads running ``self._run`` until stopped (bounded: joined within 60 s)."""

    def _threads(self, threads: int) -> None:
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
        assert not any(t.is_alive() for t in self.threads), f"a {type(self).__name__} client hung"


class TokenLoad(BackgroundLoad):
    """Bounded background KServe load on the TP model: ``threads`` keep-alive clients until stopped.

    As conftest.Load: a request that died with a reused keep-alive connection is retried once on a
    fresh one (RFC 9112 9.3.1); every other failure is recorded, with its kind.
    """

    def __init__(self, server, threads: int = 3, ids=IDS) -> None:

        self.server = server
        self.body = json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [len(ids), len(ids[0])],
                                            "data": sum(ids, [])}]}).encode()
        self.ok, self.failures, self.durations = 0, [], []
        self._threads(threads)

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


class GenLoad(BackgroundLoad):
    """Bounded background streamed generation on the TP model (/v1/completions, ``stream: true``).

    Each request is greedy on one prompt over a fresh connection. It counts as served when its
    stream ends with a finish_reason and ``data: [DONE]`` and carries no error event; everything
    else (a status other than 200, an error event, a cut stream, a socket error) is a failure. The
    texts are kept: greedy on one prompt, every generation of the server must give the same one.
    """

    def __init__(self, server, threads: int = 2, max_tokens: int = 12, prompt: str = "Once upon a time") -> None:

        self.server = server
        self.body = json.dumps({"model": "bloom", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                "stream": True}).encode()
        self.ok, self.failures, self.texts, self.started = 0, [], set(), 0
        self._threads(threads)

    def _one(self) -> str | None:
        """None when served, else why not."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=30)
        phase, started = "connect", time.monotonic()
        try:
            conn.request("POST", "/v1/completions", self.body, {"Content-Type": "application/json"})
            phase = "headers"
            r = conn.getresponse()
            if r.status != 200:
                return f"{r.status} {r.read()[:160]!r}"
            with self.lock:
                self.started += 1
            phase = "body"
            data = r.read().decode()
        except (OSError, http.client.HTTPException) as exc:  # say where and when, for the error log
            return (f"{type(exc).__name__}: {exc} (in {phase}, after {time.monotonic() - started:.1f}s, "
                    f"at {time.strftime('%H:%M:%S')})")
        finally:
            conn.close()
        events = [e.removeprefix("data: ") for e in data.split("\n\n") if e.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"stream cut: {data[-160:]!r}"
        chunks = [json.loads(e) for e in events[:-1]]
        if any("error" in c for c in chunks):
            return f"error event: {next(c for c in chunks if 'error' in c)}"
        if not chunks or chunks[-1]["choices"][0]["finish_reason"] is None:
            return f"no finish_reason: {data[-160:]!r}"
        with self.lock:
            self.texts.add("".join(c["choices"][0]["text"] for c in chunks))
        return None

    def _run(self) -> None:
        import http.client

        while not self.stop_event.is_set():
            try:
                why = self._one()
            except (OSError, http.client.HTTPException, ValueError) as exc:
                why = f"{type(exc).__name__}: {exc}"
            with self.lock:
                if why is None:
                    self.ok += 1
                else:
                    self.failures.append(why)
            if why is not None:
                time.sleep(0.05)


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


@pytest.mark.parametrize("how", ["kill", "wedge", "kill0"])
def test_rank_dies_or_wedges_group_restarts(make_server, folder, reference, how):
    from tests.conftest import free_port

    # kill: with ``tensor_parallel_port``, whose first free port is the one the dead group just left
    s = tp_server(make_server, folder, **({"tensor_parallel_port": free_port()} if how == "kill" else {}))
    old = group_pids(s)
    port = json.loads(http("GET", f"{s.url}/v2/models/bloom/config")[2])["tensor_parallel"]["port"]
    with TokenLoad(s) as load:
        wait_for(lambda: load.ok >= 3, 60, what="requests to succeed")
        victim = 0 if how == "kill0" else 1  # kill0: rank 0, the one holding the requests
        os.kill(old[victim], signal.SIGSTOP if how == "wedge" else signal.SIGKILL)  # a stopped process sends no heartbeat
        new = wait_group(s, old)
        wait_for(lambda: not alive(old[0]) and not alive(old[1]), 30, what="the old group to be gone")
        before = load.ok
        wait_for(lambda: load.ok >= before + 3, 60, what="requests to succeed on the new group")
    assert max(load.durations) < 30, "a request waited for the whole client timeout"
    np.testing.assert_allclose(logits_of(s), want_logits(reference), atol=1e-4, rtol=0)
    new_port = json.loads(http("GET", f"{s.url}/v2/models/bloom/config")[2])["tensor_parallel"]["port"]
    assert new_port != port and sorted(new) == [0, 1]
    log = s.log_text()
    assert f"lost worker #{victim}: restarting the whole group" in log
    if how == "wedge":
        assert "sent no heartbeat" in log


def rendezvous_ports(log: str) -> list[int]:
    """The rendezvous ports the master(s) logged, in order (one per incarnation of a group)."""
    import re

    return [int(p) for p in re.findall(r"rendezvous on 127\.0\.0\.1:(\d+)", log)]


def test_hup_and_quit_under_load(make_server, folder, reference):
    """HUP under KServe and streamed-generation load: zero failures of either, and the new generation's
    group rendezvouses on another port while the old one still holds its own (``tensor_parallel_port``
    given: the next free one). Then QUIT with generations in flight: every stream started finishes."""
    from tests.conftest import free_port

    base = free_port()
    s = tp_server(make_server, folder, tensor_parallel_port=base)
    old = group_pids(s)
    master = s.master_pid()
    assert rendezvous_ports(s.log_text()) == [base]
    with TokenLoad(s) as load, GenLoad(s) as gen:
        wait_for(lambda: load.ok >= 3 and gen.ok >= 2, 60, what="requests to succeed")
        s.signal(signal.SIGHUP)
        wait_for(lambda: "retiring 2 old worker(s)" in s.log_text(), 120, what="the new generation to be ready")
        wait_for(lambda: not alive(old[0]) and not alive(old[1]), 60, what="the old group to retire")
        before, gen_before = load.ok, gen.ok
        wait_for(lambda: load.ok >= before + 3 and gen.ok >= gen_before + 2, 60, what="requests on the new generation")
    assert load.failures == [], load.failures[:5]
    assert gen.failures == [], (gen.failures[:5], s.log_text()[-6000:])
    assert len(gen.texts) == 1 and gen.texts != {""}, gen.texts  # greedy: the same text from both generations
    ports = rendezvous_ports(s.log_text())
    assert len(ports) == 2 and ports[0] == base and ports[1] != base, ports  # never the port the old group holds
    new = group_pids(s)
    assert sorted(new) == [0, 1] and not set(new.values()) & set(old.values())
    # QUIT with generations (and KServe requests) in flight: every one is answered, the group drains as a unit
    with TokenLoad(s, threads=2) as load, GenLoad(s, threads=3, max_tokens=40) as gen:
        wait_for(lambda: load.ok >= 2 and gen.ok >= 1, 60, what="requests to succeed")
        wait_for(lambda: gen.started > gen.ok + len(gen.failures), 30, interval=0.01, what="a stream in flight")
        in_flight = gen.started  # streams answered 200 before the QUIT: each must run to its finish_reason
        s.signal(signal.SIGQUIT, master)
        assert s.wait_exit(60) == 0
    assert load.ok > 0 and gen.ok >= in_flight > 0, (gen.ok, in_flight, gen.failures[:3])
    refused = [f for f in load.failures + gen.failures if "Connection refused" not in f]
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


def listening(port: int) -> bool:
    """Something listens on 127.0.0.1:``port`` (/proc/net/tcp, state 0A)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(line.split()[1] == want and line.split()[3] == "0A" for line in list(f)[1:])


def test_usr2_upgrade_two_masters_never_share_a_port(make_server, folder, reference):
    """USR2 with a TP model and ``tensor_parallel_port``: while both masters are alive each group holds
    its own rendezvous port (the new binary's is the next free one), both serve, and WINCH + QUIT to
    the old master under KServe and streamed-generation load fail nothing."""
    from tests.conftest import free_port
    from tests.test_process import start_new_binary

    base = free_port()
    s = tp_server(make_server, folder, tensor_parallel_port=base)
    old_group = group_pids(s)
    with TokenLoad(s) as load, GenLoad(s) as gen:
        wait_for(lambda: load.ok >= 3 and gen.ok >= 1, 60, what="requests to succeed")
        old_master, new_master, _ = start_new_binary(s)
        s.wait_ready(120, workers=2, master=new_master)
        new_group = group_pids(s, new_master)
        assert sorted(new_group) == [0, 1] and group_pids(s, old_master) == old_group  # two groups at once
        ports = rendezvous_ports(s.log_text())
        assert len(ports) == 2 and ports[0] == base and ports[1] != base, ports
        assert listening(ports[0]) and listening(ports[1])  # each master still holds its own
        before = load.ok
        wait_for(lambda: load.ok >= before + 3, 60, what="requests while both masters serve")
        s.signal(signal.SIGWINCH, old_master)
        wait_for(lambda: not any(alive(p) for p in old_group.values()), 60, what="the old group to drain")
        s.signal(signal.SIGQUIT, old_master)
        wait_for(lambda: not alive(old_master), 30, what="the old master to exit")
        before, gen_before = load.ok, gen.ok
        wait_for(lambda: load.ok >= before + 3 and gen.ok >= gen_before + 1, 60, what="requests on the new master alone")
    assert load.failures == [] and gen.failures == [], (load.failures[:3], gen.failures[:3])
    assert len(gen.texts) == 1
    assert not listening(ports[0]) and listening(ports[1])  # the old master's port went with it
    np.testing.assert_allclose(logits_of(s), want_logits(reference), atol=1e-4, rtol=0)
    s.signal(signal.SIGTERM, new_master)
    wait_for(lambda: not alive(new_master), 30, what="the new master to exit")


def test_check_config_flag(tmp_path, folder):
    """``bin/modelsrv -t``: a valid TP block passes, a k that does not divide the heads is named."""
    import subprocess

    from tests.conftest import BIN

    def check(k: int) -> subprocess.CompletedProcess:
        conf = tmp_path / f"srv{k}.conf"
        conf.write_text(f"worker_processes 2;\npid {tmp_path}/run/modelsrv.pid;\nerror_log {tmp_path}/error.log;\n"
                        f"http {{ listen 127.0.0.1:1; }}\nmodel b {{ path {folder}; tensor_parallel {k}; }}\n")
        return subprocess.run([str(BIN), "-c", str(conf), "-p", str(tmp_path), "-t"], capture_output=True, text=True,
                              timeout=120)

    ok, bad = check(2), check(4)
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode != 0 and "tensor_parallel 4 does not divide its 2 worker" in bad.stderr, bad.stderr

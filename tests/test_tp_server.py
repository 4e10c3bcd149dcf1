"""``tensor_parallel 2`` through bin/modelsrv: a BLOOM sharded over two worker slots (gloo on 127.0.0.1).

The master forks the group together; rank 0 serves the model, rank 1 follows in lockstep and
forwards what reaches it to rank 0. KServe logits equal the unsharded model's; the group is
restarted as a unit when a rank dies or wedges; HUP and QUIT handle it as one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import load_model
from models.bloom import random_bloom_folder
from tests.conftest import http, infer_json, title

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

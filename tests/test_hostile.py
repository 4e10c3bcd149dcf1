"""Broken and hostile clients against a real server: each case reproduced first, then fixed.

Every request goes to 127.0.0.1 only; every loop is bounded.
"""

from __future__ import annotations

import json
import os
import signal

import msgpack
import numpy as np
import pytest

from server.client import Client
from tests.conftest import fixture_path, http, infer_json, wait_for

TINY = fixture_path("densenet_tiny", "model")
AFNO = fixture_path("afno_small", "model")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.conftest import Server

    prefix = tmp_path_factory.mktemp("hostile")
    stale = prefix / "run" / "metrics-999999"  # as a master killed with -9 leaves it (no such pid)
    stale.mkdir(parents=True)
    s = Server(prefix, models={"tiny": {"path": str(TINY)}, "afno": {"path": str(AFNO)}}, workers=1)
    s.start()
    s.stale_metrics = stale
    yield s
    s.stop()


def test_json_nested_deeply_is_400_not_500(server) -> None:
    body = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, _, reply = http("POST", server.url + "/v2/models/tiny/infer", body)
    assert status == 400 and b"nested too deeply" in reply
    assert "Traceback" not in server.log_text()


def test_zmq_shape_beyond_any_tensor_is_400_not_500(server) -> None:
    from tests.test_serving import raw_dealer

    s = raw_dealer(server)
    try:
        header = {"id": 1, "op": "infer", "model": "tiny",
                  "inputs": [{"name": "images", "datatype": "FP32", "shape": [2**32, 2**32, 0], "frame": 0}]}
        s.send_multipart([msgpack.packb(header), b""])
        reply = msgpack.unpackb(s.recv_multipart()[0])
    finally:
        s.close()
    assert reply["ok"] is False and reply["code"] == 400 and "shape" in reply["error"]
    status, reply = infer_json(server.url, "tiny", [{"name": "images", "datatype": "FP32", "shape": [2**40, 0], "data": []}])
    assert status == 400 and "shape" in reply["error"]
    assert "Traceback" not in server.log_text()


def test_non_finite_outputs_are_valid_json_and_read_back_by_tritonclient(server) -> None:
    import tritonclient.http as triton

    fields = np.full((1, 5, 40, 80), np.nan, np.float32)  # AFNO's forecast of NaN fields is NaN
    client = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    x = triton.InferInput("fields", list(fields.shape), "FP32")
    x.set_data_from_numpy(fields)
    out = triton.InferRequestedOutput("forecast", binary_data=False)
    got = client.infer("afno", [x], outputs=[out]).as_numpy("forecast")
    assert got.shape == (1, 5, 40, 80) and np.isnan(got).all()

    body = json.dumps({"inputs": [{"name": "fields", "datatype": "FP32", "shape": [1, 5, 40, 80],
                                   "data": [0.0] * (5 * 40 * 80)}]}).encode()
    status, _, reply = http("POST", server.url + "/v2/models/afno/infer", body)
    assert status == 200
    json.loads(reply, parse_constant=lambda name: pytest.fail(f"bare {name} in a JSON reply"))
    with Client(server.zmq_address) as c:
        assert np.isnan(c.infer("afno", {"fields": fields})["forecast"]).all()


def test_stale_metrics_folders_are_removed_at_start(server) -> None:
    assert not server.stale_metrics.exists()
    assert (server.prefix / "run" / f"metrics-{server.master_pid()}").is_dir()


def test_failed_log_reopen_is_not_reported_as_reopened(make_server) -> None:
    s = make_server(workers=1).start()
    moved = s.error_log.with_suffix(".log.1")
    os.rename(s.error_log, moved)
    s.error_log.mkdir()  # the path is now a directory: open() fails in every process
    s.signal(signal.SIGUSR1)
    wait_for(lambda: moved.read_text().count("reopening") >= 2, 20, what="the master's and the worker's errors")
    assert "reopened logs" not in moved.read_text()

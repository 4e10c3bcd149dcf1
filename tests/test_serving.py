"""The serving path through a real server: tritonclient over HTTP, the project's ZeroMQ client,
batching, forwarding between workers, splitting large requests, metrics, and bad input."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import socket
import struct
import time

import msgpack
import numpy as np
import pytest
import zmq
from safetensors.numpy import load_file

from server.client import AsyncClient, Client, ModelsrvError
from tests.conftest import fixture_path, http, infer_json, wait_for

TINY = fixture_path("densenet_tiny", "model")
IMAGES = fixture_path("densenet_tiny_images")


def close_enough(got: np.ndarray, ref: np.ndarray, atol: float = 1e-4, rtol: float = 1e-4) -> bool:
    return got.shape == ref.shape and bool(np.all(np.abs(got - ref) <= atol + rtol * np.abs(ref)))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two workers; "tiny" everywhere, "only1" placed on worker 1 alone, "split" with max_batch_size 2."""
    from tests.conftest import Server

    prefix = tmp_path_factory.mktemp("serving")
    s = Server(prefix, models={
        "tiny": {"path": str(TINY), "max_batch_size": 8, "batch_timeout": "20ms"},
        "only1": {"path": str(TINY), "workers": 1},
        "split": {"path": str(TINY), "max_batch_size": 2},
        "small_queue": {"path": str(TINY), "max_queue_size": 1, "max_batch_size": 1},
        "balance": {"path": str(TINY), "max_batch_size": 2},
    }, http_extra="    client_max_body_size 16m;\n    client_body_timeout 2s;\n")
    s.start()
    yield s
    s.stop()


def test_fixture_numbers_over_tritonclient_binary_and_json(server) -> None:
    import tritonclient.http as triton

    inputs = load_file(str(fixture_path("densenet_tiny", "inputs.safetensors")))["images"]
    expected = load_file(str(fixture_path("densenet_tiny", "expected.safetensors")))["logits"]
    client = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    for binary in (True, False):
        x = triton.InferInput("images", list(inputs.shape), "FP32")
        x.set_data_from_numpy(inputs, binary_data=binary)
        out = triton.InferRequestedOutput("logits", binary_data=binary)
        got = client.infer("tiny", [x], outputs=[out]).as_numpy("logits")
        assert close_enough(got, expected), np.abs(got - expected).max()
    # compressed both ways, as tritonclient offers
    x = triton.InferInput("images", list(inputs.shape), "FP32")
    x.set_data_from_numpy(inputs)
    got = client.infer("tiny", [x], request_compression_algorithm="gzip", response_compression_algorithm="deflate").as_numpy("logits")
    assert close_enough(got, expected)


def test_image_bytes_pipeline_over_http_and_zmq(server) -> None:
    import tritonclient.http as triton

    files = [(IMAGES / "inputs" / "0.jpg").read_bytes(), (IMAGES / "inputs" / "1.png").read_bytes()]
    expected = load_file(str(IMAGES / "expected.safetensors"))["logits"]
    client = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    x = triton.InferInput("image", [2], "BYTES")
    x.set_data_from_numpy(np.array(files, dtype=object))
    got = client.infer("tiny", [x]).as_numpy("logits")
    assert close_enough(got, expected, 1e-3, 1e-3)
    with Client(server.zmq_address) as c:
        got = c.infer("tiny", {"image": files})["logits"]
    assert close_enough(got, expected, 1e-3, 1e-3)


def test_metadata_config_and_model_list(server) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    meta = client.get_model_metadata("tiny")
    assert meta["inputs"][0] == {"name": "images", "datatype": "FP32", "shape": [-1, 3, -1, -1]}
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 7]}]
    config = client.get_model_config("split")
    assert config["max_batch_size"] == 2
    assert client.get_server_metadata()["name"] == "modelsrv"
    with Client(server.zmq_address) as c:
        assert c.live() and c.ready() and c.ready("tiny")
        assert set(c.models()) >= {"tiny", "only1", "split"}
        assert c.metadata("only1")["outputs"][0]["name"] == "logits"


def test_zmq_sync_and_async_clients_match_reference(server) -> None:
    inputs = load_file(str(fixture_path("densenet_tiny", "inputs.safetensors")))["images"]
    expected = load_file(str(fixture_path("densenet_tiny", "expected.safetensors")))["logits"]
    with Client(server.zmq_address, connections=2) as c:
        assert close_enough(c.infer("tiny", {"images": inputs})["logits"], expected)

    async def many() -> list[np.ndarray]:
        async with AsyncClient(server.zmq_address, connections=4) as c:
            return await asyncio.gather(*(c.infer("tiny", {"images": inputs[i : i + 1]}) for i in (0, 1) * 16))

    outs = asyncio.run(many())
    for k, out in enumerate(outs):
        assert close_enough(out["logits"], expected[k % 2 : k % 2 + 1])


def test_concurrent_requests_are_batched(server) -> None:
    """48 requests sent at once on one connection: the replies (ours alone, not the shared log) show batches."""
    from server import wire

    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    s = raw_dealer(server)
    try:
        for i in range(48):
            s.send_multipart(wire.request("infer", i, "tiny", {"images": x}))
        replies = [wire.unpack(s.recv_multipart()[0]) for _ in range(48)]
    finally:
        s.close()
    assert all(r["ok"] for r in replies) and sorted(r["id"] for r in replies) == list(range(48))
    sizes = [r["timing"]["batch_size"] for r in replies]
    assert max(sizes) > 1, f"48 concurrent requests never shared a batch: {sizes}"


def test_model_on_another_worker_is_forwarded(server) -> None:
    """Every request for "only1" succeeds whichever worker accepted it; some went through a peer."""
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with Client(server.zmq_address, connections=4) as c:
        ref = c.infer("tiny", {"images": x})["logits"]
        for _ in range(12):
            assert np.allclose(c.infer("only1", {"images": x})["logits"], ref, atol=1e-5)
    for _ in range(12):
        status, out = infer_json(server.url, "only1", [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                                          "data": x.ravel().tolist()}])
        assert status == 200
    wait_for(lambda: ' peer "infer only1" 200' in server.access_log.read_text(), 10, what="the forwarded request's log line")


def test_request_larger_than_max_batch_is_split_and_gathered_in_order(server) -> None:
    x = np.random.default_rng(3).standard_normal((7, 3, 32, 32)).astype(np.float32)
    with Client(server.zmq_address) as c:
        whole = c.infer("split", {"images": x})["logits"]
        one_by_one = np.concatenate([c.infer("split", {"images": x[i : i + 1]})["logits"] for i in range(7)])
    assert whole.shape == (7, 7)
    assert np.allclose(whole, one_by_one, atol=1e-5)
    # the reply names the workers its chunks ran on: both of them
    from server import wire

    s = raw_dealer(server)
    try:
        s.send_multipart(wire.request("infer", 1, "split", {"images": x}))
        reply = wire.unpack(s.recv_multipart()[0])
    finally:
        s.close()
    assert reply["ok"] and reply["timing"]["batch_size"] == 7
    assert len(reply["timing"]["worker"].split(",")) == 2, f"no chunk ran on the peer worker: {reply['timing']}"


def test_deep_queue_hands_work_to_an_idle_peer(server) -> None:
    """One connection lands on one worker; once its queue is deeper than a batch, a peer helps."""
    x = np.random.default_rng(4).standard_normal((1, 3, 96, 96)).astype(np.float32)

    async def burst() -> list:
        async with AsyncClient(server.zmq_address, connections=1) as c:
            return await asyncio.gather(*(c.infer("balance", {"images": x}) for _ in range(24)))

    outs = asyncio.run(burst())
    assert all(np.allclose(o["logits"], outs[0]["logits"], atol=1e-5) for o in outs)
    # the access log is written once per turn of a worker's loop: the last lines may trail the replies
    wait_for(lambda: server.access_log.read_text().count('zmq "infer balance" 200') == 24, 10, what="24 log lines")
    assert server.access_log.read_text().count('peer "infer balance" 200') > 0, "no request moved to the idle worker"


def raw_dealer(server) -> zmq.Socket:
    """A bare pyzmq DEALER on the server's ZMQ port, for frames the project's client would never send."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 20000)
    s.connect(server.zmq_address)
    return s


def test_client_cannot_skip_splitting_with_the_internal_fwd_flag(server) -> None:
    x = np.zeros((6, 3, 32, 32), np.float32)
    s = raw_dealer(server)
    try:
        from server import wire

        frames = wire.request("infer", 99, "split", {"images": x})
        header = msgpack.unpackb(frames[0])
        header["fwd"] = True
        s.send_multipart([msgpack.packb(header), *frames[1:]])
        reply = msgpack.unpackb(s.recv_multipart()[0])
    finally:
        s.close()
    assert reply["ok"], reply
    # split into chunks of max_batch_size 2: no batch of "split" ever ran with more than 2 items
    text = http("GET", server.url + "/metrics")[2].decode()
    count = float(re.search(r'^modelsrv_batch_size_count\{model="split"\} (\S+)$', text, re.M).group(1))
    small = float(re.search(r'^modelsrv_batch_size_bucket\{le="2.0",model="split"\} (\S+)$', text, re.M).group(1))
    assert count > 0 and small == count


def test_large_request_is_admitted_once_not_per_chunk(server) -> None:
    """small_queue holds 1 request; a request of 3 items (max_batch_size 1) is still served."""
    with Client(server.zmq_address, retries=0) as c:
        out = c.infer("small_queue", {"images": np.zeros((3, 3, 32, 32), np.float32)})
    assert out["logits"].shape == (3, 7)


def test_metrics_aggregate_over_workers(server) -> None:
    with Client(server.zmq_address, connections=4) as c:
        for _ in range(8):
            c.infer("tiny", {"images": np.zeros((1, 3, 32, 32), np.float32)})
    status, _, body = http("GET", server.url + "/metrics")
    text = body.decode()
    assert status == 200
    ok = sum(float(v) for v in re.findall(r'modelsrv_requests_total\{model="tiny",outcome="ok",protocol="zmq"\} (\S+)', text))
    assert ok >= 8
    assert 'modelsrv_batch_size_bucket{le="1.0",model="tiny"}' in text
    assert re.search(r"^modelsrv_workers_ready (\S+)$", text, re.M).group(1) == "2.0"
    assert 'modelsrv_model_load_seconds{model="tiny"}' in text
    # a name no worker serves is counted as "unknown": clients cannot mint new series
    infer_json(server.url, "made-up-name", [])
    text = http("GET", server.url + "/metrics")[2].decode()
    assert "made-up-name" not in text and 'model="unknown",outcome="404"' in text


def test_overload_gives_503_with_retry_after(server) -> None:
    big = np.zeros((1, 3, 512, 512), np.float32)

    async def flood() -> list:
        async with AsyncClient(server.zmq_address, connections=1, retries=0) as c:
            return await asyncio.gather(*(c.infer("small_queue", {"images": big}) for _ in range(12)), return_exceptions=True)

    results = asyncio.run(flood())
    codes = [r.code for r in results if isinstance(r, ModelsrvError)]
    assert 503 in codes and any(isinstance(r, dict) for r in results)
    # over HTTP: 503 with Retry-After
    import concurrent.futures

    body = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 512, 512],
                                   "data": [0.0] * (3 * 512 * 512)}]}).encode()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda _: http("POST", server.url + "/v2/models/small_queue/infer", body), range(12)))
    refused = [headers for status, headers, _ in replies if status == 503]
    assert refused and all(h.get("Retry-After") == "1" for h in refused)
    assert any(status == 200 for status, _, _ in replies)


# -- bad input: a clear error, and the worker keeps serving ----------------------------------------

def assert_still_serving(server) -> None:
    status, out = infer_json(server.url, "tiny", [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                                     "data": [0.0] * 3072}])
    assert status == 200, out


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b'{"inputs": [', 400, "malformed JSON"),
        (b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1,3,32,32], "data": [1,2,3]}]}', 400, "3 values"),
        (b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [1]}]}', 400, "pixels"),
        (b'{"inputs": [{"name": "images", "datatype": "INT64", "shape": [1,3,32,32], "data": ' + json.dumps([1] * 3072).encode() + b"}]}", 400, "FP32"),
        (b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [3,32,32], "data": ' + json.dumps([1.0] * 3072).encode() + b"}]}", 400, "shape"),
        (b'{"inputs": [{"name": "images", "datatype": "FP99", "shape": [1], "data": [1]}]}', 400, "datatype"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not an image"]}]}', 400, "image"),
        (b"[1, 2]", 400, "inputs"),
        (b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [true, 3], "data": [1, 2, 3]}]}', 400, "shape"),
        (b'{"inputs": [{"name": "images", "datatype": ["FP32"], "shape": [1], "data": [1]}]}', 400, "datatype"),
        (b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [99999999999, 99999999999], "data": [1]}]}', 400, "shape"),
    ],
)
def test_bad_json_requests_get_clear_errors(server, body: bytes, status: int, fragment: str) -> None:
    got, headers, data = http("POST", server.url + "/v2/models/tiny/infer", body, {"Content-Type": "application/json"})
    assert got == status
    assert fragment in json.loads(data)["error"]
    assert_still_serving(server)


def test_unknown_model_and_route(server) -> None:
    status, out = infer_json(server.url, "nope", [])
    assert status == 404 and "nope" in out["error"]
    assert http("GET", server.url + "/v3/whatever")[0] == 404
    assert http("GET", server.url + "/v2/models/tiny/infer")[0] == 405


def test_truncated_binary_tensor(server) -> None:
    header = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                     "parameters": {"binary_data_size": 3072 * 4}}]}).encode()
    body = header + b"\0" * 100
    status, _, data = http("POST", server.url + "/v2/models/tiny/infer", body,
                           {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "binary_data_size" in json.loads(data)["error"]
    assert_still_serving(server)


def test_oversized_body_is_413(server) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413")
    status, _, _ = http("POST", server.url + "/v2/models/tiny/infer", gzip.compress(b" " * 30_000_000),
                        {"Content-Encoding": "gzip"})
    assert status == 413  # a small gzip bomb is measured after decompression
    assert_still_serving(server)


def test_client_that_stalls_mid_body_gets_408_and_others_are_served(server) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inp")
        assert_still_serving(server)
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408")


def test_client_hanging_up_mid_request(server) -> None:
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
            s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"inputs\"")
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        body = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [2, 3, 64, 64], "data": [0.0] * 24576}]}).encode()
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert_still_serving(server)


def test_expect_100_continue_is_answered_at_once(server) -> None:
    body = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}).encode()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        s.settimeout(0.5)  # curl waits a second before sending the body if nobody answers
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.settimeout(10)
        s.sendall(body)
        assert s.recv(65536).split(b"HTTP/1.1 ")[-1].startswith(b"200")


def read_replies(s: socket.socket) -> list[bytes]:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return [b"HTTP/1.1 " + r for r in data.split(b"HTTP/1.1 ")[1:]]


def test_pipelined_bad_request_is_answered_in_its_turn(server) -> None:
    good = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    bad = b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}"
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(good + good + bad + good)
        replies = read_replies(s)
    assert [r[9:12] for r in replies] == [b"200", b"200", b"400"]  # the 4th is never read: the stream is broken
    assert b"Connection: close" in replies[2]


def test_oversized_url_and_headers_are_refused(server) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_replies(s)[0].startswith(b"HTTP/1.1 414")
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"GET /v2 HTTP/1.1\r\n" + b"X-Junk: " + b"b" * 100_000 + b"\r\n\r\n")
        assert read_replies(s)[0].startswith(b"HTTP/1.1 431")
    assert_still_serving(server)


def test_head_has_no_body(server) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"HEAD /v2/models/tiny HTTP/1.1\r\nHost: x\r\n\r\nGET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        replies = read_replies(s)
    assert len(replies) == 2 and replies[0].endswith(b"\r\n\r\n") and replies[1].endswith(b'{"live":true}')


def test_body_timeout_holds_for_a_pipelined_request(server) -> None:
    """A request that starts arriving right after an answer still gets client_body_timeout (2s here)."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\nPOST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        t0 = time.monotonic()
        replies = read_replies(s)
    assert [r[9:12] for r in replies] == [b"200", b"408"] and time.monotonic() - t0 < 8


def test_malformed_http_is_400(server) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 400")
    assert_still_serving(server)


def test_zmq_oversized_message_is_413_even_with_inline_bytes(server) -> None:
    with Client(server.zmq_address) as c, pytest.raises(ModelsrvError) as err:
        c.infer("tiny", {"image": [b"x" * (17 << 20)]})
    assert err.value.code == 413
    with Client(server.zmq_address) as c:
        assert c.infer("tiny", {"images": np.zeros((1, 3, 32, 32), np.float32)})["logits"].shape == (1, 7)


def test_zmq_garbage_and_bad_tensors_get_error_replies(server) -> None:
    s = raw_dealer(server)
    try:
        cases = [
            ([b"\xc1\xff garbage"], "msgpack"),
            ([msgpack.packb([1, 2, 3])], "map"),
            ([msgpack.packb({"id": 1, "op": "infer", "model": "tiny",
                             "inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32], "frame": 0}]}), b"\0" * 10], "bytes"),
            ([msgpack.packb({"id": 2, "op": "infer", "model": "tiny",
                             "inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32], "frame": 5}]})], "frame"),
            ([msgpack.packb({"id": 3, "op": "launch_missiles"})], "unknown op"),
            ([msgpack.packb({"id": 4, "op": "infer", "model": "ghost", "inputs": []})], "ghost"),
            ([msgpack.packb({"id": 5, "op": "infer", "model": [1], "inputs": []})], "model"),
            ([msgpack.packb({"id": 6, "op": "infer", "model": "tiny",
                             "inputs": [{"name": "images", "datatype": ["FP32"], "shape": [1], "frame": 0}]}), b"\0" * 4], "datatype"),
            ([msgpack.packb({"id": 7, "op": "infer", "model": "tiny",
                             "inputs": [{"name": "images", "datatype": "FP32", "shape": [True], "frame": 0}]}), b"\0" * 4], "shape"),
        ]
        for frames, fragment in cases:
            s.send_multipart(frames)
            header = msgpack.unpackb(s.recv_multipart()[0])
            assert header["ok"] is False and fragment in header["error"], header
        s.send_multipart([struct.pack("<I", 7)])  # a header that is valid msgpack but not a map
        assert msgpack.unpackb(s.recv_multipart()[0])["ok"] is False
    finally:
        s.close()
    with Client(server.zmq_address) as c:
        with pytest.raises(ModelsrvError) as err:
            c.infer("tiny", {"images": np.zeros((1, 3, 32, 32), np.float64)})
        assert err.value.code == 400 and "FP32" in err.value.message
        assert c.infer("tiny", {"images": np.zeros((1, 3, 32, 32), np.float32)})["logits"].shape == (1, 7)


def test_keepalive_and_pipelined_requests_are_answered_in_order(server) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"GET /v2/models/tiny HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /v2/models/split/config HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    replies = data.split(b"HTTP/1.1 ")[1:]
    assert len(replies) == 3 and all(r.startswith(b"200") for r in replies)
    assert b'"name":"tiny"' in replies[0] and b'"max_batch_size":2' in replies[1] and b'"live":true' in replies[2]

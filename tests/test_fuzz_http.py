"""Property-based fuzzing of the HTTP front door (hypothesis): the KServe JSON and binary bodies in
process, and raw requests (the HTTP parser and the routes) against a real server.

No input may yield a 5xx other than 503, kill a worker or grow it without bound. The default run
is short (tests/conftest.py's "ci" profile); ``make fuzz`` runs the "fuzz" profile, with many more
examples.
"""

from __future__ import annotations

import gzip
import json
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.spec import InputError
from server.frontends import kserve
from tests.conftest import Server, fixture_path, http
from tests.test_hostile_http import rss

TINY = fixture_path("densenet_tiny", "model")
DATATYPES = ["FP32", "FP16", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "BOOL", "BYTES", "FP99", ""]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
shapes = st.lists(st.one_of(st.integers(-2, 6), st.integers(2**31 - 2, 2**63), json_values), max_size=4) | json_values
parameters = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-4, 600) | json_values,
                                        "binary_data": json_values, "binary_data_output": json_values,
                                        "steps": json_values}),
)
tensors = st.fixed_dictionaries(
    {"name": st.sampled_from(["images", "image", "x"]) | json_values},
    optional={"datatype": st.sampled_from(DATATYPES) | json_values, "shape": shapes, "parameters": parameters,
              "data": st.lists(st.floats(allow_nan=False) | st.integers(-300, 300) | st.text(max_size=4), max_size=12)
              | json_values},
)
documents = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=3) | json_values},
    optional={"outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=8) | json_values},
                                                        optional={"parameters": parameters}), max_size=2) | json_values,
              "parameters": parameters, "id": json_values},
)


def parse_or_input_error(body: bytes, header_length: int | None) -> None:
    try:
        kserve.parse_request(body, header_length)
    except InputError:
        pass  # a 400: fine. Anything else escaping would be a 500


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512), st.none() | st.integers(-10, 600))
def test_kserve_parse_request_takes_any_bytes(body: bytes, header_length: int | None) -> None:
    parse_or_input_error(body, header_length)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(documents, st.binary(max_size=600), st.booleans())
def test_kserve_parse_request_takes_any_document(doc, tail: bytes, binary: bool) -> None:
    header = json.dumps(doc).encode()
    parse_or_input_error(header + tail if binary else header, len(header) if binary else None)


# -- raw requests against a real server ---------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("fuzz"), models={"tiny": {"path": str(TINY)}}, workers=1,
               http_extra="    client_header_timeout 2s;\n    client_body_timeout 2s;\n")
    s.start()
    s.worker = s.worker_pids()[0]
    s.rss_before = rss(s.worker)
    yield s
    s.stop()


ROUTES = ["/v2/health/live", "/v2/health/ready", "/v2", "/metrics", "/v2/models", "/v2/repository/index",
          "/v2/models/tiny", "/v2/models/tiny/ready", "/v2/models/tiny/config", "/v2/models/tiny/infer",
          "/v2/models/tiny/versions/1/infer", "/v2/models/nope/infer", "/v1/models", "/v1/completions",
          "/v1/chat/completions"]
token = st.text(st.characters(codec="ascii", exclude_characters="\r\n"), max_size=12).map(str.encode)
header_names = st.sampled_from([b"Content-Length", b"Content-Encoding", b"Transfer-Encoding", b"Expect",
                                b"Inference-Header-Content-Length", b"Connection", b"Accept-Encoding",
                                b"Authorization", b"Host"]) | token
bodies = st.one_of(st.binary(max_size=300), documents.map(lambda d: json.dumps(d).encode()),
                   json_values.map(lambda v: json.dumps(v).encode()))


@st.composite
def raw_requests(draw) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS"]) | token)
    path = draw(st.sampled_from(ROUTES).map(str.encode) | token.map(lambda t: b"/" + t))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]) | token)
    headers = draw(st.lists(st.tuples(header_names, token), max_size=5))
    body = draw(bodies)
    framing = draw(st.sampled_from(["length", "chunked", "gzip", "none"]))
    if framing == "gzip":
        body = gzip.compress(body)
        headers.append((b"Content-Encoding", draw(st.sampled_from([b"gzip", b"deflate", b"br"]))))
    if framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
        pieces = [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)])]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
    elif framing != "none":
        headers.append((b"Content-Length", str(len(body)).encode()))
    head = b"%s %s %s\r\n" % (method, path, version) + b"".join(b"%s: %s\r\n" % h for h in headers)
    raw = head + b"\r\n" + body
    if draw(st.booleans()):  # pipelined behind a well-formed request
        raw = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" + raw
    raw += b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    if draw(st.booleans()):  # damage it somewhere
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=8)) + raw[at + draw(st.integers(0, 8)):]
    return raw


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw_requests())
def test_raw_requests_never_get_a_5xx_but_503(server, raw: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)  # nothing more comes: the server answers or times the request out
        except OSError:
            return
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    for reply in data.split(b"HTTP/1.1 ")[1:]:
        status = reply[:3]
        assert not status.startswith(b"5") or status == b"503", (raw[:300], data[:300])


def test_after_the_fuzz_the_worker_lives_and_did_not_grow(server) -> None:
    assert server.worker_pids() == [server.worker], "a worker died during the fuzz run"
    grown = rss(server.worker) - server.rss_before
    assert grown < 200 << 20, f"the worker grew by {grown >> 20} MB"
    assert http("GET", server.url + "/v2/health/live")[0] == 200
    assert "Traceback" not in server.log_text()

"""Property-based tests of the ZeroMQ wire format and front door, in-process (issue 10).

Any frames a client can send end in a reply or in WireError / InputError (a 4xx), never in
another exception: another exception would be a 500, i.e. a bug.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.spec import InputError
from server import wire
from server.errors import NotFound
from server.frontends.zeromq import ZmqServer
from server.serving.batcher import Timing
from tests.wire_strategies import anything, messages, payload_frames, tensor_descs

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(messages)
def test_decode_of_any_frames_is_a_request_or_a_wire_error(frames: list[bytes]) -> None:
    try:
        header = wire.unpack(frames[0])
        tensors = wire.decode_tensors(header.get("inputs"), frames[1:])
    except (wire.WireError, InputError):
        return
    for value in tensors.values():  # what decodes is usable: arrays of the promised size, or bytes
        assert isinstance(value, list) or isinstance(value, np.ndarray)


@FUZZ
@given(st.lists(tensor_descs(), max_size=3), payload_frames)
def test_decode_of_any_descriptors_is_tensors_or_a_wire_error(descs: list[Any], frames: list[bytes]) -> None:
    try:
        wire.decode_tensors(descs, frames)
    except (wire.WireError, InputError):
        pass


@FUZZ
@given(anything)
def test_a_round_trip_keeps_any_header(value: Any) -> None:
    data = wire.pack({"id": value, "parameters": {"x": value}})
    assert wire.pack(wire.unpack(data)) == data  # compared packed: NaN != NaN


class EchoEngine:
    """Serves "tiny": the request's tensors back. Generation: no such model."""

    def metric_label(self, name: str) -> str:
        return "tiny" if name == "tiny" else "unknown"

    def known_models(self) -> list[str]:
        return ["tiny"]

    def metadata(self, name: str) -> dict | None:
        return {"name": "tiny"} if name == "tiny" else None

    async def infer(self, name: str, inputs: dict, parameters: dict, forwarded: bool = False):
        if name != "tiny":
            raise NotFound(f"unknown model {name!r}")
        return dict(inputs), Timing(0.0, 0.0, 1, "1:0")

    async def generate(self, name: str, request: dict, forwarded: bool = False):
        raise NotFound(f"unknown model {name!r}")


class Router:
    """Where _handle sends its reply."""

    def __init__(self) -> None:
        self.sent: list[list[Any]] = []
        self.partial: list[Any] = []

    def send(self, frame: Any, flags: int = 0, copy: bool = True) -> None:
        self.partial.append(frame)
        if not flags & zmq.SNDMORE:
            self.sent.append(self.partial)
            self.partial = []

    def getsockopt(self, option: int) -> int:
        return 0


CTX = zmq.asyncio.Context.instance()


@FUZZ
@given(messages, st.sampled_from(["zmq", "peer"]))
def test_the_front_door_answers_any_message_without_a_500(frames: list[bytes], protocol: str) -> None:
    server = ZmqServer(EchoEngine(), CTX, lambda line: None, lambda: True, max_message=1 << 20)  # type: ignore[arg-type]
    router = Router()
    server.inflight = 1
    asyncio.run(server._handle(router, protocol, [zmq.Frame(b"client"), *(zmq.Frame(f) for f in frames)]))  # type: ignore[arg-type]
    assert server.inflight == 0
    if not router.sent:  # only a cancel goes unanswered
        assert wire.unpack(frames[0]).get("op") == "cancel"
        return
    [reply] = router.sent
    header = wire.unpack(reply[1])
    assert header["ok"] or header["code"] in (400, 404, 413), header

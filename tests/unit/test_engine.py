"""The engine in-process, with fake peers: real ZeroMQ ROUTER sockets on ipc:// that answer with wire frames."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from models.base import InputError
from server import wire
from server.config import ModelConf
from server.errors import NotFound, PeerUnavailable, RemoteError, RequestTimeout, status_of
from server.serving.batcher import Batcher, Device
from server.serving.engine import Engine
from server.serving.loadboard import LoadBoard
from tests.unit.fakes import FakeModel, run, until, x


class FakePeer:
    """A peer worker: answers y = 2x (like FakeModel), or holds requests, or answers with an error code."""

    def __init__(self, ctx: zmq.asyncio.Context, directory: Path, key: str, models: list[str]) -> None:
        self.key, self.models = key, models
        self.generation, self.slot = (int(v) for v in key.split(":"))
        self.ipc = f"ipc://{directory}/peer-{self.generation}-{self.slot}.sock"
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.ipc)
        self.requests: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.hold = False  # receive, never answer (a peer that is about to die)
        self.code: int | None = None  # answer with this error code
        self.board: LoadBoard | None = None
        self.chunks: list[str] = ["a"]  # generate: accept, send these chunks ...
        self.finish = True  # ... then a final one (False: fall silent mid-stream)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def entry(self) -> dict[str, Any]:
        """This peer as the master's peer table lists it."""
        return {"slot": self.slot, "generation": self.generation, "ipc": self.ipc, "models": self.models,
                "meta": {m: {"name": m} for m in self.models}, "load": str(self.board.path) if self.board else ""}

    def publish_load(self, directory: Path, **load: int) -> None:
        self.board = LoadBoard(directory / f"peer-{self.generation}-{self.slot}.load", self.models)
        for model, value in load.items():
            self.board.set(model, value)

    async def _serve(self) -> None:
        while True:
            identity, header_frame, *frames = await self.sock.recv_multipart()
            header = wire.unpack(header_frame)
            inputs = wire.decode_tensors(header.get("inputs", []), frames)
            self.requests.append((header, inputs))
            if self.hold or header["op"] == "cancel":
                continue
            if header["op"] == "generate":
                await self._generate(identity, header["id"])
                continue
            if self.code is not None:
                reply = wire.reply_error(header["id"], self.code, f"peer says {self.code}")
            else:
                n = len(inputs["x"])
                reply = wire.reply_ok(header["id"], {"y": inputs["x"] * 2},
                                      timing={"queue_ms": 0.0, "compute_ms": 0.0, "batch_size": n, "worker": self.key})
            await self.sock.send_multipart([identity, *reply])

    async def _generate(self, identity: bytes, request_id: Any) -> None:
        replies = [{"id": request_id, "ok": True, "final": False, "accepted": True, "prompt_tokens": 3},
                   *({"id": request_id, "ok": True, "final": False, "text": c} for c in self.chunks)]
        if self.finish:
            replies.append({"id": request_id, "ok": True, "final": True, "text": "", "finish_reason": "stop",
                            "worker": self.key})
        for r in replies:
            await self.sock.send_multipart([identity, wire.pack(r)])

    def close(self) -> None:
        self.task.cancel()
        self.sock.close(linger=0)
        if self.board is not None:
            self.board.close()


class Harness:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ctx = zmq.asyncio.Context()
        self.device = Device()
        self.models: dict[str, FakeModel] = {}
        self.batchers: dict[str, Batcher] = {}
        self.peers: list[FakePeer] = []
        self.engine: Engine | None = None

    def local(self, name: str, **conf: Any) -> FakeModel:
        """A model served by this worker (slot 0 of generation 1)."""
        model = self.models[name] = FakeModel()
        self.batchers[name] = Batcher(name, model, ModelConf(name, Path("."), **conf), self.device, worker="1:0")
        self.batchers[name].start()
        return model

    def peer(self, key: str, *models: str) -> FakePeer:
        p = FakePeer(self.ctx, self.directory, key, list(models))
        self.peers.append(p)
        return p

    def start(self, **engine_kw: Any) -> Engine:
        self.engine = Engine(0, 1, dict(self.models), self.batchers, {m: {"name": m} for m in self.models}, self.ctx,
                             **engine_kw)
        self.announce()
        return self.engine

    def announce(self, *peers: FakePeer) -> None:
        """The master's peer table: the given peers (all by default) and this worker itself."""
        listed = peers or self.peers
        me = {"slot": 0, "generation": 1, "ipc": "ipc://unused", "models": sorted(self.models), "load": ""}
        self.engine.set_peers([me, *(p.entry() for p in listed)])

    async def close(self) -> None:
        for model in self.models.values():
            model.release()
        if self.engine is not None:
            self.engine.close()
        for p in self.peers:
            p.close()
        for b in self.batchers.values():
            b.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await b.task
        await asyncio.sleep(0)  # let the cancelled peer readers finish before the context goes
        self.ctx.destroy(linger=0)
        self.device.close()


@contextlib.asynccontextmanager
async def harness(directory: Path) -> AsyncIterator[Harness]:
    h = Harness(directory)
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """ipc:// paths must stay under the 107 bytes of sun_path: a short directory of our own."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="eng-"))
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


# -- forwarding ------------------------------------------------------------------------------------

def test_model_not_placed_here_is_forwarded_to_the_peer_hosting_it(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            h.local("here")
            other = h.peer("1:1", "there")
            engine = h.start()
            out, timing = await engine.infer("there", {"x": x(3)}, {"k": 1})
            np.testing.assert_array_equal(out["y"], 2 * x(3))
            assert timing.worker == "1:1" and timing.batch_size == 3
            header, inputs = other.requests[0]
            assert header["fwd"] is True and header["model"] == "there" and header["parameters"] == {"k": 1}
            np.testing.assert_array_equal(inputs["x"], x(3))
            assert engine.known_models() == ["here", "there"]
            assert engine.metadata("there") == {"name": "there"} and engine.metric_label("nope") == "unknown"
            # local models never leave
            out, timing = await engine.infer("here", {"x": x(1)}, {})
            assert timing.worker == "1:0" and len(other.requests) == 1

    run(main)


def test_unknown_model_is_404_and_a_forwarded_request_is_never_forwarded_again(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            h.local("here")
            other = h.peer("1:1", "there")
            engine = h.start()
            with pytest.raises(NotFound, match="known: here, there") as e:
                await engine.infer("nope", {"x": x(1)}, {})
            assert status_of(e.value) == 404
            with pytest.raises(NotFound):
                await engine.infer("there", {"x": x(1)}, {}, forwarded=True)
            assert other.requests == []

    run(main)


def test_the_least_busy_host_gets_the_request(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            busy, idle = h.peer("1:1", "m"), h.peer("1:2", "m")
            busy.hold = True
            engine = h.start()
            stuck = asyncio.ensure_future(engine.infer("m", {"x": x(1)}, {}))
            await until(lambda: busy.requests, what="the first request at a peer")
            for _ in range(3):
                assert (await engine.infer("m", {"x": x(1)}, {}))[1].worker == "1:2"
            assert len(busy.requests) == 1 and len(idle.requests) == 3
            stuck.cancel()

    run(main)


def test_peer_errors_keep_their_status(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            other = h.peer("1:1", "m")
            engine = h.start()
            other.code = 400
            with pytest.raises(InputError, match="peer says 400"):
                await engine.infer("m", {"x": x(1)}, {})
            other.code = 500
            with pytest.raises(RemoteError) as e:
                await engine.infer("m", {"x": x(1)}, {})
            assert status_of(e.value) == 500 and not e.value.retryable
            other.code = 503
            with pytest.raises(RemoteError) as e:
                await engine.infer("m", {"x": x(1)}, {})
            assert status_of(e.value) == 503 and e.value.retryable

    run(main)


def test_a_peer_that_no_longer_hosts_the_model_is_skipped(short_tmp: Path) -> None:
    """404 from a peer means placement changed under us: the next host is tried."""
    async def main() -> None:
        async with harness(short_tmp) as h:
            moved, host = h.peer("1:1", "m"), h.peer("1:2", "m")
            moved.code = 404
            engine = h.start()
            out, timing = await engine.infer("m", {"x": x(2)}, {})
            assert timing.worker == "1:2" and len(moved.requests) == 1
            host.code = 404
            with pytest.raises(PeerUnavailable, match="peer says 404"):
                await engine.infer("m", {"x": x(2)}, {})

    run(main)


# -- a peer that dies ------------------------------------------------------------------------------

def test_a_peer_that_dies_with_a_request_fails_it_over_to_another_host(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            dying, survivor = h.peer("1:1", "m"), h.peer("1:2", "m")
            dying.hold = True
            engine = h.start()
            request = asyncio.ensure_future(engine.infer("m", {"x": x(2)}, {}))
            await until(lambda: dying.requests, what="the request at the dying peer")
            assert not request.done()
            h.announce(survivor)  # the master's table without the dead peer
            out, timing = await request
            np.testing.assert_array_equal(out["y"], 2 * x(2))
            assert timing.worker == "1:2"
            assert "1:1" not in engine.peers

    run(main)


def test_the_last_host_dying_fails_its_requests_503_retryable(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            h.local("here")
            dying = h.peer("1:1", "m")
            dying.hold = True
            engine = h.start()
            requests = [asyncio.ensure_future(engine.infer("m", {"x": x(1)}, {})) for _ in range(3)]
            await until(lambda: len(dying.requests) == 3, what="three requests at the dying peer")
            engine.set_peers([])  # the master's table: nobody left hosting "m"
            for r in requests:
                with pytest.raises(PeerUnavailable) as e:
                    await r
                assert status_of(e.value) == 503 and e.value.retryable
            with pytest.raises(NotFound):  # and now nobody knows the model
                await engine.infer("m", {"x": x(1)}, {})

    run(main)


def test_deep_queue_goes_to_an_idle_peer_and_back_home_if_the_peer_dies(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            model = h.local("m", max_batch_size=4, batch_timeout=30.0)
            helper = h.peer("1:1", "m")
            helper.publish_load(short_tmp, m=0)
            engine = h.start()
            model.hold()
            first = asyncio.ensure_future(engine.infer("m", {"x": x(1)}, {}))  # ours: nothing outstanding yet
            await until(model.entered.is_set, what="the local forward")
            out, timing = await engine.infer("m", {"x": x(1)}, {})  # 2 here (with this one), 0 there
            assert timing.worker == "1:1"
            helper.board.set("m", 5)  # the peer is busier now: stay here
            second = asyncio.ensure_future(engine.infer("m", {"x": x(1)}, {}))
            await until(lambda: engine.batchers["m"].queue, what="the request queued here")
            helper.board.set("m", 0)
            helper.hold = True
            third = asyncio.ensure_future(engine.infer("m", {"x": x(1, start=7)}, {}))
            await until(lambda: len(helper.requests) == 2, what="the request at the helper")
            engine.set_peers([])  # the helper died: the request comes home and runs here
            await until(lambda: len(engine.batchers["m"].queue) == 2, what="the request back in the local queue")
            model.release()
            out, timing = await third
            np.testing.assert_array_equal(out["y"], 2 * x(1, start=7))
            assert timing.worker == "1:0" and timing.batch_size == 2
            await first
            await second

    run(main)


def test_a_peer_without_a_load_board_is_not_picked_for_balancing(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            model = h.local("m")
            blind = h.peer("1:1", "m")  # no load board published: its load is unknown
            engine = h.start()
            model.hold()
            first = asyncio.ensure_future(engine.infer("m", {"x": x(1)}, {}))
            await until(model.entered.is_set, what="the local forward")
            second = asyncio.ensure_future(engine.infer("m", {"x": x(1)}, {}))
            await until(lambda: engine.batchers["m"].queue, what="the request queued here")
            model.release()
            await first
            assert (await second)[1].worker == "1:0" and blind.requests == []

    run(main)


# -- scatter / gather ------------------------------------------------------------------------------

def test_request_above_max_batch_size_is_split_round_robin_and_gathered_in_order(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            model = h.local("m", max_batch_size=2, batch_timeout=0.0)
            other = h.peer("1:1", "m")
            engine = h.start()
            out, timing = await engine.infer("m", {"x": x(7)}, {})
            np.testing.assert_array_equal(out["y"], 2 * x(7))  # in order
            assert timing.batch_size == 7 and timing.worker == "1:0,1:1"
            # chunks of 2: 0 here, 1 there, 2 here, 3 (one item) there
            assert [inputs["x"].tolist() for _, inputs in other.requests] == [x(7)[2:4].tolist(), x(7)[6:7].tolist()]
            assert model.forwards == [(2, 4), (2, 4)]

    run(main)


def test_split_request_is_admitted_once_and_a_dead_peer_chunk_runs_here(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            model = h.local("m", max_batch_size=1, batch_timeout=0.0, max_queue_size=1)
            dying = h.peer("1:1", "m")
            dying.hold = True
            engine = h.start()
            request = asyncio.ensure_future(engine.infer("m", {"x": x(4)}, {}))
            await until(lambda: len(dying.requests) == 2, what="two chunks at the dying peer")
            engine.set_peers([])
            out, timing = await request
            np.testing.assert_array_equal(out["y"], 2 * x(4))
            assert timing.worker == "1:0" and len(model.forwards) == 4

    run(main)


def test_a_draining_worker_hands_new_work_to_a_peer_or_runs_it_itself(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            h.local("m")
            successor = h.peer("2:0", "m")
            engine = h.start()
            engine.draining = True
            assert (await engine.infer("m", {"x": x(1)}, {}))[1].worker == "2:0"
            successor.code = 404  # cannot take it: run here rather than fail
            assert (await engine.infer("m", {"x": x(1)}, {}))[1].worker == "1:0"
            # a request a peer forwarded to us runs here, draining or not
            successor.code = None
            assert (await engine.infer("m", {"x": x(1)}, {}, forwarded=True))[1].worker == "1:0"

    run(main)


# -- a frozen peer (SIGSTOP, a stuck event loop): the heartbeat would take worker_timeout ------------

def test_a_frozen_peer_times_out_and_the_request_is_retried_on_another_host(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            frozen, live = h.peer("1:1", "m"), h.peer("1:2", "m")
            frozen.hold = True
            engine = h.start(peer_timeout=0.2)
            started = time.monotonic()
            out, timing = await engine.infer("m", {"x": x(2)}, {})  # the first (equal) host: the frozen one
            np.testing.assert_array_equal(out["y"], 2 * x(2))
            assert timing.worker == "1:2" and len(frozen.requests) == 1
            assert 0.2 <= time.monotonic() - started < 1.5
            assert engine.peers["1:1"].stalled and engine.peers["1:1"].outstanding == 0
            started = time.monotonic()  # a stalled peer is picked last: no second wait
            assert (await engine.infer("m", {"x": x(1)}, {}))[1].worker == "1:2"
            assert time.monotonic() - started < 0.2 and len(frozen.requests) == 1
            live.hold = True  # nobody answers: 503, retryable, bounded
            with pytest.raises(PeerUnavailable, match="peer_timeout") as e:
                await engine.infer("m", {"x": x(1)}, {})
            assert status_of(e.value) == 503 and e.value.retryable

    run(main)


def test_a_per_model_peer_timeout_overrides_the_main_one(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            h.peer("1:1", "m", "slow").hold = True
            engine = h.start(peer_timeout=30.0, peer_timeouts={"m": 0.1})
            assert engine.timeout_for("m") == 0.1 and engine.timeout_for("slow") == 30.0
            with pytest.raises(PeerUnavailable, match="within 0.1s"):
                await engine.infer("m", {"x": x(1)}, {})

    run(main)


def test_a_split_chunk_on_a_frozen_peer_runs_here_after_peer_timeout(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            model = h.local("m", max_batch_size=1, batch_timeout=0.0)
            frozen = h.peer("1:1", "m")
            frozen.hold = True
            engine = h.start(peer_timeout=0.2)
            started = time.monotonic()
            out, timing = await engine.infer("m", {"x": x(4)}, {})
            np.testing.assert_array_equal(out["y"], 2 * x(4))  # in order, all computed here
            assert timing.worker == "1:0" and len(model.forwards) == 4 and len(frozen.requests) == 2
            assert time.monotonic() - started < 1.5
            await engine.infer("m", {"x": x(4)}, {})  # the stalled peer gets no chunks now
            assert len(frozen.requests) == 2

    run(main)


def test_a_generation_a_frozen_peer_never_accepted_is_retried_elsewhere(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            frozen, live = h.peer("1:1", "g"), h.peer("1:2", "g")
            frozen.hold = True
            engine = h.start(peer_timeout=0.2)
            stream = await engine.generate("g", {"prompt": "hi"})
            chunks = [c async for c in stream]
            assert chunks[-1]["worker"] == "1:2"
            assert [r["op"] for r, _ in frozen.requests] == ["generate", "cancel"]  # told to drop it if it wakes
            live.hold = True
            with pytest.raises(PeerUnavailable, match="did not accept"):
                await engine.generate("g", {"prompt": "hi"})

    run(main)


def test_a_generation_that_streamed_tokens_gets_an_error_not_a_retry(short_tmp: Path) -> None:
    async def main() -> None:
        async with harness(short_tmp) as h:
            stalls, other = h.peer("1:1", "g"), h.peer("1:2", "g")
            stalls.chunks, stalls.finish = ["one ", "two"], False  # then silence
            engine = h.start(peer_timeout=0.2)
            stream = await engine.generate("g", {"prompt": "hi"})
            got = [await stream.__anext__(), await stream.__anext__()]
            assert [c["text"] for c in got] == ["one ", "two"]
            with pytest.raises(RequestTimeout, match="peer_timeout") as e:
                await stream.__anext__()
            assert status_of(e.value) == 504
            await until(lambda: stalls.requests[-1][0]["op"] == "cancel", what="the cancel at the stalled peer")
            assert other.requests == []  # never re-run: the client has seen tokens

    run(main)

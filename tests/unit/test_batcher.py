"""The batcher in-process: dispatch, batch_timeout, queue limit, grouping, failing prepare."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from models.base import InputError
from server.config import ModelConf
from server.errors import Overloaded, RequestTimeout, status_of
from server.serving.batcher import Batcher, Device
from tests.unit.fakes import FakeModel, run, until, x


@contextlib.asynccontextmanager
async def batcher(model: FakeModel, **conf) -> AsyncIterator[Batcher]:
    device = Device()
    b = Batcher("m", model, ModelConf("m", Path("."), **conf), device, worker="1:0")
    b.start()
    try:
        yield b
    finally:
        model.release()
        b.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await b.task
        device.close()


def test_lone_request_on_an_idle_device_goes_at_once() -> None:
    model = FakeModel()

    async def main() -> None:
        async with batcher(model, max_batch_size=8, batch_timeout=30.0) as b:
            started = time.monotonic()
            out, timing = await b.submit({"x": x(1)}, {})
            assert time.monotonic() - started < 1.0  # not batch_timeout (30s)
            np.testing.assert_array_equal(out["y"], 2 * x(1))
            assert timing.batch_size == 1 and timing.worker == "1:0"

    run(main)
    assert model.forwards == [(1, 4)]


def test_what_is_queued_when_the_device_is_idle_goes_as_one_batch() -> None:
    model = FakeModel()

    async def main() -> None:
        async with batcher(model, max_batch_size=8, batch_timeout=30.0) as b:
            outs = await asyncio.gather(*(b.submit({"x": x(1, start=i)}, {}) for i in range(3)))
            for i, (out, timing) in enumerate(outs):
                np.testing.assert_array_equal(out["y"], 2 * x(1, start=i))
                assert timing.batch_size == 3

    run(main)
    assert model.forwards == [(3, 4)]


def test_requests_arriving_during_a_forward_go_together_in_the_next_batch() -> None:
    model = FakeModel()

    async def main() -> None:
        async with batcher(model, max_batch_size=8, batch_timeout=30.0) as b:
            model.hold()
            first = asyncio.ensure_future(b.submit({"x": x(1)}, {}))
            await until(model.entered.is_set, what="the first forward")
            rest = [asyncio.ensure_future(b.submit({"x": x(1, start=i)}, {})) for i in range(5)]
            await until(lambda: len(b.queue) == 5, what="five requests queued")
            model.release()  # the device is idle again: the queue goes at once, without batch_timeout (30s)
            for i, f in enumerate(rest):
                out, timing = await f
                np.testing.assert_array_equal(out["y"], 2 * x(1, start=i))
                assert timing.batch_size == 5
            await first

    run(main)
    assert model.forwards == [(1, 4), (5, 4)]


@contextlib.asynccontextmanager
async def two_models(**conf_b) -> AsyncIterator[tuple[Batcher, Batcher]]:
    """Two models on one device (one inference thread), as in a worker serving both."""
    device = Device()
    a = Batcher("a", FakeModel(), ModelConf("a", Path("."), max_batch_size=8, batch_timeout=0.0), device)
    b = Batcher("b", FakeModel(), ModelConf("b", Path("."), **conf_b), device)
    a.start()
    b.start()
    try:
        yield a, b
    finally:
        for batcher_ in (a, b):
            batcher_.model.release()
            batcher_.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await batcher_.task
        device.close()


def test_while_another_model_runs_a_partial_batch_waits_at_most_batch_timeout() -> None:
    async def main() -> None:
        async with two_models(max_batch_size=8, batch_timeout=0.2) as (a, b):
            a.model.hold()
            running = asyncio.ensure_future(a.submit({"x": x(1)}, {}))
            await until(a.model.entered.is_set, what="model a's forward")
            t0 = time.monotonic()
            early = [asyncio.ensure_future(b.submit({"x": x(1)}, {}))]
            await until(lambda: not b.queue, what="model b's batcher to take the request")
            early.append(asyncio.ensure_future(b.submit({"x": x(1)}, {})))  # joins the waiting batch
            # after batch_timeout, b's batch stops waiting and queues behind a's forward
            await until(lambda: b.device.busy == 2, what="model b's batch dispatched")
            waited = time.monotonic() - t0
            assert 0.19 <= waited < 1.5, waited
            late = asyncio.ensure_future(b.submit({"x": x(1)}, {}))  # too late for that batch
            await asyncio.sleep(0.01)
            a.model.release()
            await running
            assert [(await f)[1].batch_size for f in early] == [2, 2]
            assert (await late)[1].batch_size == 1
        assert b.model.forwards == [(2, 4), (1, 4)]

    run(main)


def test_while_another_model_runs_a_full_batch_does_not_wait() -> None:
    async def main() -> None:
        async with two_models(max_batch_size=2, batch_timeout=30.0) as (a, b):
            a.model.hold()
            running = asyncio.ensure_future(a.submit({"x": x(1)}, {}))
            await until(a.model.entered.is_set, what="model a's forward")
            full = asyncio.ensure_future(b.submit({"x": x(2)}, {}))
            await until(lambda: b.device.busy == 2, what="the full batch dispatched at once")
            a.model.release()
            assert (await full)[1].batch_size == 2
            await running

    run(main)


def test_a_waiting_batch_goes_as_soon_as_the_device_is_idle() -> None:
    async def main() -> None:
        async with two_models(max_batch_size=8, batch_timeout=30.0) as (a, b):
            a.model.hold()
            running = asyncio.ensure_future(a.submit({"x": x(1)}, {}))
            await until(a.model.entered.is_set, what="model a's forward")
            waiting = asyncio.ensure_future(b.submit({"x": x(1)}, {}))
            await until(lambda: not b.queue, what="model b's batcher to take the request")
            await asyncio.sleep(0.01)
            assert b.device.busy == 1 and not waiting.done()  # waiting for the device, not running
            t0 = time.monotonic()
            a.model.release()
            await waiting
            assert time.monotonic() - t0 < 1.0  # not batch_timeout (30s)
            await running

    run(main)


def test_max_batch_size_cuts_the_queue_into_batches_in_order() -> None:
    model = FakeModel()

    async def main() -> None:
        async with batcher(model, max_batch_size=3, batch_timeout=30.0) as b:
            model.hold()
            first = asyncio.ensure_future(b.submit({"x": x(1)}, {}))
            await until(model.entered.is_set, what="the first forward")
            sizes = [2, 1, 2, 3, 1]
            futs = [asyncio.ensure_future(b.submit({"x": x(n, start=10 * i)}, {})) for i, n in enumerate(sizes)]
            await until(lambda: len(b.queue) == 5, what="five requests queued")
            model.release()
            for i, (n, f) in enumerate(zip(sizes, futs)):
                out, _ = await f
                np.testing.assert_array_equal(out["y"], 2 * x(n, start=10 * i))
            await first

    run(main)
    # oldest first, up to 3 items a batch, a request never split by the batcher
    assert [shape[0] for shape in model.forwards] == [1, 3, 2, 3, 1]


def test_full_queue_is_overloaded_503_and_retryable() -> None:
    model = FakeModel()

    async def main() -> None:
        async with batcher(model, max_batch_size=1, batch_timeout=30.0, max_queue_size=2) as b:
            model.hold()
            running = asyncio.ensure_future(b.submit({"x": x(1)}, {}))
            await until(model.entered.is_set, what="the first forward")
            queued = [asyncio.ensure_future(b.submit({"x": x(1)}, {})) for _ in range(2)]
            await until(lambda: len(b.queue) == 2, what="two requests queued")
            with pytest.raises(Overloaded) as refused:
                await b.submit({"x": x(1)}, {})
            assert status_of(refused.value) == 503 and refused.value.retryable
            assert "queue full" in str(refused.value)
            # a chunk of a request already admitted (scatter/gather) is not refused
            admitted = asyncio.ensure_future(b.submit({"x": x(1)}, {}, admitted=True))
            await until(lambda: len(b.queue) == 3, what="the admitted chunk queued")
            model.release()
            for f in (running, *queued, admitted):
                await f
            assert b.outstanding == 0 and not b.queue
            await b.submit({"x": x(1)}, {})  # room again

    run(main)


def test_different_shapes_run_as_separate_forwards_of_one_batch() -> None:
    model = FakeModel()

    async def main() -> None:
        async with batcher(model, max_batch_size=16, batch_timeout=30.0) as b:
            model.hold()
            first = asyncio.ensure_future(b.submit({"x": x(1)}, {}))
            await until(model.entered.is_set, what="the first forward")
            shapes = [(1, 4), (2, 6), (2, 4), (1, 6), (1, 4)]
            futs = [asyncio.ensure_future(b.submit({"x": x(n, d, start=100 * i)}, {})) for i, (n, d) in enumerate(shapes)]
            await until(lambda: len(b.queue) == 5, what="five requests queued")
            model.release()
            for i, ((n, d), f) in enumerate(zip(shapes, futs)):
                out, timing = await f
                np.testing.assert_array_equal(out["y"], 2 * x(n, d, start=100 * i))
                assert timing.batch_size == 7  # items of the whole batch, both groups
            await first

    run(main)
    assert model.forwards[0] == (1, 4)
    assert sorted(model.forwards[1:]) == [(3, 6), (4, 4)]


def test_failing_prepare_fails_that_request_alone() -> None:
    model = FakeModel()

    async def main() -> None:
        async with batcher(model, max_batch_size=16, batch_timeout=30.0) as b:
            model.hold()
            first = asyncio.ensure_future(b.submit({"x": x(1)}, {}))
            await until(model.entered.is_set, what="the first forward")
            good = asyncio.ensure_future(b.submit({"x": x(2)}, {}))
            bad_input = asyncio.ensure_future(b.submit({"x": x(1)}, {"fail": "input"}))
            bug = asyncio.ensure_future(b.submit({"x": x(1)}, {"fail": "bug"}))
            wrong_dtype = asyncio.ensure_future(b.submit({"x": x(1).astype(np.float64)}, {}))
            good_too = asyncio.ensure_future(b.submit({"x": x(1, start=5)}, {}))
            await until(lambda: len(b.queue) == 5, what="five requests queued")
            model.release()
            out, timing = await good
            np.testing.assert_array_equal(out["y"], 2 * x(2))
            np.testing.assert_array_equal((await good_too)[0]["y"], 2 * x(1, start=5))
            with pytest.raises(InputError, match="not to my liking") as e1:
                await bad_input
            assert status_of(e1.value) == 400
            with pytest.raises(RuntimeError, match="a bug in prepare") as e2:
                await bug
            assert status_of(e2.value) == 500  # not the client's fault: a logged 500, never a 400
            with pytest.raises(InputError, match="FP32") as e3:
                await wrong_dtype
            assert status_of(e3.value) == 400
            await first

    run(main)
    assert model.forwards == [(1, 4), (3, 4)]  # the good requests ran together, the others never reached forward


def test_failing_forward_fails_its_group_only() -> None:
    model = FakeModel()

    async def main() -> None:
        async with batcher(model, max_batch_size=16, batch_timeout=30.0) as b:
            model.hold()
            first = asyncio.ensure_future(b.submit({"x": x(1)}, {}))
            await until(model.entered.is_set, what="the first forward")
            doomed = [asyncio.ensure_future(b.submit({"x": x(1)}, {"explode": True})) for _ in range(2)]
            fine = asyncio.ensure_future(b.submit({"x": x(1)}, {}))  # other parameters: another group
            await until(lambda: len(b.queue) == 3, what="three requests queued")
            model.release()
            for f in doomed:
                with pytest.raises(RuntimeError, match="exploded"):
                    await f
            assert (await fine)[1].batch_size == 3
            await first

    run(main)


def test_request_timeout_expires_a_queued_request_504() -> None:
    model = FakeModel()

    async def main() -> None:
        async with batcher(model, max_batch_size=1, batch_timeout=30.0, request_timeout=0.05) as b:
            model.hold()
            first = asyncio.ensure_future(b.submit({"x": x(1)}, {}))
            await until(model.entered.is_set, what="the first forward")
            with pytest.raises(RequestTimeout) as late:
                await b.submit({"x": x(1)}, {})
            assert status_of(late.value) == 504
            model.release()
            with pytest.raises(RequestTimeout):
                await first  # it ran too long as well: the client has its answer already
            assert b.outstanding == 0

    run(main)


def test_inputs_that_disagree_on_the_batch_dimension_are_refused() -> None:
    from server.serving.batcher import request_size

    assert request_size({"a": x(3), "b": [b"1", b"2", b"3"]}) == 3
    with pytest.raises(InputError, match="disagree"):
        request_size({"a": x(3), "b": x(2)})
    with pytest.raises(InputError, match="no inputs"):
        request_size({})


def test_device_runs_jobs_in_order_on_one_named_thread_and_survives_errors_and_cancelled_waiters() -> None:
    """The inference thread: results and exceptions reach the awaiting coroutine; a waiter that is
    cancelled (shutdown) leaves the job to finish, the device busy until then, and the thread
    serving the next one."""
    device = Device()
    release = threading.Event()
    seen: list[str] = []

    def job(tag: str) -> tuple[str, int]:
        seen.append(tag)
        return tag, threading.get_native_id()

    def fail() -> None:
        raise ValueError("bad batch")

    def held() -> str:
        release.wait(5)
        seen.append("held")
        return "late"

    async def main() -> None:
        tag, tid = await device.run(job, "a")
        assert tag == "a" and tid != threading.get_native_id()
        comm = Path(f"/proc/self/task/{tid}/comm")
        if comm.exists():  # Linux: `top -H` and per-thread CPU accounting see the name
            assert comm.read_text().strip() == "modelsrv infer"
        with pytest.raises(ValueError, match="bad batch"):
            await device.run(fail)
        waiter = asyncio.ensure_future(device.run(held))
        await asyncio.sleep(0.05)
        assert not device.idle.is_set()
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(0.05)
        assert not device.idle.is_set()  # busy until the job itself has ended
        release.set()
        assert (await device.run(job, "b"))[0] == "b"  # after the held job, on the same thread
        assert seen == ["a", "held", "b"] and device.idle.is_set()

    try:
        run(main)
    finally:
        release.set()
        device.close()
    assert not device.thread.is_alive()

"""A worker's share of a tensor-parallel group (server/serving/tensor_parallel.py, worker.py hooks), without processes."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from server.processes.worker import WorkerProcess
from server.serving.tensor_parallel import Follower


class Channel:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, msg: dict) -> bool:
        self.sent.append(msg)
        return True


def worker(followers: dict, loaded: dict | None = None) -> WorkerProcess:
    cfg = SimpleNamespace(worker_timeout=5.0)
    w = WorkerProcess(cfg, 1, 1, Channel(), {}, loaded or {}, None, None, "cpu", {"model": "b"}, followers)
    w.engine = SimpleNamespace(outstanding=0)
    return w


def beats(w: WorkerProcess) -> int:
    async def one():
        task = asyncio.get_running_loop().create_task(w._heartbeat())
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(one())
    return sum(1 for m in w.channel.sent if m.get("event") == "heartbeat")


def test_a_follower_stuck_in_one_step_stops_the_heartbeat() -> None:
    idle = Follower("b")  # waiting for rank 0's next op: alive
    assert idle.busy_for() == 0.0 and beats(worker({"b": idle})) == 1
    busy = Follower("b", progress=[time.monotonic() - 1.0])  # in a step for 1 s (< worker_timeout)
    assert beats(worker({"b": busy})) == 1
    wedged = Follower("b", progress=[time.monotonic() - 60.0])  # in one step for a minute: the master should kill it
    assert wedged.busy_for() > 5 and beats(worker({"b": wedged})) == 0


def test_a_broken_group_makes_the_worker_exit() -> None:
    f = Follower("b")
    w = worker({"b": f})
    assert not w._group_failed()
    f.done.set()  # rank 0 left while we were not told to quit: the group is over
    assert w._group_failed()
    w.exiting = True  # quitting: a clean end of the loop is the expected way out
    assert not w._group_failed()
    f.error = "RuntimeError: Connection reset by peer"
    assert w._group_failed()
    proxy = SimpleNamespace(broken="GroupBroken: ...")  # rank 0 whose collectives failed
    assert worker({}, {"b": (None, proxy, 0.0)})._group_failed()
    assert not worker({}, {"b": (None, SimpleNamespace(broken="closed"), 0.0)})._group_failed()

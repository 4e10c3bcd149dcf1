"""The master's tensor-parallel group decisions (server/processes/tpgroups.py) with fake workers.

Worker slots 0 and 1 form the group of model ``b`` (``tensor_parallel 2; workers 0 1``); slot 2
is a plain worker. Nothing forks; the rendezvous sockets are real (bound on 127.0.0.1).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.processes.channel import EXIT_FATAL
from server.processes.master import Worker
from tests.unit.test_master import FakeChannel, Harness


class TPHarness(Harness):
    def __init__(self, tmp_path: Path, monkeypatch) -> None:
        folder = tmp_path / "b"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "bloom", "n_head": 4, "vocab_size": 448}))
        (folder / "model.safetensors").write_bytes(b"")
        self.model = f"model b {{\n    path {folder};\n    tensor_parallel 2;\n    workers 0 1;\n}}\n"
        self.infos: dict[int, dict] = {}  # pid -> what the worker was told about its group
        super().__init__(tmp_path, monkeypatch, workers=3, extra=self.model)

    def _spawn(self, slot: int, generation: int, cfg) -> Worker:
        tp = self.master._tp_spawn_info(slot, generation, cfg)
        now = time.monotonic()
        w = Worker(slot=slot, generation=generation, pid=next(self.pids), channel=FakeChannel(), started=now,
                   last_heartbeat=now, tp=tp["key"] if tp else "")
        self.infos[w.pid] = tp
        self.master.workers[w.pid] = w
        self.spawned.append(w)
        return w

    def slot(self, n: int) -> Worker:
        return next(w for w in self.master.workers.values() if w.slot == n and w.state != "exiting")


@pytest.fixture
def h(tmp_path: Path, monkeypatch) -> Iterator[TPHarness]:
    harness = TPHarness(tmp_path, monkeypatch)
    yield harness
    harness.master._tp_close_all()
    harness.master.selector.close()


def test_group_members_share_a_port_rank0_gets_the_socket(h: TPHarness) -> None:
    r0, r1, plain = (h.slot(n) for n in range(3))
    i0, i1 = h.infos[r0.pid], h.infos[r1.pid]
    assert (i0["rank"], i1["rank"], i0["size"]) == (0, 1, 2) and i0["port"] == i1["port"] > 0
    assert i0["fd"] is not None and i1["fd"] is None and h.infos[plain.pid] is None
    assert (r0.tp, r1.tp, plain.tp) == ("b/0", "b/0", "")


def test_a_dead_rank_restarts_the_whole_group_on_a_new_port(h: TPHarness) -> None:
    m = h.master
    r0, r1, plain = (h.slot(n) for n in range(3))
    for w in (r0, r1, plain):
        h.ready(w)
    old_port = h.infos[r0.pid]["port"]
    h.exit(r1, sig=signal.SIGKILL)
    h.step()
    assert r0.state == "exiting" and r0.channel.commands() == ["terminate"] and r0.kill_at is not None
    assert plain.channel.commands() == [] and plain.state == "ready"
    assert not m.respawn_at  # not before every member is gone: a half group cannot serve
    h.exit(r0, code=0)
    h.step()
    assert set(m.respawn_at) == {(0, 1), (1, 1)} and len(set(m.respawn_at.values())) == 1  # together
    h.step(max(m.respawn_at.values()))
    n0, n1 = h.slot(0), h.slot(1)
    assert {n0.pid, n1.pid}.isdisjoint({r0.pid, r1.pid})
    assert h.infos[n0.pid]["port"] == h.infos[n1.pid]["port"] != old_port
    assert list(m.tp_ports) == [(1, "b/0")]


def test_a_wedged_rank_is_killed_and_its_group_restarts(h: TPHarness) -> None:
    m = h.master
    r0, r1 = h.slot(0), h.slot(1)
    for w in (r0, r1):
        h.ready(w)
    h.step(time.monotonic() + 6)  # worker_timeout 5s without a heartbeat from either
    assert r1.pid in h.signalled(signal.SIGKILL)
    h.exit(r1, sig=signal.SIGKILL)
    h.step()
    assert r0.channel.commands() == ["terminate"] and m.tp_restarting


def test_a_rank_that_cannot_load_takes_its_group_down_for_good(h: TPHarness) -> None:
    m = h.master
    r0, r1 = h.slot(0), h.slot(1)
    h.exit(r1, code=EXIT_FATAL)
    h.step()
    assert r0.channel.commands() == ["terminate"]
    h.exit(r0, code=0)
    h.step()
    assert not m.respawn_at and not m.tp_restarting and not m.tp_ports


def test_reload_starts_a_new_group_on_another_port_and_retires_the_old_one_when_ready(h: TPHarness) -> None:
    m = h.master
    old = [h.slot(n) for n in range(3)]
    for w in old:
        h.ready(w)
    old_port = h.infos[old[0].pid]["port"]
    h.signal("reconfigure")
    h.step()
    new = h.generation(2)
    assert len(new) == 3 and h.infos[new[0].pid]["port"] != old_port
    for w in new[1:]:
        h.ready(w)
        h.step()
    assert all(w.channel.commands() == [] for w in old)  # rank 0 of the new group not ready yet
    h.ready(new[0])
    h.step()
    assert [w.channel.commands() for w in old] == [["quit"]] * 3
    for w in old:
        h.exit(w, code=0)
    h.step()
    assert list(m.tp_ports) == [(2, "b/0")]  # the old group's rendezvous socket is closed


def test_configured_port_taken_by_another_group_or_master_moves_up() -> None:
    """A port held by anyone (an old group, a new binary's master) is skipped: the kernel arbitrates."""
    import socket

    from server.processes.master import Master

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    base = held.getsockname()[1]
    try:
        s = Master._tp_bind(base)
        try:
            assert base < s.getsockname()[1] < base + 100 and not s.get_inheritable()  # an exec'd new binary drops it
        finally:
            s.close()
    finally:
        held.close()


def test_two_replicas_of_a_group(tmp_path: Path, monkeypatch) -> None:
    """worker_processes 4; tensor_parallel 2: slots 0-1 and 2-3 are two copies, each on its own port."""

    class Four(TPHarness):
        def __init__(self, tmp_path, monkeypatch) -> None:
            folder = tmp_path / "b"
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps({"model_type": "bloom", "n_head": 4, "vocab_size": 448}))
            (folder / "model.safetensors").write_bytes(b"")
            self.infos = {}
            Harness.__init__(self, tmp_path, monkeypatch, workers=4,
                             extra=f"model b {{\n    path {folder};\n    tensor_parallel 2;\n}}\n")

    h = Four(tmp_path, monkeypatch)
    try:
        info = [h.infos[h.slot(n).pid] for n in range(4)]
        assert [(i["key"], i["rank"]) for i in info] == [("b/0", 0), ("b/0", 1), ("b/1", 0), ("b/1", 1)]
        assert info[0]["port"] == info[1]["port"] != info[2]["port"] == info[3]["port"]
        h.exit(h.slot(3), sig=signal.SIGKILL)
        h.step()
        assert [w.channel.commands() for w in (h.slot(0), h.slot(1))] == [[], []]  # the other replica serves on
        assert h.master.tp_restarting and list(h.master.tp_restarting)[0][1] == "b/1"
    finally:
        h.master._tp_close_all()
        h.master.selector.close()

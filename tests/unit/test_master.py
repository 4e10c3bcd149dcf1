"""The master's decisions, driven through ``Master.step`` with fake workers: nothing forks, nothing is signalled.

``_spawn`` adds a row to the process table, ``_signal`` records, ``_reap_children`` hands the
master the exits a test queued; everything else (flags, respawn, generations) is the real code.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.config import load_config
from server.processes import listeners
from server.processes.channel import EXIT_FATAL
from server.processes.master import Master, Worker


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.inbox: list[dict[str, Any]] = []
        self.broken = False  # send fails, as with a worker whose socket buffer is full
        self.closed = False

    def send(self, message: dict[str, Any]) -> bool:
        if self.broken:
            return False
        self.sent.append(message)
        return True

    def recv(self) -> dict[str, Any] | None:
        return self.inbox.pop(0) if self.inbox else None

    def close(self) -> None:
        self.closed = True

    def commands(self) -> list[str]:
        return [m["cmd"] for m in self.sent if m["cmd"] != "peers"]


class FakeLogs:
    def __init__(self) -> None:
        self.reopened = 0

    def reopen(self) -> None:
        self.reopened += 1


def conf_text(workers: int = 2, extra: str = "") -> str:
    return (f"worker_processes {workers};\nworker_shutdown_timeout 10s;\nworker_timeout 5s;\nworker_load_timeout 60s;\n"
            f"pid run/modelsrv.pid;\n{extra}\nhttp {{\n    listen 127.0.0.1:1;\n}}\n")


class Harness:
    def __init__(self, tmp_path: Path, monkeypatch, workers: int = 2, extra: str = "") -> None:
        self.conf = tmp_path / "conf" / "srv.conf"
        self.conf.parent.mkdir()
        self.conf.write_text(conf_text(workers, extra))
        monkeypatch.setattr(listeners, "open_listeners", lambda cfg, socks: None)  # nothing is bound
        m = self.master = Master(self.conf, tmp_path, load_config(self.conf, tmp_path), [])
        m.metrics_dir = tmp_path / "metrics"
        m.logs = self.logs = FakeLogs()
        self.pids = itertools.count(1_000_001)
        self.spawned: list[Worker] = []
        self.signals: list[tuple[int, int]] = []
        self.exits: list[tuple[int, int]] = []
        m._spawn = self._spawn
        m._signal = lambda w, signum: self.signals.append((w.pid, signum))
        m._reap_children = self._reap
        # what Master.run does before the cycle
        m.generation = m._new_generation()
        for slot in range(m.cfg.worker_processes):
            m._spawn(slot, m.generation, m.cfg)

    def _spawn(self, slot: int, generation: int, cfg) -> Worker:
        now = time.monotonic()
        w = Worker(slot=slot, generation=generation, pid=next(self.pids), channel=FakeChannel(), started=now,
                   last_heartbeat=now)
        self.master.workers[w.pid] = w
        self.spawned.append(w)
        return w

    def _reap(self) -> None:
        exits, self.exits = self.exits, []
        for pid, status in exits:
            self.master._worker_exited(pid, status)

    # -- what happens to the master ----------------------------------------------------------------
    def signal(self, flag: str) -> None:
        """A signal's handler, as installed by _install_signals."""
        self.master._flag_setter(flag)(0, None)

    def ready(self, w: Worker) -> None:
        w.channel.inbox.append({"event": "ready", "ipc": f"ipc://w{w.pid}", "load": "", "models": ["m"], "meta": {}})
        self.master._on_channel(w)

    def exit(self, w: Worker, code: int | None = None, sig: int | None = None) -> None:
        """The worker exits; CHLD sets the reap flag."""
        self.exits.append((w.pid, (code << 8) if code is not None else sig))
        self.master.reap = True

    def step(self, at: float | None = None) -> int | None:
        return self.master.step(time.monotonic() if at is None else at)

    def generation(self, n: int) -> list[Worker]:
        return [w for w in self.master.workers.values() if w.generation == n]

    def signalled(self, signum: int) -> list[int]:
        return [pid for pid, s in self.signals if s == signum]


@pytest.fixture
def h(tmp_path: Path, monkeypatch) -> Iterator[Harness]:
    harness = Harness(tmp_path, monkeypatch)
    yield harness
    harness.master.selector.close()


# -- respawn ---------------------------------------------------------------------------------------

def test_a_worker_that_keeps_dying_young_comes_back_with_a_doubling_delay(h: Harness) -> None:
    m = h.master
    delays = []
    for _ in range(8):
        w = next(w for w in m.workers.values() if w.slot == 1)
        h.exit(w, sig=signal.SIGKILL)
        h.step()
        assert w.pid not in m.workers
        when = m.respawn_at[(1, 1)]
        delays.append(round(when - time.monotonic(), 1))
        before = len(h.spawned)
        h.step(when - 0.01)
        assert len(h.spawned) == before  # not yet
        h.step(when)
        assert len(h.spawned) == before + 1 and h.spawned[-1].slot == 1 and h.spawned[-1].generation == 1
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]  # capped at 10s


def test_ready_or_a_long_life_resets_the_back_off(h: Harness) -> None:
    m = h.master
    w0 = next(w for w in m.workers.values() if w.slot == 0)
    h.exit(w0, sig=signal.SIGSEGV)
    h.step()
    assert m.failures[0] == 1
    h.step(m.respawn_at[(0, 1)])
    w0 = h.spawned[-1]
    h.ready(w0)  # weights loaded: the slot is healthy again
    assert 0 not in m.failures
    w0.started = time.monotonic() - 60  # and it lived a while: an immediate respawn
    h.exit(w0, code=1)
    h.step()
    assert m.failures[0] == 0 and m.respawn_at[(0, 1)] <= time.monotonic()
    h.step()
    assert h.spawned[-1].slot == 0 and (0, 1) not in m.respawn_at


def test_a_worker_that_cannot_load_its_models_is_not_respawned(h: Harness, caplog) -> None:
    m = h.master
    a, b = m.workers.values()
    a.channel.inbox.append({"event": "load_failed", "error": "no weights"})
    m._on_channel(a)
    h.exit(a, code=EXIT_FATAL)
    assert h.step() is None
    assert not m.respawn_at and len(h.spawned) == 2
    assert "cannot load its models" in caplog.text
    h.exit(b, code=EXIT_FATAL)  # the last one: nothing can serve, the master gives up with status 1
    assert h.step() == 1
    assert "no worker can serve" in caplog.text


def test_a_fatal_exit_is_not_respawned_even_without_load_failed(h: Harness) -> None:
    a = next(iter(h.master.workers.values()))
    h.exit(a, code=EXIT_FATAL)
    h.step()
    assert not h.master.respawn_at and len(h.master.workers) == 1


def test_a_wedged_worker_is_killed_and_its_replacement_comes(h: Harness) -> None:
    m = h.master
    a, b = m.workers.values()
    now = time.monotonic()
    a.state = "ready"
    a.last_heartbeat = now - 6  # worker_timeout 5s
    b.last_heartbeat = now - 30  # still loading: worker_load_timeout 60s applies
    h.step(now)
    assert h.signalled(signal.SIGKILL) == [a.pid]
    h.step(now + 0.5)
    assert h.signalled(signal.SIGKILL) == [a.pid]  # not killed twice while CHLD is on its way
    h.exit(a, sig=signal.SIGKILL)
    h.step()
    h.step(m.respawn_at[(a.slot, 1)])
    assert h.spawned[-1].slot == a.slot


def test_next_timeout_wakes_for_the_earliest_deadline(h: Harness) -> None:
    m = h.master
    assert m._next_timeout() == pytest.approx(1.0)  # HEARTBEAT_EVERY
    m.respawn_at[(5, 1)] = time.monotonic() + 0.3
    assert m._next_timeout() == pytest.approx(0.3, abs=0.05)
    next(iter(m.workers.values())).kill_at = time.monotonic() - 1
    assert m._next_timeout() == 0.0


# -- reload: generations ---------------------------------------------------------------------------

def test_old_workers_quit_only_when_every_new_one_is_ready(h: Harness) -> None:
    m = h.master
    old = h.generation(1)
    for w in old:
        h.ready(w)
    h.conf.write_text(conf_text(workers=3))
    h.signal("reconfigure")
    h.step()
    new = h.generation(2)
    assert m.pending_generation == 2 and len(new) == 3 and m.generation == 1
    for w in new[:2]:
        h.ready(w)
        h.step()
        assert all(w.channel.commands() == [] and w.state == "ready" for w in old)
    # a new worker dying while the reload waits is respawned in the new generation, with the new config
    h.exit(new[2], sig=signal.SIGKILL)
    h.step()
    h.step(m.respawn_at[(2, 2)])
    replacement = h.spawned[-1]
    assert (replacement.slot, replacement.generation) == (2, 2)
    assert all(w.channel.commands() == [] for w in old)
    h.ready(replacement)
    h.step()
    assert [w.channel.commands() for w in old] == [["quit"], ["quit"]]
    assert all(w.state == "exiting" and w.kill_at is not None for w in old)
    assert m.generation == 2 and m.pending_generation is None and m.cfg.worker_processes == 3
    # the peer table every worker got last takes new work on the new generation only (the old one drains)
    table = old[0].channel.sent[-1]
    assert table["cmd"] == "peers" and {p["generation"] for p in table["peers"] if p["accepting"]} == {2}
    assert {p["generation"] for p in table["peers"] if not p["accepting"]} <= {1}
    for w in old:  # retiring workers leave and are not replaced
        h.exit(w, code=0)
    h.step()
    assert not m.respawn_at and sorted(w.generation for w in m.workers.values()) == [2, 2, 2]


def test_a_new_generation_that_cannot_load_is_aborted_and_the_old_one_serves_on(h: Harness, caplog) -> None:
    m = h.master
    old = h.generation(1)
    for w in old:
        h.ready(w)
    h.signal("reconfigure")
    h.step()
    loaded, failed = h.generation(2)
    h.ready(loaded)
    h.exit(failed, code=EXIT_FATAL)
    h.step()
    assert "reload aborted" in caplog.text
    assert loaded.channel.commands() == ["terminate"] and loaded.state == "exiting" and not loaded.respawn
    assert m.pending_generation is None and m.generation == 1
    assert all(w.channel.commands() == [] and w.state == "ready" for w in old)
    h.exit(loaded, code=0)
    h.step()
    assert not m.respawn_at and set(m.workers) == {w.pid for w in old}


def test_a_broken_config_on_reload_changes_nothing(h: Harness, caplog) -> None:
    m = h.master
    h.conf.write_text("worker_processes none;\n")
    h.signal("reconfigure")
    h.step()
    assert "reload refused" in caplog.text and f"{h.conf}:1" in caplog.text
    assert m.pending_generation is None and len(h.spawned) == 2 and not m.reconfigure


def test_a_hup_during_a_reload_waits_for_it_and_is_not_lost(h: Harness) -> None:
    m = h.master
    h.signal("reconfigure")
    h.step()
    assert m.pending_generation == 2
    h.signal("reconfigure")  # while generation 2 loads
    h.step()
    assert m.reconfigure and m.pending_generation == 2 and not h.generation(3)
    for w in h.generation(2):
        h.ready(w)
    h.step()  # generation 2 takes over
    assert m.generation == 2
    h.step()  # and the second HUP runs now
    assert m.pending_generation == 3 and len(h.generation(3)) == 2 and not m.reconfigure


# -- signals in unusual orders ---------------------------------------------------------------------

def test_quit_drains_then_exits_0(h: Harness) -> None:
    m = h.master
    h.signal("quit")
    assert h.step() is None
    workers = list(m.workers.values())
    assert all(w.channel.commands() == ["quit"] and w.state == "exiting" for w in workers)
    h.exit(workers[0], code=0)
    assert h.step() is None and not m.respawn_at
    # past worker_shutdown_timeout (10s) + 5s a worker still draining is killed
    h.step(workers[1].kill_at)
    assert h.signalled(signal.SIGKILL) == [workers[1].pid]
    h.exit(workers[1], sig=signal.SIGKILL)
    assert h.step() == 0


def test_terminate_overrides_a_graceful_quit(h: Harness) -> None:
    m = h.master
    h.signal("quit")
    h.step()
    h.signal("terminate")
    t0 = time.monotonic()
    assert h.step(t0) is None
    workers = list(m.workers.values())
    assert sorted(h.signalled(signal.SIGTERM)) == sorted(w.pid for w in workers)  # draining ones too
    # nginx's escalation: TERM again with a doubling delay, then KILL past a second
    now, terms = t0, 0
    while not h.signalled(signal.SIGKILL):
        now = min(w.kill_at for w in workers if w.kill_at is not None)
        h.step(now)
        terms += 1
        assert terms < 20
    assert now - t0 < 3.0 and len(h.signalled(signal.SIGKILL)) == 2
    for w in workers:
        h.exit(w, sig=signal.SIGKILL)
    assert h.step() == 0


def test_terminate_while_nothing_runs_exits_at_once(h: Harness) -> None:
    for w in list(h.master.workers.values()):
        h.exit(w, sig=signal.SIGKILL)
    h.signal("terminate")
    assert h.step() == 0
    assert len(h.spawned) == 2  # nobody was respawned on the way out


def test_hup_after_winch_restarts_the_workers_with_the_running_config(h: Harness) -> None:
    m = h.master
    h.conf.write_text(conf_text(workers=3))  # a HUP after WINCH does not read it
    h.signal("noaccept")
    h.step()
    old = h.generation(1)
    assert m.noaccepting and all(w.channel.commands() == ["quit"] for w in old)
    h.exit(old[0], code=0)
    h.step()
    assert not m.respawn_at  # no respawn while not accepting
    h.signal("reconfigure")
    assert m.restart and not m.reconfigure
    h.step()
    assert not m.noaccepting and m.generation == 2 and len(h.generation(2)) == 2  # the old config: 2 workers
    h.signal("reconfigure")  # accepting again: a HUP is a reload once more
    assert m.reconfigure and not m.restart


def test_reopen_tells_every_worker_and_falls_back_to_usr1(h: Harness) -> None:
    a, b = h.master.workers.values()
    b.channel.broken = True
    h.signal("reopen")
    h.step()
    assert h.logs.reopened == 1
    assert a.channel.commands() == ["reopen"] and h.signalled(signal.SIGUSR1) == [b.pid]


# -- binary upgrade --------------------------------------------------------------------------------

def test_usr2_whose_fork_fails_gives_the_pid_file_back(h: Harness, monkeypatch, caplog) -> None:
    m = h.master
    m.cfg.pid.parent.mkdir(parents=True)
    m.cfg.pid.write_text(f"{os.getpid()}\n")
    oldbin = Path(f"{m.cfg.pid}.oldbin")

    def no_fork() -> int:
        assert oldbin.exists() and not m.cfg.pid.exists()  # renamed before the fork, as nginx does
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    h.signal("change_binary")
    with caplog.at_level(logging.INFO, "modelsrv"):
        assert h.step() is None
    assert "fork() for the new binary failed" in caplog.text
    assert m.cfg.pid.read_text() == f"{os.getpid()}\n" and not oldbin.exists()
    assert m.new_binary_pid == 0
    assert len(h.generation(1)) == 2 and not h.signals  # the workers never noticed


def test_a_second_usr2_while_a_new_binary_runs_is_ignored(h: Harness, monkeypatch, caplog) -> None:
    m = h.master
    m.cfg.pid.parent.mkdir(parents=True)
    m.cfg.pid.write_text("4242\n")
    m.new_binary_pid = 4242
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked"))
    h.signal("change_binary")
    h.step()
    assert "USR2 ignored" in caplog.text and m.cfg.pid.read_text() == "4242\n"


def test_the_new_binary_exiting_gives_the_pid_file_back(h: Harness, caplog) -> None:
    m = h.master
    m.cfg.pid.parent.mkdir(parents=True)
    Path(f"{m.cfg.pid}.oldbin").write_text(f"{os.getpid()}\n")
    m.cfg.pid.write_text("4242\n")  # the new master's
    m.new_binary_pid = 4242
    m._new_binary_exited(9)  # killed by SIGKILL
    assert m.new_binary_pid == 0 and m.cfg.pid.read_text() == f"{os.getpid()}\n"
    assert "exited on signal 9 (SIGKILL)" in caplog.text

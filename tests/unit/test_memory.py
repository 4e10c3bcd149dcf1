"""server/processes/memory.py (when an idle worker trims) and the master's side of the preload
process's protocol (server/processes/preload.py), without forking a server."""

from __future__ import annotations

import socket

import msgpack
import pytest

from server.processes import memory, preload
from server.processes.memory import MallocTrim
from server.processes.preload import Preloader, PreloadError

MIB = 1 << 20


def test_trim_only_when_idle_twice_and_grown(monkeypatch) -> None:
    rss = [300 * MIB]
    monkeypatch.setattr(memory, "resident", lambda: rss[0])
    t = MallocTrim(64 * MIB)
    calls = []
    t.fn = lambda pad: calls.append(pad) or 1
    rss[0] = 300 * MIB + 100 * MIB
    assert t.check(idle=True) is None  # idle once: maybe between two batches
    assert t.check(idle=False) is None
    assert t.check(idle=True) is None
    rss[0] = 450 * MIB
    assert t.check(idle=True) == (450 * MIB, 450 * MIB, pytest.approx(0, abs=1))  # idle at two looks, grown 150 MiB
    assert calls == [0] and t.baseline == 450 * MIB
    rss[0] = 450 * MIB + 63 * MIB
    assert t.check(idle=True) is None and t.check(idle=True) is None  # grown less than the threshold since
    rss[0] = 450 * MIB + 64 * MIB
    assert t.check(idle=True) is not None and len(calls) == 2


def test_trim_off_and_real_malloc_trim() -> None:
    assert not MallocTrim(0).enabled
    t = MallocTrim(MIB)
    if not t.enabled:
        pytest.skip("no glibc malloc_trim here")
    before, after, took = t.trim()
    assert before > 0 and after > 0 and took < 1.0
    assert memory.resident() > 10 * MIB


def test_preloader_errors_are_preload_errors(monkeypatch) -> None:
    p = Preloader()
    with pytest.raises(PreloadError, match="not running"):
        p.spawn({}, [])
    master_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    p.sock, p.pid = master_end, 0
    child_end.send(msgpack.packb({"error": "unsafe to fork after the imports (3 threads)"}))
    with pytest.raises(PreloadError, match="3 threads"):
        p.spawn({}, [])
    child_end.send(msgpack.packb({"event": "preloaded", "seconds": 0.1, "failed": {}, "threads": 1}))
    child_end.send(msgpack.packb({"error": "fork() failed: [Errno 11]"}))
    with pytest.raises(PreloadError, match="fork"):
        p.spawn({"slot": 0}, [])
    assert p.ready
    child_end.send(msgpack.packb({"pid": 4242}))
    assert p.spawn({"slot": 0}, []) == 4242
    monkeypatch.setattr(preload, "FORK_TIMEOUT", 0.05)
    with pytest.raises(PreloadError, match="timed out|TimeoutError"):  # no answer
        p.spawn({"slot": 0}, [])
    child_end.close()
    with pytest.raises(PreloadError, match="exited|Broken pipe|Connection"):
        p.spawn({"slot": 0}, [])
    p.exited()
    assert p.sock is None and not p.ready


def test_preload_modules_are_what_workers_import() -> None:
    from models.catalog import MODEL_TYPES

    mods = preload.preload_modules()
    assert mods[:2] == ["numpy", "torch"]
    assert {path.partition(":")[0] for path in MODEL_TYPES.values()} <= set(mods)

"""Memory through the real entry point (docs/ARCHITECTURE.md, "Memory"): workers forked by the
preload process share its pages of torch, the master stays torch-free and is still every worker's
parent (reaping, respawn, reload, upgrade), and an idle worker gives freed batch memory back."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np

from tests.conftest import Load, alive, children, fixture_path, free_port, infer_json, title, wait_for

TINY = fixture_path("densenet_tiny", "model")
SMALL_IMAGE = [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.5] * (3 * 32 * 32)}]
MIB = 1024  # smaps counts kB
TORCH_SHARED = 64 * MIB  # of torch's ~140 MiB of import-time heap, what a worker must share at the least


def rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        out[key] = int(value.split()[0])
    return out


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def preloads(master: int) -> list[int]:
    return [p for p in children(master) if title(p) == "modelsrv: preload process"]


def assert_shares_torch(worker: int) -> None:
    r = rollup(worker)
    assert r["Shared_Dirty"] > TORCH_SHARED, f"worker {worker} shares only {r['Shared_Dirty']} kB of dirty pages: {r}"
    assert r["Pss"] < 0.7 * r["Rss"], r


def test_workers_are_forked_by_the_preload_process_and_share_torch(make_server) -> None:
    s = make_server().start()
    master = s.master_pid()
    [pre] = preloads(master)
    workers = s.worker_pids()
    assert len(workers) == 2 and all(parent(w) == master for w in workers)  # reparented: the master reaps them
    assert maps_torch(pre) and all(maps_torch(w) for w in workers)
    assert not maps_torch(master), "the master mapped libtorch"
    assert os.listdir(f"/proc/{pre}/task") == [str(pre)], "a thread in the preload process: unsafe to fork"
    for w in workers:
        assert_shares_torch(w)
    assert all(infer_json(s.url, "tiny", SMALL_IMAGE)[0] == 200 for _ in range(4))
    assert f"preload process {pre} ready" in s.log_text()
    s.signal(signal.SIGTERM)
    assert s.wait_exit(20) == 0
    wait_for(lambda: not alive(pre) and not any(alive(w) for w in workers), 10, what="every child gone")


def test_worker_preload_off_forks_from_the_master(make_server) -> None:
    s = make_server(extra="worker_preload off;").start()
    master = s.master_pid()
    assert preloads(master) == []
    for w in s.worker_pids():
        assert parent(w) == master
        assert rollup(w)["Shared_Dirty"] < 32 * MIB  # each worker imported torch itself
    assert not maps_torch(master)
    assert infer_json(s.url, "tiny", SMALL_IMAGE)[0] == 200


def test_kill9_of_a_worker_then_of_the_preload_process_under_load(make_server) -> None:
    s = make_server().start()
    master = s.master_pid()
    [pre] = preloads(master)
    first = s.worker_pids()
    with Load(s, "tiny", "zmq", threads=3) as load:
        load.wait_served(6)
        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: len(s.worker_pids()) == 2 and first[0] not in s.worker_pids(), 30, what="a respawned worker")
        wait_for(lambda: s.ready_count() >= 3, 30, what="the respawned worker ready")
        [new] = set(s.worker_pids()) - set(first)
        assert parent(new) == master
        assert_shares_torch(new)
        load.wait_served(5)

        os.kill(pre, signal.SIGKILL)  # the next worker needs a new one
        wait_for(lambda: f"preload process {pre} exited on signal 9" in s.log_text(), 20, what="the preload process reaped")
        os.kill(first[1], signal.SIGKILL)
        wait_for(lambda: s.ready_count() >= 4, 60, what="the second respawned worker ready")
        [pre2] = preloads(master)
        assert pre2 != pre
        [newer] = set(s.worker_pids()) - {new}
        assert parent(newer) == master and newer != first[1]
        assert_shares_torch(newer)
        load.wait_served(5)
    assert load.failures == []


def test_reload_and_binary_upgrade_keep_one_preload_process_per_master(make_server) -> None:
    s = make_server().start()
    master = s.master_pid()
    [pre] = preloads(master)
    old = set(s.worker_pids())
    # a reload with another port: the new listener reaches the new workers through the preload process
    new_port = free_port()
    s.write_conf(text=s.conf_text().replace(f"listen 127.0.0.1:{s.http_port};",
                                           f"listen 127.0.0.1:{s.http_port};\n    listen 127.0.0.1:{new_port};"))
    s.signal(signal.SIGHUP)
    wait_for(lambda: len(s.worker_pids()) == 2 and not set(s.worker_pids()) & old, 60, what="the new generation")
    assert preloads(master) == [pre]
    for w in s.worker_pids():
        assert parent(w) == master
        assert_shares_torch(w)
    assert infer_json(f"http://127.0.0.1:{new_port}", "tiny", SMALL_IMAGE)[0] == 200

    s.signal(signal.SIGUSR2)
    oldbin = Path(str(s.pid_file) + ".oldbin")
    wait_for(lambda: oldbin.exists() and s.pid_file.exists() and s.master_pid() != master, 30, what="new master")
    new_master = s.master_pid()
    s.started_pids.add(new_master)
    s.wait_ready(60, workers=2, master=new_master)
    [new_pre] = preloads(new_master)
    assert preloads(master) == [pre]  # the old master keeps its own (a HUP after WINCH needs it)
    for w in s.worker_pids(new_master):
        assert parent(w) == new_master
        assert_shares_torch(w)
    s.signal(signal.SIGWINCH, master)
    wait_for(lambda: not s.worker_pids(master), 30, what="old workers gone")
    s.signal(signal.SIGQUIT, master)
    wait_for(lambda: not alive(master) and not alive(pre), 30, what="the old master and its preload process gone")
    assert alive(new_pre) and infer_json(s.url, "tiny", SMALL_IMAGE)[0] == 200
    os.kill(new_master, signal.SIGKILL)  # a master killed outright: its preload process leaves too
    wait_for(lambda: not alive(new_pre), 10, what="the preload process gone with its master")


def test_an_idle_worker_gives_freed_batch_memory_back(make_server) -> None:
    from server.client import Client

    s = make_server(models={"tiny": {"path": str(TINY), "max_batch_size": 4}}, workers=1,
                    extra="worker_malloc_trim 16m;")
    s.write_conf(text=s.conf_text().replace("error_log logs/error.log info;", "error_log logs/error.log debug;"))
    s.start()
    [w] = s.worker_pids()
    wait_for(lambda: "malloc_trim (after warm-up)" in s.log_text(), 10, what="the trim after warm-up")
    images = np.random.default_rng(0).standard_normal((4, 3, 512, 512)).astype(np.float32)
    with Client(s.zmq_address, timeout=60) as c:
        for _ in range(3):
            assert c.infer("tiny", {"images": images})["logits"].shape[0] == 4
    busy = rollup(w)["Rss"]
    wait_for(lambda: "malloc_trim (idle)" in s.log_text(), 10, what="the idle trim")
    idle = rollup(w)["Rss"]
    assert idle < busy - 16 * MIB, (busy, idle)
    line = next(x for x in s.log_text().splitlines() if "malloc_trim (idle)" in x)
    assert f" {w}#0: " in line


def test_a_preload_process_that_stops_answering_is_replaced_by_plain_forks(make_server) -> None:
    s = make_server().start()
    master = s.master_pid()
    [pre] = preloads(master)
    first = s.worker_pids()
    os.kill(pre, signal.SIGSTOP)  # wedged: the master's request for a worker times out
    os.kill(first[0], signal.SIGKILL)
    wait_for(lambda: f"preload process {pre} failed" in s.log_text(), 30, what="the preload process given up")
    wait_for(lambda: s.ready_count() >= 3, 60, what="the respawned worker ready")
    assert not alive(pre) and preloads(master) == []
    [new] = set(s.worker_pids()) - set(first)
    assert parent(new) == master and rollup(new)["Shared_Dirty"] < 32 * MIB  # forked by the master itself
    assert infer_json(s.url, "tiny", SMALL_IMAGE)[0] == 200
    s.signal(signal.SIGHUP)  # a reload tries a preload process again
    wait_for(lambda: len(s.worker_pids()) == 2 and not set(s.worker_pids()) & {first[1], new}, 60,
             what="the new generation")
    assert len(preloads(master)) == 1
    for w in s.worker_pids():
        assert_shares_torch(w)

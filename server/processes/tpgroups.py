"""The master's side of tensor parallelism: a group of worker slots managed as one unit.

``tensor_parallel k`` cuts a model's slots into groups of k (``Config.tp_groups``). For each
incarnation of a group (a generation's group, started again after a failure) the master binds
a fresh rendezvous socket on 127.0.0.1 — the configured ``tensor_parallel_port`` or the next free
port after it, else a port the kernel picks — and keeps it open while that incarnation lives:
rank 0's TCPStore adopts the inherited socket, so no other group, of this master or of a new
binary's, can ever rendezvous on the same port.

* The members are forked together (they are consecutive slots of one spawn pass).
* The model is ready when rank 0 is: rank 0's warm-up runs through every rank.
* A member that dies (or is killed for missing heartbeats) takes its group down: the others are
  told to terminate, and once none is left every slot of the group is respawned together, on a
  new port, with the slot's back-off. A member that cannot load its shard (``EXIT_FATAL``) takes
  the group down for good (the reload is aborted if it was a new generation's).
* Reload and QUIT need nothing special: the generation logic retires the old group when the new
  one is ready; a quitting rank 0 drains, then tells its followers to stop.

``TensorParallelGroups`` is a mixin of ``Master``; the master calls the ``_tp_*`` hooks.
"""

from __future__ import annotations

import signal
import socket
import time
from typing import TYPE_CHECKING, Any

from server.config import Config, slot_device
from server.logs import log

if TYPE_CHECKING:
    from server.processes.master import Worker

PORT_TRIES = 100  # ports tried from tensor_parallel_port upwards
GROUP_KILL_AFTER = 5.0  # seconds the rest of a broken group gets to exit before SIGKILL


class TensorParallelGroups:
    workers: dict[int, Worker]
    respawn_at: dict[tuple[int, int], float]
    failures: dict[int, int]
    cfg: Config
    pending_cfg: Config | None

    def _tp_setup(self) -> None:
        self.tp_ports: dict[tuple[int, str], socket.socket] = {}  # (generation, group key) -> rendezvous socket
        self.tp_restarting: dict[tuple[int, str], tuple[tuple[int, ...], float]] = {}  # -> (slots, respawn delay)

    # -- spawning ----------------------------------------------------------------------------------
    def _tp_spawn_info(self, slot: int, generation: int, cfg: Config) -> dict[str, Any] | None:
        """What worker ``slot`` of ``generation`` needs to join its group (None: not in one)."""
        found = cfg.tp_of(slot)
        if found is None:
            return None
        group, rank = found
        key = (generation, group.key)
        sock = self.tp_ports.get(key)
        if sock is None:
            sock = self._tp_open(key, group.port_base, group.slots)
        mc = cfg.models[group.model]
        return {"model": group.model, "key": group.key, "rank": rank, "size": group.size, "slots": list(group.slots),
                "port": sock.getsockname()[1], "fd": sock.fileno() if rank == 0 else None,
                # the collectives' bound: a follower waits in one while rank 0 loads its other models; dead
                # peers are noticed at once (connection reset), wedged ones by their heartbeats
                "timeout": max(60.0, 2 * cfg.worker_timeout, cfg.worker_load_timeout),
                "backend": "nccl" if slot_device(cfg, mc, slot).startswith("cuda") else "gloo"}  # as group_from_env picks

    def _tp_open(self, key: tuple[int, str], base: int | None, slots: tuple[int, ...]) -> socket.socket:
        sock = self.tp_ports[key] = self._tp_bind(base)
        log.info('tensor-parallel group %s (generation %d): rendezvous on 127.0.0.1:%d, worker(s) %s',
                 key[1], key[0], sock.getsockname()[1], " ".join(map(str, slots)))
        return sock

    @staticmethod
    def _tp_bind(base: int | None) -> socket.socket:
        candidates = range(base, min(base + PORT_TRIES, 65536)) if base else [0]
        last: OSError | None = None
        for port in candidates:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
                s.listen(128)
            except OSError as exc:
                s.close()
                last = exc
                continue
            s.set_inheritable(False)  # the fork keeps it; an exec'd new binary must not
            return s
        raise OSError(f"no free rendezvous port in {base}..{base + PORT_TRIES - 1}: {last}")

    def _tp_child_fds(self, keep: dict[str, Any] | None) -> None:
        """In a freshly forked worker: close every rendezvous socket but its own (rank 0)."""
        for sock in self.tp_ports.values():
            if keep is None or sock.fileno() != keep.get("fd"):
                sock.close()

    # -- failures ----------------------------------------------------------------------------------
    def _tp_member_exited(self, w: Worker, fatal: bool) -> bool:
        """A member of a group died unexpectedly: take the group down. True when handled here."""
        if not w.tp:
            return False
        key = (w.generation, w.tp)
        cfg = self.pending_cfg if w.generation == getattr(self, "pending_generation", None) and self.pending_cfg else self.cfg
        group = next((g for g in cfg.tp_groups() if g.key == w.tp), None)
        if group is None:
            return False
        now = time.monotonic()
        rest = [o for o in self.workers.values() if o.generation == w.generation and o.tp == w.tp and o.state != "exiting"]
        log.error("tensor-parallel group %s (generation %d) lost worker #%d: %s", w.tp, w.generation, w.slot,
                  "taking it down (its shard cannot load)" if fatal else "restarting the whole group")
        for o in rest:
            o.state = "exiting"
            o.respawn = False
            o.kill_at = now + GROUP_KILL_AFTER
            if not o.channel.send({"cmd": "terminate"}):
                self._signal(o, signal.SIGTERM)
        if fatal:
            self.tp_restarting.pop(key, None)
            return True
        quick = now - w.started < 10
        n = self.failures.get(w.slot, 0) + 1 if quick else 0
        self.failures[w.slot] = n
        delay = min(10.0, 0.1 * (2**n)) if n else 0.0
        self.tp_restarting[key] = (group.slots, delay)
        return True

    def _tp_check(self, now: float) -> None:
        """Respawn groups whose members are all gone; close rendezvous sockets no incarnation uses."""
        live = {(w.generation, w.tp) for w in self.workers.values() if w.tp}
        for key, (slots, delay) in list(self.tp_restarting.items()):
            if key in live:
                continue
            del self.tp_restarting[key]
            sock = self.tp_ports.pop(key, None)
            if sock is not None:
                # the next incarnation rendezvouses on a new port: bind it while the old one is still
                # held (else ``tensor_parallel_port`` would hand the same port straight back)
                try:
                    self._tp_open(key, self._tp_port_base(key), slots)
                except OSError:
                    pass  # _tp_spawn_info tries again (and reports) when the members are spawned
                sock.close()
            if delay:
                log.warning("tensor-parallel group %s: restart in %.1fs", key[1], delay)
            for slot in slots:
                self.respawn_at[(slot, key[0])] = now + delay
        waiting = {gen for (_, gen) in self.respawn_at}
        for key in list(self.tp_ports):
            if key not in live and key not in self.tp_restarting and key[0] not in waiting:
                self.tp_ports.pop(key).close()

    def _tp_port_base(self, key: tuple[int, str]) -> int | None:
        generation, group_key = key
        cfg = self.pending_cfg if generation == getattr(self, "pending_generation", None) and self.pending_cfg else self.cfg
        return next((g.port_base for g in cfg.tp_groups() if g.key == group_key), None)

    def _tp_close_all(self) -> None:
        for sock in self.tp_ports.values():
            sock.close()
        self.tp_ports.clear()

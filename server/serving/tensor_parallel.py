"""A worker's share of a tensor-parallel group (``tensor_parallel k`` in a model block).

The master forks the k slots of a group together and tells each its rank, the group size and a
rendezvous port on 127.0.0.1 (rank 0 also inherits the listening socket the master bound on that
port, so no two groups can ever share one). Every rank loads only its shard (``models.parallel``).

* Rank 0 serves the model: its batcher (KServe) and the generation engine call a
  ``TensorParallelBloom``, which broadcasts each call's inputs to the other ranks before computing.
  It reports ready after its warm-up, which ran through every rank: a ready rank 0 means a loaded group.
* The other ranks run ``models.parallel.follow`` on a thread of their own and do not host the model
  (the master's peer table lists only rank 0); their event loop still serves the front doors and
  forwards requests for the model to rank 0, as for any model placed on another worker.

A follower whose loop fails (rank 0 gone, a collective broken) exits with status 1, and rank 0 whose
group broke does the same: the master then restarts the whole group in its slots.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from server.config import ModelConf
from server.logs import log

KEEPALIVE = 30.0  # rank 0 pings an idle group this often, so an idle follower never reaches the collective timeout


@dataclass
class Follower:
    """The follower thread of one tensor-parallel model on this worker."""

    name: str
    thread: threading.Thread | None = None
    progress: list[float] = field(default_factory=lambda: [0.0])  # when the current op began; 0.0 while idle
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    on_done: Any = None  # called (from the thread) when the loop ends

    def busy_for(self) -> float:
        started = self.progress[0]
        return time.monotonic() - started if started else 0.0


def tp_env(tp: dict[str, Any] | None) -> None:
    """Put the group the master described into the environment ``models.parallel.group_from_env`` reads."""
    if not tp:
        return
    os.environ.update({"MODELSRV_TP_RANK": str(tp["rank"]), "MODELSRV_TP_SIZE": str(tp["size"]),
                       "MODELSRV_TP_PORT": str(tp["port"]), "MODELSRV_TP_TIMEOUT": str(tp.get("timeout", 300.0))})
    if tp.get("fd") is not None:
        os.environ["MODELSRV_TP_FD"] = str(tp["fd"])
    else:
        os.environ.pop("MODELSRV_TP_FD", None)


def load_sharded(mc: ModelConf, device: str, tp: dict[str, Any]) -> tuple[Any, Follower | None]:
    """Join the group and load this rank's shard: (the model rank 0 serves, None) or (None, a running Follower)."""
    import torch

    from models.base import read_config
    from models.catalog import model_class
    from models.parallel import TensorParallelBloom, follow, group_from_env

    tp_env(tp)
    started = time.perf_counter()
    parallel = group_from_env(device)
    log.info('model "%s": joined tensor-parallel group rank %d/%d on 127.0.0.1:%d in %.2fs',
             mc.name, parallel.rank, parallel.size, tp["port"], time.perf_counter() - started)
    config = read_config(mc.path)
    model = model_class(config["model_type"]).build(mc.path, config, torch.device(device), parallel=parallel)
    if parallel.rank == 0:
        proxy = TensorParallelBloom(model, parallel)
        proxy.warmup()  # through every rank: the group is loaded when this returns
        proxy.start_keepalive(KEEPALIVE)
        return proxy, None

    follower = Follower(mc.name)

    def run() -> None:
        try:
            follow(model, parallel, progress=follower.progress)
        except BaseException as exc:  # noqa: B036 - whatever ends the loop ends the group
            follower.error = f"{type(exc).__name__}: {exc}"
        finally:
            follower.progress[0] = 0.0
            follower.done.set()
            if follower.on_done is not None:
                follower.on_done()

    follower.thread = threading.Thread(target=run, name=f"tp-follow-{mc.name}", daemon=True)
    follower.thread.start()
    return None, follower


def tp_metadata(mc: ModelConf, tp: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``/v2/models/{m}/config`` says of the group."""
    if mc.tensor_parallel <= 1 or not tp:
        return None
    return {"size": mc.tensor_parallel, "slots": list(tp["slots"]), "port": tp["port"], "backend": tp.get("backend", "")}

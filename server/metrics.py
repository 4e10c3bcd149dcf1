"""Prometheus metrics, aggregated over every worker with prometheus_client's multiprocess mode.

Each worker writes its own mmap files under ``PROMETHEUS_MULTIPROC_DIR`` (set by the master
before forking); any worker answering ``/metrics`` merges them all. When a worker dies, the
master folds its counters and histograms into ``*_archive.db`` files and deletes its own, so
totals survive restarts and a server that restarted workers many times still scrapes fast.
Names and labels: docs/METRICS.md.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import glob
import math
import os
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("modelsrv_requests", "Inference requests by model, protocol and outcome", ["model", "protocol", "outcome"])
REQUEST_SECONDS = Histogram("modelsrv_request_seconds", "Time from arrival to reply", ["model"], buckets=LATENCY_BUCKETS)
QUEUE_SECONDS = Histogram("modelsrv_queue_seconds", "Time waiting for a batch", ["model"], buckets=LATENCY_BUCKETS)
COMPUTE_SECONDS = Histogram("modelsrv_compute_seconds", "Time of the batch a request ran in", ["model"], buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("modelsrv_batch_size", "Items per executed batch", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
INFLIGHT = Gauge("modelsrv_inflight_requests", "Requests accepted and not yet answered", ["model"], multiprocess_mode="livesum")
QUEUED = Gauge("modelsrv_queued_requests", "Requests waiting for a batch", ["model"], multiprocess_mode="livesum")
LOAD_SECONDS = Gauge("modelsrv_model_load_seconds", "Seconds the last load of a model took", ["model"], multiprocess_mode="livemax")
WORKERS_READY = Gauge("modelsrv_workers_ready", "Workers serving", multiprocess_mode="livesum")
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
TTFT_SECONDS = Histogram("modelsrv_time_to_first_token_seconds", "Time from a generation's arrival to its first token",
                         ["model"], buckets=LATENCY_BUCKETS)
TPOT_SECONDS = Histogram("modelsrv_time_per_output_token_seconds", "Mean time between a generation's tokens after the first",
                         ["model"], buckets=TOKEN_BUCKETS)
PROMPT_TOKENS = Counter("modelsrv_prompt_tokens", "Prompt tokens of admitted generations", ["model"])
GENERATED_TOKENS = Counter("modelsrv_generation_tokens", "Tokens generated (preempted work not counted twice)", ["model"])
PREEMPTIONS = Counter("modelsrv_generation_preemptions", "Sequences preempted for lack of KV-cache blocks", ["model"])
GEN_RUNNING = Gauge("modelsrv_generation_running", "Sequences in the running batch", ["model"], multiprocess_mode="livesum")
GEN_WAITING = Gauge("modelsrv_generation_waiting", "Sequences waiting for a slot or KV blocks", ["model"], multiprocess_mode="livesum")
KV_USAGE = Gauge("modelsrv_kv_cache_usage_ratio", "Share of the KV-cache blocks in use (max over workers)", ["model"],
                 multiprocess_mode="livemax")
WORKER_STARTS = Counter("modelsrv_worker_starts", "Worker processes started, by slot (restarts included)", ["slot"])


# -- written once per turn of the event loop -------------------------------------------------------
# In multiprocess mode every inc() or observe() takes a lock, checks the pid and writes the mmap
# file: a few microseconds, several times per request. The hot path records here instead, and one
# flush at the end of the loop's turn writes each series once (a histogram: each bucket once).

_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_counts: dict[Any, float] = {}  # counter or gauge child -> amount to add
_gauges: dict[Any, float] = {}  # gauge child -> value to set
_observed: dict[Any, list[float]] = {}  # histogram child -> observations
_flush_scheduled = False


def observe_request(model: str, protocol: str, outcome: str, seconds: float) -> None:
    """One answered inference request (``model`` is "unknown" for names no worker serves)."""
    key = (model, protocol, outcome)
    pair = _children.get(key)
    if pair is None:  # labels() takes a lock and builds a key: once per label set, not per request
        pair = _children[key] = (REQUESTS.labels(model, protocol, outcome), REQUEST_SECONDS.labels(model))
    inc(pair[0])
    observe(pair[1], seconds)


def inc(child: Any, amount: float = 1.0) -> None:
    """``child.inc(amount)`` at the end of this turn of the loop."""
    _counts[child] = _counts.get(child, 0.0) + amount
    _schedule()


def set_gauge(child: Any, value: float) -> None:
    """``child.set(value)`` at the end of this turn of the loop (the last value wins)."""
    _gauges[child] = value
    _schedule()


def observe(child: Any, value: float, times: int = 1) -> None:
    """``child.observe(value)``, ``times`` times, at the end of this turn of the loop."""
    values = _observed.get(child)
    if values is None:
        values = _observed[child] = []
    if times == 1:
        values.append(value)
    else:
        values.extend([value] * times)
    _schedule()


def _schedule() -> None:
    global _flush_scheduled
    if _flush_scheduled:
        return
    try:
        asyncio.get_running_loop().call_soon(flush)
    except RuntimeError:  # no event loop in this thread: write now
        flush()
        return
    _flush_scheduled = True


def flush() -> None:
    """Write what this turn recorded."""
    global _flush_scheduled
    _flush_scheduled = False
    while _counts:
        child, amount = _counts.popitem()
        child.inc(amount)
    while _gauges:
        child, value = _gauges.popitem()
        child.set(value)
    while _observed:
        child, values = _observed.popitem()
        observe_all(child, values)


def observe_all(child: Any, values: list[float]) -> None:
    """``child.observe(v) for v in values`` with one write per bucket touched and one for the sum.

    Reaches into prometheus_client's Histogram child (``_upper_bounds``, ``_buckets``, ``_sum``;
    tests/unit/test_metrics.py checks the result equals one observe() per value, so a release
    that changes them fails there) and falls back to plain observe() calls if they are missing.
    """
    bounds, buckets, total = (getattr(child, a, None) for a in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            child.observe(v)
        return
    counts = collections.Counter(bisect.bisect_left(bounds, v) for v in values)
    for index, n in counts.items():
        buckets[index].inc(n)
    total.inc(math.fsum(values))


def render() -> bytes:
    """The text exposition of every process's metrics."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry)


def worker_died(directory: str | os.PathLike, pid: int) -> None:
    """Fold a dead worker's counters and histograms into archive files; drop its live gauges."""
    directory = Path(directory)
    mark_process_dead(pid, str(directory))
    for kind in ("counter", "histogram"):
        own = directory / f"{kind}_{pid}.db"
        if not own.exists():
            continue
        archive = MmapedDict(str(directory / f"{kind}_archive.db"))
        try:
            for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(own)):
                old, _ = archive.read_value(key)
                archive.write_value(key, old + value, timestamp)
        finally:
            archive.close()
        own.unlink()
    for path in glob.glob(str(directory / f"gauge_*_{pid}.db")):  # non-live gauges of the dead pid
        os.unlink(path)

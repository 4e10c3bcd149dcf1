"""server.metrics' per-turn writes: what one flush writes equals what the per-call API would have."""

from __future__ import annotations

import asyncio
import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server import metrics


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples if not s.name.endswith("_created")}


def _pair(kind, *args, **kw):
    """The same metric twice, in two registries: one fed per call, one through server.metrics."""
    a, b = CollectorRegistry(), CollectorRegistry()
    return a, kind(*args, registry=a, **kw), b, kind(*args, registry=b, **kw)


def test_observe_all_equals_one_observe_per_value() -> None:
    values = [0.0, 0.0009, 0.001, 0.0011, 0.0025, 0.3, 0.3, 7.0, 61.0, 1e9, 0.05]
    ra, ha, rb, hb = _pair(Histogram, "h", "help", ["model"], buckets=metrics.LATENCY_BUCKETS)
    for v in values:
        ha.labels("m").observe(v)
    metrics.observe_all(hb.labels("m"), values)
    a, b = _samples(ra), _samples(rb)
    assert a.keys() == b.keys()
    for key in a:
        assert math.isclose(a[key], b[key], rel_tol=1e-12, abs_tol=1e-12), key


def test_a_turn_of_the_loop_writes_counts_gauges_and_observations_once() -> None:
    rc, c, _, _ = _pair(Counter, "c", "help")
    rg, g, _, _ = _pair(Gauge, "g", "help")
    rh, h, _, _ = _pair(Histogram, "hh", "help", buckets=(1, 2, 4))

    async def turn() -> dict:
        for _ in range(5):
            metrics.inc(c)
        metrics.set_gauge(g, 3)
        metrics.set_gauge(g, 7)  # the last value of the turn wins
        metrics.observe(h, 1.5, times=3)
        metrics.observe(h, 3.0)
        before = (_samples(rc), _samples(rg), _samples(rh))  # nothing written yet
        await asyncio.sleep(0)
        return before

    before = asyncio.run(turn())
    assert before[0][("c_total", ())] == 0 and before[1][("g", ())] == 0
    assert _samples(rc)[("c_total", ())] == 5
    assert _samples(rg)[("g", ())] == 7
    hist = _samples(rh)
    assert hist[("hh_bucket", (("le", "2.0"),))] == 3 and hist[("hh_bucket", (("le", "4.0"),))] == 4
    assert hist[("hh_sum", ())] == 7.5


def test_without_an_event_loop_writes_at_once() -> None:
    rc, c, _, _ = _pair(Counter, "c2", "help")
    metrics.inc(c, 2)
    assert _samples(rc)[("c2_total", ())] == 2

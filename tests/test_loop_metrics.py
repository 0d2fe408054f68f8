"""``tightwad.loop_metrics`` exports exactly what prometheus-client's own classes do.

The proxy's counters and histograms moved off prometheus-client's locked classes
for speed; dashboards, rules and PromQL depend on the exposition staying the
same. Each case feeds the same observations to both and compares the text a
scrape returns (``_created`` timestamps aside).
"""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from tightwad.loop_metrics import LoopCounter, LoopHistogram

BUCKETS = (0.005, 0.01, 0.1, 1.0)


def _text(registry: CollectorRegistry) -> str:
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", generate_latest(registry).decode())


def test_counters_export_as_prometheus_client_does() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    c1 = Counter("t_things", "Things", ["model", "kind"], registry=theirs)
    c2 = LoopCounter("t_things", "Things", ["model", "kind"], ours)
    for c in (c1, c2):
        c.labels("m", "a").inc()
        c.labels(model="m", kind="b").inc(2.5)
        c.labels("m", "c")  # created, never incremented: exported at zero
        c.labels("m", "gone").inc()
        c.remove("m", "gone")
    assert _text(ours) == _text(theirs)
    assert ours.get_sample_value("t_things_total", {"model": "m", "kind": "b"}) == 2.5


def test_histograms_export_as_prometheus_client_does() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("t_seconds", "Seconds", ["model"], buckets=BUCKETS, registry=theirs)
    h2 = LoopHistogram("t_seconds", "Seconds", ["model"], ours, buckets=BUCKETS)
    # On a bound (le means "less or equal"), between bounds, past the last one, and zero.
    values = [0.005, 0.0051, 0.01, 0.5, 1.0, 7.0, 0.0]
    for h in (h1, h2):
        for v in values:
            h.labels("m").observe(v)
        h.labels(model="other")
    assert _text(ours) == _text(theirs)
    assert ours.get_sample_value("t_seconds_bucket", {"model": "m", "le": "0.005"}) == 2
    assert ours.get_sample_value("t_seconds_count", {"model": "m"}) == len(values)


def test_bad_use_is_refused_as_prometheus_client_refuses_it() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("t_c", "C", ["model"], registry)
    with pytest.raises(ValueError):
        counter.labels("m").inc(-1)
    with pytest.raises(ValueError):
        counter.labels("m", "extra")
    with pytest.raises(ValueError):
        counter.labels(drafter="d")
    with pytest.raises(ValueError):  # the same name twice in one registry
        LoopCounter("t_c", "C", ["model"], registry)
    with pytest.raises(ValueError):
        LoopHistogram("t_h", "H", ["model"], registry, buckets=[float("inf")])

"""Counters and histograms for values that only the event loop's thread updates.

prometheus-client's own Counter and Histogram take a lock on every update and
check their arguments each time; a round touches about fifteen series, and that
was a tenth of the proxy's CPU per round. The proxy updates its metrics from
async code on one thread only, so a plain float needs no lock. These classes
keep plain floats and hand them to the registry as metric families at scrape
time, in exactly the shape prometheus-client's classes export (``_total``,
``_bucket``/``_count``/``_sum``, and ``_created``), so names, PromQL and
dashboards are unchanged.

Only for single-threaded use: ``tightwad.verifier`` (whose metrics are updated
from its llama.cpp worker thread) keeps prometheus-client's locked classes.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


class _CounterChild:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound lands in that bound's bucket (le = "less or equal").
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Family:
    """Labelled series of one metric, registered with ``registry`` as a collector."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], _CounterChild | _HistogramChild] = {}
        registry.register(self)

    def _new_child(self) -> _CounterChild | _HistogramChild:
        raise NotImplementedError

    def labels(self, *values: str, **by_name: str) -> _CounterChild | _HistogramChild:
        if by_name:
            if values or set(by_name) != set(self.labelnames):
                raise ValueError(f"{self.name}: expected the labels {self.labelnames}, got {tuple(by_name)}")
            values = tuple(by_name[n] for n in self.labelnames)
        elif len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, got {len(values)}")
        key = tuple(str(v) for v in values)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = self._new_child()
        return child

    def remove(self, *values: str) -> None:
        self._series.pop(tuple(str(v) for v in values), None)

    def _family(self) -> Metric:
        raise NotImplementedError

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        # A copy: a scrape must not see the dict change size if a series is added meanwhile.
        for values, child in list(self._series.items()):
            self._add(family, list(values), child)
        yield family

    def _add(self, family: Metric, values: list[str], child: _CounterChild | _HistogramChild) -> None:
        raise NotImplementedError


class LoopCounter(_Family):
    """A labelled counter; ``labels(...).inc(n)``."""

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def _family(self) -> Metric:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: Metric, values: list[str], child: _CounterChild | _HistogramChild) -> None:
        assert isinstance(family, CounterMetricFamily) and isinstance(child, _CounterChild)
        family.add_metric(values, child.value, created=child.created)


class LoopHistogram(_Family):
    """A labelled histogram with fixed upper bounds; ``labels(...).observe(v)``."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry,
                 *, buckets: Sequence[float]):
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds:
            raise ValueError(f"{name}: a histogram needs at least one finite bucket")
        self.bounds = tuple(bounds)
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.bounds)

    def _family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: Metric, values: list[str], child: _CounterChild | _HistogramChild) -> None:
        assert isinstance(family, HistogramMetricFamily) and isinstance(child, _HistogramChild)
        cumulative, total = [], 0
        for le, count in zip(self._le, child.counts, strict=True):
            total += count
            cumulative.append((le, total))
        family.add_metric(values, cumulative, child.sum)
        family.samples.append(Sample(f"{self.name}_created", dict(zip(self.labelnames, values, strict=True)),
                                     child.created))

"""Prometheus metrics: small counters, gauges and histograms, and the text exposition format.

Why not ``prometheus_client``: every ``inc``/``observe`` there takes a ``threading.Lock`` and walks
a few Python frames, about 1 µs a call (see docs/observability.md for the measurement). The
gateway's metrics are only ever touched from its one event loop thread, so no lock is needed, and
a histogram observation here is a ``bisect`` and two additions.

Invariants:
- a metric's label set is fixed when it is declared; a child (one label-value combination) is
  resolved once with ``labels(...)`` and kept by the caller, so the hot path does no label work;
- nothing here is thread-safe: call it from the event loop only (rendering included);
- gauges are read at scrape time through a callback, never tracked on the hot path;
- ``render()`` produces the Prometheus text format 0.0.4: ``# HELP``, ``# TYPE``, samples with
  escaped label values, histograms with cumulative ``_bucket`` (ending in ``+Inf``), ``_sum`` and
  ``_count``.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

__all__ = [
    "CONTENT_TYPE",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
    "format_value",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelValues = tuple[str, ...]
Sample = tuple[LabelValues, float]


def format_value(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if value != value:  # NaN
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)

    def _header(self) -> list[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]

    def render(self, peers: Sequence[Any] = ()) -> list[str]:
        """The text lines; ``peers`` are other processes' ``snapshot()`` of this metric, merged
        in (counters and histograms add up; gauges by their ``merge``)."""
        raise NotImplementedError

    def snapshot(self) -> Any:
        """This process's values, as JSON (for a worker to send to another)."""
        raise NotImplementedError


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Counter(_Metric):
    """A monotonically increasing count; ``labels(...)`` returns a child to keep and ``inc``."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._children: dict[LabelValues, CounterChild] = {}
        if not self.labelnames:
            self._children[()] = CounterChild()

    def labels(self, *values: str) -> CounterChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            child = self._children[values] = CounterChild()
        return child

    def inc(self, amount: float = 1.0) -> None:
        self._children[()].value += amount

    def value(self, *values: str) -> float:
        child = self._children.get(values)
        return 0.0 if child is None else child.value

    def snapshot(self) -> Any:
        return [[list(values), child.value] for values, child in self._children.items()]

    def render(self, peers: Sequence[Any] = ()) -> list[str]:
        totals = {values: child.value for values, child in self._children.items()}
        for peer in peers:
            for values, value in peer:
                key = tuple(values)
                totals[key] = totals.get(key, 0.0) + value
        out = self._header()
        for values, value in totals.items():
            out.append(f"{self.name}{_label_text(self.labelnames, values)} {format_value(value)}")
        return out


class Gauge(_Metric):
    """A value read at render time from ``read()``: samples of (label values, value).

    Across worker processes a gauge merges by ``merge``: "sum" (each process holds part of it),
    "max", or "own" (every process reads the same shared value: this one's is the answer)."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        read: Callable[[], Iterable[Sample]],
        labelnames: Sequence[str] = (),
        merge: str = "sum",
    ) -> None:
        super().__init__(name, help, labelnames)
        self._read = read
        self.merge = merge

    def snapshot(self) -> Any:
        return [[list(values), value] for values, value in self._read()]

    def render(self, peers: Sequence[Any] = ()) -> list[str]:
        values_now = {tuple(values): value for values, value in self._read()}
        if self.merge != "own":
            for peer in peers:
                for values, value in peer:
                    key = tuple(values)
                    if key not in values_now:
                        values_now[key] = value
                    elif self.merge == "max":
                        values_now[key] = max(values_now[key], value)
                    else:
                        values_now[key] += value
        out = self._header()
        for values, value in values_now.items():
            out.append(f"{self.name}{_label_text(self.labelnames, values)} {format_value(value)}")
        return out


class HistogramChild:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le is "less or equal").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class Histogram(_Metric):
    """Cumulative buckets rendered from per-bucket counts; ``observe`` is O(log buckets)."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> None:
        super().__init__(name, help, labelnames)
        bounds = tuple(sorted(float(b) for b in buckets if b != math.inf))
        if not bounds:
            raise ValueError("a histogram needs at least one finite bucket")
        self.bounds = bounds
        self._children: dict[LabelValues, HistogramChild] = {}
        if not self.labelnames:
            self._children[()] = HistogramChild(bounds)

    def labels(self, *values: str) -> HistogramChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            child = self._children[values] = HistogramChild(self.bounds)
        return child

    def observe(self, value: float) -> None:
        self._children[()].observe(value)

    def child(self, *values: str) -> HistogramChild | None:
        return self._children.get(values)

    def snapshot(self) -> Any:
        return [
            [list(values), list(child.counts), child.sum, child.count]
            for values, child in self._children.items()
        ]

    def render(self, peers: Sequence[Any] = ()) -> list[str]:
        merged = {
            values: (list(child.counts), child.sum, child.count)
            for values, child in self._children.items()
        }
        for peer in peers:
            for values, counts, total, count in peer:
                key = tuple(values)
                mine = merged.get(key)
                if mine is None:
                    merged[key] = (list(counts), total, count)
                else:
                    merged[key] = (
                        [a + b for a, b in zip(mine[0], counts, strict=True)],
                        mine[1] + total,
                        mine[2] + count,
                    )
        out = self._header()
        for values, (counts, total, count) in merged.items():
            running = 0
            for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
                running += n
                labels = _label_text(self.labelnames, values, f'le="{format_value(bound)}"')
                out.append(f"{self.name}_bucket{labels} {running}")
            labels = _label_text(self.labelnames, values)
            out.append(f"{self.name}_sum{labels} {format_value(total)}")
            out.append(f"{self.name}_count{labels} {count}")
        return out


M = TypeVar("M", bound=_Metric)


class Registry:
    """An ordered set of metrics, rendered together; a name may be registered once."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: M) -> M:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def get(self, name: str) -> _Metric:
        return self._metrics[name]

    def snapshot(self) -> dict[str, Any]:
        return {name: metric.snapshot() for name, metric in self._metrics.items()}

    def render(self, peers: Sequence[dict[str, Any]] = ()) -> str:
        """The exposition; ``peers`` are other worker processes' ``snapshot()``, merged in."""
        lines: list[str] = []
        for name, metric in self._metrics.items():
            lines.extend(metric.render([p[name] for p in peers if name in p]))
        return "\n".join(lines) + "\n"

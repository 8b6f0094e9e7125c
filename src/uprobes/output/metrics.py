"""Probe metrics (``uprobes serve``): hits per probe, call durations, and the run's own health, kept as a run
goes; a snapshot of them for any exporter (:mod:`uprobes.output.otlp`), and prometheus-client's collector
interface for a scrape.

The run's thread adds what it polls (:meth:`ProbeMetrics.add`); an exporter's thread takes snapshots
(:meth:`ProbeMetrics.snapshot`, :meth:`ProbeMetrics.collect`); a lock keeps them apart. Label values are
bounded: past ``max_series`` distinct ``--by`` keys of a probe, hits count under the key ``__other__`` and in
``uprobes_series_dropped_total``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .aggregate import CallsInFlight, rows_of
from .columns import EventColumns

__all__ = ["LATENCY_BUCKETS", "OTHER", "Distribution", "Family", "ProbeMetrics", "Series", "TargetHealth",
           "label_name"]

# Upper bounds of the call-duration buckets, in seconds: 1, 2.5, 5 per decade from 100 ns to 10 s.
LATENCY_BUCKETS = (*(float(f"{mantissa}e{exponent}") for exponent in range(-7, 1) for mantissa in (1, 2.5, 5)),
                   10.0)
# Upper bounds of the argument-value buckets (--hist): 0 (and below), then powers of two to 2**40.
ARGUMENT_BUCKETS = (0.0, *(float(2 ** k) for k in range(41)))
OTHER = "__other__"  # the key value of hits past a probe's max_series distinct keys
# Calls in flight kept per timed function: threads, and calls nested in one thread (the oldest go first)
_MOST_THREADS = 4096
_MOST_NESTED = 64
_SPECIAL_LABELS = {"$pid": "pid", "$tid": "tid", "$comm": "comm"}


@dataclass
class Series:
    """One value of a counter or gauge, with its labels."""

    labels: dict[str, str]
    value: float


@dataclass
class TargetHealth:
    """One target (a process, a command, a ``--match`` glob): how many of its processes are traced now, and how
    many matched but could not be traced."""

    processes: int = 0
    failures: int = 0


@dataclass
class Distribution:
    """One histogram: ``counts`` per bucket, those of ``bounds`` (upper, inclusive) and a last one above them."""

    labels: dict[str, str]
    bounds: tuple[float, ...]
    counts: list[int]
    sum: float
    min: float
    max: float


@dataclass
class Family:
    """A metric and its series: ``kind`` is counter, gauge or histogram; ``unit`` as OpenTelemetry writes it
    (``{hit}``: a count of hits; empty: none)."""

    name: str
    kind: str
    help: str
    unit: str
    series: list


def _merge(into: _Buckets | Distribution, other: _Buckets | Distribution) -> None:
    """``other``'s values (buckets of the same bounds) counted in ``into`` too: counts, sum, least and most."""
    if not any(other.counts):
        return
    first = not any(into.counts)
    into.counts = [mine + theirs for mine, theirs in zip(into.counts, other.counts)]
    into.sum += other.sum
    into.min = other.min if first else min(into.min, other.min)
    into.max = other.max if first else max(into.max, other.max)


def _add_carried(family: Family, carried: list[Series | Distribution]) -> None:
    """Values from before a reload added to their series in ``family`` (or made their series)."""
    by_labels = {tuple(series.labels.items()): series for series in family.series}
    for value in carried:
        series = by_labels.get(tuple(value.labels.items()))
        if series is None:
            family.series.append(replace(value, counts=list(value.counts)) if isinstance(value, Distribution)
                                 else replace(value))
        elif isinstance(series, Distribution):
            _merge(series, value)
        else:
            series.value += value.value


def label_name(key: str) -> str:
    """The Prometheus label of a ``--by`` key: a fetch argument's name as it is, ``$pid`` as ``pid``..."""
    return _SPECIAL_LABELS.get(key, key)


class _Buckets:
    """Values counted in buckets of ``bounds`` (upper, inclusive) and one above them, with their sum, the least
    (``min``) and the most (``max``; 0 before the first)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.min = self.max = 0.0

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            return
        first = not any(self.counts)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.min = value if first else min(self.min, value)
        self.max = value if first else max(self.max, value)

    def distribution(self, labels: dict[str, str]) -> Distribution:
        return Distribution(labels, self.bounds, list(self.counts), self.sum, self.min, self.max)


class _Calls:
    """One timed function: its calls' durations in buckets, as each return meets its thread's last entry."""

    def __init__(self, name: str, path: str) -> None:
        self.name, self.path = name, path
        self.durations = _Buckets(LATENCY_BUCKETS)
        self.in_flight = CallsInFlight(_MOST_THREADS, _MOST_NESTED)

    def entry(self, tid: int, ts_ns: int) -> None:
        self.in_flight.entry(tid, ts_ns)

    def exit(self, tid: int, ts_ns: int) -> None:
        duration = self.in_flight.exit(tid, ts_ns)
        if duration is not None:
            self.durations.add(duration / 1e9)


class ProbeMetrics:
    """What ``uprobes serve`` exports: ``names`` and ``paths`` of the probe points, the ``--by`` ``keys``,
    the ``timed`` functions (each the range of its entry and return probes' indexes) and the ``targets``."""

    def __init__(self, names: Sequence[str], paths: Sequence[str], keys: tuple[str, ...] = (),
                 timed: Sequence[range] = (), targets: Sequence[str] = (), max_series: int = 1000,
                 drawn: tuple[str, ...] = ()) -> None:
        """``drawn``: arguments whose values each probe that fetches them draws as a histogram (``--hist``)."""
        self.lock = threading.Lock()
        #: Metrics exporters add about themselves (OTLP push failures), called at each snapshot.
        self.more: list[Callable[[], list[Family]]] = []
        self._carried: dict[str, list[Series | Distribution]] = {}  # metric -> its series before a reload
        self._start(names, paths, keys, timed, targets, max_series, drawn)

    def reload(self, names: Sequence[str], paths: Sequence[str], keys: tuple[str, ...] = (),
               timed: Sequence[range] = (), targets: Sequence[str] = (), max_series: int = 1000,
               drawn: tuple[str, ...] = ()) -> None:
        """Other probes (a configuration reloaded), as for a new instance: the series that stay (the same probe,
        object and labels; the same function; the same target) go on from their values, the others end."""
        with self.lock:
            before = self._own()
            self._start(names, paths, keys, timed, targets, max_series, drawn)
            self._carried = {family.name: [series for series in family.series
                                           if self._stays(family.name, series.labels)]
                             for family in before if family.kind != "gauge"}

    def _stays(self, metric: str, labels: dict[str, str]) -> bool:
        if metric == "uprobes_hits_total" and set(labels) != {"probe", "path", *map(label_name, self.keys)}:
            return False  # a series is its set of labels
        if "arg" in labels and labels["arg"] not in self._drawn:
            return False
        if "target" in labels:
            return labels["target"] in self.targets
        if metric == "uprobes_latency_seconds":
            return any((calls.name, calls.path) == (labels["function"], labels["path"]) for calls in self._calls)
        if "probe" in labels:
            return (labels["probe"], labels["path"]) in zip(self.names, self.paths)
        return True

    def _start(self, names: Sequence[str], paths: Sequence[str], keys: tuple[str, ...], timed: Sequence[range],
               targets: Sequence[str], max_series: int, drawn: tuple[str, ...]) -> None:
        self.names, self.paths, self.keys = list(names), list(paths), keys
        self.max_series = max_series
        self.targets = {target: TargetHealth() for target in targets}
        self.placed = 0
        self.lost = 0
        self.hits = [0] * len(self.names)
        self.by_key: list[dict[tuple, int]] = [{} for _ in self.names]
        self.dropped = [0] * len(self.names)
        self._calls: list[_Calls] = []
        self._timing: dict[int, tuple[_Calls, bool]] = {}  # probe index -> its function's calls, is it a return
        for indexes in timed:
            calls = _Calls(self.names[indexes[0]], self.paths[indexes[0]])
            self._calls.append(calls)
            self._timing.update((index, (calls, index != indexes[0])) for index in indexes)
        self._counted = [index not in self._timing for index in range(len(self.names))]
        self._drawn = drawn
        self._values: dict[tuple[int, str], _Buckets] = {}  # (probe index, argument) -> its values

    def set_hits(self, hits: Sequence[int]) -> None:
        """Hits per probe as the engine counts them (a run that counts without events)."""
        with self.lock:
            self.hits = list(hits)

    def add(self, events: EventColumns) -> None:
        """The events of one poll: counted per probe (and key), drawn, and timed where they are a function's."""
        with self.lock:
            timed: list[tuple[int, bool, int, _Calls]] = []  # time, is it a return, thread, function
            for group in events.groups:
                timing = self._timing.get(group.probe_index)
                if timing is None:
                    self.hits[group.probe_index] += len(group.ts_ns)
                else:
                    timed += [(ts_ns, timing[1], group.tid, timing[0]) for ts_ns in group.ts_ns]
            for event in events.single:
                timing = self._timing.get(event.probe_index)
                if timing is None:
                    self.hits[event.probe_index] += 1
                else:
                    timed.append((event.ts_ns, timing[1], event.tid, timing[0]))
            if self.keys or self._drawn:
                for index, rows in rows_of(events, (*self._drawn, *self.keys)):
                    if index not in self._timing:
                        for row in rows:
                            for name, value in zip(self._drawn, row):
                                self._draw(index, name, value)
                            if self.keys:
                                self._count_key(index, row[len(self._drawn):])
            timed.sort(key=lambda hit: hit[:2])  # a return meets the entry before it in its thread
            for ts_ns, is_return, tid, calls in timed:
                (calls.exit if is_return else calls.entry)(tid, ts_ns)

    def _draw(self, index: int, name: str, value) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            buckets = self._values.get((index, name))
            if buckets is None:
                buckets = self._values[index, name] = _Buckets(ARGUMENT_BUCKETS)
            buckets.add(value)

    def _count_key(self, index: int, key: tuple) -> None:
        counts = self.by_key[index]
        key = tuple("" if value is None else str(value) for value in key)
        if key not in counts and len(counts) >= self.max_series:
            self.dropped[index] += 1
            key = (OTHER,) * len(self.keys)
        counts[key] = counts.get(key, 0) + 1

    def snapshot(self) -> list[Family]:
        """The metrics as they are now, for any exporter."""
        with self.lock:
            return [*self._own(), *(family for more in self.more for family in more())]

    def _own(self) -> list[Family]:
        families = [*self._hits(), *self._latency(), *self._arguments(), *self._health()]
        for family in families:
            _add_carried(family, self._carried.get(family.name, ()))
        return families

    def collect(self) -> Iterator[Metric]:
        """The metrics as they are now (prometheus-client's collector interface)."""
        for family in self.snapshot():
            names = list(family.series[0].labels) if family.series else []
            if family.kind == "histogram":
                metric = HistogramMetricFamily(family.name, family.help, labels=names)
                for series in family.series:
                    cumulative = list(zip((*(floatToGoString(bound) for bound in series.bounds), "+Inf"),
                                          itertools.accumulate(series.counts)))
                    metric.add_metric(list(series.labels.values()), cumulative, series.sum)
            else:
                kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
                metric = kind(family.name.removesuffix("_total"), family.help, labels=names)
                for series in family.series:
                    metric.add_metric(list(series.labels.values()), series.value)
            yield metric

    def _hits(self) -> list[Family]:
        # The probe points of one probe and object (a marker's sites, a function's rets, a line's copies) are one
        # series: Prometheus keeps one sample per set of labels.
        totals: dict[tuple, int] = {}
        dropped: dict[tuple, int] = {}
        for index, counted in enumerate(self._counted):
            if not counted:
                continue
            where = (self.names[index], self.paths[index])
            for key, count in self.by_key[index].items() if self.keys else [((), self.hits[index])]:
                totals[where + key] = totals.get(where + key, 0) + count
            dropped[where] = dropped.get(where, 0) + self.dropped[index]
        labels = ["probe", "path", *(label_name(key) for key in self.keys)]
        families = [Family("uprobes_hits_total", "counter", "Hits of each probe (and key of --by)", "{hit}",
                           [Series(dict(zip(labels, values)), count) for values, count in totals.items()])]
        if self.keys:
            families.append(Family("uprobes_series_dropped_total", "counter", "Hits counted under the key __other__: "
                                   "their probe had --max-series distinct keys already", "{hit}",
                                   [Series(dict(zip(("probe", "path"), where)), count)
                                    for where, count in dropped.items()]))
        return families

    def _latency(self) -> list[Family]:
        if not self._calls:
            return []
        return [Family("uprobes_latency_seconds", "histogram", "Time from a function's entry to its return "
                       "(including the engine's own part: see uprobes latency --help)", "s",
                       [calls.durations.distribution({"function": calls.name, "path": calls.path})
                        for calls in self._calls])]

    def _arguments(self) -> list[Family]:
        if not self._drawn:
            return []
        merged: dict[tuple[str, str, str], _Buckets] = {}  # the probe points of one probe are one series
        for (index, name), buckets in self._values.items():
            where = (self.names[index], self.paths[index], name)
            _merge(merged.setdefault(where, _Buckets(ARGUMENT_BUCKETS)), buckets)
        return [Family("uprobes_argument", "histogram", "Values of the arguments --hist names, per probe", "",
                       [buckets.distribution({"probe": probe, "path": path, "arg": name})
                        for (probe, path, name), buckets in merged.items()])]

    def _health(self) -> list[Family]:
        return [Family("uprobes_lost_events_total", "counter", "Events the buffers had no room for (left out of "
                       "every figure)", "{event}", [Series({}, self.lost)]),
                Family("uprobes_probes_placed", "gauge", "Probe points in place now", "{probe}",
                       [Series({}, self.placed)]),
                Family("uprobes_target_up", "gauge", "1 while the probes are on a process of the target, 0 while "
                       "none runs (or none could be traced)", "", [Series({"target": target}, int(health.processes > 0))
                                                                   for target, health in self.targets.items()]),
                Family("uprobes_target_processes", "gauge", "Processes of the target traced now", "{process}",
                       [Series({"target": target}, health.processes) for target, health in self.targets.items()]),
                Family("uprobes_attach_failures_total", "counter", "Processes of the target that could not be traced "
                       "(each named once on stderr)", "{process}",
                       [Series({"target": target}, health.failures) for target, health in self.targets.items()])]

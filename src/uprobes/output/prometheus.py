"""Probe metrics as Prometheus scrapes them (``uprobes serve``): hits per probe point, call durations, and the
run's own health, kept as a run goes and given to prometheus-client's collector interface at each scrape.

The run's thread adds what it polls (:meth:`ProbeMetrics.add`); the HTTP server's thread collects
(:meth:`ProbeMetrics.collect`); a lock keeps the two apart. Label values are bounded: past ``max_series``
distinct ``--by`` keys of a probe, hits count under the key ``__other__`` and in ``uprobes_series_dropped_total``.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .columns import EventColumns, Group
from .event import Event

__all__ = ["LATENCY_BUCKETS", "OTHER", "ProbeMetrics", "label_name"]

# Upper bounds of the call-duration buckets, in seconds: 1, 2.5, 5 per decade from 100 ns to 10 s.
LATENCY_BUCKETS = tuple(mantissa * 10.0 ** exponent for exponent in range(-7, 1) for mantissa in (1, 2.5, 5)) + (10.0,)
OTHER = "__other__"  # the key value of hits past a probe's max_series distinct keys
# Calls in flight kept per timed function: threads, and calls nested in one thread (the oldest go first)
_MOST_THREADS = 4096
_MOST_NESTED = 64
_SPECIAL_LABELS = {"$pid": "pid", "$tid": "tid", "$comm": "comm"}


def label_name(key: str) -> str:
    """The Prometheus label of a ``--by`` key: a fetch argument's name as it is, ``$pid`` as ``pid``..."""
    return _SPECIAL_LABELS.get(key, key)


class _Calls:
    """One timed function: its calls' durations in buckets, as each return meets its thread's last entry."""

    def __init__(self, name: str, path: str) -> None:
        self.name, self.path = name, path
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above the highest bound (+Inf)
        self.sum_seconds = 0.0
        self.started: dict[int, list[int]] = {}  # tid -> entry times of calls in flight, innermost last

    def entry(self, tid: int, ts_ns: int) -> None:
        calls = self.started.get(tid)
        if calls is None:
            if len(self.started) >= _MOST_THREADS:  # entries whose returns never came (lost, longjmp, exit)
                del self.started[next(iter(self.started))]
            calls = self.started[tid] = []
        elif len(calls) >= _MOST_NESTED:
            del calls[0]
        calls.append(ts_ns)

    def exit(self, tid: int, ts_ns: int) -> None:
        calls = self.started.get(tid)
        if calls:
            seconds = max(0, ts_ns - calls.pop()) / 1e9
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.sum_seconds += seconds
            if not calls:
                del self.started[tid]


class ProbeMetrics:
    """What ``uprobes serve`` exports: ``names`` and ``paths`` of the probe points, the ``--by`` ``keys``,
    the ``timed`` functions (each the range of its entry and return probes' indexes) and the ``target``."""

    def __init__(self, names: Sequence[str], paths: Sequence[str], keys: tuple[str, ...] = (),
                 timed: Sequence[range] = (), target: str = "", max_series: int = 1000) -> None:
        self.lock = threading.Lock()
        self.names, self.paths, self.keys = list(names), list(paths), keys
        self.max_series = max_series
        self.target = target
        self.up = 0
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

    def set_hits(self, hits: Sequence[int]) -> None:
        """Hits per probe as the engine counts them (a run that counts without events)."""
        with self.lock:
            self.hits = list(hits)

    def add(self, events: EventColumns) -> None:
        """The events of one poll: counted per probe (and key), and timed where they are a function's."""
        with self.lock:
            timed: list[tuple[int, bool, int, _Calls]] = []  # time, is it a return, thread, function
            for group in events.groups:
                timing = self._timing.get(group.probe_index)
                if timing is None:
                    self._count_group(group)
                else:
                    timed += [(ts_ns, timing[1], group.tid, timing[0]) for ts_ns in group.ts_ns]
            for event in events.single:
                timing = self._timing.get(event.probe_index)
                if timing is None:
                    self._count_event(event)
                else:
                    timed.append((event.ts_ns, timing[1], event.tid, timing[0]))
            timed.sort(key=lambda hit: hit[:2])  # a return meets the entry before it in its thread
            for ts_ns, is_return, tid, calls in timed:
                (calls.exit if is_return else calls.entry)(tid, ts_ns)

    def _count_group(self, group: Group) -> None:
        index = group.probe_index
        self.hits[index] += len(group.ts_ns)
        if self.keys:
            special = {"$pid": group.pid, "$tid": group.tid, "$comm": group.comm}
            columns = [group.columns[key] if key in group.columns else
                       [special[key] if key in special else group.fixed.get(key)] * len(group.ts_ns)
                       for key in self.keys]
            for key in zip(*columns):
                self._count_key(index, key)

    def _count_event(self, event: Event) -> None:
        index = event.probe_index
        self.hits[index] += 1
        if self.keys:
            special = {"$pid": event.pid, "$tid": event.tid, "$comm": event.comm}
            self._count_key(index, tuple(special[key] if key in special else event.args.get(key)
                                         for key in self.keys))

    def _count_key(self, index: int, key: tuple) -> None:
        counts = self.by_key[index]
        key = tuple("" if value is None else str(value) for value in key)
        if key not in counts and len(counts) >= self.max_series:
            self.dropped[index] += 1
            key = (OTHER,) * len(self.keys)
        counts[key] = counts.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        """The metrics as they are now (prometheus-client's collector interface)."""
        with self.lock:
            yield from self._hits()
            yield from self._latency()
            yield from self._health()

    def _hits(self) -> Iterator[Metric]:
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
        hits = CounterMetricFamily("uprobes_hits", "Hits of each probe (and key of --by)", labels=labels)
        for values, count in totals.items():
            hits.add_metric(list(values), count)
        yield hits
        if self.keys:
            past = CounterMetricFamily("uprobes_series_dropped", "Hits counted under the key __other__: their probe "
                                       "had --max-series distinct keys already", labels=["probe", "path"])
            for values, count in dropped.items():
                past.add_metric(list(values), count)
            yield past

    def _latency(self) -> Iterator[Metric]:
        if not self._calls:
            return
        latency = HistogramMetricFamily("uprobes_latency_seconds", "Time from a function's entry to its return "
                                        "(including the engine's own part: see uprobes latency --help)",
                                        labels=["function", "path"])
        for calls in self._calls:
            cumulative, total = [], 0
            for bound, count in zip((*(f"{bound:g}" for bound in LATENCY_BUCKETS), "+Inf"), calls.buckets):
                total += count
                cumulative.append((bound, total))
            latency.add_metric([calls.name, calls.path], cumulative, calls.sum_seconds)
        yield latency

    def _health(self) -> Iterator[Metric]:
        yield CounterMetricFamily("uprobes_lost_events", "Events the buffers had no room for (left out of every "
                                  "figure)", value=self.lost)
        yield GaugeMetricFamily("uprobes_probes_placed", "Probe points in place now", value=self.placed)
        up = GaugeMetricFamily("uprobes_target_up", "1 while the probes are on the target, 0 once it has ended",
                               labels=["target"])
        up.add_metric([self.target], self.up)
        yield up

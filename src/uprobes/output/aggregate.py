"""Aggregations made in the tool from events, poll by poll: hits counted per distinct key (``count --by``) and
histograms of an argument's values (``hist``), each per probe and key.

A key is a tuple of values of fetch arguments named by the probe, or of ``$pid``, ``$tid``, ``$comm``. Events
come in columns (:class:`~uprobes.output.columns.EventColumns`): a group's hits are taken a column at a time.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

from .columns import EventColumns, Group
from .event import Event
from .histogram import Histogram

__all__ = ["SPECIAL_KEYS", "CallsInFlight", "CountsByKey", "HistogramsByKey", "rows_of"]

SPECIAL_KEYS = ("$pid", "$tid", "$comm")


def _group_values(group: Group, name: str) -> list:
    if name in group.columns:
        return group.columns[name]
    special = {"$pid": group.pid, "$tid": group.tid, "$comm": group.comm}
    return [special[name] if name in special else group.fixed.get(name)] * len(group.ts_ns)


def _event_value(event: Event, name: str):
    special = {"$pid": event.pid, "$tid": event.tid, "$comm": event.comm}
    return special[name] if name in special else event.args.get(name)


def rows_of(columns: EventColumns, names: tuple[str, ...]) -> Iterator[tuple[int, Iterator[tuple]]]:
    """For each group and event: its probe, and the values of ``names`` of each of its hits."""
    for group in columns.groups:
        yield group.probe_index, zip(*(_group_values(group, name) for name in names))
    for event in columns.single:
        yield event.probe_index, iter([tuple(_event_value(event, name) for name in names)])


def _order(key: tuple) -> tuple:
    """A key's place among keys of as many hits: numbers by value, before strings (and the rest) by text."""
    return tuple((0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value)) for value in key)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


class CallsInFlight:
    """A function's calls in flight: the entry time of each, per thread (innermost last); a return ends the last
    of its thread's. ``most_threads`` and ``most_nested`` bound them (the oldest go first), for runs so long that
    entries whose returns never come (lost, longjmp, exit) would pile up."""

    def __init__(self, most_threads: int | None = None, most_nested: int | None = None) -> None:
        self.most_threads, self.most_nested = most_threads, most_nested
        self._started: dict[int, list[int]] = {}

    def entry(self, tid: int, ts_ns: int) -> None:
        calls = self._started.get(tid)
        if calls is None:
            if self.most_threads is not None and len(self._started) >= self.most_threads:
                del self._started[next(iter(self._started))]
            calls = self._started[tid] = []
        elif self.most_nested is not None and len(calls) >= self.most_nested:
            del calls[0]
        calls.append(ts_ns)

    def exit(self, tid: int, ts_ns: int) -> int | None:
        """The duration of the call a return at ``ts_ns`` ends, in ns; None where no entry is in flight."""
        calls = self._started.get(tid)
        if not calls:
            return None
        duration = max(0, ts_ns - calls.pop())
        if not calls:
            del self._started[tid]
        return duration


class CountsByKey:
    """Hits per probe and distinct value of the ``keys`` (names of fetch arguments or specials)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.counts: collections.Counter[tuple[int, tuple]] = collections.Counter()

    def add(self, columns: EventColumns) -> None:
        for probe, keys in rows_of(columns, self.keys):
            self.counts.update((probe, tuple(map(_hashable, key))) for key in keys)

    def rows(self, top: int | None = None) -> list[tuple[int, tuple, int]]:
        """(probe index, key, hits), most hits first (then by probe and key), the first ``top`` of them."""
        ordered = sorted(self.counts.items(), key=lambda item: (-item[1], item[0][0], _order(item[0][1])))
        return [(probe, key, hits) for (probe, key), hits in ordered[:top]]

    def clear(self) -> None:
        self.counts.clear()


class HistogramsByKey:
    """A histogram of argument ``arg``'s values per probe and distinct value of the ``keys`` (none: one per
    probe); values that could not be fetched are left out."""

    def __init__(self, arg: str, keys: tuple[str, ...] = (), step: int | None = None) -> None:
        self.arg, self.keys, self.step = arg, keys, step
        self.histograms: dict[tuple[int, tuple], Histogram] = {}

    def add(self, columns: EventColumns) -> None:
        for probe, rows in rows_of(columns, (self.arg, *self.keys)):
            for value, *key in rows:
                if value is None:
                    continue
                slot = (probe, tuple(map(_hashable, key)))
                histogram = self.histograms.get(slot)
                if histogram is None:
                    histogram = self.histograms[slot] = Histogram(self.step)
                histogram.add(int(value))

    def items(self) -> list[tuple[int, tuple, Histogram]]:
        """(probe index, key, histogram), the most values first."""
        return sorted(((probe, key, histogram) for (probe, key), histogram in self.histograms.items()),
                      key=lambda item: (-len(item[2].values), item[0], _order(item[1])))

    def clear(self) -> None:
        self.histograms.clear()

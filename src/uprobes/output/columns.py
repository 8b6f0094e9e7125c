"""Events in columns: many hits of one probe by one thread, formatted many at a time.

A ring of records gives events by the hundred thousand a second; an :class:`Event` object per hit, and a
``json.dumps`` per event, cost more than the hit itself. :class:`EventColumns` keeps what varies from hit to
hit (time, CPU, integer arguments) in lists, one :class:`Group` per probe and thread, and formats a whole
group with one ``%`` of a repeated template, as UTF-8 bytes (a third faster than text, and written as they
are): the JSON lines are those of :meth:`Event.to_json`, byte for byte.
Events that came one by one (a trap's) ride along, and every way out puts everything in time order.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from .event import ArgValue, Event, encode_json, json_string

__all__ = ["EventColumns", "Group"]

_BY_TIME = operator.attrgetter("ts_ns")


@dataclass
class Group:
    """Hits of one probe by one thread. ``columns`` holds the integer arguments that vary (by name, a list per
    argument, a value per hit); ``fixed`` the arguments with one value for every hit ($comm, a constant);
    ``retval`` a return probe's return values, a value per hit (None: an entry's hits)."""

    probe: str
    probe_index: int
    pid: int
    tid: int
    comm: str
    ip: int
    names: tuple[str, ...]  # every argument, in the probe's order
    fixed: dict[str, ArgValue]
    columns: dict[str, list[int]]
    ts_ns: list[int]
    cpu: list[int]
    retval: list[int] | None = None

    def events(self) -> Iterator[Event]:
        columns = [self.columns.get(name) for name in self.names]
        returns = self.retval is not None
        for i, (ts, cpu) in enumerate(zip(self.ts_ns, self.cpu)):
            args = {name: self.fixed[name] if column is None else column[i]
                    for name, column in zip(self.names, columns)}
            yield Event(self.probe, self.pid, self.tid, self.comm, ts, cpu, self.ip, args,
                        self.retval[i] if returns else None, None, returns, self.probe_index)

    def select(self, rows: list[int]) -> Group:
        """The group of the hits at ``rows`` (indexes, in order)."""
        def pick(values: list) -> list:
            return [values[i] for i in rows]

        return replace(self, columns={name: pick(values) for name, values in self.columns.items()},
                       ts_ns=pick(self.ts_ns), cpu=pick(self.cpu),
                       retval=None if self.retval is None else pick(self.retval))

    def json_bytes(self, realtime_offset_ns: int | None = None) -> bytes:
        """The events as :meth:`Event.to_json` writes them, a line each in UTF-8, in the group's order."""
        if not self.ts_ns:
            return b""
        realtime = "" if realtime_offset_ns is None else '"realtime_ns": %d, '
        times = [self.ts_ns] if realtime_offset_ns is None else [self.ts_ns, [ts + realtime_offset_ns
                                                                               for ts in self.ts_ns]]
        args = ", ".join(f"{json_string(name)}: " + ("%d" if name in self.columns
                                                     else encode_json(self.fixed[name]).replace("%", "%%"))
                         for name in self.names)
        head = (f'{{"probe": {json_string(self.probe)}, "pid": {self.pid}, "tid": {self.tid}, '
                f'"comm": {json_string(self.comm)}, ').replace("%", "%%")
        retval = ', "retval": %d' if self.retval is not None else ""
        template = (head + f'"ts_ns": %d, {realtime}"cpu": %d, "ip": {self.ip}, "args": {{{args}}}{retval}}}\n'
                    ).encode()
        varying = [self.columns[name] for name in self.names if name in self.columns]
        values = tuple(itertools.chain.from_iterable(
            zip(*times, self.cpu, *varying, *([self.retval] if self.retval is not None else []))))
        return template * len(self.ts_ns) % values


@dataclass
class EventColumns:
    """The events of one poll: groups in columns, and single events."""

    groups: list[Group] = field(default_factory=list)
    single: list[Event] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(group.ts_ns) for group in self.groups) + len(self.single)

    def events(self) -> list[Event]:
        """Every event as an :class:`Event`, in time order (stable: one thread's keep their order)."""
        events = [event for group in self.groups for event in group.events()]
        return sorted(events + self.single, key=_BY_TIME)

    def json_lines(self, realtime_offset_ns: int | None = None) -> bytes:
        """Every event as a JSON line in UTF-8, in time order: what writing :meth:`events` one by one would give
        (with ``realtime_offset_ns``, each with its wall-clock time: :meth:`Event.to_json`)."""
        offset = realtime_offset_ns
        if not self.groups:
            return "".join(event.to_json(offset) + "\n" for event in sorted(self.single, key=_BY_TIME)).encode()
        if len(self.groups) == 1 and not self.single:
            return self.groups[0].json_bytes(offset)
        lines = [line for group in self.groups for line in group.json_bytes(offset).split(b"\n")[:-1]]
        lines += [event.to_json(offset).encode() for event in self.single]
        import numpy  # loaded by whoever made the groups (the ring reader): not for single events

        times = numpy.concatenate([numpy.asarray(group.ts_ns, numpy.int64) for group in self.groups]
                                  + [numpy.fromiter((event.ts_ns for event in self.single), numpy.int64)])
        return b"\n".join([lines[i] for i in numpy.argsort(times, kind="stable").tolist()]) + b"\n"

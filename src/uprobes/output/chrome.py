"""Events as Chrome trace-event JSON, the format https://ui.perfetto.dev and chrome://tracing open.

An entry probe and a return probe of one function (the same file and offset) make slices: each hit of the
entry begins one ("B", with the entry's arguments and, with ``trace --stack``, its stack), the return ends it
("E", with ``retval``) on the same thread, so calls nest as they were made. Every other probe's hit is an
instant event ("i", thread scope) with its arguments: a function probed without its return, a return without
its entry, an SDT marker, an instruction. Each process and thread is named by its ``comm`` ("M" events,
written when first seen and again when the name changes, as at an exec). Times are CLOCK_MONOTONIC in
microseconds, written to the nanosecond.

Where the hits say less than a call tree, the document stays balanced, and Perfetto renders what was seen:

- a return whose call began before the trace did (or whose entry was lost) is an instant event, never an
  unmatched "E";
- a return of a call that has calls still open above it (they left by ``longjmp`` or an exception, so their
  returns never came) ends those too, at the same time, with ``"returned": false``;
- an entry 64 calls deep in slices is an instant: neither engine reports the return of a call nested deeper
  (the kernel's limit), and a slice that never ends would take the next return of its function (calls whose
  return probes are on the function's exits, ``--return-mode insn``, have no such limit and do not count);
- calls still open when the trace ends are left open: Perfetto draws them to the end of the trace as "Did not
  end" (chrome://tracing as "Did Not Finish"), which is what is known of them; closing them at the last event
  would invent a return.

The events are written as they come: the document is one object, ``{"traceEvents": [...], ...}``, finished by
:meth:`ChromeTraceWriter.close`, and what is kept is the calls open in each thread and the names written.
``displayTimeUnit`` comes after the events: viewers only show times in it, but some earlier versions of
Perfetto's trace processor read the timestamps in that unit when it came first. A run of ``calls 1`` with
``uprobe:calls:work i=%di:s32`` and ``uretprobe:calls:work``::

    {"traceEvents": [
    {"ph": "M", "name": "thread_name", "pid": 15653, "tid": 15653, "args": {"name": "calls"}},
    {"ph": "M", "name": "process_name", "pid": 15653, "tid": 15653, "args": {"name": "calls"}},
    {"ph": "B", "name": "work", "pid": 15653, "tid": 15653, "ts": 70746699206.966, "args": {"i": 0}},
    {"ph": "E", "name": "work", "pid": 15653, "tid": 15653, "ts": 70746699217.294, "args": {"retval": 2}}
    ], "displayTimeUnit": "ns", "otherData": {"clock": "CLOCK_MONOTONIC", "lost_events": 0}}
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, TextIO

from .columns import EventColumns
from .event import ArgValue, Event, json_string

if TYPE_CHECKING:
    from ..probes.resolve import Probe

__all__ = ["ChromeTraceWriter"]

# Both engines keep the returns of 64 nested calls per thread, as the kernel does (its MAX_URETPROBE_DEPTH;
# engines/ptrace/returns.py): a call deeper than that never reports its return.
_RETURN_DEPTH = 64

_encode = json.JSONEncoder(ensure_ascii=False, check_circular=False, allow_nan=False).encode


def _json(value: dict) -> str:
    """``value`` as JSON, where NaN and infinities (a float marker argument may be one) are strings."""
    try:
        return _encode(value)
    except ValueError:
        return _encode(_finite(value))


def _finite(value: ArgValue | dict) -> ArgValue | dict:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {name: _finite(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _micros(ts_ns: int) -> str:
    """Nanoseconds as microseconds, written exactly (a float would round the nanoseconds of a large time)."""
    return f"{ts_ns // 1000}.{ts_ns % 1000:03d}"


def _functions(probes: list[Probe]) -> list[int | None]:
    """For each probe, the index of the entry probe whose calls its hits begin or end; None: an instant."""
    entries: dict[tuple[str, int], int] = {}
    returns: dict[tuple[str, int], list[int]] = {}
    for index, probe in enumerate(probes):
        if probe.site is not None:  # a marker's site is not a function's entry, whatever its offset
            continue
        # The first entry and return probe of a function pair up (a return probe on the function's exits: all
        # of them); a second probe there would double its calls.
        if not probe.is_return:
            entries.setdefault((probe.path, probe.offset), index)
            continue
        first = returns.setdefault((probe.path, probe.entry_offset), [index])
        if first[0] != index and probe.exit is not None and probes[first[0]].spec == probe.spec:
            first.append(index)
    functions: list[int | None] = [None] * len(probes)
    for key, entry in entries.items():
        functions[entry] = entry if key in returns else None
        for index in returns.get(key, ()):
            functions[index] = entry
    return functions


def _args(event: Event, retval: bool, with_stack: bool = True) -> dict:
    """The event's arguments, with its return value, failed fetches and stack where it has them."""
    extra: dict = {"retval": event.retval} if retval else {}
    if event.errors:
        extra["errors"] = event.errors
    if with_stack and event.stack:  # trace --stack
        extra["stack"] = event.stack
    return event.args | extra if extra else event.args


class ChromeTraceWriter:
    """Writes events as one Chrome trace-event JSON document; :meth:`close` finishes it."""

    def __init__(self, out: TextIO, probes: list[Probe]) -> None:
        """``probes``: the run's, by index, a list that may grow as the run goes (probes in objects mapped
        later)."""
        self.out = out
        self._probes = probes
        self._learn_probes()
        self._kept: dict[int, int] = {}  # tid -> its calls in flight whose return addresses an engine keeps
        self._open: dict[int, list[int]] = {}  # tid -> its calls in flight (entry probe indexes), innermost last
        self._thread_names: dict[int, str] = {}
        self._process_names: dict[int, str] = {}
        self._lost = 0
        self._separator = "\n"
        out.write('{"traceEvents": [')

    def _learn_probes(self) -> None:
        probes = self._probes
        self._functions = _functions(probes)
        # functions whose returns are probed on their exits: no return address is kept for them, so no limit
        self._on_exits = {self._functions[i] for i, probe in enumerate(probes) if probe.exit is not None}
        self._names = [json_string(probe.name) for probe in probes]

    def event(self, event: Event) -> None:
        """Write one event: a slice's beginning or end, or an instant."""
        if event.probe_index >= len(self._names):
            self._learn_probes()
        if event.comm:  # "": the kernel could not name a thread that was gone
            self._name_thread(event)
        function = self._functions[event.probe_index]
        if function is None or not self._slice(function, event):
            self._write("i", json_string(event.probe), event, _args(event, event.is_return))

    def columns(self, events: EventColumns) -> None:
        """Many events at once, in time order."""
        for event in events.events():
            self.event(event)

    def lost(self, count: int) -> None:
        """How many events were lost: written at the end, in ``otherData``."""
        self._lost = count

    def close(self) -> None:
        """Finish the document: calls still open stay open (see the module's docstring)."""
        other = _json({"clock": "CLOCK_MONOTONIC", "lost_events": self._lost})
        self.out.write(f'\n], "displayTimeUnit": "ns", "otherData": {other}}}\n')

    def _slice(self, function: int, event: Event) -> bool:
        """Begin or end a slice of a call of ``function``; False when the hit is to be an instant instead."""
        calls = self._open.get(event.tid)
        if calls is None:
            calls = self._open[event.tid] = []
        kept = function not in self._on_exits
        if not event.is_return:
            if kept and self._kept.get(event.tid, 0) >= _RETURN_DEPTH:  # its return will not come
                return False
            calls.append(function)
            self._kept[event.tid] = self._kept.get(event.tid, 0) + kept
            self._write("B", self._names[function], event, _args(event, False))
            return True
        if not calls or calls[-1] != function and function not in calls:  # began before the trace, or too deep
            return False
        while (innermost := calls.pop()) != function:  # left without returning
            self._kept[event.tid] -= innermost not in self._on_exits
            self._write("E", self._names[innermost], event, {"returned": False})
        self._kept[event.tid] -= kept
        # An "E" event's arguments are added to its slice's: the stack at the return (the caller's) would clash
        # with the entry's, which says more.
        self._write("E", self._names[function], event, _args(event, True, with_stack=False))
        return True

    def _write(self, phase: str, name: str, event: Event, args: dict) -> None:
        scope = ', "s": "t"' if phase == "i" else ""
        self.out.write(f'{self._separator}{{"ph": "{phase}", "name": {name}, "pid": {event.pid}, '
                       f'"tid": {event.tid}, "ts": {_micros(event.ts_ns)}{scope}, "args": {_json(args)}}}')
        self._separator = ",\n"

    def _name_thread(self, event: Event) -> None:
        """Metadata naming the event's thread, and its process (after its main thread, once that is seen)."""
        pid, tid, comm = event.pid, event.tid, event.comm
        if self._thread_names.get(tid) != comm:
            self._thread_names[tid] = comm
            self._metadata("thread_name", pid, tid, comm)
        if (tid == pid or pid not in self._process_names) and self._process_names.get(pid) != comm:
            self._process_names[pid] = comm
            self._metadata("process_name", pid, tid, comm)

    def _metadata(self, what: str, pid: int, tid: int, name: str) -> None:
        self.out.write(f'{self._separator}{{"ph": "M", "name": "{what}", "pid": {pid}, "tid": {tid}, '
                       f'"args": {{"name": {json_string(name)}}}}}')
        self._separator = ",\n"

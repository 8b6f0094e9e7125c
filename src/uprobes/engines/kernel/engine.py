"""The kernel engine: our probes as the kernel's own uprobe events, read from perf ring buffers.

Probe points become events in a group owned by this run (``uprobes_<pid>_<start>_<n>``). To trace, the probes
of one kind (entry or return) whose arguments have the same names and types are appended to one event, each
with an immediate argument ``__probe`` holding its index, which every record carries: one event, and one set
of perf descriptors, for many probes, and one wait for the kernel's RCU grace periods when it goes, not one
per probe (``../shared/notes/kernel-scale.md``). To count, each probe is an event of its own, whose perf
counters are its exact hits, up to :data:`_COUNTED_ALONE` probes; beyond, they share events as to trace, each
hit a record of its tag alone, counted by tag in bulk (a record the kernel drops for a full buffer is counted
in :attr:`KernelEngine.lost`, never silently). Events are opened through ``perf_event_open`` (which is when the kernel
registers the uprobes and raises a marker's semaphore through ``REF_CTR_OFFSET``), on every thread of a
process and what it starts when a pid is given, system-wide otherwise. The probes in an object a traced
process maps later (``later``), told by perf's records of its mappings, are events of their own, opened on
each process that maps it (a child that forked since inherits them). Probes on instructions the kernel
would refuse, or run wrongly, are refused before anything is defined. Everything we defined is deleted when
the engine closes.
"""

from __future__ import annotations

import functools
import operator
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy

from ...consumers import Consumer
from ...errors import KernelEngineError, ProcessError, UprobesError
from ...output.columns import EventColumns, Group
from ...output.event import Event
from ...probes.fetchargs import (NULL_POINTER, Comm, Deref, FetchArg, FetchType, Immediate, ImmediateString,
                                  Register, RetVal, StackPointer)
from ...probes.markerargs import kernel_fetchable, kernel_limitation
from ...probes.resolve import Probe
from ...proc.maps import Mapping, read_maps
from ...proc.status import has_ended
from ...stacks import INCOMPLETE, StackLimits, StackReader
from ...x86_64.unwind import PERF_REGISTER_BITS, RSP, StackCopy
from ..base import Engine, LaterProbes, uninterrupted
from .eventformat import EventFormat, Field, FieldKind, load_event_format
from .instructions import refuse_unprobeable
from .perfbuf import Samples, TaskChange, TaskRecord, TracepointReader
from .tracefs import DefinedEvent, Tracefs, new_group

__all__ = ["KernelEngine"]

# Fetched with every hit: the thread's name while it is alive, and a return probe's value.
_COMM_ARG = FetchArg("__comm", True, Comm(), FetchType("string"))
_RETVAL_ARG = FetchArg("__retval", True, RetVal(), FetchType("s64"))
_EXIT_RETVAL_ARG = FetchArg("__retval", True, Register("ax"), FetchType("s64"))  # at a ret of the function
_TAG = "__probe"  # the immediate argument that says which of an event's probes a record is of
_HIDDEN_FIELDS = frozenset({"__comm", "__retval", _TAG, "__pad", "__probe_ip", "__probe_func", "__probe_ret_ip"})
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
# Beyond this many probes closing takes seconds (the kernel waits for an RCU grace period as each uprobe
# goes, some 70 ms), so the user is told why the run does not end at once.
_SAY_REMOVING = 50
# Up to this many probes to count, each is an event of its own (exact counters, nothing to read per hit, a
# hit some 15% cheaper); more would take a user-visible while to remove, each one (as above).
_COUNTED_ALONE = 4
# To count by tag, an entry's record gets 8 bytes where a return's has its return address: every record then
# has one layout (and one size), read as one array.
_PAD_ARG = FetchArg("__pad", True, Immediate(0), FetchType("u64"))
# The user registers an unwinder needs, by DWARF number, in the order perf writes them (their bits' order).
_PERF_REGISTER_ORDER = sorted(PERF_REGISTER_BITS, key=PERF_REGISTER_BITS.get)
_PERF_REGISTERS = sum(1 << bit for bit in PERF_REGISTER_BITS.values())
_STACK_PAGES = 1024
_BY_TIME = operator.attrgetter("time_ns")
# Where a function with a return probe keeps its return address, and what it is, at its entry: the kernel puts
# its trampoline there, and a stack read through the function needs the address it replaced.
_SLOT_ARG = FetchArg("__slot", True, StackPointer(), FetchType("u64"))
_CALLER_ARG = FetchArg("__caller", True, Deref(0, StackPointer()), FetchType("u64"))
# Processes that hold the probes of objects mapped later, kept before those that ended are looked for.
_HOLDERS_KEPT = 1024


def _tag(index: int) -> FetchArg:
    """The immediate argument that says a record is of probe ``index``."""
    return FetchArg(_TAG, True, Immediate(index), FetchType("u32"))


@dataclass
class _Attached:
    index: int
    probe: Probe
    event: DefinedEvent
    format: EventFormat

    @functools.cached_property
    def positions(self) -> tuple[tuple[tuple[str, int], ...], int, int, int | None]:
        """Where in a record's values (:meth:`EventFormat.unpack`) the arguments are, by name, and the
        thread's name, the probed address and the return value."""
        index = {f.name: i for i, f in enumerate(self.format.fields)}
        args = tuple((name, i) for name, i in index.items()
                     if name not in _HIDDEN_FIELDS and not name.startswith("common_"))
        ip = index["__probe_func" if self.probe.replaces_return else "__probe_ip"]
        return args, index["__comm"], ip, index.get("__retval")

    @functools.cached_property
    def constants(self) -> dict[str, str]:
        """The probe's string constants (``\\"STR"``), by name: given by us, not the kernel (``kernel_fetchable``)."""
        return {arg.name: arg.source.text for arg in self.probe.fetchargs if isinstance(arg.source, ImmediateString)}

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        """Its arguments' names, in the order asked for."""
        return tuple(arg.name for arg in self.probe.fetchargs)

    @functools.cached_property
    def left_out(self) -> dict[str, str]:
        """The marker operands tracefs cannot fetch, by name: each event gives them as None, with this reason."""
        return {arg.name: f"the kernel engine cannot fetch it: {kernel_limitation(arg)}"
                for arg in self.probe.fetchargs if kernel_limitation(arg)}


@dataclass
class _Event:
    """One tracefs event of ours, and its probes by their ``__probe`` tag."""

    defined: DefinedEvent
    format: EventFormat
    probes: dict[int, _Attached]
    filter: str | None = None  # the predicate of its probes, as the kernel applies it

    @functools.cached_property
    def fields(self) -> dict[str, Field]:
        """Its records' fields, by name."""
        return {f.name: f for f in self.format.fields}

    @functools.cached_property
    def tag(self) -> int:
        """Where a record's values (:meth:`EventFormat.unpack`) hold its probe's tag."""
        return self.format.fields.index(self.fields[_TAG])

    @functools.cached_property
    def return_address(self) -> tuple[int, int]:
        """The entries of functions with a return probe: where their values hold the stack slot of the return
        address, and the address."""
        return tuple(self.format.fields.index(self.fields[arg.name]) for arg in (_SLOT_ARG, _CALLER_ARG))

    @property
    def tag_offset(self) -> int:
        """Where a raw record holds its probe's tag."""
        return self.fields[_TAG].offset

    @functools.cached_property
    def in_columns(self) -> bool:
        """Whether its records can be read as arrays: their arguments are integers that need no retyping,
        every one the kernel fetched, and a return's value is in them (not a return probe's on a tail call)."""
        return all(not a.probe.retyped and not a.left_out and a.probe.reports_retval == a.probe.is_return
                   and all(self.fields[name].kind is FieldKind.INT for name, _ in a.positions[0])
                   for a in self.probes.values())

    @functools.cached_property
    def layout(self) -> _Layout:
        """Where its records hold the probed address, the thread's name, each argument and a return probe's
        value (:attr:`in_columns`)."""
        fields = self.fields
        args = next(iter(self.probes.values())).positions[0]
        retval = fields.get(_RETVAL_ARG.name)
        return _Layout(fields.get("__probe_func", fields.get("__probe_ip")).offset, fields["__comm"].offset,
                       tuple(name for name, _ in args), tuple((name, fields[name].offset, _numpy_type(fields[name]))
                                                              for name, _ in args),
                       retval.offset if retval else None)


@dataclass(frozen=True)
class _Layout:
    ip: int
    comm: int
    names: tuple[str, ...]
    args: tuple[tuple[str, int, str], ...]  # name, offset, numpy type
    retval: int | None  # a return probe's: its value, an s64


def _numpy_type(field: Field) -> str:
    return f"<{'i' if field.signed else 'u'}{field.size}"


@dataclass
class _LaterObject:
    """The events of the probes ``later`` gave in an object mapped after attach, and the processes that have
    them: each since when (CLOCK_MONOTONIC ns), opened on it or inherited at its fork."""

    path: str
    event_ids: list[int]
    holders: dict[int, int]


def _naming(probes: list[_Attached], most: int = 3) -> str:
    """The probes of one event, for an error about it: the first few of many."""
    named = " or ".join(f"probe {a.probe.name} at {a.probe.path}:{a.probe.offset:#x}" for a in probes[:most])
    return named + (f" (or {len(probes) - most} more probes of that event)" if len(probes) > most else "")


def _signature(is_return: bool, fetchargs: tuple[FetchArg, ...], alone: bool, index: int) -> tuple:
    """What probes share to be appended to one event (the kernel wants the same kind, and the same name and
    type for each argument); ``alone``: each probe is its own."""
    if alone:
        return (index,)
    return (is_return,) + tuple((arg.name, arg.type_text) for arg in kernel_fetchable(fetchargs))


class KernelEngine(Engine):
    """Probes through tracefs and perf. Use as a context manager so that every event is deleted."""

    name = "kernel"
    unwinder_meets_stack = True
    counts_filtered = True

    def __init__(self, pages_per_cpu: int = 256, counted_alone: int = _COUNTED_ALONE) -> None:
        """``pages_per_cpu``: each perf buffer's size; ``counted_alone``: to count up to this many probes,
        each is an event of its own."""
        self.tracefs = Tracefs()
        self.group = new_group()
        self._pages = pages_per_cpu
        self.undelivered: list[EventColumns] = []
        self._counted_alone = counted_alone
        self._events: dict[int, _Event] = {}  # by tracepoint id
        self._records = numpy.zeros(0, numpy.int64)  # records read, by probe index (one for each probe)
        self._defined: list[DefinedEvent] = []
        self._reader: TracepointReader | None = None
        self._counts: dict[int, int] = {}  # tracepoint id -> hits, as last read: kept once closed
        self._lost = 0
        self._counting = False
        self._by_tag = False  # counting, each hit a record of its probe's tag
        self._stacks: StackReader | None = None
        self._returns_events: set[int] = set()  # with stacks: the entries of the functions with a return probe
        self._pending: dict[int, dict[int, int]] = {}  # tid -> the return addresses the kernel replaced, by slot
        self._later: LaterProbes | None = None
        self._follow_forks = True
        self._offered: set[tuple[int, int]] = set()  # the objects (device, inode) later was asked about
        self._later_objects: dict[tuple[int, int], _LaterObject] = {}  # those with probes placed
        self._holders_kept = _HOLDERS_KEPT
        self._notices: list[str] = []

    @property
    def lost(self) -> int:
        """Hits the kernel dropped because a ring buffer was full, exactly (not only those reported so far)."""
        self._read_counters()
        return self._lost

    def attach(self, probes: list[Probe], pid: int | Sequence[int] | None, *, counting: bool = False,
               held: bool = False, follow_forks: bool = True, consumers: dict[int, list[Consumer]] | None = None,
               stacks: StackLimits | None = None, later: LaterProbes | None = None) -> None:
        """Define every probe and start collecting its hits (of every thread of ``pid``, or of each process of
        a sequence, and what they start; or of everyone).

        ``counting`` only counts hits (read them with :meth:`hit_counts`): no events, none lost. ``held``
        (a launched command held before exec): the events are enabled by its exec, so nothing the child runs
        before it (our own code) is counted. ``follow_forks`` False: the threads, not the forked children.
        ``stacks``: perf copies the user registers and stack with each hit, unwound here. ``later``: perf
        reports the executable mappings and forks of the processes, read as :meth:`poll` reads the hits; the
        probes in an object mapped later are placed then (the hits before are missed), in the process that
        maps it and in those that map it afterwards, unless they inherited them at a fork.
        """
        if consumers:
            raise KernelEngineError("Python handlers run on the ptrace engine, in the traced process's stops")
        if later is not None and pid is None:
            raise KernelEngineError("probes in objects mapped later are placed in the processes traced, not "
                                    "system-wide")
        self._counting = counting
        # a probe with a predicate is counted alone: its counter counts what its filter keeps; probes to come
        # (later) may be many, each an event counted alone that takes its while to remove: they are counted by tag
        self._by_tag = counting and (len(probes) > self._counted_alone or later is not None) and not any(
            p.predicate for p in probes)
        self._stacks = StackReader(stacks.depth) if stacks is not None and not counting else None
        self._pending = {}
        self._later, self._follow_forks = later, follow_forks
        self._define_probes(probes)
        # The kernel inserts the breakpoints when the perf events open; the reader explains its refusals.
        # A held child is still our own code until it execs: its events start at the exec, not before.
        # Samples with stacks are large: 4 MiB a CPU hold 512 of 8 KiB, while the first stacks read symbols.
        pages = max(self._pages, _STACK_PAGES) if self._stacks else self._pages
        self._reader = TracepointReader(list(self._events), pid, pages=pages, sampling=not counting or self._by_tag,
                                        follow_forks=follow_forks, enable_on_exec=held, raw_only=self._by_tag,
                                        user_stack=(_PERF_REGISTERS, stacks.size) if self._stacks else None,
                                        tracking=self._stacks is not None or later is not None,
                                        **self._opening(list(self._events)))
        try:
            if not held:
                self._reader.enable()
        except OSError as exc:
            raise KernelEngineError(f"cannot enable the uprobe events: {exc.strerror}") from None

    def add_process(self, pid: int) -> None:
        """Collect the hits of running process ``pid`` (and what it starts) too: its own perf events, so the
        kernel places the breakpoints in its memory, and counts its hits, as for the processes of :meth:`attach`
        (and of the objects it maps, as for one mapped later)."""
        if self._reader is None:
            raise KernelEngineError("add a process to an attached engine")
        try:
            self._reader.add_process(pid)
        except OSError as exc:
            raise KernelEngineError(f"cannot trace process {pid}: {exc.strerror}") from None
        if self._later is not None:
            for later in self._later_objects.values():
                later.holders.pop(pid, None)  # of a process that had its pid before
            try:
                mappings = read_maps(pid)
            except ProcessError:  # it has ended already
                return
            for mapping in mappings:
                self._mapped(pid, mapping)

    def _define_probes(self, probes: list[Probe]) -> list[int]:
        """Define ``probes``, indexed from the probes defined before, in new events of ours as the run wants
        them (and with stacks, the entries of the functions with a return probe); the events' tracepoint ids.
        The events defined before are left alone: perf descriptors may hold them."""
        first = len(self._records)
        self._records = numpy.concatenate([self._records, numpy.zeros(len(probes), numpy.int64)])
        refuse_unprobeable(probes)
        events: dict[tuple, _Event] = {}
        for index, probe in enumerate(probes, first):
            event_filter = probe.kernel_filter
            if self._by_tag:  # the tag where every record has it; the arguments a filter reads after it
                fetchargs = (() if probe.replaces_return else (_PAD_ARG,)) + (_tag(index),) + (
                    kernel_fetchable(probe.fetchargs) if event_filter else ())
            else:
                fetchargs = probe.fetchargs + (_COMM_ARG,) + (
                    (_RETVAL_ARG,) if probe.replaces_return else (_EXIT_RETVAL_ARG,) if probe.reports_retval
                    else ()) + (_tag(index),)
            signature = _signature(probe.replaces_return, fetchargs, self._counting and not self._by_tag, index)
            self._define(events, signature + (event_filter,), index, probe, fetchargs, event_filter)
        if self._stacks is not None:
            returning = {(p.path, p.offset): (index, p) for index, p in enumerate(probes, first) if p.replaces_return}
            for index, probe in returning.values():  # never counted
                entry = replace(probe, is_return=False, event=probe.event.removesuffix("__return"))
                self._define(events, ("returns",), index, entry, (_SLOT_ARG, _CALLER_ARG, _tag(index)))
        if self._by_tag and len({event.tag_offset for event in (*self._events.values(), *events.values())}) > 1:
            raise KernelEngineError("the kernel laid out our events' records in an unexpected way; "
                                    "count fewer probes at once")
        self._events.update((event.format.id, event) for event in events.values())
        if ("returns",) in events:
            self._returns_events.add(events["returns",].format.id)
        return [event.format.id for event in events.values()]

    def _opening(self, event_ids: list[int]) -> dict:
        """How the reader opens the events ``event_ids``: their names (for an error), filters and those without
        stacks."""
        return {"names": {event_id: _naming(list(self._events[event_id].probes.values())) for event_id in event_ids},
                "filters": {event_id: self._events[event_id].filter for event_id in event_ids
                            if self._events[event_id].filter},
                "without_stack": self._returns_events & set(event_ids)}

    def notices(self) -> list[str]:
        notices, self._notices = self._notices, []
        return notices

    def _define(self, events: dict[tuple, _Event], signature: tuple, index: int, probe: Probe,
                fetchargs: tuple[FetchArg, ...], event_filter: str | None = None) -> None:
        """Define ``probe`` (its record tagged ``index`` among ``fetchargs``) in the event of its ``signature``,
        the event too if it is new."""
        event = events.get(signature)
        name = event.defined.event if event else f"e{len(self._defined)}_{probe.event}"[:63]
        kernel_probe = replace(probe, group=self.group, event=name, fetchargs=fetchargs)
        defined = self.tracefs.define(kernel_probe.uprobe_events_line(), probe.spec)
        if event is None:
            self._defined.append(defined)
            event_format = load_event_format(self.tracefs.root, defined.group, defined.event)
            event = events[signature] = _Event(defined, event_format, {}, event_filter)
        event.probes[index] = _Attached(index, probe, defined, event.format)

    def hit_counts(self) -> list[int]:
        """Hits so far per probe, in the order given to :meth:`attach` (then those ``later`` gave), as the
        kernel's counters say (after :meth:`close`, the final counts); a probe that shares its event with others:
        the records of its hits read so far."""
        self._read_counters()
        if self._by_tag:
            self._tally()
            return self._records.tolist()
        hits = self._records.tolist()
        for event_id, event in self._events.items():
            if len(event.probes) == 1 and event_id not in self._returns_events:
                (attached,) = event.probes.values()
                hits[attached.index] = self._counts.get(event_id, 0)
        return hits

    def _read_counters(self) -> None:
        if self._reader is not None:
            if not self._by_tag:  # counted by tag: the records say it all
                self._counts = self._reader.counts()
            self._lost = self._reader.count_lost()

    def _tally(self) -> None:
        """Read the records of a run counting by tag (every event has its tag at one offset; with no event yet,
        probes to come later, the buffers hold only what the processes map)."""
        if self._reader is not None:
            tag_offset = next(iter(self._events.values())).tag_offset if self._events else 0
            self._count_records(self._reader.read_field(tag_offset, 4))

    def _count_records(self, tags: numpy.ndarray) -> None:
        """Count records read, by the probe index each one's tag holds."""
        self._records += numpy.bincount(tags[tags < len(self._records)], minlength=len(self._records))

    def poll(self, timeout: float) -> list[Event]:
        """Events that arrived, waiting up to ``timeout`` seconds for the first."""
        return self.poll_columns(timeout).events()

    @uninterrupted
    def poll_columns(self, timeout: float) -> EventColumns:
        """:meth:`poll`, in columns where an event's records hold integers only (what a writer formats in
        bulk): each such event's records read as arrays, field by field, a group per probe and thread."""
        reader = self._reader
        if reader is None or not reader.poll(timeout):
            return EventColumns()
        ended = self._ended_holders()  # before the buffers are read: every record of theirs is read then
        if self._by_tag:
            self._tally()
            columns = EventColumns()
        else:
            samples = reader.read_samples()
            columns = (EventColumns(single=self._stacked_events(samples, self._task_records()))
                       if self._stacks is not None else self._columns(samples))
        for record in self._task_records():  # with stacks, taken in order with the samples already
            self._task_changed(record)
        for later in self._later_objects.values():
            for pid in ended:
                later.holders.pop(pid, None)
        return columns

    def _task_records(self) -> list[TaskRecord]:
        """What the traced processes did to their code, since the last call, in time order."""
        records, self._reader.task_records = self._reader.task_records, []
        return sorted(records, key=_BY_TIME)

    def _columns(self, samples: Samples) -> EventColumns:
        """The events of ``samples``: those of each event whose records hold integers only as groups, in columns."""
        columns = EventColumns()
        for event_id in numpy.unique(samples.event_id).tolist():
            event = self._events.get(event_id)
            if event is None:
                continue
            rows = numpy.flatnonzero(samples.event_id == event_id)
            tags = samples.field(rows, event.tag_offset, "<u4")
            known = numpy.isin(tags, numpy.fromiter(event.probes, numpy.int64, len(event.probes)))
            rows, tags = rows[known], tags[known]
            self._count_records(tags)
            if event.in_columns:
                columns.groups += self._groups(event, samples, rows, tags)
            else:
                columns.single += self._events_one_by_one(event, samples, rows)
        return columns

    def _groups(self, event: _Event, samples: Samples, rows: numpy.ndarray, tags: numpy.ndarray) -> list[Group]:
        """The events of ``rows`` (all of ``event``, whose records hold integers and the thread's name): a
        group per probe, thread, address and name, each in time order."""
        if not len(rows):
            return []
        layout = event.layout
        ips = samples.field(rows, layout.ip, "<u8")
        location = samples.field(rows, layout.comm, "<u4")  # __data_loc: length << 16 | offset
        name_bytes = samples.field(rows, location & 0xFFFF, "S16").view(numpy.uint8).reshape(len(rows), 16)
        name_bytes[numpy.arange(16) >= (location >> 16).astype(numpy.int64)[:, None] - 1] = 0  # from the NUL on
        names = name_bytes.view("S16")[:, 0]  # no name (the thread was gone): b""
        values = {name: samples.field(rows, offset, dtype) for name, offset, dtype in layout.args}
        retvals = samples.field(rows, layout.retval, "<i8") if layout.retval is not None else None
        pids, tids = samples.pid[rows], samples.tid[rows]
        order = numpy.lexsort((names, ips, tids, pids, tags))  # stable: each group stays in time order
        keys = (tags[order], pids[order], tids[order], ips[order], names[order])
        ends = numpy.flatnonzero(numpy.any([key[1:] != key[:-1] for key in keys], axis=0)) + 1
        groups = []
        for group in numpy.split(order, ends):
            first = int(group[0])
            attached = event.probes[int(tags[first])]
            groups.append(Group(attached.probe.name, attached.index, int(pids[first]), int(tids[first]),
                                names[first].decode("utf-8", "replace"),
                                attached.probe.reported_address(int(ips[first])),
                                tuple(name for name in attached.names if name not in attached.left_out),
                                attached.constants,
                                {name: column[group].tolist() for name, column in values.items()},
                                samples.time_ns[rows[group]].tolist(), samples.cpu[rows[group]].tolist(),
                                None if retvals is None else retvals[group].tolist()))
        return groups

    def _events_one_by_one(self, event: _Event, samples: Samples, rows: numpy.ndarray) -> list[Event]:
        events = []
        data = samples.data
        for row, at, size in zip(rows.tolist(), samples.raw_at[rows].tolist(), samples.raw_size[rows].tolist()):
            values, errors = event.format.unpack(data[at:at + size])
            events.append(self._event(event.probes[values[event.tag]], int(samples.pid[row]), int(samples.tid[row]),
                                      int(samples.time_ns[row]), int(samples.cpu[row]), values, errors))
        return events

    def _stacked_events(self, samples: Samples, records: list[TaskRecord]) -> list[Event]:
        """Every sample's event with its stack, in time order, and what the processes did to their code
        (``records``, in time order) at its time: the entries of functions with a return probe (their return
        addresses) and the mappings come before the stacks that pass through them."""
        events, tags = [], []
        data = samples.data
        done = 0
        for row, event_id, tid, time_ns, at, size in zip(range(len(samples.event_id)), samples.event_id.tolist(),
                                                         samples.tid.tolist(), samples.time_ns.tolist(),
                                                         samples.raw_at.tolist(), samples.raw_size.tolist()):
            while done < len(records) and records[done].time_ns <= time_ns:
                self._task_changed(records[done])
                done += 1
            event = self._events.get(event_id)
            if event is None:
                continue
            values, errors = event.format.unpack(data[at:at + size])
            attached = event.probes.get(values[event.tag])
            if attached is None:
                continue
            if event_id in self._returns_events:
                slot, caller = (values[i] for i in event.return_address)
                # A slot still pending is a tail call's: the kernel's trampoline is there already, and the
                # address it replaced is the one kept.
                self._pending.setdefault(tid, {}).setdefault(slot, caller)
                continue
            tags.append(attached.index)
            events.append(self._event(attached, int(samples.pid[row]), tid, time_ns, int(samples.cpu[row]), values,
                                      errors))
            events[-1].stack = self._stack(samples, row, events[-1].pid, tid)
        for record in records[done:]:
            self._task_changed(record)
        self._count_records(numpy.array(tags, numpy.int64))
        return events

    def _task_changed(self, record: TaskRecord) -> None:
        """What a process did to its code: what its stacks are read against, and where later probes go."""
        if self._stacks is not None:
            self._stacks_follow(record)
        if self._later is None:
            return
        if record.change is TaskChange.MAPPED and record.mapping.executable and record.mapping.file_backed:
            self._mapped(record.pid, record.mapping)
        elif record.change is TaskChange.FORKED and self._follow_forks:
            self._forked(record.pid, record.parent, record.time_ns)

    def _stacks_follow(self, record: TaskRecord) -> None:
        if record.change is TaskChange.MAPPED:
            self._stacks.mapped(record.pid, record.mapping)
        elif record.change is TaskChange.EXEC:
            self._stacks.exec(record.pid)
        else:  # a fork: the child has its parent's code, and its pending returns (uprobe_copy_process)
            self._stacks.forked(record.pid, record.parent)
            if record.parent_tid in self._pending:
                self._pending[record.tid] = dict(self._pending[record.parent_tid])

    def _mapped(self, pid: int, mapping: Mapping) -> None:
        """Process ``pid`` maps ``mapping`` (executable, of a file): the first time its object is seen, ``later``
        is asked for the probes there, which are defined; their events are opened on each process that maps
        it and has them not yet."""
        key = mapping.device, mapping.inode
        if key not in self._offered:
            self._offered.add(key)
            probes = self._later(pid, mapping.path)
            if probes and (event_ids := self._define_later(probes, mapping.path)) is not None:
                self._later_objects[key] = _LaterObject(mapping.path, event_ids, {})
        later = self._later_objects.get(key)
        if later is not None and pid not in later.holders:
            self._open_later(later, pid)

    def _define_later(self, probes: list[Probe], path: str) -> list[int] | None:
        """Define the probes ``later`` gave in ``path`` (they take the next indexes whatever comes of them):
        their events' tracepoint ids; None, and a notice, where they cannot be (nothing of theirs is left)."""
        defined = len(self._defined)
        try:
            return self._define_probes(probes)
        except (UprobesError, OSError) as exc:
            while len(self._defined) > defined:
                self.tracefs.delete(self._defined.pop())
            self._notices.append(f"the probes in {path} are left out: {exc}")
            return None

    def _open_later(self, later: _LaterObject, pid: int) -> None:
        """Open the events of ``later`` on process ``pid`` (inherited by the children it forks from now on)."""
        later.holders[pid] = time.monotonic_ns()  # held from now, whatever comes of it: the children forked before
        try:                                      # get them as the records of their forks come
            self._reader.add_events(pid, later.event_ids, **self._opening(later.event_ids))
        except (KernelEngineError, OSError) as exc:
            if not has_ended(pid):
                self._notices.append(f"the probes in {later.path} are left out of process {pid}: {exc}")

    def _forked(self, child: int, parent: int, time_ns: int) -> None:
        """A traced process forked at ``time_ns``: the child inherited the events its parent had then; those its
        parent got since are opened on it (it has its parent's mappings)."""
        for later in self._later_objects.values():
            since = later.holders.get(parent)
            if since is None:
                later.holders.pop(child, None)  # its pid was another process's
            elif since <= time_ns:
                later.holders[child] = time_ns
            else:
                self._open_later(later, child)

    def _ended_holders(self) -> set[int]:
        """The processes that hold later probes and have ended, when they are many (a run of many short-lived
        children); none otherwise."""
        holders = {pid for later in self._later_objects.values() for pid in later.holders}
        if len(holders) < self._holders_kept:
            return set()
        ended = {pid for pid in holders if has_ended(pid)}
        self._holders_kept = max(_HOLDERS_KEPT, 2 * (len(holders) - len(ended)))
        return ended

    def _stack(self, samples: Samples, row: int, pid: int, tid: int) -> list[str]:
        """The frames of sample ``row``'s user stack, innermost first, read through the kernel's return
        trampoline where a function with a return probe is in progress."""
        copied = samples.user_stack(row, len(_PERF_REGISTER_ORDER))
        if copied is None:
            return [INCOMPLETE]
        values, data = copied
        registers = dict(zip(_PERF_REGISTER_ORDER, values))
        stack = StackCopy(registers, registers[RSP], data)
        pending = self._pending.get(tid)
        if pending:
            for slot in [slot for slot in pending if slot < stack.base]:  # returned, or left by longjmp or a throw
                del pending[slot]
            stack = stack.with_words(pending)
        return self._stacks.frames(pid, stack)

    def _event(self, attached: _Attached, pid: int, tid: int, time_ns: int, cpu: int, values: list | tuple,
               errors: dict[str, str]) -> Event:
        arg_positions, comm, ip, retval = attached.positions
        args = {name: values[i] for name, i in arg_positions}
        probe = attached.probe
        if errors:
            errors.pop("__comm", None)  # a thread that is gone: its name is ""
            for name in errors.keys() & args.keys():
                args[name] = None  # the reason is in errors
            if retval is not None and values[retval] == 0:
                errors.update((arg.name, NULL_POINTER) for arg in probe.fetchargs
                              if arg.name in errors and arg.reads_string_at_retval)
        if attached.left_out or attached.constants:
            errors = {**errors, **attached.left_out}
            args = {name: attached.constants.get(name, args.get(name)) for name in attached.names}  # in order
        return Event(probe.name, pid, tid, values[comm], time_ns, cpu, probe.reported_address(values[ip]),
                     probe.typed(args) if probe.retyped else args, None if retval is None else values[retval],
                     errors or None, probe.is_return, attached.index)

    def close(self) -> None:
        """Stop collecting and delete every event this run defined; safe to call twice.

        SIGINT, SIGTERM and SIGHUP wait until it is done: the CLI turns them into exceptions, and one in the
        middle (a second Ctrl-C while hundreds of uprobes go, which takes many seconds) would leave the rest
        defined. Those that came meanwhile take effect as this returns, as one signal (the highest-numbered):
        a second exception raised while the first unwinds could escape its handler.
        """
        if self._reader is None and not self._defined:
            return
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            if len(self._defined) > _SAY_REMOVING:
                print(f"uprobes: removing {len(self._defined)} kernel probes...", file=sys.stderr, flush=True)
            try:
                if self._reader is not None:
                    if self._by_tag:
                        self._reader.disable()
                        self._tally()
                    self._read_counters()
            finally:  # whatever went wrong reading, nothing of ours stays in the kernel
                if self._reader is not None:
                    self._reader.close()
                    self._reader = None
                while self._defined:
                    self.tracefs.delete(self._defined.pop())
                self.tracefs.close()
        finally:
            pending = signal.sigpending() & _STOP_SIGNALS
            for signum in pending:
                signal.sigtimedwait({signum}, 0)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if pending:
                signal.raise_signal(max(pending))

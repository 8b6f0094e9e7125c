"""Events made of the records jump probes write into their rings.

What a record holds is decided when its trampoline is made (:mod:`.captures`). The tool evaluates the fetch
arguments exactly as at a trap (:func:`uprobes.probes.evaluate.evaluate`), over the registers and memory the
record holds; a probe whose arguments are all integers read from one word each gets its events in columns,
converted in bulk with numpy (:class:`Column`, :class:`uprobes.output.columns.Group`). A load for a record
that faults (a hand-written marker) is caught by the tool, never seen by the program, and the site traps from
then on (:meth:`uprobes.engines.ptrace.jumps.Jump.on_signal`).

Records carry the thread's fs base, not its id: a thread is known by the key it had when we last saw it
stopped. A key no stopped thread has shown yet (a new thread, the TLS of a program just exec'd) holds its
records back until it is known: the one thread left in a process (:meth:`Recorder.attribute`), or every thread
stopped once to read its key (:meth:`Recorder.learn`). A key a thread left at its end may come back with the
next thread (glibc reuses stacks): its records are read at its exit stop, first.
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy

from ...output.columns import Group
from ...output.event import Event
from ...probes.computed import DwarfValue
from ...probes.evaluate import HitContext, evaluate
from ...probes.fetchargs import STRING_LIMIT
from ...probes.resolve import Probe
from ...proc.status import cpu_flags
from ...x86_64.abi import RETURN_VALUE, return_value
from ...x86_64.trampolines import Capture, CaptureBytes, CaptureFaults, CaptureLoad, CaptureRead, CaptureRegister, area
from .captures import arg_captures, record_words
from .clock import TscClock
from .ring import Ring, record_type
from .syscalls import ptrace_getregs

if TYPE_CHECKING:
    from .placement import Breakpoint
    from .tracee import Process, Thread

__all__ = ["Recorder", "RecordedSite", "Column"]

_CPU_MASK = 0xFFF  # rdtscp's TSC_AUX holds (node << 12) | cpu on Linux
_INTEGER = re.compile(r"([usx])(8|16|32|64)")


def _columns(probe: Probe, load_bias: int, captures: tuple[Capture, ...]) -> dict[str, Column] | None:
    """For each argument of ``probe`` that is an integer read from one word of the record, where and how; None
    when some argument needs more (a type tracefs gives another meaning, a bitfield, an array, several words):
    then each record is evaluated on its own. The other arguments have one value for every hit."""
    if probe.retyped:
        return None
    columns = {}
    for arg in probe.fetchargs:
        fresh: list[Capture] = []
        arg_captures(arg, probe, load_bias, fresh)
        if not fresh:
            continue  # a constant, $comm, %ip
        if any(isinstance(capture, CaptureRead) for capture in fresh):
            return None  # a read may fail: an error, not a number
        if isinstance(arg.source, DwarfValue):
            return None  # a value computed from several words
        loads = [capture for capture in fresh if isinstance(capture, CaptureLoad)]
        type_name = arg.type.name if arg.type is not None else "x64"
        integer = _INTEGER.fullmatch(type_name)
        if len(loads) > 1 or integer is None or arg.type is not None and (arg.type.bitfield or arg.type.array):
            return None
        columns[arg.name] = Column(captures.index(loads[0] if loads else fresh[-1]), int(integer[2]),
                                   integer[1] == "s")
    return columns


def _unsuppressed(records: numpy.ndarray, suppressed: collections.Counter) -> numpy.ndarray:
    """``records`` but the first of each thread and site that ``suppressed`` counts (and its count down)."""
    keep = numpy.ones(len(records), bool)
    for i, (key, site) in enumerate(zip(records["key"].tolist(), records["site"].tolist())):
        if suppressed[key, site]:
            suppressed[key, site] -= 1
            keep[i] = False
    return records[keep]


@dataclass(frozen=True)
class Column:
    """An argument read straight from one word of a record: ``bits`` of it, ``signed`` or not."""

    word: int
    bits: int
    signed: bool

    def values(self, words: numpy.ndarray) -> list[int]:
        """The argument of each record, from the records' words (a 2-D uint64 array)."""
        column = words[:, self.word]
        if self.bits < 64:
            column = column & numpy.uint64((1 << self.bits) - 1)
        if not self.signed:
            return column.tolist()
        values = column.astype(numpy.int64)  # two's complement: right as it is for 64 bits
        if self.bits < 64:
            values = numpy.where(values >= 1 << (self.bits - 1), values - (1 << self.bits), values)
        return values.tolist()


@dataclass(frozen=True)
class RecordedSite:
    """What a site id of the ring stands for: a breakpoint's address, its probes and its record's words; for
    each probe, how its integer arguments come straight from the words (None: evaluated record by record)."""

    address: int
    file_offset: int
    probes: tuple[int, ...]
    captures: tuple[Capture, ...]
    columns: tuple[dict[str, Column] | None, ...]
    returns: bool = False  # records of the function's returns (the return value first)
    handled: bool = False  # some probe has a Python handler: its records are taken one by one, in ring order

    @functools.cached_property
    def fields(self) -> tuple[str | None, ...]:
        """The register each word holds (None: memory)."""
        return tuple(c.field if isinstance(c, CaptureRegister) else None for c in self.captures)

    @functools.cached_property
    def loads(self) -> tuple[tuple[int, CaptureLoad], ...]:
        """The words that hold memory loaded by the trampoline, by position."""
        return tuple((i, c) for i, c in enumerate(self.captures) if isinstance(c, CaptureLoad))

    @functools.cached_property
    def reads(self) -> tuple[tuple[int, CaptureRead], ...]:
        """The words that hold memory read by ``process_vm_readv``, by position (inner reads first)."""
        return tuple((i, c) for i, c in enumerate(self.captures) if isinstance(c, CaptureRead))

    @functools.cached_property
    def areas(self) -> tuple[tuple[int, CaptureBytes], ...]:
        """The words that say how many bytes were read into the record's slots after its first (each read's
        just after the one before), by position."""
        return tuple((i, c) for i, c in enumerate(self.captures) if isinstance(c, CaptureBytes))

    @functools.cached_property
    def faults(self) -> int | None:
        """The position of the word that says which reads failed."""
        return self.captures.index(CaptureFaults()) if CaptureFaults() in self.captures else None


class _Registers:
    """The registers a record holds, as evaluate() reads them (user_regs field names)."""

    def __init__(self, values: dict[str, int]) -> None:
        self.__dict__.update(values)


class _Unknown:
    """The thread of a record whose key no stopped thread ever showed (it ended before we saw it)."""

    def __init__(self, process: Process) -> None:
        self.process, self.tid, self.comm = process, process.pid, ""


def _keep(chunks: dict[int, bytes], address: int, data: bytes) -> None:
    """Note ``data`` read at ``address``, unless a longer read there is noted (two arguments may read one
    address with different sizes: a 16-bit bitfield container and a byte)."""
    if len(data) > len(chunks.get(address, b"")):
        chunks[address] = data


class _Memory:
    """The memory a record holds, by address: ``chunks`` of bytes, and ``strings`` (None: unreadable)."""

    def __init__(self, chunks: dict[int, bytes], strings: dict[int, bytes | None] | None = None) -> None:
        self.chunks, self.strings = chunks, strings or {}

    def read(self, address: int, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.chunks.get(address + len(data))
            if chunk is None:
                raise OSError(f"{address:#x} was not captured")
            data += chunk
        return data[:size]

    def read_string(self, address: int, limit: int = STRING_LIMIT) -> bytes:
        data = self.strings.get(address)
        if data is None:
            raise OSError(f"no string was read at {address:#x}")
        return data.split(b"\0", 1)[0][:limit]


@dataclass
class Recorder:
    """The rings of a run, the sites that write into them, and the events read from them; the records of
    probes with a Python handler (``handled``) are handed to ``deliver``, one by one in the order the ring
    holds them (each thread's in the order it hit), with every register of the hit."""

    probes: list[Probe]
    counting: bool = False  # no events, only records for the handlers
    handled: frozenset[int] = frozenset()
    deliver: Callable[[int, Thread, object, dict, dict], None] | None = None  # (probe, thread, regs, args, errors)
    removed: set[int] = field(default_factory=set)  # probes whose records are dropped (their handlers went)
    sites: list[RecordedSite] = field(default_factory=list)
    rings: dict[Process, Ring] = field(default_factory=dict)  # by memory owner, while mapped
    groups: list[Group] = field(default_factory=list)  # events read, in columns
    events: list[Event] = field(default_factory=list)  # and those evaluated one by one
    _keys: dict[Process, dict[int, Thread]] = field(default_factory=lambda: collections.defaultdict(dict))
    _held: dict[Process, list[numpy.ndarray]] = field(default_factory=dict)  # records with a key not known yet
    _lost_before: int = 0  # lost by rings of address spaces that are gone
    rdpid: bool = field(default_factory=lambda: "rdpid" in cpu_flags())  # the CPU for a record, cheaper than rdtscp
    _clock: TscClock | None = None
    _handled_sites: list[int] = field(default_factory=list)
    _spans: list[int] = field(default_factory=list)  # the most slots a record of each site takes
    _span_table: numpy.ndarray | None = None  # the same as an array, made when read
    _wide: bool = False  # some take more than one
    _areas: dict[Process, dict[int, bytes]] = field(default_factory=lambda: collections.defaultdict(dict))
    _latest: dict[Process, dict[int, int]] = field(default_factory=lambda: collections.defaultdict(dict))
    # threads gone: (key, last ticket they may have written, thread), until the ring is read past it
    _exited: dict[Process, list[tuple[int, int, Thread]]] = field(
        default_factory=lambda: collections.defaultdict(list))

    @functools.cached_property
    def words(self) -> int:
        """Words a record holds (:func:`.captures.record_words`)."""
        return record_words(self.probes, self.handled)

    @functools.cached_property
    def _slot_size(self) -> int:
        return record_type(self.words).itemsize

    @property
    def lost(self) -> int:
        return self._lost_before + sum(ring.lost for ring in self.rings.values())

    def ring(self, owner: Process, via: int) -> Ring:
        """The ring of ``owner``'s memory, mapped now if it has none."""
        if owner not in self.rings:
            if self._clock is None:
                self._clock = TscClock()
            self.rings[owner] = Ring(via, owner.memory, self.words)
        return self.rings[owner]

    def site_id(self, breakpoint: Breakpoint, captures: tuple[Capture, ...], returns: bool = False) -> int:
        """A new id for the records of one trampoline of ``breakpoint``'s (``returns``: of its function's
        returns): its records are its hits (:meth:`Ring.written`), not those of a trampoline made before it for
        the same address (a library mapped again there)."""
        indices = tuple(breakpoint.returns if returns else breakpoint.entries)
        handled = not self.handled.isdisjoint(indices)
        if handled:
            self._handled_sites.append(len(self.sites))
        # a return's events carry its value beside the arguments, a handler's get every register: one by one
        # (and a return probe's on a tail call: an event that is a return without a value)
        columns = tuple(None if returns or handled or self.probes[index].is_return and
                        not self.probes[index].reports_retval else
                        _columns(self.probes[index], breakpoint.address - self.probes[index].address, captures)
                        for index in indices)
        self.sites.append(RecordedSite(breakpoint.address, breakpoint.file_offset, indices, captures, columns,
                                       returns, handled))
        self._spans.append(1 + -(-area(captures) // self._slot_size))
        self._wide = self._wide or self._spans[-1] > 1
        return len(self.sites) - 1

    def follow(self, parent: Ring, child: Process, via: int) -> Ring:
        """A fork child's own ring, where its parent's ``parent`` is (the trampolines it copied write there)."""
        self.rings[child] = Ring(via, child.memory, self.words, at=parent.address)
        return self.rings[child]

    def saw(self, thread: Thread, key: int) -> None:
        """``thread`` was seen stopped with fs base ``key`` (its name is read now: an exec changes it)."""
        keys = self._keys[thread.process.memory_owner or thread.process]
        if keys.get(key) is not thread:
            keys[key] = thread
            thread.comm  # noqa: B018 (read and kept: the name of the code that writes with this key)

    def exited(self, thread: Thread, key: int) -> None:
        """``thread`` (fs base ``key``) is at its exit stop: every record it wrote is its own, those read now and
        those a record of another thread still being written holds back (every ticket handed out by now)."""
        owner = thread.process.memory_owner or thread.process
        self.saw(thread, key)
        ring = self.rings.get(owner)
        if ring is not None:
            self._exited[owner].append((key, ring.handed_out, thread))
        self.read(owner)

    def ended(self, thread: Thread) -> None:
        """``thread`` is gone (what it wrote was read at its exit stop): its key may come back with another."""
        keys = self._keys.get(thread.process.memory_owner or thread.process, {})
        for key in [key for key, known in keys.items() if known is thread]:
            del keys[key]

    def unknown_in(self) -> list[Process]:
        """The address spaces whose ring holds records of threads whose key is not known yet."""
        return [owner for owner, batches in self._held.items() if batches]

    def attribute(self, owner: Process, thread: Thread) -> None:
        """``thread`` is the only one left in ``owner``'s memory: the keys not known yet are its."""
        self.read(owner)
        self._claim_unknown(owner, thread)

    def learn(self, threads: list[Thread]) -> None:
        """Every thread is stopped (``threads``): the keys of records held back are known now; records whose
        thread ended unseen are reported as the process's own (tid = pid)."""
        for thread in threads:
            self.saw(thread, ptrace_getregs(thread.tid).fs_base)
        for owner in self.unknown_in():
            self._claim_unknown(owner, _Unknown(owner))
        self.read_all()

    def _claim_unknown(self, owner: Process, thread: Thread | _Unknown) -> None:
        """The keys of the records held back in ``owner``'s memory are ``thread``'s; their events are made."""
        keys = self._keys[owner]
        for batch in self._held.get(owner, []):
            for key in set(batch["key"].tolist()) - set(keys):
                keys[key] = thread
        self.read(owner)

    def drain(self, thread: Thread, key: int) -> bool:
        """``thread`` (fs base ``key``) is stopped at a hit that found the ring full: every record before it is
        read now, its own first. False when some are not: a record of another thread, reserved before them, is
        still being written, and the reading stopped there (the hit must wait, or its thread's records would
        come out of order)."""
        self.saw(thread, key)
        owner = thread.process.memory_owner or thread.process
        ring = self.rings.get(owner)
        handed_out = ring.handed_out if ring is not None else 0
        self.read(owner)
        return ring is None or ring.read_to >= handed_out

    def read_all(self) -> None:
        for owner in list(self.rings):
            self.read(owner)

    def read(self, owner: Process) -> None:
        """Events of every whole record of ``owner``'s ring (those of threads not known yet are held)."""
        ring = self.rings.get(owner)
        records = ring.read(len(self.sites), self._spans_read()) if ring is not None else None
        if ring is not None and ring.areas:
            self._areas[owner].update(ring.areas)
            ring.areas.clear()
        held = self._held.pop(owner, [])
        if records is not None and len(records):
            held.append(records)
        for batch in held:
            self._events(owner, batch)
        if ring is not None and self._exited.get(owner):
            self._exited[owner] = [gone for gone in self._exited[owner] if gone[1] > ring.read_to]

    def _spans_read(self) -> numpy.ndarray | None:
        """The most slots a record of each site takes, where some take more than one (None: all take one)."""
        if not self._wide:
            return None
        if self._span_table is None or len(self._span_table) != len(self._spans):
            self._span_table = numpy.array(self._spans)
        return self._span_table

    def unmap(self, owner: Process, via: int) -> None:
        """At detach, every thread settled: ``owner``'s ring read to the end and taken out of it."""
        ring = self.rings.get(owner)
        if ring is not None:
            self.read(owner)
            ring.unmap(via)
        self.forget(owner)

    def forget(self, owner: Process) -> None:
        """``owner``'s memory is gone (exit, exec) or its ring unmapped: read what is left (records of threads
        never seen are the process's own), let the ring go."""
        self.read(owner)
        self._claim_unknown(owner, _Unknown(owner))
        ring = self.rings.pop(owner, None)
        if ring is not None:
            ring.retire()
            self._lost_before += ring.lost
        self._keys.pop(owner, None)
        self._held.pop(owner, None)
        self._areas.pop(owner, None)
        self._exited.pop(owner, None)
        self._latest.pop(owner, None)

    def take(self) -> tuple[list[Group], list[Event]]:
        """The events read so far: in columns, and one by one."""
        groups, events, self.groups, self.events = self.groups, self.events, [], []
        return groups, events

    def _events(self, owner: Process, records: numpy.ndarray) -> None:
        for key, last, thread in self._exited.get(owner, ()):
            theirs = (records["key"] == key) & (records["seq"] <= last)
            if theirs.any():
                self._made(owner, records[theirs], {key: thread})
                records = records[~theirs]
        keys = self._keys.get(owner, {})
        unknown = ~numpy.isin(records["key"], numpy.fromiter(keys, numpy.uint64, len(keys)))
        if unknown.any():
            self._held.setdefault(owner, []).append(records[unknown])
            records = records[~unknown]
        self._made(owner, records, keys)

    def _made(self, owner: Process, records: numpy.ndarray, keys: dict[int, Thread]) -> None:
        """The events of ``records``, each thread's known by its key in ``keys``."""
        ours = records["site"] < len(self.sites)  # not VOID, nor written by the target over our slots
        if not ours.all():
            records = records[ours]
        areas = self._areas.get(owner)
        areas = {seq: areas.pop(seq) for seq in records["seq"].tolist() if seq in areas} if areas else {}
        ring = self.rings.get(owner)
        if ring is not None and any(ring.suppressed.values()):
            records = _unsuppressed(records, ring.suppressed)
        if not len(records):
            return
        times = self._in_order(owner, records["key"], self._clock.to_ns(records["tsc"]))
        if self._handled_sites:
            handled = numpy.isin(records["site"], self._handled_sites)
            if handled.any():
                self._one_by_one(keys, records[handled], times[handled], areas)
                records, times = records[~handled], times[~handled]
        if not len(records) or self.counting:
            return
        sites, record_keys = records["site"], records["key"]
        if (sites == sites[0]).all() and (record_keys == record_keys[0]).all():  # one site, one thread
            self._group(self.sites[int(sites[0])], keys[int(record_keys[0])], records, times, areas)
            return
        order = numpy.lexsort((record_keys, sites))  # by site, then thread; each in the order written
        by_site, by_key = sites[order], record_keys[order]
        ends = numpy.flatnonzero((by_site[1:] != by_site[:-1]) | (by_key[1:] != by_key[:-1])) + 1
        for group in numpy.split(order, ends):
            site = self.sites[int(sites[group[0]])]
            self._group(site, keys[int(record_keys[group[0]])], records[group], times[group], areas)

    def _in_order(self, owner: Process, keys: numpy.ndarray, times: numpy.ndarray) -> numpy.ndarray:
        """``times`` (of records in ring order, by thread key ``keys``) later than the same thread's record
        before, if only by a nanosecond: each conversion measures the counter's scale again, and two records
        read apart could come out in the wrong order, or tied, which the merge by time of events from several
        sites would order by site rather than as the thread wrote them."""
        latest = self._latest[owner]
        for key in numpy.unique(keys).tolist():
            mine = numpy.flatnonzero(keys == key)
            steps = numpy.arange(len(mine), dtype=numpy.int64)
            ordered = numpy.maximum.accumulate(numpy.maximum(times[mine] - steps, latest.get(key, 0) + 1)) + steps
            times[mine] = ordered
            latest[key] = int(ordered[-1])
        return times

    def _one_by_one(self, keys: dict[int, Thread], records: numpy.ndarray, times: numpy.ndarray,
                    areas: dict[int, bytes]) -> None:
        """Events of ``records`` (at ``times``) and their handlers' calls, in the order the ring holds them."""
        for site_id, key, cpu, words, at, seq in zip(records["site"].tolist(), records["key"].tolist(),
                                                     (records["cpu"] & _CPU_MASK).tolist(),
                                                     records["words"].tolist(), times.tolist(),
                                                     records["seq"].tolist()):
            site = self.sites[site_id]
            for index in site.probes:
                if index not in self.removed:
                    self._event(site, self.probes[index], index, keys[key], at, cpu, words, key, areas.get(seq))

    def _group(self, site: RecordedSite, thread: Thread, records: numpy.ndarray, times: numpy.ndarray,
               areas: dict[int, bytes]) -> None:
        """Events of ``records``, hits of ``site`` by ``thread``: in columns for the probes that can be."""
        ts, cpu, words = times.tolist(), (records["cpu"] & _CPU_MASK).tolist(), None
        for index, columns in zip(site.probes, site.columns):
            probe = self.probes[index]
            if index in self.removed:
                continue
            if columns is None:
                for row, at, on, key, seq in zip(records["words"].tolist(), ts, cpu,
                                                          records["key"].tolist(), records["seq"].tolist()):
                    self._event(site, probe, index, thread, at, on, row, key, areas.get(seq))
                continue
            words = records["words"] if words is None else words
            fixed = [arg for arg in probe.fetchargs if arg.name not in columns]
            context = HitContext(_Registers({"rip": site.address}), _Memory({}), site.address, site.file_offset,
                                 thread.comm)
            values = evaluate(tuple(fixed), context)[0]
            retval = (Column(site.fields.index(RETURN_VALUE), 64, True).values(words)
                      if probe.returns_value_here else None)
            self.groups.append(Group(probe.name, index, thread.process.pid, thread.tid, thread.comm,
                                     probe.reported_address(site.address), tuple(arg.name for arg in probe.fetchargs),
                                     values, {name: column.values(words) for name, column in columns.items()}, ts,
                                     cpu, retval))

    def _event(self, site: RecordedSite, probe: Probe, index: int, thread: Thread, ts: int, cpu: int,
               words: list[int], key: int, record_area: bytes | None = None) -> None:
        """The event of one record, its arguments evaluated over the registers and memory it holds (``area``:
        what it holds past its first slot); its probe's handler, if it has one, called with them."""
        registers: dict[str, int] = dict(zip(site.fields, words))
        registers.pop(None, None)
        registers["rip"], registers["fs_base"] = site.address, key
        chunks: dict[int, bytes] = {}
        for i, capture in site.loads:
            _keep(chunks, capture.address(registers), words[i].to_bytes(8, "little")[:capture.size])
        values: dict[CaptureRead, int] = {}
        if site.reads:
            failed = words[site.faults]
            for i, read in site.reads:
                values[read] = words[i]
                if not failed >> i & 1:
                    _keep(chunks, read.address(registers, values), words[i].to_bytes(8, "little")[:read.size])
        strings: dict[int, bytes | None] = {}
        cursor = 0
        for i, capture in site.areas if record_area is not None else ():
            taken = min(words[i] - (words[i] >> 63 << 64), capture.size)  # a negative errno: nothing read
            data = record_area[cursor:cursor + taken] if taken >= 0 else None
            cursor += max(taken, 0)
            if capture.string:
                strings[capture.address(registers, values)] = data
            elif taken == capture.size:
                _keep(chunks, capture.address(registers, values), data)
        retval = return_value(registers[RETURN_VALUE]) if site.returns or probe.returns_value_here else None
        context = HitContext(_Registers(registers), _Memory(chunks, strings), site.address, site.file_offset,
                             thread.comm, retval)
        args, errors = evaluate(probe.fetchargs, context)
        probe.typed(args)
        if not self.counting:
            self.events.append(Event(probe.name, thread.process.pid, thread.tid, context.comm, ts, cpu,
                                     probe.reported_address(site.address), args, retval, errors or None,
                                     probe.is_return, index))
        if index in self.handled:
            self.deliver(index, thread, context.regs, args, errors)

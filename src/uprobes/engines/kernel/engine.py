"""The kernel engine: our probes as the kernel's own uprobe events, read from perf ring buffers.

Each probe point becomes one event in a group owned by this run (``uprobes_<pid>_<start>_<n>``), so hits are
told apart per site. Events are opened through ``perf_event_open`` (which is when the kernel registers the
uprobe and raises a marker's semaphore through ``REF_CTR_OFFSET``), on every thread of a process and what it
starts when a pid is given, system-wide otherwise. Probes on instructions the kernel would refuse, or run
wrongly, are refused before anything is defined. Everything we defined is deleted when the engine closes.
"""

from __future__ import annotations

import functools
import signal
import sys
from dataclasses import dataclass, replace

from ...consumers import Consumer
from ...errors import KernelEngineError
from ...output.event import Event
from ...probes.fetchargs import Comm, FetchArg, FetchType, RetVal
from ...probes.markerargs import kernel_limitation
from ...probes.resolve import Probe
from ..base import Engine
from .eventformat import EventFormat, load_event_format
from .instructions import refuse_unprobeable
from .perfbuf import TracepointReader
from .tracefs import DefinedEvent, Tracefs, new_group

__all__ = ["KernelEngine"]

# Fetched with every hit: the thread's name while it is alive, and a return probe's value.
_COMM_ARG = FetchArg("__comm", True, Comm(), FetchType("string"))
_RETVAL_ARG = FetchArg("__retval", True, RetVal(), FetchType("s64"))
_HIDDEN_FIELDS = frozenset({"__comm", "__retval", "__probe_ip", "__probe_func", "__probe_ret_ip"})
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
# Beyond this many probes closing takes seconds (the kernel waits for an RCU grace period as each uprobe
# goes, some 70 ms), so the user is told why the run does not end at once.
_SAY_REMOVING = 50


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
        ip = index["__probe_func" if self.probe.is_return else "__probe_ip"]
        return args, index["__comm"], ip, index.get("__retval")

    @functools.cached_property
    def left_out(self) -> dict[str, str]:
        """The marker operands tracefs cannot fetch, by name: each event gives them as None, with this reason."""
        return {arg.name: f"the kernel engine cannot fetch it: {kernel_limitation(arg)}"
                for arg in self.probe.fetchargs if kernel_limitation(arg)}


class KernelEngine(Engine):
    """Probes through tracefs and perf. Use as a context manager so that every event is deleted."""

    name = "kernel"

    def __init__(self, pages_per_cpu: int = 256) -> None:
        self.tracefs = Tracefs()
        self.group = new_group()
        self._pages = pages_per_cpu
        self._attached: dict[int, _Attached] = {}  # tracepoint id -> probe
        self._defined: list[DefinedEvent] = []
        self._reader: TracepointReader | None = None
        self._counts: dict[int, int] = {}  # tracepoint id -> hits, as last read: kept once closed
        self._lost = 0

    @property
    def lost(self) -> int:
        """Hits the kernel dropped because a ring buffer was full, exactly (not only those reported so far)."""
        self._read_counters()
        return self._lost

    def attach(self, probes: list[Probe], pid: int | None, *, counting: bool = False, held: bool = False,
               follow_forks: bool = True, consumers: dict[int, list[Consumer]] | None = None) -> None:
        """Define every probe and start collecting its hits (of every thread of ``pid`` and what it starts,
        or of everyone).

        ``counting`` only counts hits (read them with :meth:`hit_counts`): no events, none lost. ``held``
        (a launched command held before exec): the events are enabled by its exec, so nothing the child runs
        before it (our own code) is counted. ``follow_forks`` False: the threads, not the forked children.
        """
        if consumers:
            raise KernelEngineError("Python handlers run on the ptrace engine, in the traced process's stops")
        refuse_unprobeable(probes)
        for index, probe in enumerate(probes):
            event_name = f"e{index}_{probe.event}"[:63]
            extra = (_COMM_ARG, _RETVAL_ARG) if probe.is_return else (_COMM_ARG,)
            kernel_probe = replace(probe, group=self.group, event=event_name, fetchargs=probe.fetchargs + extra)
            defined = self.tracefs.define(kernel_probe.uprobe_events_line(), probe.spec)
            self._defined.append(defined)
            event_format = load_event_format(self.tracefs.root, defined.group, defined.event)
            self._attached[event_format.id] = _Attached(index, probe, defined, event_format)
        # The kernel inserts the breakpoints when the perf events open; the reader explains its refusals.
        # A held child is still our own code until it execs: its events start at the exec, not before.
        names = {event_id: f"probe {a.probe.name} at {a.probe.path}:{a.probe.offset:#x}"
                 for event_id, a in self._attached.items()}
        self._reader = TracepointReader(list(self._attached), pid, pages=self._pages, sampling=not counting,
                                        follow_forks=follow_forks, enable_on_exec=held, names=names)
        try:
            if not held:
                self._reader.enable()
        except OSError as exc:
            raise KernelEngineError(f"cannot enable the uprobe events: {exc.strerror}") from None

    def hit_counts(self) -> list[int]:
        """Hits so far per probe, in the order given to :meth:`attach`, as the kernel's counters say (after
        :meth:`close`, the final counts)."""
        self._read_counters()
        hits = [0] * len(self._attached)
        for event_id, attached in self._attached.items():
            hits[attached.index] = self._counts.get(event_id, 0)
        return hits

    def _read_counters(self) -> None:
        if self._reader is not None:
            self._counts, self._lost = self._reader.counts(), self._reader.count_lost()

    def poll(self, timeout: float) -> list[Event]:
        """Events that arrived, waiting up to ``timeout`` seconds for the first."""
        reader = self._reader
        if reader is None:
            return []
        if not reader.poll(timeout):
            return []
        events = []
        for sample in reader.read():
            attached = self._attached.get(sample.event_id)
            if attached is None:
                continue
            events.append(self._event(attached, sample))
        return events

    def _event(self, attached: _Attached, sample) -> Event:
        values, errors = attached.format.unpack(sample.raw)
        arg_positions, comm, ip, retval = attached.positions
        args = {name: values[i] for name, i in arg_positions}
        probe = attached.probe
        if errors:
            errors.pop("__comm", None)  # a thread that is gone: its name is ""
            for name in errors.keys() & args.keys():
                args[name] = None  # the reason is in errors
        if attached.left_out:
            errors = {**errors, **attached.left_out}
            args = {arg.name: args.get(arg.name) for arg in probe.fetchargs} | args  # in the order asked for
        return Event(probe.name, sample.pid, sample.tid, values[comm], sample.time_ns, sample.cpu, values[ip],
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
            if self._reader is not None:
                self._read_counters()
                self._reader.close()
                self._reader = None
            while self._defined:
                self.tracefs.delete(self._defined.pop())
        finally:
            pending = signal.sigpending() & _STOP_SIGNALS
            for signum in pending:
                signal.sigtimedwait({signum}, 0)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if pending:
                signal.raise_signal(max(pending))

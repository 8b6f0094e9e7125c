"""Probing from Python: handlers that run at every hit, in this process, with the ptrace engine.

    >>> from uprobes.api import Session
    >>> seen = []
    >>> with Session(command=["tests/targets/build/calls", "3"]) as session:
    ...     session.probe("uprobe:tests/targets/build/calls:work i=%di:s32",
    ...                   lambda hit: seen.append((hit.args["i"], hit.memory.read_string(hit.regs.rdx))), stop=True)
    ...     status = session.run()
    >>> seen
    [(0, b's0'), (1, b's1'), (2, b's2')]

A handler receives a :class:`~uprobes.consumers.Hit`: the probe, pid and tid, the registers
(``struct user_regs_struct`` fields: ``rdi``, ``rip``...), a memory reader that raises ``OSError`` on a bad
address and never harms the target, and the probe's fetch arguments already evaluated. It runs from a record
of the hit while the program goes on (the registers and arguments are the hit's, the memory is read as it is
then), or, with ``stop=True``, while the thread waits at the probe. Returning :data:`REMOVE` removes the
handler, and the probe with its last handler (its byte restored at once); an exception in a handler ends the
run with a clean detach.

A probe's predicate (``... if size > 4096``) decides which hits are events, counted and handed to handlers.
:meth:`Session.count` and :meth:`Session.hist` aggregate the events kept, as ``count --by`` and ``hist`` do::

    session.probe("uprobe:libc:malloc size=%di:u64 if size >= 1024")
    session.run()
    session.count(by="size")  # [("malloc", {"size": 4096}, 12), ...], most hits first
    session.hist("size")      # [("malloc", {}, Histogram), ...]: .buckets(), .summary(), .render()
"""

from __future__ import annotations

from collections.abc import Callable

from .consumers import REMOVE, Consumer, Hit
from .engines.ptrace.engine import PtraceEngine
from .errors import UprobesError
from .output.aggregate import SPECIAL_KEYS, CountsByKey, HistogramsByKey
from .output.columns import EventColumns
from .output.event import Event
from .output.histogram import Histogram
from .probes.predicate import Predicate
from .probes.resolve import Probe, resolve_text
from .proc.launch import HeldCommand
from .proc.status import thread_comm

__all__ = ["Session", "Hit", "REMOVE"]

Handler = Callable[[Hit], object]


class Session:
    """Probes in one process: a running one (``pid``) or a ``command`` started for the session."""

    def __init__(self, pid: int | None = None, command: list[str] | None = None, keep_events: bool = True) -> None:
        """``keep_events``: collect an :class:`Event` per hit in :attr:`events`; for a long session whose
        handlers do the work, False keeps memory flat (hits are still counted, handlers still run)."""
        if (pid is None) == (command is None):
            raise UprobesError("give a Session either a pid or a command")
        self._pid = pid
        self._command = command
        self._probes: list[Probe] = []
        self._consumers: dict[int, list[Consumer]] = {}
        self._engine = PtraceEngine()
        self._child: HeldCommand | None = None
        self._attached = False
        self._keep_events = keep_events
        self.events: list[Event] = []
        self.notices: list[str] = []  # warnings of the run: a probe left out of a library, rewritten code
        self._kept: list[int] = []  # per probe, the events its predicate kept

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def probe(self, text: str, handler: Handler | None = None, pid: int | None = None,
              stop: bool = False) -> list[Probe]:
        """Add a probe (any syntax ``uprobes`` accepts) and, optionally, a handler for its hits (``pid``: only
        that process's hits, say one child of a forking server). The handler runs in this process after the
        hit, from a record of it, while the program goes on (``hit.memory`` reads the memory as it is then);
        ``stop`` keeps the thread stopped at the probe while the handler runs (a ptrace stop per hit)."""
        probes = resolve_text(text)
        for probe in probes:
            if handler is not None:
                judged = handler if probe.predicate is None else _judging(handler, probe.predicate)
                self._consumers.setdefault(len(self._probes), []).append(Consumer(judged, pid, stop))
            self._probes.append(probe)
        return probes

    def run(self, duration: float | None = None) -> int | None:
        """Attach, then service the process until it ends (its exit status is returned) or ``duration``
        seconds pass (None is returned)."""
        import time

        if not self._attached:
            self._attached = True
            self._kept = [0] * len(self._probes)
            if self._command is not None:
                self._child = HeldCommand(self._command)
                self._child.traced = True
                self._engine.attach(self._probes, self._child.pid, held=True, consumers=self._consumers,
                                    counting=self._counting)
                self._child.release()
            else:
                self._engine.attach(self._probes, self._pid, consumers=self._consumers, counting=self._counting)
        deadline = None if duration is None else time.monotonic() + duration
        pid = self._child.pid if self._child else self._pid
        try:
            while deadline is None or time.monotonic() < deadline:
                self._keep(self._engine.poll(0.1))
                self.notices += self._engine.notices()
                status = self._engine.exited(pid)
                if status is not None:
                    self.close()
                    return 128 - status if status < 0 else status
        except BaseException:  # a handler raised, or Ctrl-C: detach now, with or without a `with` block
            self.close()
            raise
        return None

    @property
    def _counting(self) -> bool:
        """Only counts, no events: unless they are kept, or a predicate judges them."""
        return not self._keep_events and not any(probe.predicate for probe in self._probes)

    def _keep(self, events: list[Event]) -> None:
        """The events the predicates keep, counted; those of probes without one, kept if asked."""
        for event in events:
            predicate = self._probes[event.probe_index].predicate
            if predicate is None:
                if self._keep_events:
                    self.events.append(event)
            elif predicate.holds(event.args, event.pid, event.tid, event.comm):
                self._kept[event.probe_index] += 1
                if self._keep_events:
                    self.events.append(event)

    def hit_counts(self) -> list[int]:
        """Hits per probe so far, in the order they were added (those its predicate kept)."""
        counts = self._engine.hit_counts()
        return [self._kept[i] if probe.predicate else n for i, (probe, n) in enumerate(zip(self._probes, counts))]

    def _fetching(self, names: tuple[str, ...]) -> EventColumns:
        """The events kept of the probes that fetch each of ``names`` (or it is ``$pid``, ``$tid``, ``$comm``)."""
        if not self._keep_events:
            raise UprobesError("count() and hist() aggregate the events a Session keeps: make it with "
                               "keep_events=True")
        wanted = {i for i, probe in enumerate(self._probes)
                  if all(name in SPECIAL_KEYS or name in {arg.name for arg in probe.fetchargs} for name in names)}
        return EventColumns(single=[event for event in self.events if event.probe_index in wanted])

    def count(self, by: str | tuple[str, ...]) -> list[tuple[str, dict, int]]:
        """The events kept so far of the probes that fetch the ``by`` arguments (names of fetch arguments, or
        ``$pid``, ``$tid``, ``$comm``), counted per probe and distinct value of those: (probe name, key, hits),
        most hits first."""
        keys = (by,) if isinstance(by, str) else tuple(by)
        counts = CountsByKey(keys)
        counts.add(self._fetching(keys))
        return [(self._probes[probe].name, dict(zip(keys, key)), hits) for probe, key, hits in counts.rows()]

    def hist(self, arg: str, by: str | tuple[str, ...] = (), linear: int | None = None
             ) -> list[tuple[str, dict, Histogram]]:
        """Histograms of argument ``arg`` over the events kept so far, per probe and distinct value of the
        ``by`` arguments (log2 buckets, or ``linear`` ones of that step): (probe name, key, histogram)."""
        keys = (by,) if isinstance(by, str) else tuple(by)
        histograms = HistogramsByKey(arg, keys, linear)
        histograms.add(self._fetching((arg, *keys)))
        return [(self._probes[probe].name, dict(zip(keys, key)), histogram)
                for probe, key, histogram in histograms.items()]

    @property
    def lost(self) -> int:
        """Records of hits that found the ring full: their events and handler calls are missing."""
        return self._engine.lost

    def close(self) -> None:
        """Detach: every byte restored, the out-of-line area unmapped. A started command is not stopped."""
        self._engine.close()
        self._keep(self._engine.leftover())
        self.notices += self._engine.notices()
        if self._child is not None:
            self._child.traced = False

    def wait(self) -> int:
        """After :meth:`close`: wait for a started command to end; its exit status."""
        if self._child is None:
            raise UprobesError("this session started no command")
        return self._child.wait()


def _judging(handler: Handler, predicate: Predicate) -> Handler:
    """``handler``, called only for the hits ``predicate`` keeps."""
    reads_comm = "$comm" in predicate.names

    def judged(hit: Hit) -> object:
        if predicate.holds(hit.args, hit.pid, hit.tid, thread_comm(hit.pid, hit.tid) if reads_comm else ""):
            return handler(hit)
        return None
    return judged

"""The interface every engine offers the CLI and the Python API."""

from __future__ import annotations

import functools
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from ..consumers import Consumer
from ..output.columns import EventColumns
from ..output.event import Event
from ..probes.resolve import Probe
from ..stacks import StackLimits

__all__ = ["Engine", "LaterProbes", "uninterrupted", "STOP_SIGNALS"]

LaterProbes = Callable[[int, str], list[Probe]]
"""Probes in an object a traced process maps (``'*'`` or a glob as PATH): called with the process and the
object's path as that process maps it (as its ``/proc/PID/maps`` shows it), it returns the probe points there
not given before (perhaps none), which take the next indexes, in order."""

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
"""Ctrl-C, kill and a closed terminal: what ends a run, and what an engine defers while it must not stop."""


def uninterrupted(method):
    """A stop signal waits until ``method`` is done; the exception its handler raises then comes as the method
    returns. Events the method returned are kept for the engine's next poll instead of being lost with it
    (the poll that took them from a ring is how they would otherwise end)."""
    @functools.wraps(method)
    def wrapper(engine, *args, **kwargs):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        kept, engine.undelivered = engine.undelivered, []
        result = None
        try:
            result = method(engine, *args, **kwargs)
            if isinstance(result, EventColumns) and kept:
                result = EventColumns([group for columns in (*kept, result) for group in columns.groups],
                                      [event for columns in (*kept, result) for event in columns.single])
                kept = []
            return result
        finally:
            engine.undelivered[:0] = kept  # not handed out (another method, or an error): for the next poll
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS - previous)
            except BaseException:
                if isinstance(result, EventColumns) and len(result):
                    engine.undelivered.append(result)
                raise
    return wrapper


class Engine(ABC):
    """Probes placed in one process (``pid``), in a command held before its exec, or system-wide (``pid``
    None, where the engine can). Use as a context manager: leaving it removes everything it placed."""

    name: str
    #: Whether this engine traces a launched command with ptrace, and so collects its exit (ask :meth:`exited`).
    reaps_children: bool = False
    #: Whether a return address this engine replaces is left on the stack a C++ exception unwinds, which then
    #: ends in ``std::terminate`` (the kernel's trampoline): return probes go on the functions' exits instead,
    #: in objects that link the C++ unwinder (:class:`uprobes.probes.resolve.ReturnMode`).
    unwinder_meets_stack: bool = False
    #: Whether its counts (``attach(counting=True)``) are only of the hits a probe's predicate keeps, where the
    #: predicate is its kernel filter (:attr:`uprobes.probes.resolve.Probe.kernel_filter`).
    counts_filtered: bool = False
    #: Events a poll took as a stop signal ended it, for the next poll (see :func:`uninterrupted`); each
    #: engine makes its own list.
    undelivered: list[EventColumns]

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @abstractmethod
    def attach(self, probes: list[Probe], pid: int | Sequence[int] | None, *, counting: bool = False,
               held: bool = False, follow_forks: bool = True, consumers: dict[int, list[Consumer]] | None = None,
               stacks: StackLimits | None = None, later: LaterProbes | None = None) -> None:
        """Place ``probes`` in process ``pid``, in several (a sequence, perhaps empty: more come with
        :meth:`add_process`), or in every process (None, where the engine can); ``held``: ``pid`` is a command
        held before its exec; ``counting``: count hits without building events; ``consumers``: Python handlers
        by probe index (where the engine runs them); ``stacks``: each event carries its user stack, within
        those limits; ``later``: asked for each object (by device and inode) a traced process maps executable
        after attach (and perhaps for those it mapped already), for the probes to add there: placed as the others
        are, counted and reported under the indexes that follow."""

    @abstractmethod
    def add_process(self, pid: int) -> None:
        """Trace running process ``pid`` too, as one of :meth:`attach`'s. Where it cannot be, an error says why
        and nothing of it is left placed; the processes traced already go on."""

    @abstractmethod
    def poll(self, timeout: float) -> list[Event]:
        """Wait up to ``timeout`` seconds for hits; return their events."""

    def poll_columns(self, timeout: float) -> EventColumns:
        """:meth:`poll`, in columns where the engine has them (a writer formats those in bulk)."""
        return EventColumns(single=self.poll(timeout))

    @abstractmethod
    def hit_counts(self) -> list[int]:
        """Hits per probe so far, in the order the probes were given (still readable after :meth:`close`)."""

    @property
    @abstractmethod
    def lost(self) -> int:
        """Events dropped because the tool could not keep up."""

    def notices(self) -> list[str]:
        """Warnings that came up while running (a probe left out of a library loaded later, a byte the
        program rewrote), each once; the caller shows them."""
        return []

    def report(self) -> list[str]:
        """What the user should hear at the end (probes never placed, return probes skipped)."""
        return []

    def jumped(self) -> set[int]:
        """The probes (by index) placed as jumps to generated code: no stop, no trap per hit."""
        return set()

    def exited(self, pid: int) -> int | None:
        """How ``pid`` ended (as ``os.waitstatus_to_exitcode``), when this engine reaped it."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Remove everything placed and let every process go, as it was."""

    def leftover(self) -> list[Event]:
        """After :meth:`close`: the events of hits read while detaching (after the last :meth:`poll`), and
        those a last poll took as a stop signal ended it."""
        kept, self.undelivered = self.undelivered, []
        return [event for columns in kept for event in columns.events()]

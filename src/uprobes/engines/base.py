"""The interface every engine offers the CLI and the Python API."""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..consumers import Consumer
from ..output.columns import EventColumns
from ..output.event import Event
from ..probes.resolve import Probe
from ..stacks import StackLimits

__all__ = ["Engine"]


class Engine(ABC):
    """Probes placed in one process (``pid``), in a command held before its exec, or system-wide (``pid``
    None, where the engine can). Use as a context manager: leaving it removes everything it placed."""

    name: str
    #: Whether this engine traces a launched command with ptrace, and so collects its exit (ask :meth:`exited`).
    reaps_children: bool = False

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @abstractmethod
    def attach(self, probes: list[Probe], pid: int | None, *, counting: bool = False, held: bool = False,
               follow_forks: bool = True, consumers: dict[int, list[Consumer]] | None = None,
               stacks: StackLimits | None = None) -> None:
        """Place ``probes``; ``held``: ``pid`` is a command held before its exec; ``counting``: count hits
        without building events; ``consumers``: Python handlers by probe index (where the engine runs them);
        ``stacks``: each event carries its user stack, within those limits."""

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

    def exited(self, pid: int) -> int | None:
        """How ``pid`` ended (as ``os.waitstatus_to_exitcode``), when this engine reaped it."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Remove everything placed and let every process go, as it was."""

    def leftover(self) -> list[Event]:
        """After :meth:`close`: the events of hits read while detaching (after the last :meth:`poll`)."""
        return []

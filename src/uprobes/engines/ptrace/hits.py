"""A hit, from a stopped thread's registers to what the user sees: counts, events, Python handlers."""

from __future__ import annotations

import time

from ...consumers import REMOVE, Consumer, Hit
from ...output.event import Event
from ...probes.evaluate import HitContext, evaluate
from ...probes.resolve import Probe
from ...proc.status import last_cpu
from .syscalls import Regs, ptrace_getfpregs
from .tracee import Thread

__all__ = ["Reporter"]


class Reporter:
    """Counts hits per probe, builds their events (unless only counting) and runs their consumers."""

    def __init__(self, probes: list[Probe], consumers: dict[int, list[Consumer]], counting: bool) -> None:
        self.probes = probes
        self.consumers = {index: list(c) for index, c in consumers.items()}
        self.counting = counting
        self.hits = [0] * len(probes)
        self.events: list[Event] = []

    def report(self, thread: Thread, address: int, file_offset: int, regs: Regs, probes: list[int],
               retval: int | None = None) -> list[int]:
        """Hits of ``probes`` at ``address`` by ``thread``; the probes whose last consumer went meanwhile."""
        gone = []
        for index in probes:
            self.hits[index] += 1
            if self.counting and index not in self.consumers:
                continue
            probe = self.probes[index]
            context = HitContext(regs, thread.process.memory, address, file_offset, thread.comm, retval,
                                 lambda: ptrace_getfpregs(thread.tid))
            args, errors = evaluate(probe.fetchargs, context)
            probe.typed(args)
            pid = thread.process.pid
            if not self.counting:
                self.events.append(Event(probe.name, pid, thread.tid, context.comm, time.monotonic_ns(),
                                         last_cpu(pid, thread.tid), address, args, retval, errors or None,
                                         probe.is_return, index))
            if index in self.consumers and self.consume(index, Hit(probe, pid, thread.tid, regs, thread.process.memory,
                                                                   args, errors)):
                gone.append(index)
        return gone

    def consume(self, index: int, hit: Hit) -> bool:
        """Run the handlers of probe ``index`` on ``hit``; whether its last handler went (returned REMOVE)."""
        consumers = self.consumers.get(index, [])
        for consumer in list(consumers):
            if consumer.pid in (None, hit.pid) and consumer.handler(hit) is REMOVE:
                consumers.remove(consumer)
                if not consumers:
                    del self.consumers[index]
                    return True
        return False

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

"""A hit, from a stopped thread's registers to what the user sees: counts, events, Python handlers."""

from __future__ import annotations

import time
import weakref

from ...consumers import REMOVE, Consumer, Hit
from ...output.event import Event
from ...probes.evaluate import HitContext, evaluate
from ...probes.resolve import Probe
from ...proc.status import last_cpu
from ...stacks import ProcessStacks, StackLimits
from ...x86_64.abi import RETURN_VALUE, return_value
from ...x86_64.unwind import RIP, UNWOUND_REGISTERS, StackCopy
from .syscalls import Regs, ptrace_getfpregs
from .tracee import Process, Thread

__all__ = ["Reporter"]


class Reporter:
    """Counts hits per probe, builds their events (unless only counting) and runs their consumers."""

    def __init__(self, probes: list[Probe], consumers: dict[int, list[Consumer]], counting: bool,
                 stacks: StackLimits | None = None) -> None:
        """``stacks``: each event carries its user stack, copied at the stop and unwound after it."""
        self.probes = probes
        self.consumers = {index: list(c) for index, c in consumers.items()}
        self.counting = counting
        self.hits = [0] * len(probes)
        self.events: list[Event] = []
        self.stack_limits = stacks
        # Per address space (an exec makes a new one under the same pid), its code read while it is stopped.
        self._stacks: weakref.WeakKeyDictionary[Process, ProcessStacks] = weakref.WeakKeyDictionary()
        self._unwinding: list[tuple[Event, ProcessStacks, StackCopy]] = []  # unwound in take_events()

    def report(self, thread: Thread, address: int, file_offset: int, regs: Regs, probes: list[int],
               retval: int | None = None, returns_to: int | None = None) -> list[int]:
        """Hits of ``probes`` at ``address`` by ``thread`` (a return probe's: returning to ``returns_to``);
        the probes whose last consumer went meanwhile."""
        gone = []
        stack = None
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
                value = retval if probe.replaces_return else \
                    return_value(getattr(regs, RETURN_VALUE)) if probe.returns_value_here else None
                event = Event(probe.name, pid, thread.tid, context.comm, time.monotonic_ns(),
                              last_cpu(pid, thread.tid), probe.reported_address(address), args, value,
                              errors or None, probe.is_return, index)
                self.events.append(event)
                if self.stack_limits is not None:
                    stack = stack or _copy_stack(thread, regs, returns_to, self.stack_limits.size)
                    self._unwinding.append((event, self._stacks_of(thread.process, stack), stack))
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

    def _stacks_of(self, process: Process, stack: StackCopy) -> ProcessStacks:
        stacks = self._stacks.get(process)
        if stacks is None:
            stacks = self._stacks[process] = ProcessStacks(process.pid, self.stack_limits.depth)
        stacks.ensure_mapped(stack.registers[RIP])  # a library loaded since: read while the process is there
        return stacks

    def take_events(self) -> list[Event]:
        for event, stacks, stack in self._unwinding:
            event.stack = stacks.frames(stack)
        self._unwinding.clear()
        events, self.events = self.events, []
        return events


def _copy_stack(thread: Thread, regs: Regs, returns_to: int | None, size: int) -> StackCopy:
    """The registers an unwinder needs and ``size`` bytes of the stack from ``%rsp`` up, with the return
    addresses we sent to the return trampoline put back as the program wrote them (``returns_to``: where a
    return goes on)."""
    registers = {number: getattr(regs, field) for number, field in UNWOUND_REGISTERS.items()}
    if returns_to is not None:
        registers[RIP] = returns_to
    try:
        data = thread.process.memory.read_available(regs.rsp, size)
    except OSError:
        data = b""
    return StackCopy(registers, regs.rsp, data).with_words({r.stack: r.original for r in thread.returns})

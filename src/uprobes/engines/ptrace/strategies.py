"""How the instruction under a probe's ``int3`` runs at a hit: one strategy per breakpoint, chosen once.

============  ====================================================================  ===========================
Strategy      At a hit                                                              A thread caught inside it
============  ====================================================================  ===========================
Emulate       the tracer applies the instruction to the registers (one stop); a     never inside: nothing to do
              stack write the program could not make is stepped instead
Boost         the thread runs a copy in a kept slot that jumps back by itself       back before the copy, or on
              (one stop)                                                            past the jump back
Step          the thread single-steps a copy in a lent slot (two stops), fixed up   step finished if it ran,
              afterwards (:class:`Step`)                                            else undone
============  ====================================================================  ===========================

Each also places and takes out its breakpoint (:meth:`Strategy.place`, :meth:`Strategy.restore`). Whose code
an address is in is asked of the area (:meth:`~.xol.XolArea.owner`): a boosted breakpoint and a step are the
owners of their slots. A stepping thread meets everything a thread can meet: its own trap, a signal, a
group-stop, our interrupt, its end. :func:`on_step_stop` is the one place that decides what each means.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...proc.status import signal_pending
from ...x86_64.abi import BREAKPOINT
from ...x86_64.analysis import EmulationFault
from .memory import ProcessMemory
from .syscalls import EVENT_STOP, TRAP_TRACE, Regs, ptrace_getregs, ptrace_getsiginfo, ptrace_setregs
from .tracee import STOPPED, WAITING_FOR_SLOT, Thread, is_fault

if TYPE_CHECKING:
    from .placement import Breakpoint

__all__ = ["INT3", "Strategy", "Emulate", "Boost", "StepOutOfLine", "Step", "strategy_for", "start_step", "retry_step",
           "on_step_stop", "settle_step", "GROUP_STOP_SIGNALS"]

INT3 = BREAKPOINT
GROUP_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


class Strategy:
    """What a breakpoint does at a hit, and what it answers for a thread found inside its code."""

    def __init__(self, breakpoint: Breakpoint) -> None:
        self.breakpoint = breakpoint

    def execute(self, thread: Thread, regs: Regs) -> None:
        """Run the displaced instruction for ``thread``, trapped with ``regs.rip`` at the probe."""
        start_step(thread, self.breakpoint, regs)

    def settle(self, thread: Thread, regs: Regs) -> None:
        """``thread`` is stopped inside this strategy's code: put it back on the program's own path."""

    def place(self, memory: ProcessMemory, via: int) -> None:
        """Write the breakpoint over the instruction."""
        memory.write(self.breakpoint.address, INT3, via)

    def restore(self, memory: ProcessMemory, via: int) -> bool:
        """Write back what the breakpoint replaced (its first byte, under the int3), if our int3 is still
        there; False when the program rewrote that byte (self-modifying code): it is left as it is. A mapping
        gone with its library needs nothing."""
        address = self.breakpoint.address
        try:
            if memory.read(address, len(INT3)) != INT3:
                return False
            memory.write(address, self.breakpoint.original[:len(INT3)], via)
        except OSError:
            pass
        return True


class StepOutOfLine(Strategy):
    """Single-step a copy from a slot lent for that one step."""


class Emulate(Strategy):
    """Apply the instruction in the tracer. Its stack writes go through as the program's own would, so a
    push into a guard page is stepped instead, and faults in the program as it would have."""

    def execute(self, thread: Thread, regs: Regs) -> None:
        try:
            self.breakpoint.plan.emulate(regs, thread.process.memory.as_program)
        except EmulationFault:
            start_step(thread, self.breakpoint, regs)  # regs are as they were: at the probe
            return
        thread.run_on(regs)


class Boost(Strategy):
    """Run a copy followed by a jump back from a slot kept for this breakpoint; step while none is free. The
    slot stays kept while the area lives, even once the breakpoint is gone: a thread sent into it a moment
    before may not have run it yet, and this strategy still answers for that thread."""

    def __init__(self, breakpoint: Breakpoint) -> None:
        super().__init__(breakpoint)
        self.slot: int | None = None

    def execute(self, thread: Thread, regs: Regs) -> None:
        area = thread.process.area
        if self.slot is None:
            self.slot = area.keep(self.breakpoint.plan.boost_code, self, thread.tid)
        if self.slot is None:
            start_step(thread, self.breakpoint, regs)
            return
        regs.rip = self.slot
        thread.run_on(regs)

    def settle(self, thread: Thread, regs: Regs) -> None:
        plan = self.breakpoint.plan
        regs.rip = plan.address if regs.rip == self.slot else plan.address + plan.length
        ptrace_setregs(thread.tid, regs)

    def on_signal(self, thread: Thread, regs: Regs, sig: int) -> None:
        """A signal for a thread inside the slot: never delivered there, since a handler's frame would point
        into the area. Before the copy: a fault it raised is delivered at the probe; any other signal waits
        while the copy is stepped. At the jump back: delivered at the next instruction."""
        info = ptrace_getsiginfo(thread.tid)
        if regs.rip == self.slot and not is_fault(sig, info):
            thread.step = Step(self.breakpoint, self.slot, {}, lent=False)
            thread.hold(sig, info)
            thread.resume()
            return
        self.settle(thread, regs)
        thread.resume(sig)


_CHOICES = ((lambda plan: plan.kind == "emulate", Emulate),
            (lambda plan: plan.boost_code is not None, Boost),
            (lambda plan: True, StepOutOfLine))


def strategy_for(breakpoint: Breakpoint) -> Strategy:
    """The first strategy of the table that can run the breakpoint's instruction."""
    return next(make for fits, make in _CHOICES if fits(breakpoint.plan))(breakpoint)


# -- stepping out of line -----------------------------------------------------------------------------------

@dataclass(eq=False, slots=True)
class Step:
    """One thread's run of a displaced instruction from a slot (``lent``: for this step only)."""

    breakpoint: Breakpoint
    slot: int
    saved: dict  # registers the fixup puts back (a rip-relative scratch)
    lent: bool = True
    mask: int | None = None  # the thread's own signal mask, while we defer its signals

    def settle(self, thread: Thread, regs: Regs) -> None:
        settle_step(thread, regs)


def start_step(thread: Thread, breakpoint: Breakpoint, regs: Regs) -> None:
    """Send ``thread`` (trapped, ``regs.rip`` at the probe) through a lent slot; with every slot lent, it
    waits, stopped, until :meth:`PtraceEngine` wakes it with :func:`retry_step`."""
    regs.rip = breakpoint.address
    step = Step(breakpoint, 0, {})
    area = thread.process.area
    slot = area.lend(breakpoint.plan.slot_code, step, thread.tid)
    if slot is None:
        thread.hit, thread.state = breakpoint, WAITING_FOR_SLOT
        area.waiters.append(thread)
        return
    step.slot = slot
    step.saved = breakpoint.plan.prepare_step(regs, slot)
    ptrace_setregs(thread.tid, regs)
    thread.hit, thread.step = None, step
    thread.resume()


def retry_step(thread: Thread) -> None:
    """A slot came free for a thread that waited for one."""
    start_step(thread, thread.hit, ptrace_getregs(thread.tid))


def on_step_stop(thread: Thread, event: int, sig: int, serving: bool, finish: bool = False) -> None:
    """``thread`` owns a step and reported a stop: its own trap ends the step; anything else waits for it
    (serving) or settles it (``serving`` False: the world is being stopped). ``finish``: the world is being
    paused, and the step goes on until it ends (the thread then stays stopped)."""
    step = thread.step
    regs = ptrace_getregs(thread.tid)
    if not event and sig == signal.SIGTRAP and _ends_step(thread, step, regs):
        _finish(thread, regs)
        if serving:
            thread.resume(thread.take_held())
        return
    info = ptrace_getsiginfo(thread.tid) if not event else None
    if info is not None:
        if serving and regs.rip == step.slot and is_fault(sig, info):
            # The copy itself faulted: deliver the fault at the original address (hazard 18).
            step.breakpoint.plan.abort_step(regs, step.saved)
            ptrace_setregs(thread.tid, regs)
            _end(thread)
            thread.resume(thread.take_held(sig))
            return
        thread.hold(sig, info)  # (hazard 17)
    if finish and not (event == EVENT_STOP and sig in GROUP_STOP_SIGNALS) and not (info is not None and is_fault(sig, info)):
        thread.resume()  # with the trap flag: the step goes on, and its trap ends it (the first case above)
    elif not serving and event == EVENT_STOP and regs.rip != step.slot \
            and signal_pending(thread.process.pid, thread.tid, signal.SIGTRAP):
        thread.resume()  # the copy ran and its trap is due: take it now, not after we are gone (hazard 24)
    elif not serving:
        settle_step(thread, regs)
    elif event == EVENT_STOP and sig in GROUP_STOP_SIGNALS:
        thread.listen()  # Ctrl-Z: the step waits in the group-stop; SIGCONT's stop resumes it below
    else:
        thread.resume()  # with the trap flag: the step goes on


def settle_step(thread: Thread, regs: Regs) -> None:
    """A stopped thread that owns a step: finish it if the copy ran, else undo it (back to the probe)."""
    step = thread.step
    if regs.rip == step.slot:
        step.breakpoint.plan.abort_step(regs, step.saved)
        ptrace_setregs(thread.tid, regs)
        _end(thread)
    else:
        _finish(thread, regs)


def _ends_step(thread: Thread, step: Step, regs: Regs) -> bool:
    """Whether a SIGTRAP ends the step: the copy has run (where the thread stands says so, without asking
    the siginfo on every hit), or, for a rep string instruction at its start, the trap is the single-step's.
    Otherwise it is a SIGTRAP someone sent, held like any signal. If the trap flag was lost, the thread ran
    into the slot's int3 padding right after the copy: it is taken back to the copy's end. (A SIGTRAP sent
    with tgkill just as the copy ran is merged by the kernel with the step's trap, and is lost.)"""
    ran = step.breakpoint.plan.step_ran(regs.rip, step.slot)
    if ran is None:
        ran = ptrace_getsiginfo(thread.tid).si_code == TRAP_TRACE
    end = step.slot + len(step.breakpoint.plan.slot_code)
    if ran and step.lent and regs.rip - 1 == end:
        regs.rip = end
    return ran


def _finish(thread: Thread, regs: Regs) -> None:
    step = thread.step
    step.breakpoint.plan.finish_step(regs, step.slot, step.saved, thread.process.memory.through(thread.tid))
    ptrace_setregs(thread.tid, regs)
    _end(thread)


def _end(thread: Thread) -> None:
    step = thread.step
    thread.restore_mask()
    if step.lent:
        thread.process.area.release(step.slot)
    thread.step = None
    thread.state = STOPPED

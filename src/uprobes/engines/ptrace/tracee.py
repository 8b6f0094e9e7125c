"""Traced threads and processes: the state each thread is in, and the only code that restarts one.

A thread's :class:`State` says what the engine owes it. Every ``PTRACE_CONT``, ``PTRACE_SINGLESTEP`` and
``PTRACE_LISTEN`` of the engine goes through :meth:`Thread.resume` or :meth:`Thread.listen`, so a thread
that owns an out-of-line step is always restarted with the trap flag (a ``PTRACE_CONT`` would clear it and
let the copy run on into the slot's padding).
"""

from __future__ import annotations

import enum
import signal
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...proc.status import thread_comm
from .memory import ProcessMemory
from .semaphores import Semaphores
from .syscalls import (Regs, SigInfo, ptrace_cont, ptrace_getsigmask, ptrace_listen, ptrace_setregs, ptrace_setsiginfo,
                       ptrace_setsigmask, ptrace_singlestep, tgkill)
from .xol import XolArea

if TYPE_CHECKING:
    from .placement import Breakpoint
    from .returns import Return
    from .strategies import Step

__all__ = ["State", "Thread", "Process", "RUNNING", "STOPPED", "TRAPPED", "WAITING_FOR_SLOT", "STEPPING",
           "LISTENING", "EXITING"]

_FAULT_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
# Blocked while a step is in flight once one signal has been held. A fault signal or SIGTRAP raised while
# blocked would reset the program's handler to SIG_DFL, so those stay open (SIGKILL and SIGSTOP cannot close).
_DEFERRABLE = sum(1 << (sig - 1) for sig in range(1, 65)
                  if sig not in _FAULT_SIGNALS | {signal.SIGTRAP, signal.SIGKILL, signal.SIGSTOP})


class State(enum.Enum):
    """What a traced thread is doing, as far as the engine is concerned."""

    RUNNING = "running"  # the program's code, or a boosted copy of one instruction in a slot
    STOPPED = "stopped"  # in a ptrace stop with nothing of ours in flight
    TRAPPED = "trapped at a probe"  # stopped on a probe's int3; the displaced instruction has not run
    WAITING_FOR_SLOT = "waiting for a slot"  # trapped, and every out-of-line slot is lent: stays stopped
    STEPPING = "stepping out of line"  # running the displaced instruction from its slot, trap flag set
    LISTENING = "group-stopped"  # SIGSTOP or Ctrl-Z: left in the stop by PTRACE_LISTEN (a step may be owed)
    EXITING = "exiting"  # a ptrace call found it gone (SIGKILL): its exit stop or its end is due

    @property
    def stopped(self) -> bool:
        """Whether the thread is in a ptrace stop where its registers can be read and written."""
        return self in _IN_A_STOP


# The states by name for the hit path: reading a member from its class costs three times a global in 3.11.
RUNNING, STOPPED, TRAPPED, WAITING_FOR_SLOT, STEPPING, LISTENING, EXITING = State
_IN_A_STOP = frozenset({STOPPED, TRAPPED, WAITING_FOR_SLOT})


@dataclass(eq=False)
class Process:
    """One address space we placed breakpoints in (a vfork or CLONE_VM child shares its owner's)."""

    pid: int
    memory: ProcessMemory
    breakpoints: dict[int, Breakpoint] = field(default_factory=dict)
    memory_owner: Process | None = None
    semaphores: Semaphores = field(default_factory=Semaphores)
    retired: set[int] = field(default_factory=set)  # addresses of breakpoints removed with their last probe
    _area: XolArea | None = None

    @property
    def owns_memory(self) -> bool:
        return self.memory_owner is None

    @property
    def area(self) -> XolArea | None:
        """The out-of-line area of this address space: its owner's, for a child sharing it (mapped on demand,
        perhaps after the child was born)."""
        return self._area if self.memory_owner is None else self.memory_owner.area

    @area.setter
    def area(self, area: XolArea | None) -> None:
        if self.memory_owner is None:
            self._area = area
        else:
            self.memory_owner.area = area


@dataclass(eq=False)
class Thread:
    """One traced thread. ``hit``: the breakpoint it is trapped on; ``step``: the step it owns, if any."""

    tid: int
    process: Process
    state: State = RUNNING
    hit: Breakpoint | None = None
    step: Step | None = None
    held: list[tuple[int, SigInfo]] = field(default_factory=list)  # signals that arrived during a step
    in_signal_stop: bool = False  # this stop is a signal-delivery-stop, where a signal can be injected
    vfork_child: int | None = None  # the child it vforked and waits for, in the kernel, until it reports a stop
    returns: list[Return] = field(default_factory=list)  # pending returns, innermost last
    # pending returns found below the stack pointer: left by longjmp, or on another stack (64: MAX_RETURN_DEPTH)
    set_aside: deque[Return] = field(default_factory=lambda: deque(maxlen=64))
    _comm: str | None = None

    @property
    def comm(self) -> str:
        """The thread's name, read once per program image (an exec renames it)."""
        if self._comm is None:
            self._comm = thread_comm(self.process.pid, self.tid)
        return self._comm

    def renamed(self) -> None:
        """An exec gave the thread a new name (the program's)."""
        self._comm = None

    def resume(self, sig: int = 0) -> None:
        """Restart a stopped thread, with signal ``sig``: by a single step if it owns one, else to run on."""
        if self.step is not None:
            ptrace_singlestep(self.tid, sig)
            self.state = STEPPING
        else:
            ptrace_cont(self.tid, sig)
            if self.state is not EXITING:
                self.state = RUNNING

    def run_on(self, regs: Regs) -> None:
        """A trapped thread is done with its hit: restart it from ``regs``."""
        ptrace_setregs(self.tid, regs)
        self.hit = None
        self.resume()

    def listen(self) -> None:
        """Leave the thread in its group-stop, to be woken by SIGCONT (hazards 3-4)."""
        ptrace_listen(self.tid)
        self.state = LISTENING

    def hold(self, sig: int, info: SigInfo) -> None:
        """Keep a signal that arrived during a step, with its siginfo, and defer the others in the kernel's
        queue until the step is done, as the kernel's uprobe_deny_signal() does (hazard 17)."""
        self.held.append((sig, info))
        if self.step is not None and self.step.mask is None:
            self.step.mask = ptrace_getsigmask(self.tid)
            ptrace_setsigmask(self.tid, self.step.mask | _DEFERRABLE)

    def restore_mask(self) -> None:
        """The step is over: the thread's own signal mask again."""
        if self.step is not None and self.step.mask is not None:
            ptrace_setsigmask(self.tid, self.step.mask)
            self.step.mask = None

    def take_held(self, current: int = 0) -> int:
        """The signal to restart with: ``current``, the signal of this stop, or else the first one held, with
        its own siginfo. Any other held signal is sent again: only a signal that cannot be deferred (SIGSTOP,
        a sent fault signal) comes after the first."""
        if not self.held:
            return current
        held, self.held = self.held, []
        if not current and held and self.in_signal_stop:
            current, info = held.pop(0)
            ptrace_setsiginfo(self.tid, info)
        for sig, _ in held:
            tgkill(self.process.pid, self.tid, sig)
        return current


def is_fault(sig: int, info: SigInfo) -> bool:
    """Whether a signal is a fault the thread's own instruction raised (not one sent to it)."""
    return sig in _FAULT_SIGNALS and info.si_code > 0

"""Stopping the world: every thread stopped, nothing of ours in flight; then, at detach, everything undone.

A thread caught in the middle of a hit is put back on the program's own path: trapped or waiting for a
slot, back to the probed instruction (its int3 is about to go, so it runs the real one); stepping, the
step finished or undone; inside a boosted copy, before it or past its jump back. Whose code a thread is in
is asked of the out-of-line area, once (hazard 24).
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

from .family import when_stopped
from .returns import put_back, returned
from .stops import Phase, dispatch
from .strategies import Boost
from .syscalls import WALL, ptrace_detach, ptrace_getregs, ptrace_interrupt, ptrace_setregs
from .tracee import EXITING, STOPPED, Process, Thread

if TYPE_CHECKING:
    from .engine import PtraceEngine

__all__ = ["stop_world", "detach_all", "let_process_go", "restore"]

_STOP_SECONDS = 10


def stop_world(engine: PtraceEngine, detaching: bool = True) -> None:
    """Interrupt every thread that is not stopped, stepping and group-stopped ones included, and wait until
    each is stopped with nothing in flight (``detaching`` False: the world goes on afterwards, so a return
    about to be taken at the trampoline is left to be taken and reported, a step under way finishes, and a
    thread sent into a boosted copy stays there: each has had its hit reported)."""
    family = engine.family
    for thread in list(family.threads.values()):
        if not thread.state.stopped and thread.state is not EXITING:
            try:
                ptrace_interrupt(thread.tid)
            except ProcessLookupError:
                family.gone(thread.tid, None)
    deadline = time.monotonic() + _STOP_SECONDS
    while time.monotonic() < deadline and not all(family.at_rest(t) for t in family.threads.values()):
        try:
            tid, status = os.waitpid(-1, WALL | os.WNOHANG)
        except ChildProcessError:
            break
        if tid == 0:
            signal.sigtimedwait({signal.SIGCHLD}, 0.05)
            continue
        dispatch(engine, tid, status, Phase.STOPPING if detaching else Phase.PAUSING)
    for thread in list(family.threads.values()):
        if thread.process.area is not None:
            thread.process.area.waiters.clear()
        if thread.state.stopped:
            try:
                _settle(thread, engine, detaching)
            except ProcessLookupError:
                family.gone(thread.tid, None)


def _settle(thread: Thread, engine: PtraceEngine, detaching: bool) -> None:
    regs = ptrace_getregs(thread.tid)
    area = thread.process.area
    if thread.hit is not None:  # trapped, or waiting for a slot
        regs.rip = thread.hit.address
        ptrace_setregs(thread.tid, regs)
    elif area is not None and regs.rip == area.trampoline:  # returned, its trap not taken yet
        ended = returned(thread, regs) if detaching else None
        if ended:
            regs.rip = ended[-1].original
            ptrace_setregs(thread.tid, regs)
    elif area is not None and (owner := area.owner(regs.rip)) is not None:
        if detaching or not isinstance(owner, Boost):  # a boosted copy's slot is kept while the area is
            owner.settle(thread, regs)
    elif detaching:
        engine.placement.jumps.settle(thread, regs)
    thread.hit, thread.state = None, STOPPED


def detach_all(engine: PtraceEngine) -> None:
    """With the world stopped: every byte restored, every area unmapped, every thread let go with the
    signals held for it."""
    family = engine.family
    family.let_go_unadopted()
    for process in list(family.processes.values()):
        restore(engine, process)
    _let_go(family.threads.values())


def restore(engine: PtraceEngine, process: Process) -> None:
    """With the world stopped: every byte we wrote in ``process`` restored (return addresses too), its areas
    unmapped."""
    family = engine.family
    via = family.stopped_in(process)
    if not process.owns_memory or via is None:
        return
    for thread in family.threads.values():
        if thread.process is process or thread.process.memory_owner is process:
            put_back(process.memory, [*thread.returns, *thread.set_aside], process.area, via.tid)
            thread.returns.clear()
            thread.set_aside.clear()
    engine.placement.restore(process, via.tid)
    engine.placement.jumps.unmap(process, via.tid)
    if process.area is not None:
        process.area.unmap(via.tid)
        process.area = None


def let_process_go(engine: PtraceEngine, process: Process) -> None:
    """With ``process``'s threads stopped (the others may run): everything of ours taken out of it, its threads
    detached, and it forgotten."""
    family = engine.family
    restore(engine, process)
    threads = [thread for thread in family.threads.values() if thread.process is process]
    _let_go(threads)
    for thread in threads:
        family.threads.pop(thread.tid, None)
    family.processes.pop(process.pid, None)
    engine.placement.jumps.forget(process)
    process.memory.close()


def _let_go(threads) -> None:
    """Detach ``threads`` (stopped), each with the signals held for it."""
    # A held signal may end the process (Ctrl-C reached it too): its threads still traced would then stop at
    # their exit for a tracer that has left, and the process would never end. So those go last.
    dying = []
    for thread in sorted(threads, key=lambda t: bool(t.held)):
        if thread.state is EXITING:
            dying.append(thread.tid)
            continue
        try:
            ptrace_detach(thread.tid, thread.take_held())
        except ProcessLookupError:
            dying.append(thread.tid)  # not in a stop any more: killed on its way to its exit stop
    when_stopped(dying, 5, lambda tid: ptrace_detach(tid, 0))

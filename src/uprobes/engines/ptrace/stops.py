"""The one waitpid dispatcher: every stop and end of every traced thread is routed from here.

The phase is a parameter: while **serving**, a hit is reported and the thread goes on; while **stopping**
the world (detach), nothing new starts: a hit is rewound unreported, a signal is held for the detach, a step
is settled, and only a thread that must report a trap first is let run. **Pausing** the world for a moment
(to write jumps, read threads' keys, take out probes) is stopping it, except that a step already under way
finishes first: its hit was reported, and undoing it would have the thread hit the probe, and report it,
again (a Go program's goroutine, preempted there, even from another thread).
"""

from __future__ import annotations

import enum
import os
import signal
from typing import TYPE_CHECKING

from ...proc.status import signal_pending
from .strategies import GROUP_STOP_SIGNALS, on_step_stop
from .syscalls import EVENT_CLONE, EVENT_EXEC, EVENT_EXIT, EVENT_FORK, EVENT_STOP, EVENT_VFORK, WALL
from .tracee import EXITING, STOPPED

if TYPE_CHECKING:
    from .engine import PtraceEngine

__all__ = ["Phase", "dispatch", "drain"]


class Phase(enum.Enum):
    SERVING = "serving hits"
    STOPPING = "stopping the world"
    PAUSING = "stopping the world for a moment"


def drain(engine: PtraceEngine, phase: Phase) -> bool:
    """Handle every stop already reported, round-robin so no thread starves (hazard 8); whether any was."""
    handled = False
    while True:
        try:
            # any tid, never one (a leader that exits early would block us: hazard 11); __WALL: hazard 5
            tid, status = os.waitpid(-1, os.WNOHANG | WALL)
        except ChildProcessError:
            return handled
        if tid == 0:
            return handled
        handled = True
        dispatch(engine, tid, status, phase)


def dispatch(engine: PtraceEngine, tid: int, status: int, phase: Phase) -> None:
    """Route one waitpid status of ``tid``."""
    family = engine.family
    serving = phase is Phase.SERVING
    if not os.WIFSTOPPED(status):  # it ended
        engine.freed_slot(family.gone(tid, status), serving)
        return
    thread = family.threads.get(tid)
    if thread is None:
        try:
            family.unknown_stop(tid, status, serving)
        except ProcessLookupError:
            family.gone(tid, None)
        return
    event, sig = status >> 16, os.WSTOPSIG(status)
    thread.in_signal_stop = not event
    thread.vfork_child = None  # a parent that stops again is done waiting for its vfork child
    if thread.step is None and thread.state is not EXITING:
        thread.state = STOPPED
    try:
        if thread.state is EXITING or event == EVENT_EXIT:
            if event == EVENT_EXIT:
                engine.placement.jumps.exiting(thread)
            thread.resume()  # its end goes on; WIFEXITED follows (hazards 12-13)
        elif thread.step is not None:
            on_step_stop(thread, event, sig, serving, finish=phase is Phase.PAUSING)
            engine.freed_slot(thread if thread.step is None else None, phase is not Phase.STOPPING)
        elif event == 0 and sig == signal.SIGTRAP:
            engine.on_trap(thread, serving)
        elif event == 0:
            engine.on_signal(thread, sig, serving)
        elif event == EVENT_STOP:
            _on_event_stop(thread, sig, serving)
        elif event == EVENT_CLONE:
            family.on_clone(thread, serving)
        elif event in (EVENT_FORK, EVENT_VFORK):
            family.on_fork(thread, event == EVENT_VFORK, serving)
        elif event == EVENT_EXEC:
            family.on_exec(thread, engine.insert if serving else None)
        if serving and thread.state is STOPPED:
            thread.resume()  # nothing kept it: an event (clone, fork, vfork done), our interrupt
    except ProcessLookupError:
        engine.freed_slot(family.gone(tid, None), serving)  # it died between two ptrace calls (hazard 12)


def _on_event_stop(thread, sig: int, serving: bool) -> None:
    """A group-stop, our interrupt, a new thread's first stop, or SIGCONT ending a group-stop."""
    if serving and sig in GROUP_STOP_SIGNALS:
        thread.listen()  # SEIZE tells a group-stop by EVENT_STOP; it stays a stop (hazards 3-4)
    elif not serving and signal_pending(thread.process.pid, thread.tid, signal.SIGTRAP):
        # Our interrupt was reported before the SIGTRAP of an int3 the thread has just hit: let it take that
        # SIGTRAP now, so it is rewound, and not after we are gone (hazard 24).
        thread.resume()

"""Surviving a SIGKILL of the tool: the process the user started stays in front, the work runs in a child.

A ptrace tracer cannot be replaced by a guardian after it dies: the kernel detaches every tracee at once
(``exit_ptrace``), a thread stopped at one of our ``int3`` then receives the SIGTRAP it stopped for
(``ptrace_signal`` takes ``current->exit_code``, which no tracer cleared), and the others run into the
``int3`` still in place, all within microseconds: no process that starts acting after the tracer is gone
wins that race (measured: 0 of 10 targets lived). So the roles are the other way round. When ``uprobes``
attaches to a running process, it forks: the child attaches, traces and writes the output, and dies with a
SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), which ends in the same clean detach as a Ctrl-C; the
parent, the pid the user knows, only waits, passes on the stop signals sent to it alone, and exits with the
child's status. ``kill -9`` of that pid leaves the traced process as it was.

A command that ``uprobes`` launches is not guarded this way: it dies with the tool (PTRACE_O_EXITKILL).
"""

from __future__ import annotations

import ctypes
import os
import signal

from . import STOP_SIGNALS

__all__ = ["work_in_a_child"]

_PR_SET_PDEATHSIG = 1
# si_code of kill(), sigqueue() and tgkill(): a signal sent to the front alone. One from the terminal
# (SI_KERNEL) went to the whole foreground process group, the child included, and is not passed on.
_SENT = {0, -1, -6}


def work_in_a_child() -> None:
    """Fork. Returns in the child, which does the work; the parent stays in front until the child ends, then
    exits with its status (never returns)."""
    front = os.getpid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS | {signal.SIGCHLD})
    child = os.fork()
    if child == 0:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS | {signal.SIGCHLD})
        if os.getppid() != front:  # the front died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
        return
    _stay_in_front(child)


def _stay_in_front(child: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS | {signal.SIGCHLD})
        if info.si_signo == signal.SIGCHLD:
            done, status = os.waitpid(child, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                os._exit(128 - code if code < 0 else code)
        elif info.si_code in _SENT and info.si_pid != child:
            os.kill(child, info.si_signo)

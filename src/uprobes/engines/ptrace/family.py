"""Who is traced: the threads and processes of a run, as they are seized, clone, fork, exec and end.

A fork child inherits every ``int3`` (hazard 14): followed, it gets breakpoints and an area of its own;
not followed, every byte we wrote is taken out of its copy before it goes. A vfork child, or one made by
``clone(CLONE_VM)`` without ``CLONE_THREAD``, shares its parent's memory, so it is serviced like a thread
until it execs or exits (hazard 15).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable

from ...errors import ProcessError, UprobesError
from ...proc.status import explain_seize_error, tgid, thread_ids
from .memory import ProcessMemory
from .placement import Placement
from .returns import Return, put_back
from .shadow import Forked
from .semaphores import Semaphores
from .strategies import GROUP_STOP_SIGNALS
from .syscalls import (EVENT_CLONE, EVENT_EXEC, EVENT_FORK, EVENT_STOP, EVENT_VFORK, WALL, ptrace_cont,
                       ptrace_detach, ptrace_geteventmsg, ptrace_getsiginfo, ptrace_interrupt, ptrace_seize,
                       same_memory)
from .tracee import EXITING, RUNNING, STOPPED, Process, Thread
from .xol import XolArea

__all__ = ["Family", "when_stopped"]

# A fork or vfork: its kind, the parent, the pending returns of the thread that forked (trapped, and kept by jumps)
_Announced = tuple[str, Process, list[Return], Forked | None]


class Family:
    """The run's threads and processes, and children announced but not yet seen."""

    def __init__(self, placement: Placement, follow_forks: bool) -> None:
        self.placement = placement
        self.follow_forks = follow_forks
        self.threads: dict[int, Thread] = {}
        self.processes: dict[int, Process] = {}
        self.exit_status: dict[int, int] = {}
        self._newborn: dict[int, int] = {}  # stops of tids we have not been told about yet (hazard 7)
        self._children: dict[int, _Announced] = {}  # forks announced, not yet stopped
        self.group_stopped: set[int] = set()  # threads the last seize_all found in a group-stop (SIGSTOP, Ctrl-Z)

    # -- seizing ----------------------------------------------------------------------------------------------

    def seize(self, pid: int, tid: int, options: int) -> None:
        try:
            ptrace_seize(tid, options)
        except OSError as exc:
            raise ProcessError(explain_seize_error(pid, exc)) from None

    def seize_held(self, pid: int, options: int) -> Process:
        """A command held before its exec: its one thread, seized; its probes go in at the exec."""
        self.seize(pid, pid, options)
        process = self.processes[pid] = Process(pid, ProcessMemory(pid))
        self.threads[pid] = Thread(pid, process)  # running: it waits for its release, then execs
        return process

    def seize_all(self, pid: int, options: int) -> Process:
        """SEIZE and INTERRUPT every thread, re-reading the task list until no new thread turns up (hazard 6);
        every thread is stopped when this returns."""
        process = self.processes[pid] = Process(pid, ProcessMemory(pid))
        seized: set[int] = set()
        self.group_stopped = set()
        while True:
            tids = thread_ids(pid)
            if not tids:
                raise ProcessError(f"process {pid} does not exist")
            new = tids - seized
            if not new:
                break
            for tid in sorted(new):
                try:
                    self.seize(pid, tid, options)  # SEIZE, never ATTACH: no stray SIGSTOP (hazards 1-2)
                    ptrace_interrupt(tid)
                except ProcessError:
                    if tid == pid:
                        raise
                    continue  # the thread exited meanwhile
                self.threads[tid] = Thread(tid, process)
                seized.add(tid)
        self._await_interrupt_stops(seized)
        return process

    def _await_interrupt_stops(self, seized: set[int]) -> None:
        """Wait until each seized thread is in a ptrace stop. Any stop will do, not only our interrupt's (the
        kernel clears a pending interrupt at any stop): at an event the child or thread it made is taken in
        and runs; a parent at its vfork event is run on and interrupted again, so that it stops once its
        child has exec'd or exited (never left where running it would wait for a child we may stop: see
        :meth:`stopped_in`); at a signal the signal is held, to be delivered when the thread is let go
        (nothing is placed yet)."""
        while seized:
            tid, status = os.waitpid(-1, WALL)
            thread = self.threads.get(tid)
            if not os.WIFSTOPPED(status):
                self.gone(tid, status)
                seized.discard(tid)
                continue
            event, sig = status >> 16, os.WSTOPSIG(status)
            try:
                if thread is None:
                    self.unknown_stop(tid, status, serving=True)
                    continue
                if event == EVENT_CLONE:
                    self.on_clone(thread, serving=True)
                elif event in (EVENT_FORK, EVENT_VFORK):
                    self.on_fork(thread, event == EVENT_VFORK, serving=True)
                elif event == EVENT_EXEC:
                    self.on_exec(thread, None)  # a child taken in meanwhile: its own memory now
                    if self.threads.get(tid) is not thread:
                        continue  # let go
                elif event == 0 and sig != signal.SIGTRAP:
                    thread.held.append((sig, ptrace_getsiginfo(tid)))
                elif event == EVENT_STOP and sig in GROUP_STOP_SIGNALS:
                    self.group_stopped.add(tid)
                thread.in_signal_stop = not event
                if tid in seized and thread.vfork_child is not None:
                    thread.vfork_child = None
                    ptrace_cont(tid, 0)
                    ptrace_interrupt(tid)
                elif tid in seized:
                    thread.state = STOPPED
                    seized.discard(tid)
                else:
                    ptrace_cont(tid, 0)  # a thread born meanwhile: its first stop
            except ProcessLookupError:
                self.gone(tid, None)
                seized.discard(tid)

    # -- threads and children ---------------------------------------------------------------------------------

    def let_run(self, group_stopped: frozenset[int] | set[int] = frozenset()) -> None:
        """Restart every stopped thread, with the signals held for it; those of ``group_stopped`` go back into
        the group-stop they were in (Ctrl-Z). One that died meanwhile is gone."""
        for tid, thread in list(self.threads.items()):
            if not thread.state.stopped:
                continue
            try:
                if tid in group_stopped:
                    self._listen(thread)
                else:
                    thread.resume(thread.take_held())
            except ProcessLookupError:
                self.gone(tid, None)

    @staticmethod
    def _listen(thread: Thread) -> None:
        try:
            thread.listen()
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            # It left its group-stop to run our code (an area mapped as it was seized): stopped again, it
            # reports the stop, which is listened to then.
            thread.resume(signal.SIGSTOP)

    def sharing(self, process: Process) -> list[Thread]:
        """Every thread running in the memory of ``process``: its own, and those of children sharing it."""
        return [t for t in self.threads.values() if t.process is process or t.process.memory_owner is process]

    def at_rest(self, thread: Thread) -> bool:
        """Whether ``thread`` runs none of the program's code until we let it, with nothing about to be reported
        for it: stopped (a parent at its vfork event once its child's first stop is in), exiting, or a parent
        waiting in the kernel for a vfork child we hold stopped (which cannot stop before its child goes)."""
        if thread.state is EXITING:
            return True
        if thread.state.stopped:
            return thread.vfork_child not in self._children
        child = self.threads.get(thread.vfork_child) if thread.vfork_child is not None else None
        return child is not None and child.state.stopped

    def stopped_in(self, process: Process) -> Thread | None:
        """A thread in a ptrace stop through which the memory of ``process`` can be written and system calls
        run: one of its own, or of a child sharing it. Never a parent at its vfork event: run on, it would wait
        in the kernel for its child, which may be stopped at a probe or held by us, and we would wait for it."""
        return next((t for t in self.sharing(process) if t.state.stopped and t.vfork_child is None), None)

    def on_clone(self, thread: Thread, serving: bool) -> None:
        """``thread`` made a thread; its first stop may have come already (hazard 7)."""
        new_tid = ptrace_geteventmsg(thread.tid)
        if new_tid in self.threads:
            return
        if self._newborn.pop(new_tid, None) is None:
            self.threads[new_tid] = Thread(new_tid, thread.process)  # its first stop is on its way
            return
        new = self.threads[new_tid] = Thread(new_tid, thread.process, STOPPED)
        if serving:
            self._start(new)

    def on_fork(self, thread: Thread, vfork: bool, serving: bool) -> None:
        """``thread`` forked (or vforked) a child, which is traced from its first stop on."""
        child = ptrace_geteventmsg(thread.tid)
        if vfork:
            thread.vfork_child = child
        announced = ("vfork" if vfork else "fork", thread.process, list(thread.returns),
                     self.placement.jumps.forked(thread))
        if self._newborn.pop(child, None) is None:
            self._children[child] = announced
        else:
            self._take(child, announced, serving)

    def unknown_stop(self, tid: int, status: int, serving: bool) -> None:
        """A new thread or child whose first stop came before its parent's event (hazard 7)."""
        announced = self._children.pop(tid, None)
        if announced is not None:
            self._take(tid, announced, serving)
            return
        group = tgid(tid)
        parent = self.processes.get(group)
        if parent is not None and group != tid:
            thread = self.threads[tid] = Thread(tid, parent, STOPPED)
            if serving:
                self._start(thread)
        else:
            self._newborn[tid] = status

    def _start(self, thread: Thread) -> None:
        """Let a new thread or child run; one killed meanwhile is gone (the ESRCH is its, not its parent's)."""
        try:
            self.placement.jumps.started(thread)
            thread.resume()
        except ProcessLookupError:
            self.gone(thread.tid, None)

    def _take(self, pid: int, announced: _Announced, serving: bool) -> None:
        """A child at its first stop: one sharing its parent's memory is a thread of that memory until it
        execs or exits (detached with the others, after the restore, if the world is being stopped); a fork
        child is followed, or let go clean (always, once the world is being stopped)."""
        kind, parent, returns, forked = announced
        try:
            if kind == "vfork" or _shares_memory(parent.pid, pid):
                thread = self._share(pid, parent)
                if not self.follow_forks or self.placement.jumps.recorder is not None:
                    # its hits trap: a record would name its parent's thread (they share the TLS)
                    self.placement.jumps.suspend(thread.process.memory_owner, pid, pid)
                if serving:
                    self._start(thread)
            elif self.follow_forks and serving:
                self._follow(pid, parent, returns, forked)
            else:
                self._let_go(pid, parent, returns, forked)
        except (ProcessLookupError, UprobesError):
            self.gone(pid, None)  # it ended meanwhile

    def _share(self, pid: int, parent: Process) -> Thread:
        child = self.processes[pid] = Process(pid, parent.memory, parent.breakpoints,
                                              memory_owner=parent.memory_owner or parent,
                                              semaphores=parent.semaphores)
        thread = self.threads[pid] = Thread(pid, child, STOPPED)
        return thread

    def _let_go(self, pid: int, parent: Process, returns: list[Return], forked: Forked | None) -> None:
        """Detach a fork child after taking every byte we wrote out of its copy of its parent's memory."""
        memory = ProcessMemory(pid)
        try:
            self.placement.clean_copy(parent, memory, pid)
            put_back(memory, returns, parent.area, pid)  # the trampoline is not in the child
            self.placement.jumps.clean_copy(parent, memory, pid, forked)
        finally:
            memory.close()
        ptrace_detach(pid, 0)

    def _follow(self, pid: int, parent: Process, returns: list[Return], forked: Forked | None) -> None:
        """Trace a fork child as its parent: the same breakpoints (its copy of memory has the int3s already),
        its own out-of-line area at the parent's address, and the pending returns of the forking thread."""
        child = self.processes[pid] = Process(pid, ProcessMemory(pid),
                                              semaphores=Semaphores(parent.semaphores.raised))
        child.breakpoints = {address: b.copy() for address, b in parent.breakpoints.items()}
        thread = self.threads[pid] = Thread(pid, child, STOPPED)  # gone() forgets it if it dies meanwhile
        if parent.area is not None:
            child.area = XolArea(pid, child.memory, at=parent.area.address)
            if child.area.trampoline == parent.area.trampoline:
                thread.returns = [Return(r.stack, r.original, child.breakpoints.get(r.breakpoint.address, r.breakpoint),
                                         r.probes, r.chained) for r in returns]
            else:
                put_back(child.memory, returns, parent.area, pid)
        self.placement.jumps.follow(parent, child, pid, forked)
        thread.resume()

    def let_go_unadopted(self) -> None:
        """Children forked just before we stopped, whose first stop is not reported yet: each is traced (our
        options are inherited), so it would die with us (EXITKILL) unless let go, clean, like a thread."""
        when_stopped(list(self._children), 2, lambda pid: self._take(pid, self._children.pop(pid), False))

    def on_exec(self, thread: Thread, insert: Callable[[Process, int], None] | None) -> None:
        """A new image: the old breakpoints and area went with the old memory (hazards 9-10); ``insert``
        places the probes in the new one (None: the world is being stopped, the thread stays stopped)."""
        old = thread.process
        pid = old.pid
        if old.owns_memory:
            self.placement.jumps.execing(thread)
        for tid, other in list(self.threads.items()):
            if other.process is old and tid != thread.tid:
                del self.threads[tid]  # the other threads are gone; the exec'ing one now has tid == pid
        if thread.tid != pid:
            del self.threads[thread.tid]
            thread.tid = pid
            self.threads[pid] = thread
        if not old.owns_memory and not self.follow_forks:  # it leaves the shared memory: let it go
            del self.threads[pid]
            del self.processes[pid]
            ptrace_detach(pid, 0)
            thread.state = RUNNING  # on its own now
            self.placement.jumps.unsuspend(old.memory_owner, pid, old.memory_owner.pid)
            return
        if old.owns_memory:  # a vfork child borrowed its parent's memory: nothing of its own to close
            old.memory.close()
            self.placement.jumps.forget(old)
        process = self.processes[pid] = Process(pid, ProcessMemory(pid))
        thread.process, thread.step, thread.hit = process, None, None
        thread.returns.clear()
        thread.renamed()
        if insert is not None:
            insert(process, pid)
            thread.resume()

    def gone(self, tid: int, status: int | None) -> Thread | None:
        """``tid`` ended (``status``), or a ptrace call said ESRCH (``status`` None), which a thread killed on
        its way out also says: it still reports its exit stop, and must be let go then or its process never
        ends (hazard 12). Returns the thread if it owned a slot, now free."""
        thread = self.threads.get(tid)
        if status is None and thread is not None:
            thread.state = EXITING
        elif thread is not None:
            del self.threads[tid]
            self.placement.jumps.ended(thread)
        if status is not None and tid in self.processes and self.processes[tid].owns_memory:
            self.exit_status[tid] = os.waitstatus_to_exitcode(status)  # not of every vfork child: they come by the million
        freed = None
        if thread is not None and thread.process.area is not None and thread in thread.process.area.waiters:
            thread.process.area.waiters.remove(thread)
        if thread is not None and thread.step is not None:
            if thread.step.lent:
                thread.process.area.release(thread.step.slot)  # a thread that ends mid-step frees its slot
            thread.step, freed = None, thread
        process = self.processes.get(tid)
        if process is not None and not any(t.process is process for t in self.threads.values()):
            if process.owns_memory:
                process.memory.close()
                self.placement.jumps.forget(process)
            else:
                self.placement.jumps.unsuspend(process.memory_owner, tid, process.memory_owner.pid)
            del self.processes[tid]
        return freed


def when_stopped(tids: list[int], seconds: float, act: Callable[[int], None]) -> None:
    """Wait up to ``seconds`` for each of ``tids`` to report a stop and ``act`` on it then; one that ends
    instead, or has ended, needs nothing."""
    deadline = time.monotonic() + seconds
    waiting = set(tids)
    while waiting and time.monotonic() < deadline:
        for tid in list(waiting):
            try:
                reported, status = os.waitpid(tid, WALL | os.WNOHANG)
            except ChildProcessError:  # gone, or reaped with its process
                reported, status = tid, 0
            if not reported:
                continue
            waiting.discard(tid)
            if os.WIFSTOPPED(status):
                try:
                    act(tid)
                except ProcessLookupError:
                    pass
        if waiting:
            signal.sigtimedwait({signal.SIGCHLD}, 0.01)


def _shares_memory(pid: int, child: int) -> bool:
    try:
        return same_memory(pid, child)
    except OSError:
        return False  # kcmp is missing (a kernel without CONFIG_KCMP) or the parent is gone: a fork, as before

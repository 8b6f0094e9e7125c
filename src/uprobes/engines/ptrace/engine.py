"""The ptrace engine: uprobes in user space, with breakpoints and single-step out of line.

Each probe point is an ``int3`` over the first byte of an instruction, placed in every mapping of the
probed file. At a hit the thread's registers are read once, every consumer of the point runs (fetch
arguments, a Python handler), and the displaced instruction is either emulated or single-stepped from a
slot of the out-of-line area; the ``int3`` never leaves, so no other thread misses the probe meanwhile.
What to do with an instruction is decided once, at insertion, by :mod:`uprobes.x86_64.analysis`.

Every ptrace call comes from the thread that calls :meth:`PtraceEngine.attach` and :meth:`poll`.
Hazards of section 4 of the ptrace note are named where they are handled (``hazard N``).
"""

from __future__ import annotations

import errno
import functools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ...elf.objfile import ElfObject
from ...errors import ProcessError, UprobesError
from ...output.event import Event
from ...probes.evaluate import HitContext, evaluate
from ...probes.resolve import Probe
from ...proc.maps import read_maps, runtime_addresses
from ...errors import UnprobeableInstruction
from ...x86_64.analysis import EmulationFault, Plan, analyze
from .memory import ProcessMemory
from .semaphores import Semaphores
from .syscalls import (EVENT_CLONE, EVENT_EXEC, EVENT_EXIT, EVENT_FORK, EVENT_STOP, EVENT_VFORK, EXITKILL, OPTIONS,
                       SI_KERNEL, WALL, Regs, ptrace_cont, ptrace_detach, ptrace_geteventmsg, ptrace_getregs,
                       SigInfo, ptrace_getfpregs, ptrace_getsiginfo, ptrace_getsigmask, ptrace_interrupt, ptrace_listen,
                       ptrace_seize, ptrace_setregs, ptrace_setsiginfo, ptrace_setsigmask, ptrace_singlestep,
                       same_memory, tgkill)
from .xol import XolArea

__all__ = ["PtraceEngine", "Hit", "Consumer", "REMOVE"]

REMOVE = object()  # a handler returns this to be removed from its probe
_MAX_INSTRUCTION = 16
_GROUP_STOP_SIGNALS = {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
_FAULT_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
# Blocked while a step is in flight once one signal has been held. A fault signal or SIGTRAP raised while
# blocked would reset the program's handler to SIG_DFL, so those stay open (SIGKILL and SIGSTOP cannot close).
_DEFERRABLE = sum(1 << (sig - 1) for sig in range(1, 65)
                  if sig not in _FAULT_SIGNALS | {signal.SIGTRAP, signal.SIGKILL, signal.SIGSTOP})
_AT_BASE = 7
_UNWINDERS = ("_Unwind_RaiseException", "_Unwind_ForcedUnwind", "_Unwind_Resume_or_Rethrow")
MAX_RETURN_DEPTH = 64  # the kernel's MAX_URETPROBE_DEPTH
_TOOL_STOPPERS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_WAKERS = _TOOL_STOPPERS | {signal.SIGCHLD}
_MASK64 = (1 << 64) - 1
# While stops come closer together than this, the next one is awaited by polling waitpid, not by sleeping:
# on a VM, waking a sleeping tracer costs more than the hit itself (perf-levers.md; bench/ measures it).
_SPIN_S = 0.002


@dataclass
class Hit:
    """What a Python handler receives: the probe, the thread, its registers and a safe memory reader."""

    probe: Probe
    pid: int
    tid: int
    regs: Regs
    memory: ProcessMemory  # read() raises OSError on a bad address; the target is never harmed
    args: dict
    errors: dict


@dataclass
class Consumer:
    """A Python handler of one probe's hits; ``pid``: only that process's. A handler that returns
    :data:`REMOVE` goes; when a probe's last consumer goes, so does the probe, and its byte is restored."""

    handler: Callable[[Hit], object]
    pid: int | None = None


@dataclass
class _Breakpoint:
    address: int
    original: bytes  # the instruction's bytes as they were (the first one is under the int3)
    plan: Plan
    probes: list[int] = field(default_factory=list)
    file_offset: int = 0
    internal: str | None = None  # the engine's own: "rendezvous" (ld.so), "unwind" (libgcc_s), "catch" (libstdc++)


@dataclass
class _Return:
    """A pending return: the return address at ``stack`` was replaced by the trampoline (section 6 of the
    kernel note). ``chained``: a tail call found the trampoline there already and shares the caller's return."""

    stack: int
    original: int
    breakpoint: _Breakpoint
    probes: list[int]
    chained: bool = False


@dataclass
class _Step:
    breakpoint: _Breakpoint
    slot: int
    saved: dict
    mask: int | None = None  # the thread's own signal mask, while we defer its signals


@dataclass
class _Thread:
    tid: int
    process: _Process
    running: bool = True
    step: _Step | None = None
    hit: _Breakpoint | None = None  # trapped on this probe, its instruction not yet run or given a step
    held: list[tuple[int, SigInfo]] = field(default_factory=list)  # signals that arrived during a step
    at_signal_stop: bool = False  # stopped in a signal-delivery-stop, where a signal can be injected
    comm: str | None = None
    returns: list[_Return] = field(default_factory=list)


@dataclass
class _Process:
    pid: int
    memory: ProcessMemory
    breakpoints: dict[int, _Breakpoint] = field(default_factory=dict)
    xol: XolArea | None = None
    memory_owner: _Process | None = None  # a vfork or clone(CLONE_VM) child shares this process's memory
    semaphores: Semaphores = field(default_factory=Semaphores)
    retired: set[int] = field(default_factory=set)  # breakpoints removed with their last consumer


def _uninterrupted(method):
    """Ctrl-C, SIGTERM and SIGHUP to the tool wait until ``method`` is done: the exception their handler raises
    halfway through a stop would lose it, and leave a thread stopped past a probe's int3 (hazard 24)."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _TOOL_STOPPERS)
        try:
            return method(*args, **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _TOOL_STOPPERS - previous)
    return wrapper


class PtraceEngine:
    """Probes placed and serviced by this process through ptrace. Use as a context manager."""

    name = "ptrace"
    reaps_children = True  # the tracing thread collects its tracees' exits; ask exited() for them

    def __init__(self) -> None:
        self._probes: list[Probe] = []
        self._consumers: dict[int, list[Consumer]] = {}
        self._removed: set[int] = set()  # probes whose last consumer went
        self._hits: list[int] = []
        self._events: list[Event] = []
        self._counting = False
        self._processes: dict[int, _Process] = {}
        self._threads: dict[int, _Thread] = {}
        self._exit_status: dict[int, int] = {}
        self._newborn: dict[int, int] = {}  # stops of tids we have not been told about yet (hazard 7)
        self._dying: set[int] = set()  # tids that vanished from a ptrace call (ESRCH) and may still stop at exit
        self._children: dict[int, tuple] = {}  # fork/vfork children announced, not yet stopped
        self._slot_waiters: list[_Thread] = []
        self._sigchld_blocked = False
        self._stopping = False
        self.lost = 0
        self.skipped_returns = 0
        self._placed: set[int] = set()  # probes placed in some process at some time
        self._follow_forks = True  # return probes left out past the depth cap, reported at the end
        self._last_stop = 0.0  # time.perf_counter() when stops were last handled
        self._stop_gap = math.inf  # and how long before that the previous ones were

    def __enter__(self) -> PtraceEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- attaching ---------------------------------------------------------------------------------------

    @_uninterrupted
    def attach(self, probes: list[Probe], pid: int | None, *, counting: bool = False, held: bool = False,
               follow_forks: bool = True, consumers: dict[int, list[Consumer]] | None = None) -> None:
        """Place ``probes`` in process ``pid``: a running one (every thread is seized), or, with ``held``, a
        child held before its exec (probes go in at the exec, before the program's first instruction).
        Children it forks are traced too, unless ``follow_forks`` is False: then they are let go, every
        byte we wrote taken out of their copy of memory first."""
        if pid is None:
            raise UprobesError("the ptrace engine traces one process: give -p PID or a command to run")
        self._probes = list(probes)
        self._hits = [0] * len(probes)
        self._counting = counting
        self._follow_forks = follow_forks
        self._consumers = {i: list(c) for i, c in (consumers or {}).items()}
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # waited for with sigtimedwait
        self._sigchld_blocked = True
        if held:
            self._seize(pid, pid, OPTIONS | EXITKILL)  # a command we launch dies with us, not of SIGTRAP (hazard 25)
            process = _Process(pid, ProcessMemory(pid))
            self._processes[pid] = process
            self._threads[pid] = _Thread(pid, process)
            return  # the probes go in at PTRACE_EVENT_EXEC
        process = _Process(pid, ProcessMemory(pid))
        self._processes[pid] = process
        self._seize_all_threads(process)
        try:
            self._insert(process, next(iter(t for t in self._threads.values() if t.process is process)).tid)
        finally:
            for thread in list(self._threads.values()):
                self._resume(thread)

    def _seize(self, pid: int, tid: int, options: int) -> None:
        try:
            ptrace_seize(tid, options)
        except OSError as exc:
            raise ProcessError(_explain_seize_error(pid, exc)) from None

    def _seize_all_threads(self, process: _Process) -> None:
        """SEIZE and INTERRUPT every thread, re-reading the task list until no new thread turns up (hazard 6)."""
        pid = process.pid
        while True:
            try:
                tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
            except FileNotFoundError:
                raise ProcessError(f"process {pid} does not exist") from None
            new = tids - self._threads.keys()
            if not new:
                break
            for tid in sorted(new):
                try:
                    self._seize(pid, tid, OPTIONS)  # SEIZE, never ATTACH: no stray SIGSTOP (hazards 1-2)
                    ptrace_interrupt(tid)
                except ProcessError:
                    if tid == pid:
                        raise
                    continue  # the thread exited meanwhile
                self._threads[tid] = _Thread(tid, process)
        for thread in list(self._threads.values()):
            self._wait_interrupt_stop(thread)

    def _wait_interrupt_stop(self, thread: _Thread) -> None:
        while True:
            _, status = os.waitpid(thread.tid, WALL)
            if not os.WIFSTOPPED(status):
                del self._threads[thread.tid]
                return
            if status >> 16 == EVENT_STOP:
                thread.running = False
                return
            sig = os.WSTOPSIG(status)
            ptrace_cont(thread.tid, sig if status >> 16 == 0 and sig != signal.SIGTRAP else 0)  # nothing is placed yet

    def _insert(self, process: _Process, tid: int, at_exec: bool = False, strict: bool = True) -> None:
        """Place every probe whose file ``process`` maps now; analyse them all before writing a byte.

        ``strict``: an instruction that cannot be probed is an error (at attach and exec, before anything is
        written); later (a library loaded by the program) that probe is left out with a warning.
        """
        if _shadow_stack(process.pid):
            # Emulated calls, stepped calls and returns through our trampoline would disagree with the CET
            # shadow stack and kill the process (hazard 31): refuse rather than disturb it.
            raise ProcessError(f"process {process.pid} runs with a CET shadow stack, which the ptrace engine "
                               f"cannot keep consistent; use --engine kernel")
        planned: dict[int, tuple[list[int], int, bytes]] = {}  # address -> (probe indices, file offset, code)
        mappings = read_maps(process.pid)
        wanted = set()
        for index, probe in enumerate(self._probes):
            if index in self._removed:
                continue
            for address in runtime_addresses(mappings, probe.path, probe.offset, "x"):
                wanted.add(address)
                if address in process.breakpoints:
                    if index not in process.breakpoints[address].probes:
                        process.breakpoints[address].probes.append(index)
                elif address in planned:
                    planned[address][0].append(index)
                else:
                    planned[address] = ([index], probe.offset, process.memory.read(address, _MAX_INSTRUCTION))
        for address in [a for a, b in process.breakpoints.items() if not b.internal and a not in wanted]:
            del process.breakpoints[address]  # its object was unmapped (dlclose): nothing left to restore
        plans = {}
        for address, (indices, _offset, code) in planned.items():
            try:
                _check_not_taken(code, self._probes[indices[0]], address)
                plans[address] = analyze(code, address)
            except UnprobeableInstruction as exc:
                if strict:
                    raise  # nothing is written yet
                names = ", ".join(self._probes[i].name for i in indices)
                print(f"uprobes: warning: {names} left out: {exc}", file=sys.stderr)
        if plans:
            self._ensure_xol(process, tid)
        self._placed.update(i for b in process.breakpoints.values() for i in b.probes)
        for address, plan in plans.items():
            indices, offset, code = planned[address]
            self._placed.update(indices)
            process.memory.write(address, b"\xcc", tid)
            process.breakpoints[address] = _Breakpoint(address, code, plan, indices, offset)
        process.semaphores.raise_armed(process.memory, mappings,
                                       [p for i, p in enumerate(self._probes) if i not in self._removed], tid)
        self._rendezvous_breakpoint(process, tid)  # at exec, and in a process attached with -p
        if any(probe.is_return for probe in self._probes):
            self._unwind_breakpoints(process, tid, mappings)

    def _ensure_xol(self, process: _Process, tid: int) -> None:
        if process.xol is None:
            process.xol = XolArea(tid, process.memory)  # on demand, at the first probe

    def _rendezvous_breakpoint(self, process: _Process, tid: int) -> None:
        """The dynamic linker calls ``_dl_debug_state`` (``r_debug.r_brk``) after it maps or unmaps objects
        and before their constructors run: an engine breakpoint there places the probes of every object a
        program links or dlopens (section 5 of the ptrace note)."""
        base = _auxv(process.pid, _AT_BASE)
        interpreter = next((m for m in read_maps(process.pid) if m.start == base and m.path), None)
        if base and interpreter is not None:  # else a static program: nothing is loaded later
            self._internal_breakpoint(process, tid, interpreter, "_dl_debug_state", "rendezvous")

    def _unwind_breakpoints(self, process: _Process, tid: int, mappings) -> None:
        """The C++ unwinder cannot walk through a return address replaced by the trampoline (the kernel's
        uretprobes make such a throw end in std::terminate). So when a thread starts unwinding, its pending
        return addresses are put back; where the exception is caught (``__cxa_begin_catch``), the frames it
        unwound are dropped (and counted) and the trampoline goes back into the frames still alive."""
        for mapping in mappings:
            name = os.path.basename(mapping.path)
            if mapping.executable and name.startswith("libgcc_s.so"):
                for symbol in _UNWINDERS:
                    self._internal_breakpoint(process, tid, mapping, symbol, "unwind")
            elif mapping.executable and name.startswith("libstdc++.so"):
                self._internal_breakpoint(process, tid, mapping, "__cxa_begin_catch", "catch")

    def _internal_breakpoint(self, process: _Process, tid: int, mapping, symbol: str, role: str) -> None:
        try:
            obj = ElfObject.open(mapping.path)
            found = obj.symbols.lookup(symbol)
            if not found:
                return
            address = mapping.start - mapping.offset + obj.vaddr_to_offset(found[0].value)
        except UprobesError:
            return
        if address in process.breakpoints:
            return
        code = process.memory.read(address, _MAX_INSTRUCTION)
        self._ensure_xol(process, tid)
        process.memory.write(address, b"\xcc", tid)
        process.breakpoints[address] = _Breakpoint(address, code, analyze(code, address), internal=role)

    # -- running -----------------------------------------------------------------------------------------

    def hit_counts(self) -> list[int]:
        return list(self._hits)

    def report(self) -> list[str]:
        """What the user should hear at the end: probes that never found their object, skipped returns."""
        notes = [f"never mapped: {probe.name} ({probe.path}); the program did not load it"
                 for index, probe in enumerate(self._probes) if index not in self._placed]
        if self.skipped_returns:
            notes.append(f"{self.skipped_returns} return probes skipped (nesting deeper than {MAX_RETURN_DEPTH}, "
                         f"an unreadable stack, or frames unwound by a C++ exception)")
        return notes

    def exited(self, pid: int) -> int | None:
        """How ``pid`` ended (as ``os.waitstatus_to_exitcode``) once it has, if this engine reaped it."""
        return self._exit_status.get(pid)

    @_uninterrupted
    def poll(self, timeout: float) -> list[Event]:
        """Service the target for up to ``timeout`` seconds; return the events of the hits meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            handled = self._drain()
            if handled:
                now = time.perf_counter()
                self._stop_gap, self._last_stop = now - self._last_stop, now
            if self._events and not handled:
                break
            remaining = deadline - time.monotonic()
            if not self._threads or remaining <= 0:
                break
            if not handled and not self._spin():
                woken = signal.sigtimedwait(_WAKERS, remaining)
                if woken is not None and woken.si_signo in _TOOL_STOPPERS:
                    # Sent again, to be handled once we return; the events wait for the next poll.
                    signal.pthread_kill(threading.get_ident(), woken.si_signo)
                    return []
        events, self._events = self._events, []
        return events

    def _spin(self) -> bool:
        """Poll for a stop until _SPIN_S after the last one, if stops have been coming faster than that;
        True if one came. When none does, the next waits sleep until stops come quickly again."""
        if self._stop_gap >= _SPIN_S:
            return False
        end = self._last_stop + _SPIN_S
        while time.perf_counter() < end:
            if self._drain():
                return True
        self._stop_gap = math.inf
        return False

    def _drain(self) -> bool:
        """Handle every stop already reported (round-robin, so no thread starves: hazard 8)."""
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
            self._on_status(tid, status)

    def _on_status(self, tid: int, status: int) -> None:
        thread = self._threads.get(tid)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self._gone(tid, status)
            return
        if thread is None:
            self._unknown_stop(tid, status)
            return
        thread.running = False
        event, sig = status >> 16, os.WSTOPSIG(status)
        thread.at_signal_stop = not event
        try:
            if event:
                self._on_event(thread, event, sig)
            elif sig == signal.SIGTRAP:
                self._on_trap(thread)
            else:
                self._on_signal(thread, sig)
        except ProcessLookupError:
            self._gone(tid, None)  # the thread died between two ptrace calls (hazard 12)

    def _gone(self, tid: int, status: int | None) -> None:
        """``status`` None: a ptrace call said ESRCH, which a thread killed on its way out also says; it still
        reports its exit stop, and must be let go then or its process never ends (hazard 12)."""
        if status is None:
            self._dying.add(tid)
        else:
            self._dying.discard(tid)
        thread = self._threads.pop(tid, None)
        if thread is not None and thread.step is not None and thread.process.xol:
            thread.process.xol.release(thread.step.slot)  # a thread that exits mid-step frees its slot
            self._wake_slot_waiter(thread.process)
        if thread in self._slot_waiters:
            self._slot_waiters.remove(thread)
        if status is not None and tid in self._processes:
            self._exit_status[tid] = os.waitstatus_to_exitcode(status)
        process = self._processes.get(tid)
        if process is not None and not any(t.process is process for t in self._threads.values()):
            if process.memory_owner is None:  # a vfork child borrowed its parent's memory
                process.memory.close()
            del self._processes[tid]

    def _unknown_stop(self, tid: int, status: int) -> None:
        """A new thread or child whose first stop came before its parent's event (hazard 7)."""
        announced = self._children.pop(tid, None)
        if announced is not None:
            self._adopt_child(tid, *announced)
            return
        tgid = _tgid(tid)
        parent = self._processes.get(tgid)
        if parent is not None and tgid != tid:
            thread = _Thread(tid, parent, running=False)
            self._threads[tid] = thread
            self._resume(thread)
        else:
            self._newborn[tid] = status

    def _on_event(self, thread: _Thread, event: int, sig: int) -> None:
        if event == EVENT_STOP:
            if sig in _GROUP_STOP_SIGNALS:
                ptrace_listen(thread.tid)  # SEIZE tells a group-stop by EVENT_STOP; it stays a stop (hazards 3-4)
                thread.running = True
                return
            self._resume(thread)  # the stop of PTRACE_INTERRUPT or of a new thread
        elif event == EVENT_CLONE:
            new_tid = ptrace_geteventmsg(thread.tid)
            if new_tid not in self._threads:
                self._threads[new_tid] = _Thread(new_tid, thread.process, running=False)
                if self._newborn.pop(new_tid, None) is not None:
                    self._resume(self._threads[new_tid])
            self._resume(thread)
        elif event in (EVENT_FORK, EVENT_VFORK):
            child = ptrace_geteventmsg(thread.tid)
            kind = "vfork" if event == EVENT_VFORK else "fork"
            announced = (kind, thread.process, list(thread.returns))
            if self._newborn.pop(child, None) is not None:
                self._adopt_child(child, *announced)
            else:
                self._children[child] = announced
            self._resume(thread)
        elif event == EVENT_EXEC:
            self._on_exec(thread)
        elif event == EVENT_EXIT:
            self._resume(thread)  # the exit goes on; WIFEXITED follows (hazard 13)
        else:
            self._resume(thread)

    def _adopt_child(self, pid: int, kind: str, parent: _Process, returns: list[_Return]) -> None:
        """A fork child inherits every int3 (hazard 14): take them out of its copy and let it go. A vfork child,
        or one made by clone(CLONE_VM) without CLONE_THREAD, shares its parent's memory, so it is serviced like a
        thread until it execs or exits (hazard 15)."""
        if kind == "vfork" or _shares_memory(parent.pid, pid):
            owner = parent.memory_owner or parent
            child = _Process(pid, parent.memory, parent.breakpoints, parent.xol, memory_owner=owner,
                             semaphores=parent.semaphores)
            self._processes[pid] = child
            thread = _Thread(pid, child, running=False)
            self._threads[pid] = thread
            self._resume(thread)
            return
        if self._follow_forks:
            self._follow(pid, parent, returns)
        else:
            self._let_go(pid, parent, returns)

    def _let_go(self, pid: int, parent: _Process, returns: list[_Return]) -> None:
        """Detach a fork child after taking every byte we wrote out of its copy of its parent's memory."""
        memory = ProcessMemory(pid)
        try:
            for breakpoint in parent.breakpoints.values():
                memory.write(breakpoint.address, breakpoint.original[:1], pid)
            _restore_returns(memory, returns, parent.xol, pid)  # the trampoline is not in the child
            Semaphores(parent.semaphores.raised).lower_all(memory, pid)
        finally:
            memory.close()
        ptrace_detach(pid, 0)

    def _follow(self, pid: int, parent: _Process, returns: list[_Return]) -> None:
        """Trace a fork child as its parent: the same breakpoints (its copy of memory has the int3s already),
        its own out-of-line area at the parent's address, and the pending returns of the forking thread."""
        child = _Process(pid, ProcessMemory(pid), semaphores=Semaphores(parent.semaphores.raised))
        child.breakpoints = {address: replace(b, probes=list(b.probes)) for address, b in parent.breakpoints.items()}
        self._processes[pid] = child
        thread = _Thread(pid, child, running=False)
        self._threads[pid] = thread
        if parent.xol is not None:
            child.xol = XolArea(pid, child.memory, at=parent.xol.address)
            if child.xol.trampoline == parent.xol.trampoline:
                thread.returns = [replace(r) for r in returns]
            else:
                _restore_returns(child.memory, returns, parent.xol, pid)
        self._resume(thread)

    def _on_exec(self, thread: _Thread) -> None:
        """A new image: the old breakpoints and area went with the old memory (hazards 9-10)."""
        old = thread.process
        pid = old.pid
        for tid, other in list(self._threads.items()):
            if other.process is old and tid != thread.tid:
                del self._threads[tid]  # the other threads are gone; the exec'ing one now has tid == pid
        if thread.tid != pid:
            del self._threads[thread.tid]
            thread.tid = pid
            self._threads[pid] = thread
        if old.memory_owner is not None and not self._follow_forks:  # it leaves the shared memory: let it go
            del self._threads[pid]
            del self._processes[pid]
            ptrace_detach(pid, 0)
            return
        if old.memory_owner is None:  # a vfork child borrowed its parent's memory: nothing of its own to close
            old.memory.close()
        process = _Process(pid, ProcessMemory(pid))
        self._processes[pid] = process
        thread.process = process
        thread.step = None
        thread.returns.clear()
        self._insert(process, pid, at_exec=True)
        self._resume(thread)

    def _on_trap(self, thread: _Thread) -> None:
        if thread.step is not None:
            self._finish_step(thread)
            return
        regs = ptrace_getregs(thread.tid)
        address = regs.rip - 1
        breakpoint = thread.process.breakpoints.get(address)
        xol = thread.process.xol
        if xol is not None and address == xol.trampoline:  # only its int3 leads there
            self._returned(thread, regs)
            return
        # The program's own int3, or a sent SIGTRAP (hazard 22). Only after a one-byte instruction can a thread
        # stand just past a probe without having run its int3, so only then is the siginfo worth asking.
        if breakpoint is None and address in thread.process.retired \
                and ptrace_getsiginfo(thread.tid).si_code == SI_KERNEL:
            regs.rip = address  # it trapped before its probe went: run the restored instruction
            ptrace_setregs(thread.tid, regs)
            self._resume(thread)
            return
        if breakpoint is None or (breakpoint.plan.length == 1
                                  and ptrace_getsiginfo(thread.tid).si_code != SI_KERNEL):
            self._resume(thread, signal.SIGTRAP)
            return
        regs.rip = address
        thread.hit = breakpoint
        if breakpoint.internal == "rendezvous":
            self._insert(thread.process, thread.tid, strict=False)  # objects were mapped or unmapped
        elif breakpoint.internal == "unwind" and thread.returns:
            _restore_returns(thread.process.memory, thread.returns, thread.process.xol, thread.tid)
        elif breakpoint.internal == "catch" and thread.returns:
            self._caught(thread, regs)
        self._report(thread, breakpoint, regs, [i for i in breakpoint.probes if not self._probes[i].is_return])
        returning = [i for i in breakpoint.probes if self._probes[i].is_return]
        if returning:
            self._hijack_return(thread, breakpoint, regs, returning)
        self._execute(thread, breakpoint, regs)

    def _hijack_return(self, thread: _Thread, breakpoint: _Breakpoint, regs: Regs, probes: list[int]) -> None:
        """At a function's first instruction, [rsp] is its return address: send it to the trampoline."""
        memory, trampoline = thread.process.memory, thread.process.xol.trampoline
        try:
            original = int.from_bytes(memory.read(regs.rsp, 8), "little")
        except OSError:
            self.skipped_returns += 1
            return
        chained = original == trampoline  # a tail call: the caller's return is already ours, in this slot
        # Frames left by longjmp are below the stack pointer now: drop them, unreported. A tail call's caller
        # shares this very slot and stays (the kernel's RP_CHECK_CHAIN_CALL).
        while thread.returns and (thread.returns[-1].stack < regs.rsp
                                  or thread.returns[-1].stack == regs.rsp and not chained):
            thread.returns.pop()
        if len(thread.returns) >= MAX_RETURN_DEPTH:
            self.skipped_returns += 1
            return
        try:
            if chained:
                if not thread.returns:
                    return
                original = thread.returns[-1].original
            else:
                memory.write(regs.rsp, trampoline.to_bytes(8, "little"), thread.tid)
        except OSError:
            self.skipped_returns += 1
            return
        thread.returns.append(_Return(regs.rsp, original, breakpoint, probes, chained))

    def _caught(self, thread: _Thread, regs: Regs) -> None:
        """An exception is caught in the frame calling ``__cxa_begin_catch``: the frames at or below its return
        address were unwound; the others return as usual again, through the trampoline."""
        alive = [instance for instance in thread.returns if instance.stack > regs.rsp]
        self.skipped_returns += len(thread.returns) - len(alive)
        thread.returns[:] = alive
        memory, trampoline = thread.process.memory, thread.process.xol.trampoline
        for instance in alive:
            try:
                if int.from_bytes(memory.read(instance.stack, 8), "little") == instance.original:
                    memory.write(instance.stack, trampoline.to_bytes(8, "little"), thread.tid)
            except OSError:
                pass  # left as the program wrote it; the return goes unreported

    def _returned(self, thread: _Thread, regs: Regs, report: bool = True) -> None:
        """A hijacked function returned to the trampoline: its ``ret`` popped the slot at ``rsp - 8``."""
        frame = regs.rsp - 8
        while thread.returns and thread.returns[-1].stack < frame:
            thread.returns.pop()  # returns skipped by longjmp (their frames are gone)
        if not thread.returns:
            self._resume(thread, signal.SIGILL)  # nothing to return to: as the kernel does
            return
        while True:
            instance = thread.returns.pop()
            regs.rip = instance.breakpoint.address  # events of a return probe carry the function's address
            if report:
                self._report(thread, instance.breakpoint, regs, instance.probes, retval=_signed(regs.rax))
            if not instance.chained or not thread.returns:
                break
        regs.rip = instance.original
        ptrace_setregs(thread.tid, regs)
        if report:
            self._resume(thread)

    def _report(self, thread: _Thread, breakpoint: _Breakpoint, regs: Regs, probes: list[int],
                retval: int | None = None) -> None:
        if thread.process.memory_owner is not None and not self._follow_forks:
            return  # a child serviced only because it shares its parent's memory (and our int3s): not followed
        for index in probes:
            self._hits[index] += 1
            if self._counting and index not in self._consumers:
                continue
            probe = self._probes[index]
            context = HitContext(regs, thread.process.memory, breakpoint.address, breakpoint.file_offset,
                                 self._comm(thread), retval, lambda: ptrace_getfpregs(thread.tid))
            args, errors = evaluate(probe.fetchargs, context)
            probe.typed(args)
            if not self._counting:
                self._events.append(Event(probe.name, thread.process.pid, thread.tid, context.comm,
                                          time.monotonic_ns(), _cpu_of(thread), breakpoint.address, args, retval,
                                          errors or None, probe.is_return, index))
            for consumer in list(self._consumers.get(index, ())):
                if consumer.pid not in (None, thread.process.pid):
                    continue
                if consumer.handler(Hit(probe, thread.process.pid, thread.tid, regs, thread.process.memory, args,
                                        errors)) is REMOVE:
                    self._consumers[index].remove(consumer)
                    if not self._consumers[index]:
                        self._remove_probe(index)

    def _remove_probe(self, index: int) -> None:
        """The last consumer of probe ``index`` went: it counts no more, and a breakpoint left with no probe
        is taken out of every process (threads already trapped on it are rewound in :meth:`_on_trap`)."""
        del self._consumers[index]
        self._removed.add(index)
        probe = self._probes[index]
        for process in self._processes.values():
            if process.memory_owner is not None:
                continue  # the owner's memory is the same: done there
            for address, breakpoint in list(process.breakpoints.items()):
                if index not in breakpoint.probes:
                    continue
                breakpoint.probes.remove(index)
                if breakpoint.probes:
                    continue
                tid = next((t.tid for t in self._threads.values() if t.process is process and not t.running),
                           process.pid)  # /proc/PID/mem takes the write; the tid serves only PTRACE_POKETEXT
                process.memory.write(address, breakpoint.original[:1], tid)
                del process.breakpoints[address]
                process.retired.add(address)
                if not any(i not in self._removed and p.path == probe.path and p.offset == probe.offset
                           for i, p in enumerate(self._probes)):
                    process.semaphores.lower(process.memory, probe.path, probe.offset, tid)

    def _comm(self, thread: _Thread) -> str:
        if thread.comm is None:
            try:
                with open(f"/proc/{thread.process.pid}/task/{thread.tid}/comm") as f:
                    thread.comm = f.read().rstrip("\n")
            except OSError:
                thread.comm = ""
        return thread.comm

    def _execute(self, thread: _Thread, breakpoint: _Breakpoint, regs: Regs) -> None:
        plan = breakpoint.plan
        if plan.kind == "emulate":
            try:
                plan.emulate(regs, thread.process.memory)
                ptrace_setregs(thread.tid, regs)
                thread.hit = None
                self._resume(thread)
                return
            except EmulationFault:
                regs.rip = breakpoint.address  # e.g. a push that must grow the stack: step it instead
        elif plan.boost_code is not None:
            slot = thread.process.xol.boost(breakpoint.address, plan.boost_code, breakpoint.address + plan.length)
            if slot is not None:  # the thread runs the instruction and jumps back by itself: no step
                regs.rip = slot
                ptrace_setregs(thread.tid, regs)
                thread.hit = None
                self._resume(thread)
                return
        self._start_step(thread, breakpoint, regs)

    def _start_step(self, thread: _Thread, breakpoint: _Breakpoint, regs: Regs) -> None:
        xol = thread.process.xol
        slot = xol.acquire(breakpoint.plan.slot_code)
        if slot is None:  # every slot is lent: wait, stopped (its hit pending), for one
            self._slot_waiters.append(thread)
            return
        saved = breakpoint.plan.prepare_step(regs, slot)
        thread.step = _Step(breakpoint, slot, saved)
        ptrace_setregs(thread.tid, regs)
        thread.hit = None
        ptrace_singlestep(thread.tid, 0)
        thread.running = True

    def _finish_step(self, thread: _Thread) -> None:
        step = thread.step
        regs = ptrace_getregs(thread.tid)
        step.breakpoint.plan.finish_step(regs, step.slot, step.saved, thread.process.memory)
        ptrace_setregs(thread.tid, regs)
        self._end_step(thread)
        self._resume(thread, self._held_signal(thread))

    def _end_step(self, thread: _Thread) -> None:
        if thread.step.mask is not None:
            ptrace_setsigmask(thread.tid, thread.step.mask)
        thread.process.xol.release(thread.step.slot)
        thread.step = None
        if not self._stopping:
            self._wake_slot_waiter(thread.process)

    def _wake_slot_waiter(self, process: _Process) -> None:
        for waiter in self._slot_waiters:
            if waiter.process.xol is process.xol:
                self._slot_waiters.remove(waiter)
                breakpoint = waiter.hit
                regs = ptrace_getregs(waiter.tid)
                regs.rip = breakpoint.address
                self._start_step(waiter, breakpoint, regs)
                return

    def _on_signal(self, thread: _Thread, sig: int) -> None:
        step = thread.step
        if step is None:
            if not self._leave_boost_slot(thread, sig):
                self._resume(thread, sig)  # signals reach the target unchanged
            return
        regs = ptrace_getregs(thread.tid)
        info = ptrace_getsiginfo(thread.tid)
        if regs.rip == step.slot and sig in _FAULT_SIGNALS and info.si_code > 0:
            # The stepped instruction itself faulted: deliver the fault at the original address (hazard 18).
            step.breakpoint.plan.abort_step(regs, step.saved)
            ptrace_setregs(thread.tid, regs)
            self._end_step(thread)
            self._resume(thread, self._held_signal(thread, sig))
            return
        # A signal arrived during the step (hazard 17): hold it, with its siginfo, and defer the others in the
        # kernel's queue, as the kernel's uprobe_deny_signal() does, until the step is done.
        thread.held.append((sig, info))
        if step.mask is None:
            step.mask = ptrace_getsigmask(thread.tid)
            ptrace_setsigmask(thread.tid, step.mask | _DEFERRABLE)
        ptrace_singlestep(thread.tid, 0)
        thread.running = True

    def _leave_boost_slot(self, thread: _Thread, sig: int) -> bool:
        """A signal for a thread inside a boost slot: never deliver it there, since a handler's frame would
        point into the area. At the jump back, go to the next instruction; before the instruction, deliver a
        fault it raised at the probed address, or step the instruction and deliver the signal after it."""
        regs = ptrace_getregs(thread.tid)
        boosted = thread.process.xol and thread.process.xol.boosted_probe(regs.rip)
        if not boosted:
            return False
        slot, address, following = boosted
        breakpoint = thread.process.breakpoints.get(address)
        faulted = sig in _FAULT_SIGNALS and ptrace_getsiginfo(thread.tid).si_code > 0
        if regs.rip == slot and breakpoint is not None and not faulted:
            thread.step = _Step(breakpoint, slot, {})
            self._on_signal(thread, sig)  # held, the others deferred, the step started
            return True
        regs.rip = following if regs.rip != slot else address  # past the instruction, or back to it
        ptrace_setregs(thread.tid, regs)
        self._resume(thread, sig)
        return True

    def _held_signal(self, thread: _Thread, current: int = 0) -> int:
        """The signal to restart ``thread`` with: ``current``, the signal of this stop, or else the first one
        held during its step, delivered with its own siginfo. Any other held signal is sent again: only a signal
        that cannot be deferred (SIGSTOP, a sent fault signal) comes after the first."""
        held, thread.held = thread.held, []
        if not current and held and thread.at_signal_stop:
            current, info = held.pop(0)
            ptrace_setsiginfo(thread.tid, info)
        for sig, _ in held:
            tgkill(thread.process.pid, thread.tid, sig)
        return current

    def _resume(self, thread: _Thread, sig: int = 0) -> None:
        if thread.running:
            return
        ptrace_cont(thread.tid, sig)
        thread.running = True

    # -- detaching ---------------------------------------------------------------------------------------

    @_uninterrupted
    def close(self) -> None:
        """Stop every thread, finish or undo what is in flight, restore every byte, unmap the area, detach."""
        self._stopping = True
        try:
            self._stop_all()
            self._release_unadopted_children()
            for process in list(self._processes.values()):
                self._restore(process)
            # A held signal may end the process (Ctrl-C reached it too): its threads still traced would then stop
            # at their exit for a tracer that has left, and the process would never end. So those go last.
            dying = []
            for thread in sorted(self._threads.values(), key=lambda t: bool(t.held)):
                try:
                    ptrace_detach(thread.tid, self._held_signal(thread))
                except ProcessLookupError:
                    dying.append(thread.tid)  # not in a stop any more: killed on its way to its exit stop
            _detach_when_stopped(dying + sorted(self._dying))
            self._dying.clear()
        finally:
            self._threads.clear()
            for process in self._processes.values():
                if process.memory_owner is None:
                    process.memory.close()
            self._processes.clear()
            if self._sigchld_blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                self._sigchld_blocked = False

    def _stop_all(self) -> None:
        """Interrupt every running thread and wait until each is stopped with nothing in flight (hazard 24)."""
        for thread in list(self._threads.values()):
            if thread.running and thread.step is None:
                try:
                    ptrace_interrupt(thread.tid)
                except ProcessLookupError:
                    self._threads.pop(thread.tid, None)
        deadline = time.monotonic() + 10
        while any(t.running for t in self._threads.values()) and time.monotonic() < deadline:
            try:
                tid, status = os.waitpid(-1, WALL | os.WNOHANG)
            except ChildProcessError:
                break
            if tid == 0:
                signal.sigtimedwait({signal.SIGCHLD}, 0.05)
                continue
            self._on_status_stopping(tid, status)
        self._slot_waiters.clear()
        for thread in list(self._threads.values()):
            try:
                self._settle(thread)
            except ProcessLookupError:
                self._gone(thread.tid, None)

    def _release_unadopted_children(self) -> None:
        """Children forked just before we stopped, whose first stop is not reported yet: each is traced (our
        options are inherited), so it would die with us (EXITKILL) unless let go, clean, like a thread."""
        def let_go(pid: int) -> None:
            kind, parent, returns = self._children.pop(pid)
            try:
                if kind == "vfork" or _shares_memory(parent.pid, pid):
                    ptrace_detach(pid, 0)  # its memory is its parent's, restored with it
                else:
                    self._let_go(pid, parent, returns)
            except ProcessError:
                pass  # it ended meanwhile

        _when_stopped(list(self._children), 2, let_go)

    def _settle(self, thread: _Thread) -> None:
        """A stopped thread caught in the middle of a hit (a handler raised, Ctrl-C, waiting for a slot, inside
        a boost slot): undo the step it was given, or take it back to the probe's address, so it runs the real
        instruction."""
        regs = ptrace_getregs(thread.tid)
        boosted = thread.process.xol and thread.process.xol.boosted_probe(regs.rip)
        if thread.step is None and boosted:
            slot, address, following = boosted
            regs.rip = address if regs.rip == slot else following
            ptrace_setregs(thread.tid, regs)
            return
        if thread.step is None and thread.hit is None:
            return
        if thread.step is not None:
            thread.step.breakpoint.plan.abort_step(regs, thread.step.saved)
            ptrace_setregs(thread.tid, regs)
            self._end_step(thread)
        else:
            regs.rip = thread.hit.address
            ptrace_setregs(thread.tid, regs)
        thread.hit = None

    def _on_status_stopping(self, tid: int, status: int) -> None:
        thread = self._threads.get(tid)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self._gone(tid, status)
            return
        if thread is None:
            if tid in self._dying:  # stopped at its exit: let it go on
                self._dying.discard(tid)
                try:
                    ptrace_detach(tid, 0)
                except ProcessLookupError:
                    pass
            return
        thread.running = False
        event, sig = status >> 16, os.WSTOPSIG(status)
        thread.at_signal_stop = not event
        try:
            if thread.step is not None:
                if sig == signal.SIGTRAP and event == 0:
                    regs = ptrace_getregs(tid)
                    thread.step.breakpoint.plan.finish_step(regs, thread.step.slot, thread.step.saved,
                                                            thread.process.memory)
                else:
                    regs = ptrace_getregs(tid)
                    thread.step.breakpoint.plan.abort_step(regs, thread.step.saved)
                    if not event:
                        thread.held.append((sig, ptrace_getsiginfo(tid)))
                ptrace_setregs(tid, regs)
                self._end_step(thread)  # the thread stays stopped, outside the slot
                return
            if event == 0 and sig == signal.SIGTRAP:
                regs = ptrace_getregs(tid)
                fresh_int3 = ptrace_getsiginfo(tid).si_code == SI_KERNEL
                xol = thread.process.xol
                if fresh_int3 and xol is not None and regs.rip - 1 == xol.trampoline:
                    self._returned(thread, regs, report=False)  # returning while we detach: go on quietly
                    return
                if fresh_int3 and regs.rip - 1 in thread.process.breakpoints:  # hit while detaching: no report
                    regs.rip -= 1
                    ptrace_setregs(tid, regs)
                    return
                thread.held.append((sig, ptrace_getsiginfo(tid)))
            elif event == 0:
                thread.held.append((sig, ptrace_getsiginfo(tid)))
            elif event in (EVENT_CLONE, EVENT_FORK, EVENT_VFORK):
                self._on_event(thread, event, sig)
                if thread.running:
                    ptrace_interrupt(tid)
            elif event == EVENT_EXIT:  # the process is dying: let it, or its leader waits for this thread
                self._resume(thread)
            elif event == EVENT_STOP and _trap_pending(thread.process.pid, tid):
                # Our interrupt was reported before the SIGTRAP of an int3 the thread has just hit: let it
                # take that SIGTRAP now, so it is rewound above, and not after we are gone (hazard 24).
                self._resume(thread)
        except ProcessLookupError:
            self._gone(tid, None)

    def _restore(self, process: _Process) -> None:
        if process.memory_owner is not None:
            return
        stopped = next((t for t in self._threads.values() if t.process is process and not t.running), None)
        if stopped is None:
            return
        for thread in self._threads.values():
            if thread.process is process:
                _restore_returns(process.memory, thread.returns, process.xol, stopped.tid)
                thread.returns.clear()
        for breakpoint in process.breakpoints.values():
            try:
                process.memory.write(breakpoint.address, breakpoint.original[:1], stopped.tid)
            except OSError:
                pass  # the mapping went away with its library
        process.breakpoints.clear()
        process.semaphores.lower_all(process.memory, stopped.tid)
        if process.xol is not None:
            process.xol.unmap(stopped.tid)
            process.xol = None


def _auxv(pid: int, key: int) -> int | None:
    """One value of the process's auxiliary vector (AT_BASE: where the dynamic linker is loaded)."""
    try:
        with open(f"/proc/{pid}/auxv", "rb") as f:
            data = f.read()
    except OSError:
        return None
    for i in range(0, len(data) - 15, 16):
        if int.from_bytes(data[i:i + 8], "little") == key:
            return int.from_bytes(data[i + 8:i + 16], "little")
    return None


def _shadow_stack(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("x86_Thread_features:") and "shstk" in line for line in f)
    except OSError:
        return False


def _restore_returns(memory: ProcessMemory, returns: list[_Return], xol: XolArea | None, tid: int) -> None:
    """Put back every return address we replaced with the trampoline (at detach, and in a fork child)."""
    if xol is None:
        return
    for instance in returns:
        try:
            if int.from_bytes(memory.read(instance.stack, 8), "little") == xol.trampoline:
                memory.write(instance.stack, instance.original.to_bytes(8, "little"), tid)
        except OSError:
            pass  # that stack is gone


def _when_stopped(tids: list[int], seconds: float, act: Callable[[int], None]) -> None:
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


def _detach_when_stopped(tids: list[int]) -> None:
    """Detach threads that were running to their exit when we let the others go: each reports a last stop
    (PTRACE_EVENT_EXIT) or its end within moments."""
    _when_stopped(tids, 5, lambda tid: ptrace_detach(tid, 0))


def _shares_memory(pid: int, child: int) -> bool:
    try:
        return same_memory(pid, child)
    except OSError:
        return False  # kcmp is missing (a kernel without CONFIG_KCMP) or the parent is gone: a fork, as before


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _check_not_taken(code: bytes, probe: Probe, address: int) -> None:
    """Refuse an instruction another tracer has already replaced with an int3 that is not in the file."""
    if code[0] != 0xCC:
        return
    with open(probe.path, "rb") as f:
        f.seek(probe.offset)
        if f.read(1) == b"\xcc":
            return  # the program's own int3
    raise UnprobeableInstruction(
        f"cannot probe {probe.name} at {address:#x}: another tracer's breakpoint is already there, most likely a "
        f"kernel uprobe (perf, bpftrace, uprobes --engine kernel), and the kernel takes its traps; stop that "
        f"tracer or use --engine kernel")


def _trap_pending(pid: int, tid: int) -> bool:
    """Whether a SIGTRAP waits in thread ``tid``'s own pending set."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            pending = next(line for line in f if line.startswith("SigPnd:"))
    except (OSError, StopIteration):
        return False
    return bool(int(pending.split()[1], 16) & 1 << signal.SIGTRAP - 1)


def _tgid(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return tid


def _cpu_of(thread: _Thread) -> int:
    try:
        with open(f"/proc/{thread.process.pid}/task/{thread.tid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[36])  # field 39: the CPU it last ran on
    except (OSError, IndexError, ValueError):
        return -1


def _explain_seize_error(pid: int, exc: OSError) -> str:
    """Why we may not trace ``pid``, the way strace diagnoses EPERM (hazard 29)."""
    if exc.errno == errno.ESRCH:
        return f"process {pid} does not exist"
    if exc.errno != errno.EPERM:
        return f"cannot trace process {pid}: {os.strerror(exc.errno)}"
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        status = {}
    tracer = status.get("TracerPid", "0").strip()
    if tracer not in ("", "0"):
        return f"cannot trace process {pid}: it is already traced by process {tracer} (a debugger or tracer)"
    uids = status.get("Uid", "").split()
    if uids and os.geteuid() != 0 and str(os.geteuid()) not in uids[:1]:
        return f"cannot trace process {pid}: it belongs to uid {uids[0]}, not to you (run as that user or root)"
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f.read().strip()
    except OSError:
        scope = "0"
    if scope != "0" and os.geteuid() != 0:
        return (f"cannot trace process {pid}: kernel.yama.ptrace_scope is {scope}, which allows tracing only "
                f"your own children (launch it with -c, or set the sysctl to 0, or run as root)")
    if uids and len(set(uids)) > 1:
        return f"cannot trace process {pid}: it is setuid (its user ids differ); only root may trace it"
    return f"cannot trace process {pid}: permission denied (not dumpable, or refused by a security module)"

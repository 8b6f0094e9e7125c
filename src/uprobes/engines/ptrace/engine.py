"""The ptrace engine: uprobes in user space, with breakpoints and single-step out of line.

Each probe point is an ``int3`` over the first byte of an instruction, placed in every mapping of the
probed file. At a hit the thread's registers are read once, every consumer of the point runs (fetch
arguments, a Python handler), and the displaced instruction runs by the breakpoint's strategy (emulated,
boosted or stepped out of line); the ``int3`` never leaves, so no other thread misses the probe meanwhile.
A probe with no Python handler becomes a jump where its site allows (:mod:`.jumps`): no stop at all, at the
entry or (:mod:`.shadow`) at the return; traced, its hits are records in a ring shared with the target
(:mod:`.ring`, :mod:`.records`).

This module coordinates; each part has its own module:

- :mod:`.tracee` a thread's named state, and the only code that restarts a thread;
- :mod:`.family` seizing, clone, fork, vfork, exec, ends;
- :mod:`.stops` the one waitpid dispatcher; :mod:`.world` stopping every thread, and detach;
- :mod:`.placement` breakpoints for probes and roles; :mod:`.linker` where the roles go;
- :mod:`.strategies` emulate, boost, step; :mod:`.xol` the out-of-line area; :mod:`.jumps` jump probes;
- :mod:`.returns` pending return probes; :mod:`.hits` counts, events, handlers; :mod:`.semaphores`.

Every ptrace call comes from the thread that calls :meth:`PtraceEngine.attach` and :meth:`poll`.
Hazards of section 4 of the ptrace note are named where they are handled (``hazard N``).
"""

from __future__ import annotations

import collections
import math
import signal
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...consumers import Consumer, Hit
from ...elf.locate import is_elf
from ...errors import ProcessError, UprobesError
from ...output.columns import EventColumns
from ...output.event import Event
from ...probes.resolve import Probe
from ...stacks import StackLimits
from ...x86_64.abi import RETURN_VALUE, return_value
from ..base import STOP_SIGNALS, Engine, LaterProbes, uninterrupted
from .family import Family, when_stopped
from .hits import Reporter
from .jumps import FULL, Jump
from .linker import role_sites
from .placement import INT3, Breakpoint, Placement, Role
from .returns import MAX_RETURN_DEPTH, caught, hijack, put_back, returned
from .stops import Phase, drain
from .strategies import Boost, retry_step
from .syscalls import (EXITKILL, OPTIONS, SI_KERNEL, Regs, ptrace_detach, ptrace_getregs, ptrace_getsiginfo,
                       ptrace_interrupt, ptrace_setregs)
from .tracee import LISTENING, TRAPPED, Process, Thread
from .world import detach_all, let_process_go, stop_world

if TYPE_CHECKING:
    from .records import Recorder

__all__ = ["PtraceEngine"]

_TOOL_STOPPERS = STOP_SIGNALS
_WAKERS = _TOOL_STOPPERS | {signal.SIGCHLD}
# While stops come closer together than this, the next one is awaited by polling waitpid, not by sleeping:
# on a VM, waking a sleeping tracer costs more than the hit itself (perf-levers.md; bench/ measures it).
_SPIN_S = 0.002
_REFUSALS_SHOWN = 5
_RING_READ_S = 0.005  # how often rings are read while no stop comes (a ring holds 65,536 records)


class PtraceEngine(Engine):
    """Probes placed and serviced by this process through ptrace. Use as a context manager."""

    name = "ptrace"
    reaps_children = True

    def __init__(self, jumps: bool = True) -> None:
        """``jumps`` False: every probe traps, none becomes a jump (``--trap``)."""
        self.jumps_allowed = jumps
        self._jumps_pending = False  # breakpoints placed while threads ran, to be made jumps with all stopped
        self.placement = Placement([])
        self.family = Family(self.placement, follow_forks=True)
        self._reporter = Reporter([], {}, counting=False)
        self._closing = False
        self.undelivered: list[EventColumns] = []
        self._handler_error: BaseException | None = None  # raised by a handler while detaching: raised after
        self._returns_wanted = False
        self._sigchld_blocked = False
        self.skipped_returns = 0
        self._processes_may_come = False  # with none traced, a poll waits for one (add_process)
        self._last_stop = 0.0  # time.perf_counter() when stops were last handled
        self._stop_gap = math.inf  # and how long before that the previous ones were

    # -- attaching ---------------------------------------------------------------------------------------

    @uninterrupted
    def attach(self, probes: list[Probe], pid: int | Sequence[int] | None, *, counting: bool = False,
               held: bool = False, follow_forks: bool = True, consumers: dict[int, list[Consumer]] | None = None,
               stacks: StackLimits | None = None, later: LaterProbes | None = None) -> None:
        """Place ``probes`` in process ``pid``: a running one (every thread is seized), several (a sequence, more
        added with :meth:`add_process`), or, with ``held``, a child held before its exec (probes go in at the
        exec, before the program's first instruction).
        Children it forks are traced too, unless ``follow_forks`` is False: then they are let go, every
        byte we wrote taken out of their copy of memory first. With ``stacks``, every probe traps: the
        stack is copied at the stop (a trampoline records none). ``later``'s probes are placed where the
        others of an object it maps are: at attach, exec, and the linker's rendezvous, before its code runs."""
        if pid is None:
            raise UprobesError("the ptrace engine traces one process: give -p PID or a command to run")
        self.placement = Placement(list(probes), later)
        consumers = consumers or {}
        self._jumps_wanted = self.jumps_allowed and stacks is None
        self._counting = counting
        self._consumers = consumers
        self.family = Family(self.placement, follow_forks)
        self._reporter = Reporter(self.placement.probes, consumers, counting, stacks)
        self._handlers_gone: list[int] = []  # probes whose last handler went in a record's call
        self._returns_wanted = False
        self._took(range(len(probes)))
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # waited for with sigtimedwait
        self._sigchld_blocked = True
        if held:
            self.family.seize_held(pid, OPTIONS | EXITKILL)  # dies with us, not of SIGTRAP (hazard 25)
            return  # the probes go in at PTRACE_EVENT_EXEC
        self._processes_may_come = not isinstance(pid, int)
        for each in [pid] if isinstance(pid, int) else pid:
            self.add_process(each)

    @uninterrupted
    def add_process(self, pid: int) -> None:
        """Seize every thread of running process ``pid`` and place the probes in it; the processes traced
        already are stopped meanwhile (as a hit that turns breakpoints into jumps stops them)."""
        if pid in self.family.processes:
            return
        group_stopped = {tid for tid, thread in self.family.threads.items() if thread.state is LISTENING}
        try:
            if self.family.threads:
                stop_world(self, detaching=False)
            process = self.family.seize_all(pid, OPTIONS)
            group_stopped |= self.family.group_stopped  # stopped by SIGSTOP or Ctrl-Z: they stay so
            via = self.family.stopped_in(process)
            if via is None:
                raise ProcessError(f"process {pid} has ended")
            try:
                self.insert(process, via.tid)
            except BaseException:
                let_process_go(self, process)
                raise
        except (ProcessLookupError, FileNotFoundError):
            self._let_seized_go(pid)
            raise ProcessError(f"process {pid} has ended") from None
        except BaseException:
            self._let_seized_go(pid)
            raise
        finally:
            self.family.let_run(group_stopped)  # a signal met while seizing goes on now

    def _let_seized_go(self, pid: int) -> None:
        """The threads of ``pid`` still ours after adding it failed: stopped, detached, forgotten."""
        seized = [thread for thread in self.family.threads.values() if thread.process.pid == pid]
        running = []
        for thread in seized:
            try:
                if thread.state.stopped:
                    ptrace_detach(thread.tid, thread.take_held())
                else:
                    ptrace_interrupt(thread.tid)
                    running.append(thread.tid)
            except ProcessLookupError:
                pass  # gone
        when_stopped(running, 2, lambda tid: ptrace_detach(tid, 0))
        for thread in seized:
            del self.family.threads[thread.tid]
        process = self.family.processes.pop(pid, None)
        if process is not None:
            process.memory.close()

    def _took(self, indexes: range) -> None:
        """Probes ``indexes`` are the engine's (at attach, or found later): each may be a jump, recorded, unless
        a handler wants its thread stopped."""
        if not indexes:
            return
        self._reporter.hits += [0] * (len(self.placement.probes) - len(self._reporter.hits))
        self._returns_wanted |= any(self.placement.probes[i].replaces_return for i in indexes)
        if not self._jumps_wanted:
            return
        jumps = self.placement.jumps
        eligible = frozenset(i for i in indexes if not any(consumer.stop for consumer in self._consumers.get(i, ())))
        handled = eligible.intersection(self._consumers)
        jumps.eligible |= eligible
        jumps.recorded |= handled if self._counting else eligible
        if jumps.recorded and jumps.recorder is None:
            from .records import Recorder  # numpy, the ring reader's: loaded only to trace
            jumps.recorder = Recorder(self.placement.probes, self._counting, handled, self._ring_hit,
                                      self.placement.removed)

    def insert(self, process: Process, via: int, strict: bool = True) -> None:
        """Place every probe and role whose object ``process`` maps now (at attach, exec, and each time the
        linker maps or unmaps objects, then not ``strict``), with the probes found in objects mapped since."""
        known = len(self.placement.probes)
        mappings = self.placement.insert(process, via, strict)
        self._took(range(known, len(self.placement.probes)))
        for address, role, inode, function in role_sites(process.pid, mappings, self._returns_wanted):
            self.placement.add_role(process, address, role, inode, function, via)
        if self.placement.jumps.waiting(process, self.placement.probes):
            if not self._place_jumps_in(process, via):
                self._jumps_pending = True  # after this hit, with every thread stopped

    def _place_jumps_in(self, process: Process, via: int) -> bool:
        """Turn the breakpoints of ``process`` that may be jumps into jumps, if every thread of its memory is at
        rest; whether they were."""
        threads = self.family.sharing(process)
        if not all(self.family.at_rest(thread) for thread in threads):
            return False
        stopped = [thread for thread in threads if thread.state.stopped]
        self.placement.jumps.upgrade(process, self.placement.probes, stopped, via)
        return True

    def _place_jumps(self) -> None:
        """Stop every thread, turn the breakpoints placed meanwhile into jumps, let every thread go on."""
        self._jumps_pending = False
        group_stopped = {tid for tid, thread in self.family.threads.items() if thread.state is LISTENING}
        stop_world(self, detaching=False)
        for process in list(self.family.processes.values()):
            via = self.family.stopped_in(process)
            if process.owns_memory and via is not None:
                self._place_jumps_in(process, via.tid)  # not at rest (the world did not stop): they stay traps
        self.family.let_run(group_stopped)

    # -- running -----------------------------------------------------------------------------------------

    @property
    def lost(self) -> int:
        """Records of jump probes that found their ring full (a trapped hit stops its thread until reported)."""
        recorder = self.placement.jumps.recorder
        return recorder.lost if recorder is not None else 0

    def hit_counts(self) -> list[int]:
        jumped = self.placement.jumps.counts(len(self._reporter.hits))
        return [traps + jumps for traps, jumps in zip(self._reporter.hits, jumped)]

    def jumped(self) -> set[int]:
        return self.placement.jumps.jumped()

    def notices(self) -> list[str]:
        notices, self.placement.notices = self.placement.notices, []
        notices += self.placement.jumps.notices
        self.placement.jumps.notices = []
        return notices

    def report(self) -> list[str]:
        """What the user should hear at the end: probes that never found their object, skipped returns."""
        notes = [f"never mapped: {probe.name} ({probe.path}); the program did not load it" + (
                 "" if is_elf(probe.path) else " through the dynamic linker (a file a program maps itself is found "
                 "when the ptrace engine attaches, -p, or at a library load; the kernel engine finds it at the mmap)")
                 for index, probe in enumerate(self.placement.probes) if index not in self.placement.placed]
        jumps = self.placement.jumps
        if jumps.eligible:
            jumped = jumps.jumped()
            placed = len(self.placement.placed)
            notes.append(f"{len(jumped)} of {placed} probe points were jumps (no stop per hit)" if placed != 1 else
                         f"the probe point was {'a jump (no stop per hit)' if jumped else 'not a jump'}")
            # one line per probe and reason: a return probe's exits often give the same
            refusals = collections.Counter((self.placement.probes[index].name, why)
                                           for index, why in sorted(jumps.refused.items()))
            shown = list(refusals.items())[:_REFUSALS_SHOWN]
            notes += [f"{name} trapped at an int3, not a jump{f' ({n} probe points)' if n > 1 else ''}: {why}"
                      for (name, why), n in shown]
            notes += [f"{self.placement.probes[index].name} trapped after its first hits: a load for its record "
                      f"faulted (the program never saw the fault)" for index in jumps.demoted()]
            unshown = len(jumps.refused) - sum(n for _, n in shown)
            if unshown:
                notes.append(f"{unshown} more probe points trapped ('uprobes resolve --engine ptrace' says why)")
        if self.skipped_returns:
            notes.append(f"{self.skipped_returns} return probes skipped (nesting deeper than {MAX_RETURN_DEPTH}, "
                         f"an unreadable stack, or frames unwound by a C++ exception)")
        return notes

    def exited(self, pid: int) -> int | None:
        """How ``pid`` ended (as ``os.waitstatus_to_exitcode``) once it has, if this engine reaped it."""
        return self.family.exit_status.get(pid)

    def poll(self, timeout: float) -> list[Event]:
        """Service the target for up to ``timeout`` seconds; return the events of the hits meanwhile."""
        return self.poll_columns(timeout).events()

    @uninterrupted
    def poll_columns(self, timeout: float) -> EventColumns:
        """:meth:`poll`, with the events of jump probes in columns (what a writer formats in bulk)."""
        deadline = time.monotonic() + timeout
        recorder = self.placement.jumps.recorder
        while True:
            handled = drain(self, Phase.SERVING)
            if self._jumps_pending:
                self._place_jumps()
            if recorder is not None:
                recorder.read_all()
                self._resolve_keys(recorder)
                if self._handlers_gone:
                    self._remove_handled()
            if handled:
                now = time.perf_counter()
                self._stop_gap, self._last_stop = now - self._last_stop, now
            if (self._reporter.events or recorder is not None and (recorder.events or recorder.groups)) \
                    and not handled:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.family.threads and not self._processes_may_come:
                break
            if not handled and (not self.family.threads or not self._spin()):
                if recorder is not None and recorder.rings:
                    remaining = min(remaining, _RING_READ_S)
                woken = signal.sigtimedwait(_WAKERS, remaining)
                if woken is not None and woken.si_signo in _TOOL_STOPPERS:
                    # Sent again, to be handled once we return; the events wait for the next poll.
                    signal.pthread_kill(threading.get_ident(), woken.si_signo)
                    return EventColumns()
        return self._take_events()

    def _take_events(self) -> EventColumns:
        events = self._reporter.take_events()
        recorder = self.placement.jumps.recorder
        if recorder is None:
            return EventColumns(single=events)
        groups, recorded = recorder.take()
        return EventColumns(groups, events + recorded)

    def _ring_hit(self, index: int, thread: Thread, regs: object, args: dict, errors: dict) -> None:
        """A record of probe ``index``, which has a Python handler: the handler runs now, with every register
        of the hit and the process's memory as it is now."""
        hit = Hit(self.placement.probes[index], thread.process.pid, thread.tid, regs, thread.process.memory, args,
                  errors)
        try:
            gone = self._reporter.consume(index, hit)
        except BaseException as exc:
            if not self._closing:
                raise
            self._handler_error = self._handler_error or exc  # the detach goes on to the end first
            return
        if gone:
            self.placement.removed.add(index)  # its records are dropped from now on
            self._handlers_gone.append(index)

    def _remove_handled(self) -> None:
        """Probes whose last handler went, run from records: every thread stopped, their jumps taken out."""
        gone, self._handlers_gone = self._handlers_gone, []
        group_stopped = {tid for tid, thread in self.family.threads.items() if thread.state is LISTENING}
        stop_world(self, detaching=False)
        for index in gone:
            self._remove_probe(index)
        self.family.let_run(group_stopped)

    def _resolve_keys(self, recorder: Recorder) -> None:
        """Records came from threads whose key we have not seen: in a process with one thread they are its;
        otherwise every thread is stopped once, to read all the keys."""
        for owner in recorder.unknown_in():
            threads = self.family.sharing(owner)
            if len(threads) == 1:
                recorder.attribute(owner, threads[0])
        if recorder.unknown_in():
            group_stopped = {tid for tid, thread in self.family.threads.items() if thread.state is LISTENING}
            stop_world(self, detaching=False)
            recorder.learn([thread for thread in self.family.threads.values() if thread.state.stopped])
            self.family.let_run(group_stopped)

    def _spin(self) -> bool:
        """Poll for a stop until _SPIN_S after the last one, if stops have been coming faster than that;
        True if one came. When none does, the next waits sleep until stops come quickly again."""
        if self._stop_gap >= _SPIN_S:
            return False
        end = self._last_stop + _SPIN_S
        while time.perf_counter() < end:
            if drain(self, Phase.SERVING):
                return True
        self._stop_gap = math.inf
        return False

    # -- what the dispatcher hands over -----------------------------------------------------------------

    def on_trap(self, thread: Thread, serving: bool) -> None:
        """A SIGTRAP: a probe's int3, the return trampoline, or not ours (the program's own int3, a sent
        SIGTRAP: hazard 22), which is delivered (serving) or held for the detach."""
        regs = ptrace_getregs(thread.tid)
        address = regs.rip - 1
        process = thread.process
        if process.area is not None and address == process.area.trampoline:  # only its int3 leads there
            self._returned(thread, regs, serving)
            return
        breakpoint = process.breakpoints.get(address)
        jump = self.placement.jumps.owner(process, address) if breakpoint is None else None
        if jump is not None and any(address in t.traps for t in jump.trampolines()):
            self._jump_trapped(thread, jump, address, regs, serving)
            return
        # Only after a one-byte instruction can a thread stand just past a probe without having run its int3,
        # so only then (or at an address whose probe went) is the siginfo worth asking. (A SIGTRAP sent with
        # tgkill just as the thread runs into the int3 is merged by the kernel with the int3's, and is lost.)
        ours = breakpoint is not None and (breakpoint.plan.length > 1 or self._from_int3(thread))
        if breakpoint is None and address in process.retired and self._from_int3(thread) \
                and process.memory.read(address, len(INT3)) != INT3:
            ours = True  # it trapped before its probe went: run the restored instruction
        if not ours:
            self._deliver(thread, signal.SIGTRAP, serving)
            return
        regs.rip = address
        if breakpoint is None or not serving:
            ptrace_setregs(thread.tid, regs)  # a hit while detaching, or on a probe removed: no report
            if serving:
                thread.resume()
            return
        self._hit(thread, breakpoint, regs)

    def on_signal(self, thread: Thread, sig: int, serving: bool) -> None:
        """A signal for a thread that owns no step: never delivered inside a boosted copy."""
        area = thread.process.area
        if area is not None and serving:
            regs = ptrace_getregs(thread.tid)
            owner = area.owner(regs.rip)
            if isinstance(owner, Boost):
                owner.on_signal(thread, regs, sig)
                return
            jump = self.placement.jumps.owner(thread.process, regs.rip)
            if jump is not None:
                jump.on_signal(thread, regs, sig, self._take_return)
                return
        self._deliver(thread, sig, serving)

    def freed_slot(self, thread: Thread | None, serving: bool) -> None:
        """``thread`` gave a lent slot back: a thread waiting for one takes it (while serving)."""
        if thread is None or not serving:
            return
        waiters = thread.process.area.waiters
        while waiters:
            waiter = waiters.popleft()
            try:
                retry_step(waiter)
                return
            except ProcessLookupError:
                self.family.gone(waiter.tid, None)  # its ESRCH, not the thread's that gave the slot back

    # -- hits --------------------------------------------------------------------------------------------

    def _hit(self, thread: Thread, breakpoint: Breakpoint, regs: Regs) -> None:
        thread.hit, thread.state = breakpoint, TRAPPED
        for role in breakpoint.roles:
            self._play(role, thread, regs)
        gone = self._report(thread, breakpoint, regs, breakpoint.entries) if breakpoint.entries else ()
        if breakpoint.returns and not hijack(thread, breakpoint, regs, breakpoint.returns):
            self.skipped_returns += 1
        for index in gone:
            self._remove_probe(index)
        if thread.process.breakpoints.get(breakpoint.address) is breakpoint:
            breakpoint.strategy.execute(thread, regs)
        else:  # its last probe went in a handler: the real instruction is back
            thread.run_on(regs)

    def _play(self, role: Role, thread: Thread, regs: Regs) -> None:
        """The engine's own part at a breakpoint (see :mod:`.linker`)."""
        process = thread.process
        if role is Role.RENDEZVOUS:
            self.insert(process, thread.tid, strict=False)  # objects were mapped or unmapped
        elif role is Role.UNWIND:
            put_back(process.memory, thread.returns, process.area, thread.tid)
            self.placement.jumps.unwind(thread, regs)
        elif role is Role.CATCH:
            self.skipped_returns += caught(thread, regs) + self.placement.jumps.caught(thread, regs)

    def _jump_trapped(self, thread: Thread, jump: Jump, address: int, regs: Regs, serving: bool) -> None:
        """What a jump's trampoline leaves to us (an ``int3``, every register the program's again): sending a
        return to the return trampoline, or taking one, where the shadow stack needs more than the trampoline
        does (:mod:`.shadow`); or a hit of a Python handler's probe whose record found the ring full, which is
        reported here, after every record before it (or, while one of those is still being written by another
        thread, runs again). While the world is being stopped, a hit already counted goes back to run again,
        and a return goes back to the start of its trampoline."""
        entry = address in jump.trampoline.traps
        kind = (jump.trampoline if entry else jump.returns.trampoline).traps[address]
        regs.rip = address  # at the int3 itself until done: a handler that raises leaves a thread detach can settle
        ptrace_setregs(thread.tid, regs)
        # records before a full ring's hit not all read yet: the hit runs again (most likely into the ring now)
        if (kind == FULL or not entry) and not serving or \
                kind == FULL and not self.placement.jumps.recorder.drain(thread, regs.fs_base):
            regs.rip = jump.site.address if entry else jump.returns.trampoline.address
            ptrace_setregs(thread.tid, regs)
            if serving:
                thread.resume()
            return
        if entry:
            if kind == FULL:
                regs.rip = jump.site.address
                for index in self._report(thread, jump.breakpoint, regs, jump.breakpoint.entries):
                    self._remove_probe(index)
            if jump.breakpoint.returns and not self.placement.jumps.enter(thread, jump, regs):
                self.skipped_returns += 1
            regs.rip = jump.trampoline.displaced(jump.site.address)
            ptrace_setregs(thread.tid, regs)
            if serving:
                thread.resume()
            return
        regs.rip = jump.returns.trampoline.address
        taken = self._take_return(thread, regs, True)
        thread.resume(0 if taken else signal.SIGILL)  # nothing to return to: as the kernel does

    def _take_return(self, thread: Thread, regs: Regs, report: bool) -> bool:
        """A thread at the start of a return trampoline: its return taken (and reported, with ``report``);
        whether one was pending there."""
        taken = self.placement.jumps.take_return(thread, regs)
        if report:
            at = regs.rip
            for jump in taken:
                regs.rip = jump.breakpoint.address  # events of a return probe carry the function's address
                for index in self._report(thread, jump.breakpoint, regs, jump.breakpoint.returns,
                                          getattr(regs, RETURN_VALUE)):
                    self._remove_probe(index)
            regs.rip = at
        ptrace_setregs(thread.tid, regs)
        return bool(taken)

    def _returned(self, thread: Thread, regs: Regs, serving: bool) -> None:
        """At the trampoline: report the returns that end here and go to where the function returns. While
        the world is being stopped, the thread goes back to the trampoline's int3: the return is taken once
        the world goes on, or at the detach (:func:`.world.stop_world`)."""
        if not serving:
            regs.rip = thread.process.area.trampoline
            ptrace_setregs(thread.tid, regs)
            return
        ended = returned(thread, regs)
        if not ended:
            thread.resume(signal.SIGILL)  # nothing to return to: as the kernel does
            return
        for instance in ended:
            regs.rip = instance.breakpoint.address  # events of a return probe carry the function's address
            for index in self._report(thread, instance.breakpoint, regs, instance.probes, getattr(regs, RETURN_VALUE),
                                      instance.original):
                self._remove_probe(index)
        regs.rip = ended[-1].original
        ptrace_setregs(thread.tid, regs)
        thread.resume()

    def _report(self, thread: Thread, breakpoint: Breakpoint, regs: Regs, probes: list[int],
                retval: int | None = None, returns_to: int | None = None) -> list[int]:
        if self.placement.removed:
            probes = [i for i in probes if i not in self.placement.removed]
        if not probes or (not thread.process.owns_memory and not self.family.follow_forks):
            return []  # a child serviced only because it shares its parent's memory (and our int3s)
        if retval is not None:
            retval = return_value(retval)
        return self._reporter.report(thread, breakpoint.address, breakpoint.file_offset, regs, probes, retval,
                                     returns_to)

    def _remove_probe(self, index: int) -> None:
        """The last consumer of probe ``index`` went: it counts no more, and its breakpoints go where no other
        probe or role keeps them, in every process (each written through one of its stopped threads)."""
        self.placement.removed.add(index)
        self.placement.jumps.freeze(index)
        for process in list(self.family.processes.values()):
            via = self.family.stopped_in(process)
            if process.owns_memory and via is not None:
                try:
                    self.placement.remove_probe(process, index, via.tid)
                except ProcessLookupError:
                    self.freed_slot(self.family.gone(via.tid, None), True)

    @staticmethod
    def _deliver(thread: Thread, sig: int, serving: bool) -> None:
        if serving:
            thread.resume(sig)  # signals reach the target unchanged
        else:
            thread.held.append((sig, ptrace_getsiginfo(thread.tid)))

    @staticmethod
    def _from_int3(thread: Thread) -> bool:
        return ptrace_getsiginfo(thread.tid).si_code == SI_KERNEL

    # -- detaching ---------------------------------------------------------------------------------------

    def leftover(self) -> list[Event]:
        """Records read at detach, from the rings' last slots."""
        return super().leftover() + self._take_events().events()

    @uninterrupted
    def close(self) -> None:
        """Stop every thread, finish or undo what is in flight, restore every byte, unmap the area, detach.
        Records read meanwhile still go to their handlers; one that raises does so once the detach is done."""
        self._closing = True
        try:
            stop_world(self)
            detach_all(self)
        finally:
            for process in self.family.processes.values():
                if process.owns_memory:
                    process.memory.close()
            self.family.threads.clear()
            self.family.processes.clear()
            if self._sigchld_blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                self._sigchld_blocked = False
        if self._handler_error is not None:
            error, self._handler_error = self._handler_error, None
            raise error

"""Jump probes: sites whose first bytes became a ``jmp`` to a trampoline, so that a hit never stops the program.

A probe with no Python handler needs no stop: its site becomes a 5-byte ``jmp`` to a trampoline that bumps
the site's counter in shared memory, traced also writes a record of the hit into the ring (:mod:`.ring`,
:mod:`.records`), and runs the displaced instructions (:mod:`uprobes.x86_64.trampolines`). A return probe's
trampoline sends the function's return to a return trampoline of its own, which does the same at the return
(the real return address waits on the thread's shadow stack: :mod:`.shadow`).
Every site starts as an ``int3`` like any other; :meth:`Jumps.upgrade` turns those that qualify
(:func:`uprobes.x86_64.jumps.jump_site`) into jumps while every thread of the process is stopped, moving a
thread that stands inside the replaced bytes to its place in the trampoline. The rest stay traps, and the user
is told why.

Trampolines and counters live in a :class:`JumpArea`: a memfd mapped into the target within reach of a
``rel32`` from the code (trampolines r-x, counters rw) and into the tracer, which reads the counts from its
own mapping, even after the target has gone. An area is never reused or unmapped while the target runs;
``MADV_DONTFORK`` keeps it out of fork children, which get their own at the same address.
"""

from __future__ import annotations

import bisect
import ctypes
import collections
import struct
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...elf.objfile import ElfObject
from ...errors import UprobesError
from ...probes.resolve import Probe
from ...proc.maps import free_range_near, read_maps
from ...x86_64.abi import NR_MPROTECT
from ...x86_64.jumps import JUMP_LENGTH, JumpSite, jump_bytes, jump_site
from ...x86_64.registers import STATUS_FLAGS, ZERO_FLAG
from ...x86_64.trampolines import (FULL, CaptureFaults, Resume, Test, Trampoline, counting_trampoline,
                                   recording_trampoline, return_trampoline)
from .memory import ProcessMemory
from .captures import captures_for, records_possible, register_arguments
from .shadow import Forked, ShadowStacks
from .shared import PROT_EXEC, PROT_READ, PROT_WRITE, map_shared, reads_possible, unmap_shared
from .strategies import INT3, Strategy
from .syscalls import Regs, ptrace_getregs, ptrace_getsiginfo, ptrace_setregs
from .tracee import is_fault
from .xol import InjectionError, inject_syscall

if TYPE_CHECKING:
    from .placement import Breakpoint
    from .records import Recorder
    from .ring import Ring
    from .tracee import Process, Thread

__all__ = ["FULL", "Jump", "JumpArea", "Jumps", "site_for"]

_CODE_SIZE = 1 << 18
_COUNTERS_SIZE = 1 << 18
_TRAMPOLINE_MAX = 8192  # a trampoline takes what it needs, 16-byte aligned (16 strings take 5 KiB)
_COUNTER_SIZE = 64  # one cache line each: threads counting different sites never share a line
_REACH = (1 << 31) - (1 << 24)  # what a rel32 reaches, less a margin
_COUNT = struct.Struct("<Q")


def site_for(probe: Probe, obj: ElfObject | None = None) -> JumpSite | str:
    """Whether ``probe``'s site can be a jump (at link-time addresses), or why not; ``obj``: its object, opened.
    A return probe's site is its function's entry, where the jump sends the return to a trampoline too."""
    return jump_site(probe.address, obj or ElfObject.open(probe.path))


class JumpArea:
    """Trampolines and counters of one address space, in a memfd mapped near the code they serve."""

    def __init__(self, tid: int, memory: ProcessMemory, near: tuple[int, int], at: int = 0) -> None:
        """Map the area through stopped thread ``tid``: within reach of ``near`` (low, high), or at ``at``."""
        size = _CODE_SIZE + _COUNTERS_SIZE
        address = at or free_range_near(read_maps(memory.pid), *near, size, _REACH)
        if address is None:
            raise InjectionError(f"no free address range within 2 GiB of the code at {near[0]:#x}")
        self._shared, _ = map_shared(tid, memory, size, address, PROT_READ | PROT_EXEC, b"uprobes-jumps")
        inject_syscall(tid, memory, NR_MPROTECT, address + _CODE_SIZE, _COUNTERS_SIZE, PROT_READ | PROT_WRITE)
        # whole 8-byte loads: struct reads a word a byte at a time, and a count bumped meanwhile would be torn
        self._counters = (ctypes.c_uint64 * (_COUNTERS_SIZE // 8)).from_buffer(self._shared, _CODE_SIZE)
        self.address, self.size, self.memory = address, size, memory
        self._next_code, self._next_counter = 0, _CODE_SIZE
        self._starts: list[int] = []  # trampoline addresses, in order
        self._ends: list[int] = []
        self._owners: list[Jump | None] = []
        self._retired: tuple[bytes, dict[int, int]] | None = None  # code and counts, once our mapping is gone

    def reaches(self, low: int, high: int) -> bool:
        """Whether a rel32 reaches every byte of the area from every byte of ``[low, high)``, and back."""
        return high - self.address < _REACH and self.address + self.size - low < _REACH

    def full(self) -> bool:
        """Whether a site's trampolines (an entry's and a return's) and their counters might not fit."""
        return self._next_code + 2 * _TRAMPOLINE_MAX > _CODE_SIZE or self._next_counter + 2 * _COUNTER_SIZE > self.size

    def take(self) -> tuple[int, int]:
        """Where the next trampoline goes, and a counter never given out before."""
        code, counter = self.address + self._next_code, self.address + self._next_counter
        self._next_counter += _COUNTER_SIZE
        return code, counter

    def install(self, trampoline: Trampoline) -> None:
        """Write a trampoline no thread has run yet, through the tracer's own mapping (ValueError: too big);
        no jump answers for it until one adopts it (:meth:`adopt`)."""
        if len(trampoline.code) > _TRAMPOLINE_MAX:
            raise ValueError(f"a trampoline of {len(trampoline.code)} bytes does not fit a slot")
        offset = trampoline.address - self.address
        self._shared[offset:offset + len(trampoline.code)] = trampoline.code
        self._next_code = offset + len(trampoline.code) + 15 & ~15
        self._starts.append(trampoline.address)
        self._ends.append(trampoline.address + len(trampoline.code))
        self._owners.append(None)

    def count(self, counter: int) -> int:
        if self._retired is not None:
            return self._retired[1][counter]
        return self._counters[(counter - self.address - _CODE_SIZE) // 8]

    def retire(self) -> None:
        """The target's memory is gone (exit, exec) or unmapped: keep the code and the counts, and let our
        mapping go (a forking server makes thousands of children in a long run)."""
        if self._retired is None:
            counters = range(self.address + _CODE_SIZE, self.address + self._next_counter, _COUNTER_SIZE)
            self._retired = (self.code(), {counter: self.count(counter) for counter in counters})
            self._counters = None
            self._shared.close()

    def code(self) -> bytes:
        """Every trampoline written so far, from the area's start."""
        return self._retired[0] if self._retired is not None else self._shared[:self._next_code]

    def owner(self, address: int) -> Jump | None:
        """The jump whose trampoline holds ``address``, if any."""
        if not self.address <= address < self.address + _CODE_SIZE:
            return None
        i = bisect.bisect_right(self._starts, address) - 1
        return self._owners[i] if i >= 0 and address < self._ends[i] else None

    def copy_into(self, tid: int, memory: ProcessMemory) -> JumpArea:
        """The same trampolines at the same address in a fork child (stopped thread ``tid``), counting afresh."""
        child = JumpArea(tid, memory, (self.address, self.address), at=self.address)
        child._shared[:self._next_code] = self.code()
        child._next_code, child._next_counter = self._next_code, self._next_counter
        child._starts, child._ends = list(self._starts), list(self._ends)
        child._owners = [None] * len(self._starts)
        return child

    def adopt(self, owner: Jump) -> None:
        """``owner`` answers for its trampolines, installed without it or copied here by :meth:`copy_into`."""
        for trampoline in owner.trampolines():
            self._owners[self._starts.index(trampoline.address)] = owner

    def unmap(self, via: int) -> None:
        """Take the area out of the target (at detach, when no thread is inside it)."""
        unmap_shared(via, self.memory, self.address, self.size)
        self.retire()


@dataclass(frozen=True)
class ReturnPath:
    """Where the function of a jump returns to: its return trampoline, the counter of its returns there, and
    the site id of their records (if ``recorded``)."""

    trampoline: Trampoline
    counter: int
    site_id: int = 0
    recorded: bool = False


class Jump(Strategy):
    """A site replaced by a ``jmp`` to its trampoline: hits are counted there, and nothing traps. With return
    probes, the function's return goes through a return trampoline (``returns``) too, kept on ``shadow``."""

    def __init__(self, breakpoint: Breakpoint, site: JumpSite, trampoline: Trampoline, area: JumpArea,
                 counter: int, trap: Strategy, ring: Ring | None = None, site_id: int | None = None,
                 returns: ReturnPath | None = None, shadow: ShadowStacks | None = None) -> None:
        super().__init__(breakpoint)
        self.site, self.trampoline, self.area, self.counter = site, trampoline, area, counter
        self.ring, self.site_id = ring, site_id  # where its records go, and their site id if it records hits
        self.returns, self.shadow = returns, shadow
        self.trap = trap  # how the int3 of before the jump is taken out (a fork child's copy made before it)
        self.jump = jump_bytes(site.address, trampoline.address)
        self.correction = 0  # hits counted twice: a thread sent back to the site after it was counted
        self.return_correction = 0  # the same, at the return
        self.demoted = False  # an int3 is over the first byte for good (a load for a record faulted)
        self.frozen: dict[int, int] = {}  # probes taken out of the jump (their handlers went): their last count

    @property
    def hits(self) -> int:
        """Hits of the entry so far: counted, or recorded (read from the ring)."""
        written = self.ring.written(self.site_id) if self.site_id is not None else 0
        return self.area.count(self.counter) + written + self.correction

    @property
    def return_hits(self) -> int:
        if self.returns is None:
            return 0
        written = self.ring.written(self.returns.site_id) if self.returns.recorded else 0
        return self.area.count(self.returns.counter) + written + self.return_correction

    def trampolines(self) -> list[Trampoline]:
        return [self.trampoline] + ([self.returns.trampoline] if self.returns is not None else [])

    def resume_at(self, rip: int) -> Resume | None:
        """Where a thread at ``rip`` in one of the jump's trampolines stands in the program's terms."""
        return next((found for t in self.trampolines() if (found := t.resume(rip)) is not None), None)

    def execute(self, thread: Thread, regs: Regs) -> None:
        """A hit on the int3 over the jump (:meth:`Jumps.suspend`): the thread runs the displaced instructions
        from the trampoline, past its count (this hit is the int3's)."""
        regs.rip = self.trampoline.displaced(self.site.address)
        thread.run_on(regs)

    def place(self, memory: ProcessMemory, via: int) -> None:
        memory.write(self.site.address, self.jump, via)

    def restore(self, memory: ProcessMemory, via: int) -> bool:
        """Write back the bytes the jump replaced, whether an int3 is over it or not; a copy of the memory made
        before the jump was placed (a fork child's) has the int3 of before, put back as the trap does."""
        address = self.site.address
        try:
            if memory.read(address, JUMP_LENGTH) not in (self.jump, INT3 + self.jump[1:]):
                return self.trap.restore(memory, via)
            memory.write(address, self.breakpoint.original[:JUMP_LENGTH], via)
        except OSError:
            pass
        return True

    def settle(self, thread: Thread, regs: Regs) -> bool:
        """Back onto the program's own path from anywhere in the trampolines (the world is being stopped);
        whether the thread is at the start of the return trampoline now, its return still to be taken."""
        resume = self.resume_at(regs.rip)
        if resume is not None:
            self._apply(thread, regs, resume)
        return resume is not None and resume.returning

    def on_signal(self, thread: Thread, regs: Regs, sig: int,
                  take_return: Callable[[Thread, Regs, bool], bool]) -> None:
        """A signal for a thread in the trampoline is delivered at the program's own address, so that no
        handler frame points into the area; only between displaced instructions, where no such address
        exists, is it delivered in place. A hit counted and sent back to the site will count again: once more
        than it happened, unless the signal is a fault of the first displaced instruction, which runs again
        after the handler (a second hit, as the kernel counts it). A fault of the trampoline's own load for a
        record is never the program's: the thread goes back to the site, and the site traps from now on. In the
        return trampoline, the return is taken first (``take_return``, reporting it unless it was counted)."""
        resume = self.resume_at(regs.rip)
        if resume is None or self.site.inside(resume.rip):
            thread.resume(sig)
            return
        if resume.returning or resume.returned:
            self._apply(thread, regs, resume)
            if resume.returning:
                take_return(thread, regs, not resume.counted)
            thread.resume(sig)
            return
        fault = is_fault(sig, ptrace_getsiginfo(thread.tid))
        if resume.loads and fault:
            self.correction -= resume.counted
            self._apply(thread, regs, resume)
            self.demote(thread.process.memory, thread.tid)
            thread.resume()
            return
        if (resume.counted or resume.recorded) and resume.rip == self.site.address and not fault:
            self.correction -= resume.counted
            if resume.recorded:
                self.ring.suppress(regs.fs_base, self.site_id)
        self._apply(thread, regs, resume)
        thread.resume(sig)

    def demote(self, memory: ProcessMemory, via: int) -> None:
        """An int3 over the jump's first byte for good: every hit traps (and is read with the thread stopped)."""
        self.demoted = True
        memory.write(self.site.address, INT3, via)

    def copy_for(self, breakpoint: Breakpoint, area: JumpArea, ring: Ring | None,
                 shadow: ShadowStacks | None) -> Jump:
        """This jump in a fork child's copy of the memory, counting in the child's own area, ring and stacks."""
        jump = Jump(breakpoint, self.site, self.trampoline, area, self.counter, breakpoint.strategy, ring,
                    self.site_id, self.returns, shadow)
        jump.demoted = self.demoted
        area.adopt(jump)
        return jump

    def _apply(self, thread: Thread, regs: Regs, resume: Resume) -> None:
        """Put the thread where ``resume`` says, with what the trampoline saved put back; a ring slot it had
        reserved is written off, a return it had sent to the return trampoline is its own again."""
        memory = thread.process.memory
        if resume.reserved is not None and (not resume.reserved_if_zf or regs.eflags & ZERO_FLAG):
            held = (getattr(regs, resume.reserved) if resume.reserved_at is None else
                    _COUNT.unpack(memory.read(regs.rsp + resume.reserved_at, 8))[0])
            span = resume.shrunk_if_zf if resume.shrunk_if_zf and regs.eflags & ZERO_FLAG else resume.reserved_span
            span = getattr(regs, span) if isinstance(span, str) else span
            self.ring.void(held - span + 1 if resume.reserved_ahead else held, span)
        for name, offset in resume.saved:
            setattr(regs, name, _COUNT.unpack(memory.read(regs.rsp + offset, 8))[0])
        if resume.flags_at is not None:
            saved = _COUNT.unpack(memory.read(regs.rsp + resume.flags_at, 8))[0]
            regs.eflags = regs.eflags & ~STATUS_FLAGS | saved & STATUS_FLAGS
        regs.rsp += resume.stack
        if resume.shadowed:
            self.shadow.undo(regs.fs_base, thread.tid)
        regs.rip = _COUNT.unpack(memory.read(regs.rsp - 8, 8))[0] if resume.returned else resume.rip
        ptrace_setregs(thread.tid, regs)


def _jumped_of(jump: Jump) -> set[int]:
    """The probes ``jump`` was placed for."""
    return {*jump.breakpoint.probes, *jump.frozen}


def _demoted_of(jump: Jump) -> set[int]:
    """The probes of ``jump`` that trap for good (a load for a record faulted)."""
    return set(jump.breakpoint.entries) if jump.demoted else set()


def _hits_of(jump: Jump) -> dict[int, int]:
    """What ``jump`` counted for each of its probes (those taken out of it: until then)."""
    hits = dict(jump.frozen)
    for indices, count in ((jump.breakpoint.entries, jump.hits), (jump.breakpoint.returns, jump.return_hits)):
        for index in indices:
            if index not in jump.frozen:
                hits[index] = hits.get(index, 0) + count
    return hits


@dataclass
class Jumps:
    """The jump probes of a run: which probes may be jumps, the areas of each address space, the counts."""

    eligible: frozenset[int] = frozenset()  # probe indices that may be jumps: no handler that wants a stop
    recorded: frozenset[int] = frozenset()  # those whose hits a jump records (traced, or run by a handler)
    placed: list[Jump] = field(default_factory=list)  # every jump placed, in every process that still has it
    # what the jumps of address spaces that are gone counted (probe index -> hits), placed and demoted
    _gone_hits: collections.Counter = field(default_factory=collections.Counter)
    _gone_jumped: set[int] = field(default_factory=set)
    _gone_demoted: set[int] = field(default_factory=set)
    refused: dict[int, str] = field(default_factory=dict)  # probe index -> why one of its sites stays a trap
    notices: list[str] = field(default_factory=list)
    # Areas mapped in each address space now (one that is unmapped, or gone with its memory, leaves the list)
    _areas: dict[Process, list[JumpArea]] = field(default_factory=lambda: collections.defaultdict(list))
    _sites: dict[tuple[str, int], JumpSite | str] = field(default_factory=dict)
    _objects: dict[str, ElfObject] = field(default_factory=dict)  # opened once per run (a realpath each)
    _broken: set[Process] = field(default_factory=set)  # address spaces where no area could be mapped
    _suspended: dict[Process, set[int]] = field(default_factory=dict)  # memory -> children not followed in it
    recorder: Recorder | None = None  # where traced jumps record their hits (None: jumps only count)
    _recordable: dict[Process, str | None] = field(default_factory=dict)  # why an address space cannot record
    _declined: dict[int, Breakpoint] = field(default_factory=dict)  # breakpoints refused, by id: they stay traps
    _shadows: dict[Process, ShadowStacks] = field(default_factory=dict)  # by memory owner, while mapped
    _readable: dict[Process, str | None] = field(default_factory=dict)  # why an address space cannot dereference

    def wanted(self, breakpoint: Breakpoint) -> bool:
        """Whether ``breakpoint`` may still become a jump: its probes may, and it was never refused."""
        return (bool(breakpoint.probes) and not breakpoint.roles and self.eligible.issuperset(breakpoint.probes)
                and not isinstance(breakpoint.strategy, Jump) and id(breakpoint) not in self._declined)

    def waiting(self, process: Process, probes: list[Probe]) -> bool:
        """Whether ``process`` has breakpoints that may still become jumps (not known to be refused): only then
        is every thread stopped to place them."""
        return any(self.wanted(breakpoint) and not isinstance(self._sites.get(_key(probes[breakpoint.probes[0]])), str)
                   for breakpoint in process.breakpoints.values())

    def upgrade(self, process: Process, probes: list[Probe], threads: list[Thread], via: int) -> None:
        """Turn every breakpoint of ``process`` that may be a jump into one. Every thread of its memory is
        stopped (``threads``); one inside replaced bytes moves to the same instruction in the trampoline."""
        owner = process.memory_owner or process
        if owner in self._broken:
            return
        regs = {thread.tid: ptrace_getregs(thread.tid) for thread in threads}
        if self.recorder is not None:
            for thread in threads:
                self.recorder.saw(thread, regs[thread.tid].fs_base)
        placed = sorted(process.breakpoints)
        for breakpoint in list(process.breakpoints.values()):
            if not self.wanted(breakpoint):
                continue
            site = self._site(breakpoint, probes[breakpoint.probes[0]], process, placed)
            captures = returned = ()
            if not isinstance(site, str):
                captures = self._captures(breakpoint, breakpoint.entries, probes, owner, via)
                returned = self._captures(breakpoint, breakpoint.returns, probes, owner, via)
            why = next((reason for reason in (site, captures, returned) if isinstance(reason, str)), None)
            if why is not None:
                self._refuse(breakpoint, why)
                continue
            try:
                area = self._area(owner, site, via)
                ring = (self.recorder.ring(owner, via) if self.recorder is not None
                        and not self.recorded.isdisjoint(breakpoint.probes) else None)
                shadow = self._shadow(owner, via) if breakpoint.returns else None
            except (InjectionError, OSError) as exc:
                self._broken.add(owner)
                self.notices.append(f"jump probes are off in process {process.pid}, every probe traps: {exc}")
                return
            try:
                trampoline, counter, site_id, returns = self._trampolines(breakpoint, site, area, ring, shadow,
                                                                          captures, returned)
            except ValueError as exc:
                self._refuse(breakpoint, f"its instructions cannot run from the trampoline ({exc})")
                continue
            moves = _moves(site, trampoline, regs)
            if moves is None:
                self._refuse(breakpoint, "a thread stood between its instructions")
                continue
            jump = Jump(breakpoint, site, trampoline, area, counter, breakpoint.strategy, ring, site_id, returns,
                        shadow)
            area.adopt(jump)
            for tid, rip in moves.items():
                regs[tid].rip = rip
                ptrace_setregs(tid, regs[tid])
            jump.place(process.memory, via)
            breakpoint.strategy = jump
            self.placed.append(jump)

    def _trampolines(self, breakpoint: Breakpoint, site: JumpSite, area: JumpArea, ring: Ring | None,
                     shadow: ShadowStacks | None, captures: tuple, returned: tuple
                     ) -> tuple[Trampoline, int, int | None, ReturnPath | None]:
        """The trampoline of ``breakpoint``, its counter and site id (None: its hits are not recorded), and its
        return path (return probes: its own trampoline), each installed in ``area`` (ValueError: one cannot be
        made or does not fit); ``captures`` and ``returned``: the words of its records."""
        returns = None
        rdpid = self.recorder.rdpid if self.recorder is not None else False
        if shadow is not None:
            code, counter = area.take()
            recorded = ring if not self.recorded.isdisjoint(breakpoint.returns) else None
            site_id = self.recorder.site_id(breakpoint, returned, returns=True) if recorded is not None else 0
            returns = ReturnPath(return_trampoline(site.address, code, shadow.layout, counter,
                                                   recorded.layout if recorded is not None else None, site_id,
                                                   returned, rdpid, self._handled(breakpoint.returns)),
                                 counter, site_id, recorded is not None)
            area.install(returns.trampoline)
        code, counter = area.take()
        entries = bool(breakpoint.entries)
        ring = ring if not self.recorded.isdisjoint(breakpoint.entries) else None
        if returns is None and ring is None:
            trampoline = counting_trampoline(site, code, counter)
            area.install(trampoline)
            return trampoline, counter, None, None
        site_id = self.recorder.site_id(breakpoint, captures) if ring is not None else None
        handled = self._handled(breakpoint.entries)
        test = self._test(breakpoint) if ring is not None and returns is None and not handled else None
        trampoline = recording_trampoline(site, code, counter if entries else None, ring.layout if ring else None,
                                          site_id, captures, rdpid,
                                          (shadow.layout, returns.trampoline.address) if returns else None,
                                          handled, test)
        area.install(trampoline)
        return trampoline, counter, site_id, returns

    def _test(self, breakpoint: Breakpoint) -> Test | None:
        """The test the trampoline of ``breakpoint`` makes before recording a hit: its one probe's predicate,
        where that compares arguments read from registers with constants (the tool judges each event anyway)."""
        if len(breakpoint.entries) != 1:
            return None
        probe = self.recorder.probes[breakpoint.entries[0]]
        if probe.predicate is None:
            return None
        return probe.predicate.compiled(register_arguments(probe))

    def _handled(self, indices: list[int]) -> bool:
        """Whether some of probes ``indices`` has a Python handler run from records."""
        return self.recorder is not None and not self.recorder.handled.isdisjoint(indices)

    def _captures(self, breakpoint: Breakpoint, indices: list[int], probes: list[Probe], owner: Process,
                  via: int) -> tuple | str:
        """What a record of the hits of probes ``indices`` of ``breakpoint`` holds (nothing when only counting),
        or why it cannot be one (``via``: a stopped thread of ``owner``'s, to try what the record needs)."""
        if self.recorder is None or self.recorded.isdisjoint(indices):
            return ()
        if owner not in self._recordable:
            self._recordable[owner] = records_possible(owner.pid)
        if self._recordable[owner] is not None:
            return self._recordable[owner]
        captures: list = []
        for index in indices:
            probe = probes[index]
            more = captures_for(probe, breakpoint.address - probe.address, index in self.recorder.handled)
            if isinstance(more, str):
                return more
            captures += [capture for capture in more if capture not in captures]
        words = self.recorder.words
        if len(captures) > words:
            return f"its probes need more than {words} words"
        if CaptureFaults() in captures:  # dereferences
            if owner not in self._readable:
                self._readable[owner] = reads_possible(via, owner.memory)
            if self._readable[owner] is not None:
                return self._readable[owner]
        return tuple(captures)

    def jumped(self) -> set[int]:
        """The probes placed as a jump somewhere."""
        return self._gone_jumped.union(*map(_jumped_of, self.placed))

    def demoted(self) -> list[int]:
        """The probes of jumps that trap for good, in order (a load for a record faulted)."""
        return sorted(self._gone_demoted.union(*map(_demoted_of, self.placed)))

    def _refuse(self, breakpoint: Breakpoint, reason: str) -> None:
        self._declined[id(breakpoint)] = breakpoint  # kept: an id is unique only while its object lives
        for index in breakpoint.entries:
            self.refused.setdefault(index, reason)

    def follow(self, parent: Process, child: Process, tid: int, forked: Forked | None) -> None:
        """A fork child has its parent's jumps in its copy of the memory (those placed before it forked): give
        it the same trampolines at the same addresses, counting in areas and recording in a ring of its own,
        and shadow stacks of its own with the pending returns of the thread that forked (``forked``)."""
        copies: dict[JumpArea, JumpArea] = {}  # the parent may have ended already: its areas are in our mappings
        ring = shadow = None
        for address, breakpoint in child.breakpoints.items():
            jump = parent.breakpoints[address].strategy
            # placed before the fork (an int3 over it: suspended for a vfork child, or demoted)
            if isinstance(jump, Jump) and child.memory.read(address, JUMP_LENGTH) in (jump.jump, INT3 + jump.jump[1:]):
                if jump.area not in copies:
                    copies[jump.area] = jump.area.copy_into(tid, child.memory)
                    self._areas[child].append(copies[jump.area])
                if jump.ring is not None and ring is None:
                    ring = self.recorder.follow(jump.ring, child, tid)
                if jump.shadow is not None and shadow is None:
                    shadow = self._shadows[child] = jump.shadow.copy_into(tid, child.memory, forked)
                breakpoint.strategy = jump.copy_for(breakpoint, copies[jump.area], ring, shadow)
                self.placed.append(breakpoint.strategy)

    def suspend(self, owner: Process, child: int, via: int) -> None:
        """A child that is not followed runs in ``owner``'s memory (vfork, clone(CLONE_VM)): an int3 goes over the
        first byte of every jump there, so that its hits can be told from the parent's, until it leaves
        (:meth:`unsuspend`). A thread already in a trampoline goes on through it."""
        children = self._suspended.setdefault(owner, set())
        if not children:
            self._first_bytes(owner, True, via)
        children.add(child)

    def unsuspend(self, owner: Process, child: int, via: int) -> None:
        """``child`` left ``owner``'s memory (exec or exit): with no other such child, the jumps go back in. A
        jump that cannot be written back stays an int3, which counts the same."""
        children = self._suspended.get(owner)
        if children is None or child not in children:
            return
        children.discard(child)
        if not children:
            del self._suspended[owner]
            try:
                self._first_bytes(owner, False, via)
            except OSError:
                pass

    @staticmethod
    def _first_bytes(owner: Process, trap: bool, via: int) -> None:
        """An int3 over the first byte of every jump of ``owner``'s memory, or (``trap`` False) the jump's own."""
        for breakpoint in owner.breakpoints.values():
            if isinstance(breakpoint.strategy, Jump) and not breakpoint.strategy.demoted:
                owner.memory.write(breakpoint.address, INT3 if trap else breakpoint.strategy.jump[:1], via)

    def owner(self, process: Process, address: int) -> Jump | None:
        """The jump whose trampoline in ``process``'s memory holds ``address``."""
        for area in self._areas.get(process.memory_owner or process, ()):
            found = area.owner(address)
            if found is not None:
                return found
        return None

    def unmap(self, process: Process, via: int) -> None:
        """Every area of ``process`` taken out of it (at detach, its jumps restored, every thread out of them),
        its pending returns put back, its ring read to the end."""
        shadow = self._shadows.pop(process, None)
        if shadow is not None:
            shadow.put_back_all(via)
            shadow.unmap(via)
        for area in self._areas.pop(process, []):
            area.unmap(via)
        if self.recorder is not None:
            self.recorder.unmap(process, via)

    def forked(self, thread: Thread) -> Forked | None:
        """The pending returns a fork by ``thread`` (stopped at it) leaves its child, if jumps keep any."""
        shadow = self._stacks(thread.process)
        return shadow.forked(ptrace_getregs(thread.tid).fs_base) if shadow is not None else None

    def clean_copy(self, parent: Process, child: ProcessMemory, via: int, forked: Forked | None) -> None:
        """A fork child let go: the returns its copy of the stacks sends to trampolines are its own again."""
        shadow = self._stacks(parent)
        if shadow is not None and forked is not None:
            shadow.clean_copy(forked, child, via)

    def forget(self, process: Process) -> None:
        """``process`` exec'd or ended: its areas went with its memory (their counts stay readable)."""
        shadow = self._shadows.pop(process, None)
        if shadow is not None:
            shadow.retire()
        retired = self._areas.pop(process, [])
        for area in retired:
            area.retire()
        self._broken.discard(process)
        self._recordable.pop(process, None)
        self._readable.pop(process, None)
        if self.recorder is not None:
            self.recorder.forget(process)
        # their counts kept, the jumps let go: a server whose processes come and go runs for days
        gone = [jump for jump in self.placed if jump.area in retired]
        for jump in gone:
            self._gone_hits.update(_hits_of(jump))
            self._gone_jumped |= _jumped_of(jump)
            self._gone_demoted |= _demoted_of(jump)
        if gone:
            self.placed = [jump for jump in self.placed if jump.area not in retired]

    def started(self, thread: Thread) -> None:
        """A new thread, stopped before its first instruction: its key (fs base) is known from now on."""
        if self.recorder is not None:
            self.recorder.saw(thread, ptrace_getregs(thread.tid).fs_base)

    def exiting(self, thread: Thread) -> None:
        """``thread`` stopped at its exit: every record it wrote is its own (read now, or once a record of another
        thread that holds them back is written); its shadow stack may serve another thread."""
        shadow = self._stacks(thread.process)
        if self.recorder is not None or shadow is not None:
            key = ptrace_getregs(thread.tid).fs_base
            if shadow is not None:
                shadow.free(key)
            if self.recorder is not None:
                self.recorder.exited(thread, key)

    def execing(self, thread: Thread) -> None:
        """``thread`` is at its exec, the only one left of its image: what the image wrote is read now, under
        the thread's old id and name."""
        if self.recorder is not None:
            self.recorder.attribute(thread.process, thread)

    def ended(self, thread: Thread) -> None:
        """``thread`` is gone: its key may come back with another thread."""
        if self.recorder is not None:
            self.recorder.ended(thread)

    def counts(self, number: int) -> list[int]:
        """Hits per probe (``number`` of them) counted or recorded by jumps so far, in every process."""
        if self.recorder is not None:
            self.recorder.read_all()
        totals = collections.Counter(self._gone_hits)
        for jump in self.placed:
            totals.update(_hits_of(jump))
        return [totals[index] for index in range(number)]

    def freeze(self, index: int) -> None:
        """Probe ``index`` is being taken out: its count so far stays, whatever its jumps count from now on."""
        if self.recorder is not None:
            self.recorder.read_all()
        for jump in self.placed:
            if index in jump.breakpoint.entries:
                jump.frozen[index] = jump.hits
            elif index in jump.breakpoint.returns:
                jump.frozen[index] = jump.return_hits

    # -- returns: what the trampolines leave to the tool -------------------------------------------------------

    def enter(self, thread: Thread, jump: Jump, regs: Regs) -> bool:
        """At the ``int3`` of ``jump``'s trampoline: send the function's return to its return trampoline (its
        registers are the function's at entry); False when it cannot be (the return goes unreported)."""
        return jump.shadow.enter(regs.fs_base, regs.rsp, jump.returns.trampoline.address, thread.tid)

    def take_return(self, thread: Thread, regs: Regs) -> list[Jump]:
        """A thread at a return trampoline's start (the function's ``ret`` popped its slot): the pending returns
        taken there, innermost first (a tail call's with its caller's), and ``regs.rip`` where the function
        really returns; [] when none was pending at that slot."""
        shadow = self._stacks(thread.process)
        taken: list[Jump] = []
        while shadow is not None:
            pending = shadow.leave(regs.fs_base, regs.rsp - 8)
            jump = self.owner(thread.process, pending.trampoline) if pending is not None else None
            if jump is None:
                break
            taken.append(jump)
            regs.rip = pending.original
            if self.owner(thread.process, pending.original) is None:  # not a caller's return trampoline
                break
        return taken

    def settle(self, thread: Thread, regs: Regs) -> None:
        """Back onto the program's own path from a trampoline (the world is stopped to detach), a return in
        flight taken unreported."""
        jump = self.owner(thread.process, regs.rip)
        if jump is not None and jump.settle(thread, regs):
            self.take_return(thread, regs)
            ptrace_setregs(thread.tid, regs)

    def unwind(self, thread: Thread, regs: Regs) -> None:
        """A C++ exception starts unwinding: every return address of the thread's shadow stack is its own."""
        shadow = self._stacks(thread.process)
        if shadow is not None:
            shadow.unwind(regs.fs_base, thread.tid)

    def caught(self, thread: Thread, regs: Regs) -> int:
        """The exception is caught (at ``__cxa_begin_catch``): how many pending returns it unwound."""
        shadow = self._stacks(thread.process)
        return shadow.caught(regs.fs_base, regs.rsp, thread.tid) if shadow is not None else 0

    def _stacks(self, process: Process) -> ShadowStacks | None:
        """The shadow stacks of ``process``'s memory, if it has any."""
        return self._shadows.get(process.memory_owner or process)

    def _shadow(self, owner: Process, via: int) -> ShadowStacks:
        if owner not in self._shadows:
            self._shadows[owner] = ShadowStacks(via, owner.memory)
        return self._shadows[owner]

    def _site(self, breakpoint: Breakpoint, probe: Probe, process: Process, placed: list[int]) -> JumpSite | str:
        """The jump site of ``breakpoint`` (whose probe is ``probe``), or why not: ``placed`` are the addresses of
        every breakpoint of the process, sorted."""
        key = _key(probe)
        if key not in self._sites:
            try:
                if probe.path not in self._objects:
                    self._objects[probe.path] = ElfObject.open(probe.path)
                self._sites[key] = site_for(probe, self._objects[probe.path])
            except UprobesError as exc:
                self._sites[key] = str(exc)
        site = self._sites[key]
        if isinstance(site, str):
            return site
        site = site.rebased(breakpoint.address - probe.address)
        following = bisect.bisect_right(placed, site.address)
        other = placed[following] if following < len(placed) and site.inside(placed[following]) else None
        if other is not None:
            return f"another probe, at {other:#x}, lies inside the {site.length} bytes the jump would replace"
        try:
            memory = breakpoint.original[:1] + process.memory.read(site.address + 1, site.length - 1)
        except OSError:
            return "its code cannot be read"
        if memory != site.code:
            return "its code in memory differs from the file"
        return site

    def _area(self, owner: Process, site: JumpSite, via: int) -> JumpArea:
        low, high = site.address, site.address + site.length
        areas = self._areas[owner]
        area = next((a for a in areas if not a.full() and a.reaches(low, high)), None)
        if area is None:
            area = JumpArea(via, owner.memory, (low, high))
            areas.append(area)
        return area


def _moves(site: JumpSite, trampoline: Trampoline, regs: dict[int, Regs]) -> dict[int, int] | None:
    """Where each thread standing strictly inside the replaced bytes goes in the trampoline (None: one stands
    where no instruction of the trampoline matches)."""
    moves = {}
    for tid, thread_regs in regs.items():
        if site.inside(thread_regs.rip):
            place = trampoline.displaced(thread_regs.rip)
            if place is None:
                return None
            moves[tid] = place
    return moves


def _key(probe: Probe) -> tuple[str, int]:
    return probe.path, probe.offset


"""Breakpoints in a process: placed for the user's probes and for the engine's own roles, taken out again.

A breakpoint is one ``int3`` over the first byte of an instruction. It carries the user probes placed there
and, beside them, the engine's roles at that address (the linker's rendezvous, the C++ unwinder's hooks): a
probe removed never removes a role, and a role never hides a probe. Every instruction is analysed before
any byte is written. A byte is written back only if it is still our ``int3``: code the program rewrote
meanwhile is left as the program made it, and the user is told.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ...errors import ProcessError, UnprobeableInstruction
from ...probes.resolve import Probe
from ...proc.maps import Mapping, read_maps, runtime_addresses
from ...proc.status import shadow_stack
from ...x86_64.analysis import Plan, analyze
from ..base import LaterProbes
from .jumps import Jumps
from .memory import ProcessMemory
from .semaphores import Semaphores
from .strategies import INT3, Strategy, strategy_for
from .tracee import Process
from .xol import XolArea

__all__ = ["Role", "Breakpoint", "Placement", "INT3"]

_MAX_INSTRUCTION = 16


class Role(enum.Enum):
    """The engine's own uses of a breakpoint."""

    RENDEZVOUS = "the dynamic linker's rendezvous"  # objects were mapped or unmapped: place their probes
    UNWIND = "the C++ unwinder"  # an exception starts unwinding: put hijacked return addresses back
    CATCH = "the C++ catch"  # an exception is caught: the frames it unwound return no more


_ROLE_LOSS = {
    Role.RENDEZVOUS: "libraries it loads from now on are not probed",
    Role.UNWIND: "a C++ exception thrown through a pending return probe may end in std::terminate",
    Role.CATCH: "return probes of frames a caught exception unwound stay pending",
}


@dataclass(eq=False)
class Breakpoint:
    """An ``int3`` at ``address`` of a mapping of the file whose inode is ``inode``."""

    address: int
    original: bytes  # the instruction's bytes as they were (the first one is under the int3)
    plan: Plan
    inode: int
    file_offset: int = 0
    entries: list[int] = field(default_factory=list)  # the entry probes placed here (indices)
    returns: list[int] = field(default_factory=list)  # the return probes of the function starting here
    roles: set[Role] = field(default_factory=set)
    strategy: Strategy = field(init=False)

    def __post_init__(self) -> None:
        self.strategy = strategy_for(self)

    @property
    def probes(self) -> list[int]:
        return self.entries + self.returns

    @property
    def wanted(self) -> bool:
        return bool(self.entries or self.returns or self.roles)

    def copy(self) -> Breakpoint:
        """The same breakpoint in a fork child's copy of the memory: its own strategy (its own slots)."""
        return Breakpoint(self.address, self.original, self.plan, self.inode, self.file_offset, list(self.entries),
                          list(self.returns), set(self.roles))


class Placement:
    """Which of ``probes`` are placed where, in every process of a run."""

    def __init__(self, probes: list[Probe], later: LaterProbes | None = None) -> None:
        """``later``: asked for the probes of each object a process maps (see :data:`LaterProbes`)."""
        self.probes = probes
        self.later = later
        self._offered: set[tuple[int, int]] = set()  # the objects (device, inode) ``later`` was asked about
        self.removed: set[int] = set()  # probes whose last consumer went
        self.placed: set[int] = set()  # probes placed in some process at some time
        self.notices: list[str] = []
        self.jumps = Jumps()  # which breakpoints became jumps

    def active(self) -> list[Probe]:
        return [p for i, p in enumerate(self.probes) if i not in self.removed]

    def insert(self, process: Process, via: int, strict: bool = True) -> list[Mapping]:
        """Place every probe whose file ``process`` maps now, and forget what went with unmapped objects.

        ``strict``: an instruction that cannot be probed is an error (at attach and exec, before anything is
        written); later (a library loaded by the program) that probe is left out with a notice.
        """
        if shadow_stack(process.pid):
            # Emulated calls, stepped calls and returns through our trampoline would disagree with the CET
            # shadow stack and kill the process (hazard 31): refuse rather than disturb it.
            raise ProcessError(f"process {process.pid} runs with a CET shadow stack, which the ptrace engine "
                               f"cannot keep consistent; use --engine kernel")
        mappings = read_maps(process.pid)
        self._forget_unmapped(process, mappings)
        if self.later is not None:
            self._ask_later(process.pid, mappings)
        planned: dict[int, tuple[list[int], int, bytes]] = {}  # address -> (probe indices, file offset, code)
        for index, probe in enumerate(self.probes):
            if index in self.removed:
                continue
            for address in runtime_addresses(mappings, probe.path, probe.offset, "x"):
                existing = process.breakpoints.get(address)
                if existing is not None:
                    self._add(existing, index)
                elif address in planned:
                    planned[address][0].append(index)
                else:
                    planned[address] = ([index], probe.offset, process.memory.read(address, _MAX_INSTRUCTION))
        plans = {}
        for address, (indices, _offset, code) in planned.items():
            try:
                _check_not_taken(code, self.probes[indices[0]], address)
                plans[address] = analyze(code, address)
            except UnprobeableInstruction as exc:
                if strict:
                    raise  # nothing is written yet
                names = ", ".join(self.probes[i].name for i in indices)
                self.notices.append(f"{names} left out: {exc}")
        for address, plan in plans.items():
            indices, offset, code = planned[address]
            breakpoint = Breakpoint(address, code, plan, _inode_at(mappings, address), offset)
            for index in indices:
                self._add(breakpoint, index)
            self._write(process, breakpoint, via)
        self.placed.update(i for b in process.breakpoints.values() for i in b.probes)
        process.semaphores.raise_armed(process.memory, mappings, self.active(), via)
        return mappings

    def _ask_later(self, pid: int, mappings: list[Mapping]) -> None:
        """Add the probes ``later`` finds in the objects mapped executable that it was not asked about yet."""
        for mapping in mappings:
            key = (mapping.device, mapping.inode)
            if mapping.executable and mapping.file_backed and key not in self._offered:
                self._offered.add(key)
                self.probes += self.later(pid, mapping.path)

    def add_role(self, process: Process, address: int, role: Role, inode: int, function: str, via: int) -> None:
        """Give the breakpoint at ``address`` (``function``) the engine's ``role``, placing one there if there is
        none; an instruction the analysis refuses there (another tracer's int3) leaves the role out, said once."""
        existing = process.breakpoints.get(address)
        if existing is not None:
            existing.roles.add(role)
            return
        code = process.memory.read(address, _MAX_INSTRUCTION)
        try:
            plan = analyze(code, address)
        except UnprobeableInstruction as exc:
            self.notices.append(f"{function} cannot serve as {role.value} in process {process.pid}, so "
                                f"{_ROLE_LOSS[role]}: {exc}")
            return
        self._write(process, Breakpoint(address, code, plan, inode, roles={role}), via)

    def remove_probe(self, process: Process, index: int, via: int) -> None:
        """Probe ``index`` went: a breakpoint left with neither probe nor role is taken out (threads already
        trapped on it are rewound when their trap is seen), and the site's semaphore lowered."""
        self.removed.add(index)
        probe = self.probes[index]
        for address, breakpoint in list(process.breakpoints.items()):
            kind = breakpoint.returns if probe.replaces_return else breakpoint.entries
            if index not in kind:
                continue
            kind.remove(index)
            if not breakpoint.wanted:
                self._take_out(process, breakpoint, via)
                process.retired.add(address)
        if not any(p.path == probe.path and p.offset == probe.offset for p in self.active()):
            process.semaphores.lower(process.memory, probe.path, probe.offset, via)

    def restore(self, process: Process, via: int) -> None:
        """Every byte written back, every semaphore count taken back (at detach)."""
        for breakpoint in list(process.breakpoints.values()):
            self._take_out(process, breakpoint, via)
        process.semaphores.lower_all(process.memory, _maps_or_none(process.pid), via)

    def clean_copy(self, parent: Process, child: ProcessMemory, child_pid: int) -> None:
        """Take every byte we wrote out of a fork child's copy of its parent's memory, before it goes free."""
        for breakpoint in parent.breakpoints.values():
            self._unwrite(child, breakpoint, child_pid)
        Semaphores(parent.semaphores.raised).lower_all(child, _maps_or_none(child_pid), child_pid)

    def _add(self, breakpoint: Breakpoint, index: int) -> None:
        kind = breakpoint.returns if self.probes[index].replaces_return else breakpoint.entries
        if index not in kind:
            kind.append(index)

    def _write(self, process: Process, breakpoint: Breakpoint, via: int) -> None:
        if process.area is None:
            process.area = XolArea(via, process.memory)  # on demand, at the first breakpoint
        breakpoint.strategy.place(process.memory, via)
        process.breakpoints[breakpoint.address] = breakpoint

    def _take_out(self, process: Process, breakpoint: Breakpoint, via: int) -> None:
        self._unwrite(process.memory, breakpoint, via)
        del process.breakpoints[breakpoint.address]

    def _unwrite(self, memory: ProcessMemory, breakpoint: Breakpoint, via: int) -> None:
        if not breakpoint.strategy.restore(memory, via):
            names = ", ".join(self.probes[i].name for i in breakpoint.probes) or \
                ", ".join(role.value for role in breakpoint.roles)
            self.notices.append(f"the code at {breakpoint.address:#x} ({names}) was rewritten while probed "
                                f"(self-modifying code?): left as the program wrote it")

    def _forget_unmapped(self, process: Process, mappings: list[Mapping]) -> None:
        """Breakpoints whose object was unmapped (dlclose) are gone with it; what comes at their address later
        is another object's code, placed afresh (with a strategy and slots of its own)."""
        for address, breakpoint in list(process.breakpoints.items()):
            if _inode_at(mappings, address) != breakpoint.inode:
                del process.breakpoints[address]
        process.retired = {a for a in process.retired if _inode_at(mappings, a) is not None}


def _inode_at(mappings: list[Mapping], address: int) -> int | None:
    """The inode of the file mapped executable at ``address`` (None: nothing executable there)."""
    return next((m.inode for m in mappings if m.start <= address < m.end and m.executable), None)


def _maps_or_none(pid: int) -> list[Mapping]:
    try:
        return read_maps(pid)
    except ProcessError:
        return []


def _check_not_taken(code: bytes, probe: Probe, address: int) -> None:
    """Refuse an instruction another tracer has already replaced with an int3 that is not in the file."""
    if code[:1] != INT3:
        return
    with open(probe.path, "rb") as f:
        f.seek(probe.offset)
        if f.read(1) == INT3:
            return  # the program's own int3
    raise UnprobeableInstruction(
        f"cannot probe {probe.name} at {address:#x}: another tracer's breakpoint is already there, most likely a "
        f"kernel uprobe (perf, bpftrace, uprobes --engine kernel), and the kernel takes its traps; stop that "
        f"tracer or use --engine kernel")

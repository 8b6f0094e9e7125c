"""A process's code as an unwinder and a reader of stacks see it: which object holds a pc, its CFI row there,
and its name as ``object`function+0xoff``.

The objects come from ``/proc/PID/maps``, read again when a pc falls outside every mapping known (a library
loaded since); each object's CFI table and symbols are read once, and kept with the object
(:class:`~uprobes.elf.objfile.ElfObject` instances are shared per file version).
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict

from ..elf.cfi import UnwindRow
from ..elf.demangle import demangle
from ..elf.objfile import ElfObject
from ..errors import UprobesError
from ..proc.maps import Mapping, path_in_process, read_maps
from ..proc.perfmap import PerfMap
from ..x86_64.unwind import DEFAULT_DEPTH, Ending, StackCopy, frame_pointer_row, unwind

__all__ = ["ProcessStacks", "StackReader", "TRUNCATED", "INCOMPLETE"]

TRUNCATED = "[truncated]"  # the stack goes on past the depth limit
INCOMPLETE = "[incomplete]"  # the unwinder could not go on: code without CFI or frame pointer, a stack not copied
_MARKS = {Ending.TRUNCATED: TRUNCATED, Ending.INCOMPLETE: INCOMPLETE}
_PROCESSES_KEPT = 64


class _Code:
    """One executable mapping; its ELF object is opened the first time a stack passes through it."""

    __slots__ = ("mapping", "pid", "name", "_obj")

    def __init__(self, mapping: Mapping, pid: int) -> None:
        self.mapping = mapping
        self.pid = pid  # whose view of the file system names the mapping's path
        self.name = os.path.basename(mapping.path)
        self._obj: ElfObject | None | bool = False  # False: not opened yet

    @property
    def obj(self) -> ElfObject | None:
        """The mapped file as an ELF object; None where it is none (anonymous code, not ELF, gone, or the
        file at that path is no longer the one mapped)."""
        if self._obj is False:
            self._obj = _open(self.mapping, self.pid)
        return self._obj

    def vaddr(self, pc: int) -> int | None:
        """``pc`` as the object's own virtual address."""
        if self.obj is None:
            return None
        try:
            return self.obj.offset_to_vaddr(pc - self.mapping.start + self.mapping.offset)
        except UprobesError:
            return None


def _jit_code(code: _Code) -> bool:
    """Whether code may be a JIT compiler's: anonymous, or in a memfd (mapped twice, as .NET does)."""
    path = code.mapping.path
    return (not code.mapping.file_backed and path != "[vdso]") or path.startswith("/memfd:")


def _open(mapping: Mapping, pid: int) -> ElfObject | None:
    if not mapping.file_backed:
        return None
    path = path_in_process(pid, mapping.path)  # a container's file, through its root
    try:
        st = os.stat(path)
        if (st.st_ino, st.st_dev) != (mapping.inode, mapping.device):
            return None  # replaced since: its frames are named by offset
        return ElfObject.open(path)
    except (OSError, UprobesError):
        return None  # not ELF, or gone


class ProcessStacks:
    """The stacks of one process: unwinding copies of them and naming their frames."""

    def __init__(self, pid: int, depth: int = DEFAULT_DEPTH, code: list[_Code] | None = None) -> None:
        """The code is read from ``/proc/PID/maps``, or is ``code`` (a fork's: its parent's)."""
        self.pid = pid
        self.depth = depth
        self._code: list[_Code] = list(code or ())
        self._names: dict[tuple[int, bool], str] = {}
        self._rows: dict[int, UnwindRow | None] = {}
        self._jit = PerfMap(pid)
        self._forget_code()
        if code is None:
            self._read_maps()

    def _read_maps(self) -> bool:
        """The process's executable mappings now; False (and those known kept) when it is gone."""
        try:
            mappings = read_maps(self.pid)
        except UprobesError:
            return False
        if not mappings:  # a zombie's: it has no memory left
            return False
        self._code = [_Code(mapping, self.pid) for mapping in mappings if mapping.executable]
        self._forget_code()
        return True

    def mapped(self, mapping: Mapping) -> None:
        """The process mapped code (perf told us): it replaces whatever it overlaps."""
        kept = [c for c in self._code if c.mapping.end <= mapping.start or c.mapping.start >= mapping.end]
        self._code = sorted(kept + [_Code(mapping, self.pid)], key=lambda c: c.mapping.start)
        self._forget_code()

    def exec(self) -> None:
        """The process exec'd: none of its code is left (what the new program maps comes next)."""
        self._code = []
        self._forget_code()

    def forked(self, pid: int) -> ProcessStacks:
        """The stacks of a child ``pid`` forked from this process: the same code, from now on its own."""
        return ProcessStacks(pid, self.depth, self._code)

    def ensure_mapped(self, pc: int) -> None:
        """Read the mappings again now if ``pc`` is in none known, and a JIT compiler's perf map if it has
        changed (the process is alive now, maybe not later)."""
        self._code_at(pc)
        if any(_jit_code(code) for code in self._code):
            self._jit.containing(pc)

    def _forget_code(self) -> None:
        self._starts = [c.mapping.start for c in self._code]
        self._names.clear()
        self._rows.clear()

    def _code_at(self, pc: int, reread: bool = True) -> _Code | None:
        i = bisect.bisect_right(self._starts, pc) - 1
        if i >= 0 and pc < self._code[i].mapping.end:
            return self._code[i]
        if reread and self._read_maps():  # mapped since we looked
            return self._code_at(pc, reread=False)
        return None

    def row_at(self, pc: int) -> UnwindRow | None:
        """The unwind rules at ``pc``: the object's CFI, else the frame pointer's; None where ``pc`` is no code."""
        try:
            return self._rows[pc]
        except KeyError:
            row = self._rows[pc] = self._row_at(pc)
            return row

    def _row_at(self, pc: int) -> UnwindRow | None:
        code = self._code_at(pc)
        if code is None:
            return None
        vaddr = code.vaddr(pc)
        if vaddr is None and _jit_code(code):  # a JIT compiler's code (anonymous, a memfd): its frame pointer's
            jitted = self._jit.containing(pc)
            return frame_pointer_row(jitted.start if jitted else pc - 1, pc, b"")
        if vaddr is None:
            return None
        row = code.obj.unwind_table.row(vaddr)
        if row is not None:
            return row
        start = code.obj.function_start(vaddr)
        code_bytes = code.obj.read(start, vaddr - start) if start is not None else b""
        return frame_pointer_row(start if start is not None else vaddr, vaddr, code_bytes)

    def unwind(self, stack: StackCopy) -> list[int | str]:
        """The pcs of the frames of ``stack``, innermost first, then a mark if it was cut or not unwound whole."""
        pcs, ending = unwind(stack, self.row_at, self.depth)
        return pcs + [_MARKS[ending]] if ending in _MARKS else pcs

    def name(self, pc: int, returns_here: bool) -> str:
        """``object`function+0xoff`` for the frame at ``pc`` (``returns_here``: a return address, named by the
        call before it; C++ names demangled); ``object`0xOFFSET`` (file offset) where no symbol covers it;
        ``[jit]`function+0xoff`` in code a JIT compiler lists in its perf map; ``[unknown]`0xADDR`` where no
        object does."""
        key = (pc, returns_here)
        name = self._names.get(key)
        if name is None:
            name = self._name(pc, returns_here)
            if not name.startswith(("[jit]", "[unknown]")):  # a JIT's map may name it later
                self._names[key] = name
        return name

    def _name(self, pc: int, returns_here: bool) -> str:
        code = self._code_at(pc)
        jitted = self._jit.containing(pc - returns_here) if code is None or _jit_code(code) else None
        if jitted is not None:
            offset = pc - jitted.start
            return f"[jit]`{jitted.name}+{offset:#x}" if offset else f"[jit]`{jitted.name}"
        if code is None or not code.mapping.file_backed:
            return f"[unknown]`{pc:#x}"
        vaddr = code.vaddr(pc)
        symbol = code.obj.symbols.containing(vaddr - returns_here) if vaddr is not None else None
        if symbol is None and returns_here and vaddr is not None:  # a signal trampoline "returned" to at its start
            symbol = code.obj.symbols.containing(vaddr)
        if symbol is None:
            return f"{code.name}`{pc - code.mapping.start + code.mapping.offset:#x}"
        offset, name = vaddr - symbol.value, demangle(symbol.name)
        return f"{code.name}`{name}+{offset:#x}" if offset else f"{code.name}`{name}"

    def frames(self, stack: StackCopy) -> list[str]:
        """The named frames of ``stack``, innermost first, with the mark of a cut or incomplete stack last."""
        frames = self.unwind(stack)
        return [frame if isinstance(frame, str) else self.name(frame, i > 0) for i, frame in enumerate(frames)]


class StackReader:
    """:class:`ProcessStacks` of every process whose hits have stacks, the most recently used kept."""

    def __init__(self, depth: int = DEFAULT_DEPTH) -> None:
        self.depth = depth
        self._processes: OrderedDict[int, ProcessStacks] = OrderedDict()

    def process(self, pid: int) -> ProcessStacks:
        """The stacks of process ``pid`` (its code read now, the first time)."""
        stacks = self._processes.get(pid)
        if stacks is None:
            return self._keep(ProcessStacks(pid, self.depth))
        self._processes.move_to_end(pid)
        return stacks

    def _keep(self, stacks: ProcessStacks) -> ProcessStacks:
        self._processes[stacks.pid] = stacks
        self._processes.move_to_end(stacks.pid)
        if len(self._processes) > _PROCESSES_KEPT:
            self._processes.popitem(last=False)
        return stacks

    def frames(self, pid: int, stack: StackCopy) -> list[str]:
        """The named frames of a hit of process ``pid``, innermost first."""
        return self.process(pid).frames(stack)

    def mapped(self, pid: int, mapping: Mapping) -> None:
        """Process ``pid`` mapped code."""
        self.process(pid).mapped(mapping)

    def exec(self, pid: int) -> None:
        """Process ``pid`` exec'd."""
        self.process(pid).exec()

    def forked(self, pid: int, parent: int) -> None:
        """Process ``pid`` was forked from ``parent``: it has its parent's code."""
        self._keep(self.process(parent).forked(pid))

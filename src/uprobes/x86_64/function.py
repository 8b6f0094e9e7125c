"""A function's machine code as a whole: its instructions, the parts of it moved out of line (``foo.cold``) and
the jump tables it dispatches through.

What a jump probe must know (where a branch may land) and what a return probe on a function's exits must know
(where it leaves) both come from reading the whole function, once.

Jump tables are found by what the code refers to: every address a memory operand names (``lea
.L4(%rip)``, ``jmp *.L4(,%rax,8)``), and the word stored there (a table reached through the GOT), is read
as a table of 32-bit offsets from its start (what GCC and Clang emit for position-independent code) and as
a table of 8-byte addresses (non-PIC code, computed ``goto`` label arrays), entry after entry while they
point into the function. Reading past a table's end can only add targets, never miss one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from iced_x86 import Decoder, DecoderOptions, FlowControl, Instruction, OpKind, Register

from ..errors import UprobesError

__all__ = ["CodeObject", "DIRECT_BRANCHES", "FunctionCode", "decode", "function_code"]

DIRECT_BRANCHES = frozenset({FlowControl.UNCONDITIONAL_BRANCH, FlowControl.CONDITIONAL_BRANCH})
_MAX_TABLE = 4096


class CodeObject(Protocol):
    """What the analysis reads of an object, at link-time addresses (:class:`uprobes.elf.objfile.ElfObject`)."""

    exception_tables: bool

    def read(self, vaddr: int, size: int) -> bytes:
        """The object's bytes as in its file."""

    def function_bounds(self, vaddr: int) -> tuple[int, int] | None:
        """``(start, end)`` of the function holding ``vaddr``, or None."""

    def pointer_at(self, vaddr: int) -> int | None:
        """The 8-byte word at ``vaddr`` as the loader leaves it (relocated), in link-time terms."""

    def is_outlined_part(self, vaddr: int) -> bool:
        """Whether code starting at ``vaddr`` may be part of another function (its ``.cold`` part)."""

    def outlined_parts(self, vaddr: int) -> tuple[tuple[int, int], ...]:
        """The parts of the function starting at ``vaddr`` moved out of line under names of their own."""

    def owns_part(self, function: int, part: int) -> bool:
        """Whether code starting at ``part`` is a part of the function starting at ``function`` (by its name)."""

    def neighbours(self, vaddr: int, count: int) -> list[tuple[int, int]]:
        """The code of up to ``count`` functions on each side of the one holding ``vaddr``."""


@dataclass(frozen=True)
class FunctionCode:
    """The instructions of a function and of the parts of it moved out of line, and where each part lies (the
    function's own range first)."""

    ranges: tuple[tuple[int, int], ...]
    instructions: tuple[Instruction, ...]

    def holds(self, address: int) -> bool:
        """Whether ``address`` is in the function or one of its parts."""
        return any(low <= address < high for low, high in self.ranges)

    @property
    def indirect_jumps(self) -> tuple[Instruction, ...]:
        return tuple(ins for ins in self.instructions if ins.flow_control == FlowControl.INDIRECT_BRANCH)

    def table_entries(self, obj: CodeObject) -> Iterator[tuple[int, int]]:
        """(table, target) for every entry of every table the code may jump through (module docstring)."""
        for table in sorted(_tables(self.instructions, obj) - {None}):
            if self.holds(table):
                continue
            for index in range(_MAX_TABLE):
                try:
                    offset = int.from_bytes(obj.read(table + 4 * index, 4), "little", signed=True)
                except UprobesError:
                    break
                if not self.holds(table + offset):
                    break
                yield table, table + offset
            for index in range(_MAX_TABLE):
                address = obj.pointer_at(table + 8 * index)
                if address is None or not self.holds(address):
                    break
                yield table, address


@functools.lru_cache(maxsize=64)  # every site of one function asks the same
def function_code(obj: CodeObject, start: int, end: int) -> FunctionCode | str:
    """The function ``[start, end)`` of ``obj`` and the parts of it moved out of line: those named after it
    (``foo.cold``, where landing pads may be) and those it, or such a part, branches to (a direct branch out of
    them to anything but another function's first byte); or why it cannot be read whole."""
    instructions = decode(obj, start, end)
    if instructions is None:
        return "the function holds bytes that do not decode"
    ranges, code, read = [(start, end)], list(instructions), 0
    called = {ins.near_branch_target for ins in instructions if ins.flow_control == FlowControl.CALL}
    for part in obj.outlined_parts(start):
        if part[0] in called:
            continue  # a function split off and called (LLVM's foo.cold.1), which returns into this one
        decoded = decode(obj, *part)
        if decoded is None:
            return f"its part at {part[0]:#x} does not decode"
        ranges.append(part)
        code += decoded
    while read < len(code):  # the parts' own branches too: a cold part may branch to another
        targets = sorted({ins.near_branch_target for ins in code[read:] if ins.flow_control in DIRECT_BRANCHES})
        read = len(code)
        for target in targets:
            if any(low <= target < high for low, high in ranges) or not obj.is_outlined_part(target):
                continue  # within the function, or a tail call
            part = obj.function_bounds(target)
            if part is None or part in ranges:
                continue
            decoded = decode(obj, *part)
            if decoded is None:
                return f"code the function branches to at {target:#x} does not decode"
            ranges.append(part)
            code += decoded
    return FunctionCode(tuple(ranges), tuple(code))


def _tables(code: tuple[Instruction, ...], obj: CodeObject) -> set[int | None]:
    """Addresses the memory operands of ``code`` name, and the words stored there."""
    named = set()
    for ins in code:
        if not any(ins.op_kind(i) == OpKind.MEMORY for i in range(ins.op_count)):
            continue
        if ins.is_ip_rel_memory_operand:
            named.add(ins.ip_rel_memory_address)
        elif ins.memory_base == Register.NONE and ins.memory_displacement:
            named.add(ins.memory_displacement)
    return named | {obj.pointer_at(address) for address in named}


@functools.lru_cache(maxsize=256)  # every probe of one function decodes it once
def decode(obj: CodeObject, start: int, end: int) -> list[Instruction] | None:
    """The instructions of ``obj`` from ``start`` to ``end``, or None if some bytes there do not decode."""
    try:
        code = obj.read(start, end - start)
    except UprobesError:
        return None
    instructions = list(Decoder(64, code, DecoderOptions.NONE, ip=start))
    return None if any(ins.is_invalid for ins in instructions) else instructions

"""Values the DWARF computes at a hit, or keeps in an ``xmm`` register, where tracefs has no way to say them: a
fetch source the engines that read registers themselves evaluate (the ptrace engine), and the kernel engine
leaves out, saying why.

An optimised program often keeps a variable as an expression of registers (``p->x * scale`` as rbx * rbp, a
bitfield masked out of a register): DWARF writes it as a small stack program, which this source carries.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from elftools.dwarf.dwarf_expr import DWARFExprParser
from elftools.dwarf.structs import DWARFStructs

from ..dwarf.expression import evaluate, reads_memory, registers_used

__all__ = ["DwarfValue"]

_PARSER = DWARFExprParser(DWARFStructs(little_endian=True, dwarf_format=32, address_size=8))


@dataclass(frozen=True)
class DwarfValue:
    """The value of the DWARF expression ``expression`` (its bytes) at a hit; ``frame_base`` is where
    ``DW_OP_fbreg`` counts from: ``(register, offset)``, the CFA there. ``text`` names the variable."""

    expression: bytes
    frame_base: tuple[int, int] | None
    text: str

    @property
    def why_not_tracefs(self) -> str:
        if self.xmm is not None:
            return f"{self.text} is in %xmm{self.xmm}, which tracefs cannot read"
        return f"{self.text} is computed by a DWARF expression, which tracefs cannot evaluate"

    @property
    def xmm(self) -> int | None:
        """N when the value is the whole of register %xmmN (``DW_OP_reg17`` .. ``DW_OP_reg32``)."""
        return self.expression[0] - 0x50 - 17 if len(self.expression) == 1 and 0x61 <= self.expression[0] <= 0x70 \
            else None

    def format(self) -> str:
        from .markerargs import Unexpressible

        raise Unexpressible(self.why_not_tracefs)

    @functools.cached_property
    def operations(self) -> list:
        return _PARSER.parse_expr(list(self.expression))

    @property
    def registers(self) -> list[int]:
        """The DWARF numbers of the registers it reads."""
        used = registers_used(self.operations)
        if self.frame_base is not None and self.frame_base[0] not in used:
            used.append(self.frame_base[0])
        return used

    @property
    def reads_memory(self) -> bool:
        return reads_memory(self.operations)

    def value(self, register: Callable[[int], int | None], word: Callable[[int], int | None]) -> int | None:
        """Its value, from registers by DWARF number and 8-byte words of memory; None where one is missing."""
        frame = None
        if self.frame_base is not None:
            base = register(self.frame_base[0])
            frame = None if base is None else base + self.frame_base[1]
        return evaluate(self.operations, register, word, frame_base=frame)

"""Call frame information: for an address in an object, how to find its caller's frame.

pyelftools reads the CFI. Decoding every FDE of a large object up front costs seconds (python3.11's 10,223
FDEs: 3.2 s), and an unwinder needs only the few functions its stacks pass through, so the table is built
lazily: the ``.eh_frame_hdr`` search table (every FDE's first address, sorted, read in one pass) finds the
FDE of an address, and that FDE alone is parsed and decoded, once, the first time a stack passes through
it. An object without that table (or with CFI only in ``.debug_frame``) is parsed whole, once.

A row says where the canonical frame address (CFA) is and where each register was saved, as DWARF
register numbers; :mod:`uprobes.x86_64.unwind` applies it.
"""

from __future__ import annotations

import bisect
import io
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from elftools.common.exceptions import DWARFError, ELFError as _PyelftoolsELFError
from elftools.dwarf.callframe import FDE, CallFrameInfo, RegisterRule
from elftools.dwarf.constants import DW_CFA
from elftools.dwarf.structs import DWARFStructs

if TYPE_CHECKING:
    from .objfile import ElfObject

__all__ = ["Rule", "UnwindRow", "UnwindTable"]

_HEADER = struct.Struct("<BBBBiI")
_DW_EH_PE_UDATA4, _DW_EH_PE_SDATA4, _DW_EH_PE_DATAREL = 0x03, 0x0B, 0x30
_STRUCTS = DWARFStructs(little_endian=True, dwarf_format=32, address_size=8)
# What a damaged or unusual FDE makes pyelftools raise while parsing or decoding it.
_UNREADABLE = (_PyelftoolsELFError, DWARFError, AssertionError, KeyError, ValueError, TypeError, IndexError,
               struct.error)


@dataclass(frozen=True, slots=True)
class Rule:
    """Where a register's caller value is: ``kind`` is one of pyelftools' ``RegisterRule`` types
    (``OFFSET``: saved at CFA+arg; ``VAL_OFFSET``: it is CFA+arg; ``REGISTER``: in register arg;
    ``SAME_VALUE``; ``UNDEFINED``; ``EXPRESSION``/``VAL_EXPRESSION``: a DWARF expression in ``arg``)."""

    kind: str
    arg: int | bytes | None = None


@dataclass(frozen=True, slots=True)
class UnwindRow:
    """The rules from ``start`` on: the CFA is ``cfa_register + cfa_offset`` (or ``cfa_expression``).
    ``signal_frame``: the code is a signal's return trampoline, whose caller's pc is where the signal came,
    not a return address (the CIE's ``S`` augmentation)."""

    start: int
    cfa_register: int | None
    cfa_offset: int
    cfa_expression: bytes | None
    rules: dict[int, Rule]
    signal_frame: bool = False


class _Function:
    """One FDE, decoded: its rows by start address."""

    __slots__ = ("end", "starts", "rows")

    def __init__(self, end: int, rows: list[UnwindRow]) -> None:
        self.end = end
        self.starts = [row.start for row in rows]
        self.rows = rows

    def row(self, vaddr: int) -> UnwindRow | None:
        i = bisect.bisect_right(self.starts, vaddr) - 1
        return self.rows[i] if i >= 0 and vaddr < self.end else None


class UnwindTable:
    """The CFI of one object (addresses are the object's own virtual addresses); each FDE decoded once."""

    def __init__(self, obj: ElfObject) -> None:
        self._functions: dict[int, _Function | None] = {}  # by FDE offset; None: unreadable
        self._cfi: CallFrameInfo | None = None
        self._starts: list[int] = []
        self._fdes: list[int] = []  # offset of each start's FDE in the section
        eh_frame, header = obj.section(".eh_frame"), obj.section(".eh_frame_hdr")
        if eh_frame is not None and eh_frame.size:
            data = obj.section_bytes(".eh_frame") or b""
            self._cfi = CallFrameInfo(io.BytesIO(data), len(data), eh_frame.addr, _STRUCTS, for_eh_frame=True)
            if header is not None and self._read_search_table(obj.section_bytes(".eh_frame_hdr"), header.addr,
                                                              eh_frame.addr):
                return
        else:
            debug_frame = obj.section(".debug_frame")
            if debug_frame is None or not debug_frame.size:
                return
            data = obj.section_bytes(".debug_frame") or b""
            self._cfi = CallFrameInfo(io.BytesIO(data), len(data), 0, _STRUCTS, for_eh_frame=False)
        self._read_every_entry()

    def _read_search_table(self, header: bytes | None, header_address: int, section_address: int) -> bool:
        if header is None or len(header) < _HEADER.size:
            return False
        version, _, count_encoding, table_encoding, _, count = _HEADER.unpack_from(header)
        if version != 1 or count_encoding != _DW_EH_PE_UDATA4 or table_encoding != _DW_EH_PE_DATAREL | _DW_EH_PE_SDATA4:
            return False
        table = header[_HEADER.size:_HEADER.size + 8 * count]
        pairs = sorted(struct.iter_unpack("<ii", table[:len(table) & ~7]))
        self._starts = [header_address + location for location, _ in pairs]
        self._fdes = [header_address + fde - section_address for _, fde in pairs]
        return True

    def _read_every_entry(self) -> None:
        try:
            entries = self._cfi.get_entries()
        except _UNREADABLE:
            return
        pairs = sorted((entry["initial_location"], entry.offset) for entry in entries if isinstance(entry, FDE))
        self._starts = [start for start, _ in pairs]
        self._fdes = [offset for _, offset in pairs]

    def start_of(self, vaddr: int) -> int | None:
        """Where the function holding ``vaddr`` starts by its FDE (every compiler-made function has one): the
        last FDE start at or below ``vaddr``, or None."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        return self._starts[i] if i >= 0 else None

    def around(self, vaddr: int, count: int) -> list[tuple[int, int]]:
        """The spans between FDE starts (a function each, its padding included): ``count`` of them before the one
        holding ``vaddr``, and ``count`` after it."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        starts = self._starts[max(0, i - count):i + count + 2]
        return [(low, high) for low, high in zip(starts, starts[1:]) if not low <= vaddr < high]

    def next_after(self, vaddr: int) -> int | None:
        """The first FDE start above ``vaddr``: where the function holding ``vaddr`` ends at the latest."""
        i = bisect.bisect_right(self._starts, vaddr)
        return self._starts[i] if i < len(self._starts) else None

    def row(self, vaddr: int) -> UnwindRow | None:
        """The rules that hold at ``vaddr``; None where no FDE covers it (or its CFI cannot be read)."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i < 0:
            return None
        offset = self._fdes[i]
        if offset not in self._functions:
            self._functions[offset] = self._decode(offset)
        function = self._functions[offset]
        return function.row(vaddr) if function is not None else None

    def _decode(self, offset: int) -> _Function | None:
        try:
            # pyelftools parses one entry only through this method (get_entries() parses all of them).
            entry = self._cfi._parse_entry_at(offset)
            if not isinstance(entry, FDE):
                return None
            # pyelftools parses DW_CFA_GNU_args_size (how much a call's arguments took on the stack, for the
            # C++ unwinder) but its decoder refuses it: it changes no rule, so it goes.
            entry.instructions = [i for i in entry.instructions if i.opcode != DW_CFA.GNU_args_size]
            decoded = entry.get_decoded()
        except _UNREADABLE:  # an opcode pyelftools does not know, a damaged entry: no rows, not an error
            return None
        start = entry["initial_location"]
        signal_frame = b"S" in bytes(entry.cie.header.get("augmentation", b""))
        rows = [_row(line, signal_frame) for line in decoded.table]
        return _Function(start + entry["address_range"], rows)


def _row(line: dict, signal_frame: bool) -> UnwindRow:
    cfa = line["cfa"]
    rules = {register: Rule(rule.type, bytes(rule.arg) if isinstance(rule.arg, list) else rule.arg)
             for register, rule in line.items() if isinstance(register, int) and isinstance(rule, RegisterRule)}
    expression = bytes(cfa.expr) if cfa.expr is not None else None
    return UnwindRow(line["pc"], cfa.reg, cfa.offset or 0, expression, rules, signal_frame)

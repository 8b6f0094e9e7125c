"""Function starts from ``.eh_frame_hdr``: where code begins when no symbol says so (stripped objects).

The header ends in a table of (initial location, FDE address) pairs sorted by location, which the unwinder
binary-searches; every compiler-generated function has an FDE, so its first entry at or below an address is
the start of the function holding it. Only the encodings every x86-64 toolchain emits are read: a 4-byte
``eh_frame_ptr``, a ``udata4`` count and a ``datarel|sdata4`` table. Other headers give no starts.
"""

from __future__ import annotations

import bisect
import struct

__all__ = ["FunctionStarts"]

_HEADER = struct.Struct("<BBBBiI")  # version, eh_frame_ptr_enc, fde_count_enc, table_enc, eh_frame_ptr, fde_count
_DW_EH_PE_UDATA4, _DW_EH_PE_SDATA4, _DW_EH_PE_DATAREL = 0x03, 0x0B, 0x30


class FunctionStarts:
    """Sorted function start addresses read from a ``.eh_frame_hdr`` loaded at ``address``."""

    def __init__(self, header: bytes | None, address: int) -> None:
        self._starts: list[int] = []
        if header is None or len(header) < _HEADER.size:
            return
        version, _, count_encoding, table_encoding, _, count = _HEADER.unpack_from(header)
        if version != 1 or count_encoding != _DW_EH_PE_UDATA4 or table_encoding != _DW_EH_PE_DATAREL | _DW_EH_PE_SDATA4:
            return
        table = header[_HEADER.size:_HEADER.size + 8 * count]
        self._starts = sorted(address + location for location, _ in struct.iter_unpack("<ii", table[:len(table) & ~7]))

    def start_of(self, vaddr: int) -> int | None:
        """The last function start at or below ``vaddr``, or None."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        return self._starts[i] if i >= 0 else None

    def next_after(self, vaddr: int) -> int | None:
        """The first function start above ``vaddr``, or None: where the function holding ``vaddr`` ends at the latest."""
        i = bisect.bisect_right(self._starts, vaddr)
        return self._starts[i] if i < len(self._starts) else None

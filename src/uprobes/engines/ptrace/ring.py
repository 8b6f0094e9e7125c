"""The ring jump probes write their records into: shared memory the target's threads fill, we read in bulk.

One ring per address space, in a memfd mapped read-write into the target and into the tool. A header page
holds three words, each on its own cache line: ``head`` (tickets handed out, moved by the writers with
``lock cmpxchg``), ``tail`` (records read, moved only by us) and ``lost`` (hits that found the ring full).
Then :data:`SLOTS` slots of :data:`SLOT_SIZE` bytes. A writer reserves ticket ``t`` only while
``head - tail`` leaves a slot free, fills slot ``t % SLOTS`` and writes its ``seq`` word, ``t + 1``, last:
a slot whose ``seq`` says so is whole (x86 never reorders a store with earlier stores). Reading takes every
whole record in ticket order up to the first slot still being written, then gives the slots back.

Layout and the code that writes a record (:func:`uprobes.x86_64.trampolines.recording_trampoline`) meet in
:data:`LAYOUT_OFFSETS`; what is in a record is untrusted (the target can write anything there).
"""

from __future__ import annotations

import collections
import struct

import numpy

from ...x86_64.trampolines import RingLayout
from .captures import WORDS
from .memory import ProcessMemory
from .shared import PROT_READ, PROT_WRITE, map_shared, unmap_shared

__all__ = ["Ring", "RECORD", "SLOTS", "SLOT_SIZE", "VOID", "WORDS"]

SLOTS = 1 << 16
SLOT_SIZE = 128
VOID = 0xFFFFFFFF  # the site id of a slot given up by a thread the tool moved out of it
_HEADER = 4096
_HEAD, _TAIL, _LOST = 64, 128, 192
RECORD = numpy.dtype([("seq", "<u8"), ("site", "<u4"), ("cpu", "<u4"), ("tsc", "<u8"), ("key", "<u8"),
                      ("words", "<u8", (WORDS,))])
assert RECORD.itemsize == SLOT_SIZE
_VOID = struct.Struct("<QI")


class Ring:
    """A ring in one address space: its records, read from our own mapping even after the target has gone."""

    def __init__(self, tid: int, memory: ProcessMemory, at: int = 0) -> None:
        """Map a ring through stopped thread ``tid`` (at ``at``: a fork child's, where its parent's was)."""
        self.size = _HEADER + SLOTS * SLOT_SIZE
        # populated: a page fault every 32 records would cost each record more than writing it
        self._shared, self.address = map_shared(tid, memory, self.size, at, PROT_READ | PROT_WRITE, b"uprobes-ring",
                                                populate=True)
        self.memory = memory
        self._slots = numpy.frombuffer(self._shared, RECORD, SLOTS, _HEADER)
        # The header's words as whole 8-byte loads and stores: struct would write a word a byte at a time, and
        # a writer reading the tail halfway through would see the ring full.
        self._header = numpy.frombuffer(self._shared, numpy.uint64, _HEADER // 8)
        self._tail = 0
        self._lost_at_retire: int | None = None
        self.suppressed: collections.Counter = collections.Counter()  # (key, site): records to drop

    def suppress(self, key: int, site: int) -> None:
        """A thread (fs base ``key``) whose hit at ``site`` was recorded was sent back to its probe: its next
        record there is the same hit's."""
        self.suppressed[key, site] += 1

    @property
    def layout(self) -> RingLayout:
        fields = RECORD.fields
        return RingLayout(self.address, _HEAD, _TAIL, _LOST, _HEADER, SLOT_SIZE.bit_length() - 1, SLOTS,
                          *(fields[name][1] for name in ("seq", "site", "cpu", "tsc", "key", "words")))

    @property
    def lost(self) -> int:
        """Hits whose record found the ring full."""
        if self._lost_at_retire is not None:
            return self._lost_at_retire
        return int(self._header[_LOST // 8])

    def read(self) -> numpy.ndarray:
        """Every whole record not read yet, in ticket order (void ones included); their slots go back."""
        if self._lost_at_retire is not None:
            return self._slots[:0]
        head = int(self._header[_HEAD // 8])
        if head == self._tail:
            return self._slots[:0]
        head = min(head, self._tail + SLOTS)  # a target that wrote over our header
        tickets = numpy.arange(self._tail, head, dtype=numpy.uint64)
        slots = (tickets & (SLOTS - 1)).astype(numpy.intp)
        seqs = self._slots["seq"][slots]  # read before the records: a seq seen whole means its record is
        pending = numpy.flatnonzero(seqs != tickets + 1)
        ready = int(pending[0]) if len(pending) else len(tickets)
        records = self._slots[slots[:ready]]
        self._tail += ready
        self._header[_TAIL // 8] = self._tail
        return records

    def void(self, seq: int) -> None:
        """Write off the slot of ticket ``seq - 1``, reserved by a thread we moved back to its probe."""
        slot = _HEADER + ((seq - 1) & (SLOTS - 1)) * SLOT_SIZE
        _VOID.pack_into(self._shared, slot, seq, VOID)

    def unmap(self, via: int) -> None:
        """Take the ring out of the target (at detach, once read to the end)."""
        unmap_shared(via, self.memory, self.address, self.size)
        self.retire()

    def retire(self) -> None:
        """The target's memory is gone or the ring unmapped: let our mapping go (read the ring first)."""
        if self._lost_at_retire is None:
            self._lost_at_retire = self.lost
            self._slots, self._header = self._slots[:0].copy(), None
            self._shared.close()

"""The ring jump probes write their records into: shared memory the target's threads fill, we read in bulk.

One ring per address space, in a memfd mapped read-write into the target and into the tool. A header page
holds three words, each on its own cache line: ``head`` (tickets handed out, moved by the writers with
``lock cmpxchg``), ``tail`` (records read, moved only by us) and ``lost`` (hits that found the ring full).
Then 8 MiB of slots of one size, a power of two (128 bytes: 12 captured words; 256 where a Python handler
reads every register). A writer reserves ticket ``t`` only while ``head - tail`` leaves a slot free, fills
slot ``t % count`` and writes its ``seq`` word, ``t + 1``, last: a slot whose ``seq`` says so is whole (x86
never reorders a store with earlier stores). Reading takes every whole record in ticket order up to the
first slot still being written, then gives the slots back.

A site whose record holds strings or arrays reserves the most tickets it may need at once: its first slot,
then the bytes it reads, in the slots after it; it gives back those it did not need where no record was
reserved after it, and says in the high 16 bits of its CPU word how many it kept. The slots are mapped a
second time just after the ring in the target, so those bytes are contiguous there even where they run past
the last slot; the reader steps from record to record.

Layout and the code that writes a record (:func:`uprobes.x86_64.trampolines.recording_trampoline`) meet in
:attr:`Ring.layout`; what is in a record is untrusted (the target can write anything there).
"""

from __future__ import annotations

import collections
import struct

import numpy

from ...x86_64.trampolines import RingLayout
from .captures import WORDS
from .memory import ProcessMemory
from .shared import PROT_READ, PROT_WRITE, map_shared, unmap_shared

__all__ = ["Ring", "record_type", "VOID"]

VOID = 0xFFFFFFFF  # the site id of a slot given up by a thread the tool moved out of it
_HEADER = 4096
_HEAD, _TAIL, _LOST, _PID = 64, 128, 192, 256
_SLOTS_SIZE = 8 << 20  # 65,536 records of 12 words, 32,768 of 28
_VOID = struct.Struct("<QII")


def record_type(words: int) -> numpy.dtype:
    """A slot holding ``words`` captured words (its size a power of two)."""
    record = numpy.dtype([("seq", "<u8"), ("site", "<u4"), ("cpu", "<u4"), ("tsc", "<u8"), ("key", "<u8"),
                          ("words", "<u8", (words,))])
    assert record.itemsize & record.itemsize - 1 == 0
    return record


class Ring:
    """A ring in one address space: its records, read from our own mapping even after the target has gone."""

    def __init__(self, tid: int, memory: ProcessMemory, words: int = WORDS, at: int = 0) -> None:
        """Map a ring of records of ``words`` words through stopped thread ``tid`` (at ``at``: a fork child's,
        where its parent's was)."""
        self.record = record_type(words)
        self.count = _SLOTS_SIZE // self.record.itemsize
        self.size = _HEADER + 2 * _SLOTS_SIZE  # in the target, the slots twice
        # populated: a page fault every 32 records would cost each record more than writing it
        self._shared, self.address = map_shared(tid, memory, _HEADER + _SLOTS_SIZE, at, PROT_READ | PROT_WRITE,
                                                b"uprobes-ring", populate=True, mirror=_SLOTS_SIZE)
        self.memory = memory
        self._slots = numpy.frombuffer(self._shared, self.record, self.count, _HEADER)
        self._bytes = numpy.frombuffer(self._shared, numpy.uint8, _SLOTS_SIZE, _HEADER)
        self.areas: dict[int, bytes] = {}  # by seq: what the records read so far hold past their header slot
        # The header's words as whole 8-byte loads and stores: struct would write a word a byte at a time, and
        # a writer reading the tail halfway through would see the ring full.
        self._header = numpy.frombuffer(self._shared, numpy.uint64, _HEADER // 8)
        self._header[_PID // 8] = memory.pid  # whose memory a trampoline's process_vm_readv reads
        self._tail = 0
        self._lost_at_retire: int | None = None
        self.suppressed: collections.Counter = collections.Counter()  # (key, site): records to drop
        self._written = numpy.zeros(0, numpy.int64)  # whole records read so far, by site id

    def suppress(self, key: int, site: int) -> None:
        """A thread (fs base ``key``) whose hit at ``site`` was recorded was sent back to its probe: its next
        record there is the same hit's."""
        self.suppressed[key, site] += 1

    @property
    def layout(self) -> RingLayout:
        fields = self.record.fields
        return RingLayout(self.address, _HEAD, _TAIL, _LOST, _HEADER, self.record.itemsize.bit_length() - 1,
                          self.count, *(fields[name][1] for name in ("seq", "site", "cpu", "tsc", "key", "words")),
                          _PID)

    @property
    def handed_out(self) -> int:
        """Tickets handed out so far (a record's seq is its ticket + 1: every record written by now has a seq
        at most this)."""
        return self._tail if self._lost_at_retire is not None else int(self._header[_HEAD // 8])

    @property
    def read_to(self) -> int:
        """Tickets read so far."""
        return self._tail

    @property
    def lost(self) -> int:
        """Hits whose record found the ring full."""
        if self._lost_at_retire is not None:
            return self._lost_at_retire
        return int(self._header[_LOST // 8])

    def written(self, site: int) -> int:
        """Records of site id ``site`` read so far."""
        return int(self._written[site]) if site < len(self._written) else 0

    def read(self, sites: int, spans: numpy.ndarray | None = None) -> numpy.ndarray:
        """Every whole record not read yet, in ticket order (void ones included); their slots go back, and those
        of site ids below ``sites`` are counted (:meth:`written`). ``spans``: the most slots a record of each site
        id takes, where some take more than one (what those hold past their first slot is in :attr:`areas`)."""
        if self._lost_at_retire is not None or int(self._header[_HEAD // 8]) == self._tail:
            return numpy.empty(0, self.record)  # never a view: one kept alive (a traceback's) keeps our mapping
        head = int(self._header[_HEAD // 8])
        head = min(head, self._tail + self.count)  # a target that wrote over our header
        tickets = numpy.arange(self._tail, head, dtype=numpy.uint64)
        first = self._tail & (self.count - 1)
        # the seqs read before the records: a seq seen whole means its record is
        whole = self._in_order(self._slots["seq"], first, len(tickets)) == tickets + 1
        if spans is None:
            pending = numpy.flatnonzero(~whole)
            taken = int(pending[0]) if len(pending) else len(tickets)
            records = self._in_order(self._slots, first, taken)
        else:
            slots = (tickets & (self.count - 1)).astype(numpy.intp)
            starts, taken = self._starts(slots, whole, spans)
            records = self._slots[slots[numpy.asarray(starts, numpy.intp)]]
            self._keep_areas(records, starts, taken, slots)
        self._tail += taken
        self._header[_TAIL // 8] = self._tail
        ids = records["site"]
        ids = ids[ids < sites]
        if len(ids):
            counts = numpy.bincount(ids, minlength=sites)
            counts[:len(self._written)] += self._written
            self._written = counts
        return records

    def _in_order(self, slots: numpy.ndarray, first: int, n: int) -> numpy.ndarray:
        """A copy of ``n`` of ``slots`` (the slots, or a field of them) from slot ``first`` on, past the last
        slot on to the first."""
        end = first + n
        if end <= self.count:
            return slots[first:end].copy()
        return numpy.concatenate((slots[first:], slots[:end - self.count]))

    def _starts(self, slots: numpy.ndarray, whole: numpy.ndarray, spans: numpy.ndarray) -> tuple[list[int], int]:
        """Where each whole record starts among ``slots`` (stepping over the slots each one says it takes), and
        how many slots they take in all."""
        sites = self._slots["site"][slots]
        most = numpy.ones(len(slots), numpy.int64)
        known = sites < len(spans)
        most[known] = spans[sites[known]]
        most[sites == VOID] = self.count
        steps = numpy.where(most > 1, numpy.clip(self._slots["cpu"][slots] >> 16, 1, most), 1)
        steps, whole, starts, at = steps.tolist(), whole.tolist(), [], 0
        while at < len(slots) and whole[at] and at + steps[at] <= len(slots):
            starts.append(at)
            at += steps[at]
        return starts, at

    def _keep_areas(self, records: numpy.ndarray, starts: list[int], end: int, slots: numpy.ndarray) -> None:
        """Copy out what the records (starting at ``starts`` among ``slots``, the last one ending at ``end``)
        hold past their first slot."""
        size = self.record.itemsize
        for site, seq, start, after in zip(records["site"].tolist(), records["seq"].tolist(), starts,
                                           starts[1:] + [end]):
            length = (after - start - 1) * size if site != VOID else 0
            if length:
                first = (int(slots[start]) + 1) % self.count * size
                area = self._bytes[first:first + length]
                if len(area) < length:  # past the last slot: the rest is at the first
                    area = numpy.concatenate((area, self._bytes[:length - len(area)]))
                self.areas[seq] = area.tobytes()

    def void(self, seq: int, span: int = 1) -> None:
        """Write off the ``span`` slots from ticket ``seq - 1``, reserved by a thread we moved back to its
        probe."""
        slot = _HEADER + ((seq - 1) & (self.count - 1)) * self.record.itemsize
        _VOID.pack_into(self._shared, slot, seq, VOID, span << 16)

    def unmap(self, via: int) -> None:
        """Take the ring out of the target (at detach, once read to the end)."""
        unmap_shared(via, self.memory, self.address, self.size)
        self.retire()

    def retire(self) -> None:
        """The target's memory is gone or the ring unmapped: let our mapping go (read the ring first)."""
        if self._lost_at_retire is None:
            self._lost_at_retire = self.lost
            self._slots, self._header, self._bytes = None, None, None
            self._shared.close()

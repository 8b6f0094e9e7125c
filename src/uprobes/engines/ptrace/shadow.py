"""Pending returns of jump probes: a stack per thread in memory shared with the target, kept by the trampolines.

A return probe placed as a jump sends its function's return to a return trampoline at the entry, and takes it
there (:func:`uprobes.x86_64.trampolines.return_trampoline`), neither with a stop: the real return address is
kept on the thread's shadow stack, one per thread (found by its fs base) in a memfd of the address space.
The trampolines take the common cases. The others end in an ``int3`` of the trampoline and are taken here,
with the thread stopped, by the rules of trapped return probes (:mod:`.returns`): a thread's first return
probe (its stack is made here), a full stack, a stack left by ``longjmp``, a return on another stack. Entries
found below the stack pointer are set aside, in the tool, as there.
"""

from __future__ import annotations

import collections
import ctypes
from dataclasses import dataclass

from ...x86_64.trampolines import ShadowLayout
from .memory import ProcessMemory
from .returns import MAX_RETURN_DEPTH
from .shared import PROT_READ, PROT_WRITE, map_shared, unmap_shared

__all__ = ["Forked", "Pending", "ShadowStacks"]

_THREADS = 256  # records looked for first: a thread's is one of the _PROBES from (fs base >> 12) % _THREADS
_PROBES = 8
_RECORD_SHIFT = 12
_ENTRY_SHIFT = 5
_ENTRIES = 64  # bytes: a record's key and depth, then its entries
_WORD = 8


@dataclass(frozen=True)
class Pending:
    """A pending return: the return-address ``slot`` held ``original``, now ``trampoline`` (a return trampoline)."""

    slot: int
    original: int
    trampoline: int


@dataclass(frozen=True)
class Forked:
    """The pending returns of an address space when one of its threads (fs base ``key``) forked: that thread's
    (``stack`` and ``aside``, which the child has too), and every thread's (what the child's copy of the stacks
    sends to trampolines)."""

    key: int
    stack: list[Pending]
    aside: list[Pending]
    every: list[Pending]


class ShadowStacks:
    """The shadow stacks of one address space: their records, read and written from our own mapping."""

    def __init__(self, tid: int, memory: ProcessMemory, at: int = 0) -> None:
        """Map them through stopped thread ``tid`` (at ``at``: a fork child's, where its parent's are)."""
        self.size = (_THREADS + _PROBES) << _RECORD_SHIFT
        self._shared, self.address = map_shared(tid, memory, self.size, at, PROT_READ | PROT_WRITE,
                                                b"uprobes-returns")
        self._words = (ctypes.c_uint64 * (self.size // _WORD)).from_buffer(self._shared)
        self.memory = memory
        self.layout = ShadowLayout(self.address, _THREADS, _PROBES, _RECORD_SHIFT, key=0, depth=8, entries=_ENTRIES,
                                   entry_shift=_ENTRY_SHIFT, limit=MAX_RETURN_DEPTH, slot=0, original=8, trampoline=16)
        # by key: pending returns found below the stack pointer (left by longjmp, or on another stack)
        self.set_aside: dict[int, collections.deque[Pending]] = collections.defaultdict(
            lambda: collections.deque(maxlen=MAX_RETURN_DEPTH))

    def stack(self, key: int) -> list[Pending]:
        """The pending returns of the thread whose fs base is ``key``, innermost last."""
        record = self._record(key)
        if record is None:
            return []
        first = record + _ENTRIES // _WORD
        step = 1 << _ENTRY_SHIFT - 3
        depth = min(self._words[record + 1], MAX_RETURN_DEPTH)
        return [Pending(*self._words[first + i * step:first + i * step + 3]) for i in range(depth)]

    def store(self, key: int, stack: list[Pending]) -> bool:
        """Make ``stack`` the thread's (its record made now if it has none); False if no record is free."""
        record = self._record(key, claim=bool(stack))
        if record is None:
            return not stack
        first = record + _ENTRIES // _WORD
        step = 1 << _ENTRY_SHIFT - 3
        for i, pending in enumerate(stack):
            self._words[first + i * step:first + i * step + 3] = [pending.slot, pending.original, pending.trampoline]
        self._words[record + 1] = len(stack)
        return True

    def free(self, key: int) -> None:
        """The thread whose fs base is ``key`` ended: its record may serve another."""
        record = self._record(key)
        if record is not None:
            self._words[record + 1] = 0
            self._words[record] = 0
        self.set_aside.pop(key, None)

    def enter(self, key: int, slot: int, trampoline: int, via: int) -> bool:
        """At a function's entry (its return address at ``slot``), the return sent to ``trampoline``; False when
        it cannot be (the stack full, no record free, an unreadable slot): the return goes unreported."""
        stack, aside = self.stack(key), self.set_aside[key]
        try:
            original = self._read(slot)
        except OSError:
            return False
        chained = bool(stack) and stack[-1].slot == slot and stack[-1].trampoline == original  # a tail call
        while stack and (stack[-1].slot < slot or stack[-1].slot == slot and not chained):
            aside.append(stack.pop())
        if len(stack) >= MAX_RETURN_DEPTH or not key:
            self.store(key, stack)
            return False
        stack.append(Pending(slot, original, trampoline))
        if not self.store(key, stack):
            return False
        self.memory.write(slot, trampoline.to_bytes(_WORD, "little"), via)
        return True

    def leave(self, key: int, frame: int) -> Pending | None:
        """A return popped the slot at ``frame``: the pending return it takes (None: none is at that slot)."""
        stack, aside = self.stack(key), self.set_aside[key]
        while stack and stack[-1].slot < frame:
            aside.append(stack.pop())
        if not stack or stack[-1].slot != frame:
            back = [pending for pending in aside if pending.slot == frame]  # from another stack
            for pending in back:
                aside.remove(pending)
            stack += reversed(back)
        taken = stack.pop() if stack and stack[-1].slot == frame else None
        self.store(key, stack)
        return taken

    def undo(self, key: int, via: int) -> None:
        """The thread's last return sent to a trampoline is its own again (the thread goes back to the site)."""
        stack = self.stack(key)
        if stack:
            self._put_back([stack.pop()], via)
            self.store(key, stack)

    def unwind(self, key: int, via: int) -> None:
        """A C++ exception starts unwinding the thread's stack: every return address it may meet is its own."""
        self._put_back(self.stack(key), via)

    def caught(self, key: int, rsp: int, via: int) -> int:
        """The exception is caught in the frame whose stack pointer is ``rsp``: the frames below were unwound,
        the others return through their trampolines again. How many were unwound."""
        stack = self.stack(key)
        alive = [pending for pending in stack if pending.slot > rsp]
        self.store(key, alive)
        for pending in alive:
            try:
                if self._read(pending.slot) == pending.original:
                    self.memory.write(pending.slot, pending.trampoline.to_bytes(_WORD, "little"), via)
            except OSError:
                pass  # left as the program wrote it; the return goes unreported
        return len(stack) - len(alive)

    def put_back_all(self, via: int) -> None:
        """Every return address sent to a trampoline, as it was (at detach)."""
        for record in self._records():
            key = self._words[record]
            self._put_back([*self.set_aside.get(key, ()), *self.stack(key)], via)

    def forked(self, key: int) -> Forked:
        """What a fork by the thread whose fs base is ``key`` leaves its child (read while it is at its fork)."""
        every = [pending for record in self._records()
                 for pending in (*self.set_aside.get(self._words[record], ()), *self.stack(self._words[record]))]
        return Forked(key, self.stack(key), list(self.set_aside.get(key, ())), every)

    def copy_into(self, tid: int, memory: ProcessMemory, forked: Forked) -> ShadowStacks:
        """A fork child's shadow stacks, where these are, with the forking thread's pending returns."""
        child = ShadowStacks(tid, memory, at=self.address)
        child.store(forked.key, forked.stack)
        child.set_aside[forked.key].extend(forked.aside)
        return child

    def clean_copy(self, forked: Forked, memory: ProcessMemory, via: int) -> None:
        """A fork child let go: the return addresses its copy of the stacks sends to trampolines, as they were."""
        self._put_back(forked.every, via, memory)

    def unmap(self, via: int) -> None:
        """Take the stacks out of the target (at detach, every return put back)."""
        unmap_shared(via, self.memory, self.address, self.size)
        self.retire()

    def retire(self) -> None:
        """The target's memory is gone (exit, exec) or the stacks unmapped: let our mapping go."""
        if self._words is not None:
            self._words = None
            self._shared.close()

    def _records(self) -> list[int]:
        """The word index of every record in use."""
        return [record for record in range(0, self.size // _WORD, 1 << _RECORD_SHIFT - 3) if self._words[record]]

    def _record(self, key: int, claim: bool = False) -> int | None:
        """The word index of the record of ``key`` (``claim``: a free one made its, if it has none)."""
        if not key:
            return None
        start = key >> _RECORD_SHIFT & _THREADS - 1
        free = None
        for index in range(start, start + _PROBES):
            record = index << _RECORD_SHIFT - 3
            if self._words[record] == key:
                return record
            if free is None and not self._words[record]:
                free = record
        if claim and free is not None:
            self._words[free + 1] = 0
            self._words[free] = key
            return free
        return None

    def _read(self, slot: int, memory: ProcessMemory | None = None) -> int:
        return int.from_bytes((memory or self.memory).read(slot, _WORD), "little")

    def _put_back(self, pending: list[Pending], via: int, memory: ProcessMemory | None = None) -> None:
        """The original return addresses of ``pending`` in their slots, innermost first (a tail call's slot held
        its caller's trampoline before its own)."""
        memory = memory or self.memory
        for instance in reversed(pending):
            try:
                if self._read(instance.slot, memory) == instance.trampoline:
                    memory.write(instance.slot, instance.original.to_bytes(_WORD, "little"), via)
            except OSError:
                pass  # that stack is gone

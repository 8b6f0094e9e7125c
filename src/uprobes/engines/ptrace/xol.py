"""The out-of-line area: one r-x page mapped into the target on demand, cut into slots.

The page is mapped by making a stopped thread run ``mmap`` from an existing ``syscall`` instruction (section
6 of the ptrace note): registers and the signal mask are saved, every signal is blocked, ``orig_rax`` is
set to -1, the call is run with ``PTRACE_SYSCALL`` to its exit, and everything is put back. The page is
never writable: slots are written through ``/proc/PID/mem``. ``MADV_DONTFORK`` keeps it out of children.
"""

from __future__ import annotations

import errno
import os
from collections import deque

from ...errors import UprobesError
from ...proc.maps import read_maps
from ...x86_64.abi import (BREAKPOINT, NR_MADVISE, NR_MMAP, NR_MUNMAP, SYSCALL_ARGUMENTS, SYSCALL_INSTRUCTION,
                           restart_interrupted_syscall)
from .memory import ProcessMemory
from .syscalls import (Regs, ptrace_getregs, ptrace_getsigmask, ptrace_setregs, ptrace_setsigmask,
                       ptrace_syscall, WALL)

__all__ = ["XolArea", "inject_syscall", "PAGE_SIZE", "SLOT_SIZE"]

PAGE_SIZE = 4096
SLOT_SIZE = 32  # an instruction (at most 15 bytes) and a 14-byte jump back; the rest is int3 padding
_STEP_SLOTS = 16  # slots boosting never takes: threads stepping at once
_PROT_READ_EXEC = 0x1 | 0x4
_MAP_PRIVATE_ANONYMOUS = 0x02 | 0x20
_MAP_FIXED_NOREPLACE = 0x100000
_MADV_DONTFORK = 10
_ALL_SIGNALS = (1 << 64) - 1


class InjectionError(UprobesError):
    """The target could not be made to run a system call for us."""


def _find_syscall_instruction(pid: int, memory: ProcessMemory) -> int:
    """Address of an existing ``syscall`` (0f 05) in an executable mapping: we never write one into live code."""
    mappings = sorted((m for m in read_maps(pid) if m.executable), key=lambda m: m.path != "[vdso]")
    for mapping in mappings:
        try:
            code = memory.read(mapping.start, min(mapping.end - mapping.start, 1 << 20))
        except OSError:
            continue
        at = code.find(SYSCALL_INSTRUCTION)
        if at >= 0:
            return mapping.start + at
    raise InjectionError(f"process {pid} maps no code with a syscall instruction to borrow")


def inject_syscall(tid: int, memory: ProcessMemory, number: int, *args: int) -> int:
    """Run syscall ``number`` in stopped thread ``tid``; return its result. The thread is left as it was."""
    saved = ptrace_getregs(tid)
    saved_mask = ptrace_getsigmask(tid)
    regs = saved.copy()
    regs.rax, regs.orig_rax = number, (1 << 64) - 1  # orig_rax -1: no syscall restart logic (hazard 21)
    for name, value in zip(SYSCALL_ARGUMENTS, args):
        setattr(regs, name, value & (1 << 64) - 1)
    regs.rip = _find_syscall_instruction(memory.pid, memory)
    ptrace_setsigmask(tid, _ALL_SIGNALS)
    try:
        for _attempt in range(3):
            ptrace_setregs(tid, regs)
            ptrace_syscall(tid)
            _wait_syscall_stop(tid)
            entry = ptrace_getregs(tid)
            if entry.orig_rax == number and entry.rip == regs.rip + 2:
                break
            # A thread stopped inside a system call (at an exec event, say) first reports that call's exit,
            # which also wrote its result over our rax: set ours up again.
        else:
            raise InjectionError(f"thread {tid} did not enter the system call uprobes gave it")
        ptrace_syscall(tid)
        _wait_syscall_stop(tid)
        result = ptrace_getregs(tid).rax
    finally:
        _restore(tid, saved)
        ptrace_setsigmask(tid, saved_mask)
    return result - (1 << 64) if result >= 1 << 63 else result


def _wait_syscall_stop(tid: int) -> None:
    while True:
        _, status = os.waitpid(tid, WALL)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise InjectionError(f"thread {tid} exited while running a system call for uprobes")
        if os.WIFSTOPPED(status) and os.WSTOPSIG(status) == (0x80 | 5):  # SIGTRAP | 0x80: TRACESYSGOOD
            return
        ptrace_syscall(tid)  # every signal is blocked; anything else is a group-stop or an event: go on


def _restore(tid: int, saved: Regs) -> None:
    """Put the registers back. A thread we stopped inside a restartable system call would otherwise return
    -ERESTARTSYS to its program, because our syscall consumed the restart; so restart it by hand."""
    regs = saved.copy()
    restart_interrupted_syscall(regs)
    ptrace_setregs(tid, regs)


class XolArea:
    """Slots of one page in one address space; "is this thread inside our code?" is asked here, once.

    Slot 0 is the return trampoline: an ``int3`` that return probes put in place of a return address. A slot
    is lent to one stepping thread at a time (:meth:`lend`), or kept by a boosted breakpoint for as long as
    that breakpoint lives (:meth:`keep`): its instruction and a jump back, which any number of threads run
    through at once. Each slot in use has an owner, who answers for a thread found inside it.
    """

    def __init__(self, tid: int, memory: ProcessMemory, at: int = 0) -> None:
        """Map the page through stopped thread ``tid``, at address ``at`` if given and free (a fork child gets
        its parent's address, so the return addresses that point at the trampoline stay right)."""
        flags = _MAP_PRIVATE_ANONYMOUS | (_MAP_FIXED_NOREPLACE if at else 0)
        address = inject_syscall(tid, memory, NR_MMAP, at, PAGE_SIZE, _PROT_READ_EXEC, flags, (1 << 64) - 1, 0)
        if at and address != at:  # taken (or an old kernel): anywhere will do
            address = inject_syscall(tid, memory, NR_MMAP, 0, PAGE_SIZE, _PROT_READ_EXEC, _MAP_PRIVATE_ANONYMOUS,
                                     (1 << 64) - 1, 0)
        if -4096 < address < 0:
            raise InjectionError(f"mmap of the out-of-line area failed in process {memory.pid}: "
                                 f"{os.strerror(-address)} (seccomp or an execmem policy?)")
        inject_syscall(tid, memory, NR_MADVISE, address, PAGE_SIZE, _MADV_DONTFORK)
        self.address = address
        self.memory = memory
        self.trampoline = address
        memory.write(self.trampoline, BREAKPOINT * SLOT_SIZE, tid)
        self._free = list(range(PAGE_SIZE // SLOT_SIZE - 1, 0, -1))
        self._content: dict[int, bytes] = {}
        self._owners: dict[int, object] = {}  # slot address -> who uses it
        self.waiters: deque = deque()  # threads waiting, stopped, for a slot to be given back

    def lend(self, code: bytes, owner: object, via: int) -> int | None:
        """A slot holding ``code`` for one step, or None when every slot is in use (the caller waits for one):
        each stepping thread has its own, so threads stepping one probe at once never share one (hazard 23)."""
        if not self._free:
            return None
        # Prefer a free slot that already holds this code (the last one given back, most often): no write needed.
        index = len(self._free) - 1
        if self._content.get(self._free[index]) != code:
            index = next((i for i in range(index - 1, -1, -1) if self._content.get(self._free[i]) == code), index)
        number = self._free.pop(index)
        slot = self.address + number * SLOT_SIZE
        if self._content.get(number) != code:
            self.memory.write(slot, code + BREAKPOINT * (SLOT_SIZE - len(code)), via)
            self._content[number] = code
        self._owners[slot] = owner
        return slot

    def keep(self, code: bytes, owner: object, via: int) -> int | None:
        """A slot holding ``code`` for ``owner`` as long as the area lives; None once only the slots kept for
        stepping are left."""
        if len(self._free) <= _STEP_SLOTS:
            return None
        return self.lend(code, owner, via)

    def release(self, slot: int) -> None:
        """Give back a lent slot."""
        self._owners.pop(slot, None)
        self._free.append((slot - self.address) // SLOT_SIZE)

    def owner(self, address: int) -> object | None:
        """Who uses the slot ``address`` lies in (None: not in a slot of ours, or in a free one)."""
        if not self.contains(address):
            return None
        return self._owners.get(address - (address - self.address) % SLOT_SIZE)

    def contains(self, address: int) -> bool:
        return self.address <= address < self.address + PAGE_SIZE

    def unmap(self, via: int) -> None:
        """Remove the page from the target (at detach, when no thread is inside it)."""
        try:
            inject_syscall(via, self.memory, NR_MUNMAP, self.address, PAGE_SIZE)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

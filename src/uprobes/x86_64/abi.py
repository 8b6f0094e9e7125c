"""x86-64 Linux ABI facts the engines rely on: where a function's return address and return value are, the
system calls the ptrace engine makes a tracee run, and how the kernel restarts an interrupted system call.

Register names are ``struct user_regs_struct`` fields (:mod:`uprobes.x86_64.registers`)::

    >>> RETURN_ADDRESS, RETURN_VALUE
    (Location(base='rsp', offset=0, size=8), 'rax')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from iced_x86 import Code, Encoder, Instruction

__all__ = [
    "BREAKPOINT", "Location", "RETURN_ADDRESS", "RETURN_VALUE", "return_value", "SYSV_ARGUMENTS", "GO_ARGUMENTS",
    "GO_G_REGISTER", "SYSCALL_INSTRUCTION", "SYSCALL_ARGUMENTS", "NR_MMAP",
    "NR_MUNMAP", "NR_MADVISE", "NR_CLOSE", "NR_MPROTECT", "NR_FTRUNCATE", "NR_MEMFD_CREATE", "NR_PROCESS_VM_READV", "NR_RESTART_SYSCALL", "ERESTARTSYS", "ERESTARTNOINTR", "ERESTARTNOHAND",
    "ERESTART_RESTARTBLOCK", "SyscallRegs", "restart_interrupted_syscall",
]

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Location:
    """``size`` bytes of memory at register ``base`` plus ``offset``."""

    base: str
    offset: int
    size: int

    def address(self, regs: Any) -> int:
        """Where the bytes are, given a thread's registers."""
        return (getattr(regs, self.base) + self.offset) & _MASK64


RETURN_ADDRESS = Location("rsp", 0, 8)
"""The return address, at a function's first instruction: the ``call`` has just pushed it."""

RETURN_VALUE = "rax"
"""The register an integer or pointer return value is in when the function returns."""

SYSV_ARGUMENTS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
"""Where a C function's first six integer or pointer arguments are at its entry; the next are on the stack,
after the return address."""

GO_ARGUMENTS = ("rax", "rbx", "rcx", "rdi", "rsi", "r8", "r9", "r10", "r11")
"""Where a Go function (its ABIInternal, Go 1.17 on) takes its first nine integer words at its entry: each
argument takes as many as it has (a string two, a slice three); where the rest are depends on their types."""

GO_G_REGISTER = "r14"
"""The register that holds the running goroutine's ``runtime.g`` inside Go code (ABIInternal)."""


def return_value(word: int) -> int:
    """A return value as events report it: the 64 bits of :data:`RETURN_VALUE`, signed."""
    return word - (1 << 64) if word >> 63 else word

def _encoded(instruction: Instruction) -> bytes:
    encoder = Encoder(64)
    encoder.encode(instruction, 0)
    return bytes(encoder.take_buffer())


BREAKPOINT = _encoded(Instruction.create(Code.INT3))
"""``int3``: what a probe puts over an instruction's first byte, and what the trampoline and slot padding are."""

SYSCALL_INSTRUCTION = b"\x0f\x05"
"""``syscall``: rip is just past it while a thread is in a system call."""

SYSCALL_ARGUMENTS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
"""The registers holding a system call's arguments, in order (the number goes in rax)."""

# arch/x86/entry/syscalls/syscall_64.tbl
NR_CLOSE = 3
NR_MMAP = 9
NR_MPROTECT = 10
NR_MUNMAP = 11
NR_MADVISE = 28
NR_FTRUNCATE = 77
NR_MEMFD_CREATE = 319
NR_PROCESS_VM_READV = 310
NR_RESTART_SYSCALL = 219

# include/linux/errno.h: what an interrupted system call returns for the kernel to restart it; never seen by the
# program, unless something (our injected call) runs between the interruption and the return to user space.
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516

# error -> the system call number to run again; None: the interrupted call itself (orig_rax).
# The case of arch_do_signal_or_restart() (arch/x86/kernel/signal.c) where no signal handler runs.
_RESTARTS: dict[int, int | None] = {
    ERESTARTSYS: None,
    ERESTARTNOINTR: None,
    ERESTARTNOHAND: None,
    ERESTART_RESTARTBLOCK: NR_RESTART_SYSCALL,
}


class SyscallRegs(Protocol):
    """The registers :func:`restart_interrupted_syscall` reads and writes (``Regs`` has them)."""

    rax: int
    orig_rax: int
    rip: int


def restart_interrupted_syscall(regs: SyscallRegs) -> None:
    """Make ``regs`` of a thread stopped inside an interrupted system call run it again, as the kernel would
    have on its way back to user space: rip back onto the ``syscall``, rax the call's number (or
    restart_syscall's, for a call such as nanosleep that resumes where it was). Other registers are left alone.

    For a thread that was in no system call (orig_rax -1), or whose call is not to be restarted, nothing changes.
    """
    if regs.orig_rax >> 63:  # orig_rax is -1 outside a system call
        return
    error = (1 << 64) - (regs.rax & _MASK64)
    if error not in _RESTARTS:
        return
    number = _RESTARTS[error]
    regs.rax = regs.orig_rax if number is None else number
    regs.rip = (regs.rip - len(SYSCALL_INSTRUCTION)) & _MASK64

"""Memory shared by the target and the tool: a memfd the target creates (system calls we inject through a
stopped thread), mapped into it and into us. What the target writes there, we read without a stop."""

from __future__ import annotations

import errno
import mmap
import os
import struct

from ...x86_64.abi import NR_CLOSE, NR_FTRUNCATE, NR_MADVISE, NR_MEMFD_CREATE, NR_MMAP, NR_MUNMAP, NR_PROCESS_VM_READV
from .memory import ProcessMemory
from .syscalls import ptrace_getregs
from .xol import InjectionError, inject_syscall

__all__ = ["PROT_READ", "PROT_WRITE", "PROT_EXEC", "map_shared", "reads_possible", "unmap_shared"]

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
_MFD_CLOEXEC = 1
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
_MAP_POPULATE, _MAP_FIXED_NOREPLACE = 0x8000, 0x100000
_MADV_DONTFORK = 10
_PROBE_BYTES = b"uprobes!"


def map_shared(tid: int, memory: ProcessMemory, size: int, address: int, prot: int, name: bytes,
               populate: bool = False, mirror: int = 0) -> tuple[mmap.mmap, int]:
    """Map ``size`` bytes of a new memfd called ``name`` at ``address`` in the target (0: where the kernel
    chooses), with ``prot``, through stopped thread ``tid``; kept out of fork children (``MADV_DONTFORK``);
    ``populate``: every page allocated and mapped now, not at the target's first touch of it; ``mirror``: its
    last ``mirror`` bytes mapped a second time just after it (what runs past the end goes on at the start of
    those bytes: unmap ``size + mirror``). Returns our own read-write mapping of the memfd, and where the
    target has it."""
    scratch = (ptrace_getregs(tid).rsp - 1024) & ~15  # below the red zone: scratch for the program too
    memory.write(scratch, name + b"\0", tid)
    fd = checked(inject_syscall(tid, memory, NR_MEMFD_CREATE, scratch, _MFD_CLOEXEC), "memfd_create")
    try:
        checked(inject_syscall(tid, memory, NR_FTRUNCATE, fd, size), "ftruncate")
        ours = os.open(f"/proc/{memory.pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            shared = mmap.mmap(ours, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(ours)
        placed = _MAP_FIXED_NOREPLACE if address else 0
        populated = _MAP_POPULATE if populate else 0
        if mirror:  # room for both, then the memfd over it twice
            mapped = inject_syscall(tid, memory, NR_MMAP, address, size + mirror, 0,
                                    _MAP_PRIVATE | _MAP_ANONYMOUS | placed, -1, 0)
            results = [mapped] if mapped < 0 else [
                inject_syscall(tid, memory, NR_MMAP, start, length, prot, _MAP_SHARED | _MAP_FIXED | populated, fd,
                               offset) for start, length, offset in ((mapped, size, 0), (mapped + size, mirror,
                                                                                           size - mirror))]
        else:
            mapped = inject_syscall(tid, memory, NR_MMAP, address, size, prot, _MAP_SHARED | placed | populated, fd, 0)
            results = [mapped]
        failed = min(results)
        if failed < 0 or (address and mapped != address):
            if mapped >= 0:
                inject_syscall(tid, memory, NR_MUNMAP, mapped, size + mirror)
            shared.close()
            raise InjectionError(f"mmap of {size >> 10} KiB at {address:#x} failed in process {memory.pid}: "
                                 f"{error_text(failed)}")
    finally:
        inject_syscall(tid, memory, NR_CLOSE, fd)
    inject_syscall(tid, memory, NR_MADVISE, mapped, size + mirror, _MADV_DONTFORK)
    return shared, mapped


def reads_possible(tid: int, memory: ProcessMemory) -> str | None:
    """Why the process of stopped thread ``tid`` cannot read its own memory with ``process_vm_readv`` (what a
    trampoline dereferences with; a seccomp filter may forbid it), or None: one such read is tried."""
    scratch = (ptrace_getregs(tid).rsp - 1024) & ~15  # below the red zone, as map_shared's
    iovecs = struct.pack("<4Q", scratch + 64, 8, scratch + 32, 8) + _PROBE_BYTES
    memory.write(scratch, iovecs, tid)
    result = inject_syscall(tid, memory, NR_PROCESS_VM_READV, memory.pid, scratch, 1, scratch + 16, 1, 0)
    if result != 8 or memory.read(scratch + 64, 8) != _PROBE_BYTES:
        return f"the process cannot read its own memory with process_vm_readv ({error_text(result)}): it traps"
    return None


def unmap_shared(via: int, memory: ProcessMemory, address: int, size: int) -> None:
    """Take a mapping of ours out of the target, through stopped thread ``via`` (gone already: nothing to do)."""
    try:
        inject_syscall(via, memory, NR_MUNMAP, address, size)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def checked(result: int, call: str) -> int:
    """A system call's result in the target, or an error naming the call."""
    if result < 0:
        raise InjectionError(f"{call} failed in the target: {error_text(result)} (seccomp?)")
    return result


def error_text(result: int) -> str:
    return os.strerror(-result) if -4096 < result < 0 else f"it answered {result:#x}"

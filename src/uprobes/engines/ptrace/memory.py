"""Reading and writing a traced process's memory through ``/proc/PID/mem``.

``pwrite`` there uses FOLL_FORCE, so text and the r-x out-of-line area are written without changing their
protection (``process_vm_writev`` fails with EFAULT on them, hazard 27). Where a kernel blocks forced
writes (hazard 28), ``PTRACE_POKETEXT`` takes over, a word at a time, through a thread that is stopped: so
every write names that thread (:meth:`ProcessMemory.through`). The program's own writes that we make for it
(an emulated ``push``) go through ``process_vm_writev``, which honours protections as the program would.
"""

from __future__ import annotations

import errno
import os

from ...errors import ProcessError
from ...probes.fetchargs import STRING_LIMIT
from ...proc.maps import unreadable_reason
from .syscalls import process_vm_writev, ptrace_peektext, ptrace_poketext

__all__ = ["ProcessMemory", "ThreadMemory", "ProgramMemory"]


def _pread(fd: int, size: int, address: int) -> bytes:
    """pread of /proc/PID/mem, where an address past the 63 bits of a file offset is a fault like any address
    no mapping holds (no user address is that high: a wild pointer, or a kernel one)."""
    if not 0 <= address < 1 << 63:
        raise OSError(errno.EFAULT, f"no user memory at {address:#x}")
    return os.pread(fd, size, address)


class ProcessMemory:
    """The memory of one address space; reopen it after an exec (hazard 10)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessError(f"process {pid} does not exist (it has ended)") from None
        except PermissionError:
            raise ProcessError(unreadable_reason(pid, "mem")) from None
        self.poke = False  # forced writes are off in this kernel (proc_mem.force_override): PTRACE_POKETEXT
        self.as_program = ProgramMemory(self)
        self._views: dict[int, ThreadMemory] = {}

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes at ``address``; OSError (EIO/EFAULT) if any of them is not mapped."""
        data = _pread(self._fd, size, address)
        if len(data) != size:
            raise OSError(errno.EFAULT, f"short read at {address:#x}")
        return data

    def read_available(self, address: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``address``: fewer where the mapping ends; OSError if none is mapped."""
        return _pread(self._fd, size, address)

    def read_string(self, address: int, limit: int = STRING_LIMIT) -> bytes:
        """The NUL-terminated bytes at ``address`` (without the NUL), at most ``limit``; stops at unmapped memory."""
        result = bytearray()
        while len(result) < limit:
            chunk_size = min(256, limit - len(result), 4096 - (address + len(result)) % 4096)
            try:
                chunk = _pread(self._fd, chunk_size, address + len(result))
            except OSError:
                if not result:
                    raise
                break
            if not chunk:
                break
            end = chunk.find(b"\0")
            if end >= 0:
                result += chunk[:end]
                return bytes(result)
            result += chunk
        return bytes(result)

    def write(self, address: int, data: bytes, via: int) -> None:
        """Write ``data`` at ``address``, even into read-only text. ``via``: a thread of this address space
        that is in a ptrace stop, for the PTRACE_POKETEXT fallback (ESRCH there means that thread is gone)."""
        if not self.poke:
            try:
                if os.pwrite(self._fd, data, address) == len(data):
                    return
            except OSError as exc:
                # Refused forced writes give EPERM, or EIO as for an address not mapped: the poke tells which.
                if exc.errno not in (errno.EPERM, errno.EIO):
                    raise
                try:
                    self._poke_words(address, data, via)
                except ProcessLookupError:
                    raise
                except OSError:
                    raise exc from None
                self.poke = True
                return
        self._poke_words(address, data, via)

    def _poke_words(self, address: int, data: bytes, via: int) -> None:
        start = address & ~7
        end = (address + len(data) + 7) & ~7
        for word_at in range(start, end, 8):
            word = bytearray(ptrace_peektext(via, word_at).to_bytes(8, "little"))
            for i in range(8):
                if address <= word_at + i < address + len(data):
                    word[i] = data[word_at + i - address]
            ptrace_poketext(via, word_at, int.from_bytes(word, "little"))

    def through(self, tid: int) -> ThreadMemory:
        """This memory as the stopped thread ``tid`` reaches it."""
        view = self._views.get(tid)
        if view is None:
            if len(self._views) >= 1024:  # threads come and go in a long run
                self._views.clear()
            view = self._views[tid] = ThreadMemory(self, tid)
        return view

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ThreadMemory:
    """One address space seen from one stopped thread: what the out-of-line fixups read and write."""

    def __init__(self, memory: ProcessMemory, tid: int) -> None:
        self.memory, self.tid = memory, tid
        self.read, self.read_string = memory.read, memory.read_string

    def write(self, address: int, data: bytes) -> None:
        self.memory.write(address, data, self.tid)


class ProgramMemory:
    """Writes the program itself makes, emulated: they fault (OSError EFAULT) where the program's would, on
    a guard page or a read-only page, instead of going through as forced writes do."""

    def __init__(self, memory: ProcessMemory) -> None:
        self._pid = memory.pid
        self.read, self.read_string = memory.read, memory.read_string

    def write(self, address: int, data: bytes) -> None:
        process_vm_writev(self._pid, address, data)

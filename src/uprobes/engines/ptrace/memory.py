"""Reading and writing a traced process's memory through ``/proc/PID/mem``.

``pwrite`` there uses FOLL_FORCE, so text and the r-x out-of-line area are written without changing their
protection (``process_vm_writev`` fails with EFAULT on them, hazard 27). Where a kernel blocks forced
writes (hazard 28), ``PTRACE_POKETEXT`` takes over, a word at a time.
"""

from __future__ import annotations

import errno
import os

from ...errors import ProcessError
from ...proc.maps import unreadable_reason
from .syscalls import ptrace_peektext, ptrace_poketext

__all__ = ["ProcessMemory"]


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
        self._poke = False

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes at ``address``; OSError (EIO/EFAULT) if any of them is not mapped."""
        data = os.pread(self._fd, size, address)
        if len(data) != size:
            raise OSError(errno.EFAULT, f"short read at {address:#x}")
        return data

    def read_string(self, address: int, limit: int = 4096) -> bytes:
        """The NUL-terminated bytes at ``address`` (without the NUL), at most ``limit``; stops at unmapped memory."""
        result = bytearray()
        while len(result) < limit:
            chunk_size = min(256, limit - len(result), 4096 - (address + len(result)) % 4096)
            try:
                chunk = os.pread(self._fd, chunk_size, address + len(result))
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

    def write(self, address: int, data: bytes, tid: int | None = None) -> None:
        """Write ``data`` at ``address``, even into read-only text. ``tid``: a stopped thread, for the fallback."""
        if not self._poke:
            try:
                if os.pwrite(self._fd, data, address) == len(data):
                    return
            except OSError as exc:
                if exc.errno != errno.EPERM or tid is None:
                    raise
                self._poke = True  # forced writes are off in this kernel (proc_mem.force_override)
        self._poke_write(tid if tid is not None else self.pid, address, data)

    def _poke_write(self, tid: int, address: int, data: bytes) -> None:
        start = address & ~7
        end = (address + len(data) + 7) & ~7
        for word_at in range(start, end, 8):
            word = bytearray(ptrace_peektext(tid, word_at).to_bytes(8, "little"))
            for i in range(8):
                if address <= word_at + i < address + len(data):
                    word[i] = data[word_at + i - address]
            ptrace_poketext(tid, word_at, int.from_bytes(word, "little"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

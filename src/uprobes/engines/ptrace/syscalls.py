"""ptrace(2), waitpid and the x86-64 register set, through ctypes.

Only what the engine uses is here. Every ptrace call must come from the thread that attached (hazard 26 of
the ptrace note); the engine makes all of them from one thread.
"""

from __future__ import annotations

import ctypes
import errno
import os

from ...x86_64.registers import USER_REGS

__all__ = [
    "Regs", "SigInfo", "ptrace_seize", "ptrace_interrupt", "ptrace_cont", "ptrace_singlestep", "ptrace_listen",
    "ptrace_detach", "ptrace_getregs", "ptrace_setregs", "ptrace_geteventmsg", "ptrace_getsiginfo",
    "ptrace_setsiginfo", "ptrace_getfpregs", "ptrace_getsigmask", "ptrace_setsigmask", "tgkill", "same_memory",
    "ptrace_syscall", "ptrace_poketext", "ptrace_peektext", "process_vm_writev",
    "OPTIONS", "EVENT_CLONE", "EVENT_EXEC", "EVENT_EXIT", "EVENT_FORK", "EVENT_VFORK", "EVENT_VFORK_DONE",
    "EVENT_STOP", "WALL", "SI_KERNEL", "TRAP_TRACE", "TRAP_BRKPT",
]

_PTRACE_PEEKTEXT = 1
_PTRACE_POKETEXT = 4
_PTRACE_CONT = 7
_PTRACE_SINGLESTEP = 9
_PTRACE_GETREGS = 12
_PTRACE_SETREGS = 13
_PTRACE_GETFPREGS = 14
_PTRACE_DETACH = 17
_PTRACE_SYSCALL = 24
_PTRACE_GETEVENTMSG = 0x4201
_PTRACE_GETSIGINFO = 0x4202
_PTRACE_SETSIGINFO = 0x4203
_PTRACE_SEIZE = 0x4206
_PTRACE_INTERRUPT = 0x4207
_PTRACE_LISTEN = 0x4208
_PTRACE_GETSIGMASK = 0x420A
_PTRACE_SETSIGMASK = 0x420B

_O_TRACESYSGOOD = 1
_O_TRACEFORK = 1 << 1
_O_TRACEVFORK = 1 << 2
_O_TRACECLONE = 1 << 3
_O_TRACEEXEC = 1 << 4
_O_TRACEVFORKDONE = 1 << 5
_O_TRACEEXIT = 1 << 6
_O_EXITKILL = 1 << 20
# SEIZE with TRACEEXEC: no stray SIGTRAP after an exec (hazard 30); TRACESYSGOOD tells syscall stops (hazard 22)
OPTIONS = _O_TRACESYSGOOD | _O_TRACEFORK | _O_TRACEVFORK | _O_TRACECLONE | _O_TRACEEXEC | _O_TRACEVFORKDONE | _O_TRACEEXIT
EXITKILL = _O_EXITKILL

EVENT_FORK, EVENT_VFORK, EVENT_CLONE, EVENT_EXEC, EVENT_VFORK_DONE, EVENT_EXIT = 1, 2, 3, 4, 5, 6
EVENT_STOP = 128
WALL = 0x40000000  # __WALL: clone children (threads) too (hazard 5)

SI_KERNEL = 0x80  # si_code of the SIGTRAP an int3 raises
TRAP_BRKPT = 1
TRAP_TRACE = 2  # si_code of a single-step trap


class Regs(ctypes.Structure):
    """``struct user_regs_struct`` (x86-64)."""

    _fields_ = [(reg.field, ctypes.c_uint64) for reg in USER_REGS]

    def copy(self) -> Regs:
        clone = Regs()
        ctypes.pointer(clone)[0] = self
        return clone


class SigInfo(ctypes.Structure):
    """``siginfo_t``: its head tells an int3 from a step, a fault from a sent signal; the whole is kept to
    deliver a held signal as it was sent."""

    _fields_ = [("si_signo", ctypes.c_int), ("si_errno", ctypes.c_int), ("si_code", ctypes.c_int),
                ("_pad", ctypes.c_int), ("si_addr", ctypes.c_uint64), ("_rest", ctypes.c_byte * 104)]


_SYS_TGKILL = 234
_SYS_KCMP, _KCMP_VM = 312, 1
_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def _call(request: int, tid: int, addr: int | None = 0, data=None) -> int:
    """ptrace(2); OSError with its errno on failure. Only PEEKTEXT can return -1 as a value: errno is reset
    for it alone (that costs a ctypes call on every one of the four ptrace calls of a hit)."""
    if request == _PTRACE_PEEKTEXT:
        ctypes.set_errno(0)
    result = _ptrace(request, tid, addr, data)
    if result == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")
    return result


def ptrace_seize(tid: int, options: int) -> None:
    _call(_PTRACE_SEIZE, tid, 0, options)


def ptrace_interrupt(tid: int) -> None:
    _call(_PTRACE_INTERRUPT, tid)


def ptrace_cont(tid: int, sig: int = 0) -> None:
    _call(_PTRACE_CONT, tid, 0, sig)


def ptrace_syscall(tid: int, sig: int = 0) -> None:
    _call(_PTRACE_SYSCALL, tid, 0, sig)


def ptrace_singlestep(tid: int, sig: int = 0) -> None:
    _call(_PTRACE_SINGLESTEP, tid, 0, sig)


def ptrace_listen(tid: int) -> None:
    _call(_PTRACE_LISTEN, tid)


def ptrace_detach(tid: int, sig: int = 0) -> None:
    _call(_PTRACE_DETACH, tid, 0, sig)


def ptrace_getregs(tid: int, regs: Regs | None = None) -> Regs:
    regs = regs if regs is not None else Regs()
    _call(_PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def ptrace_setregs(tid: int, regs: Regs) -> None:
    _call(_PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


def ptrace_getfpregs(tid: int) -> bytes:
    """The thread's FXSAVE area (``struct user_fpregs_struct``, 512 bytes): x87, mxcsr, xmm0..15."""
    area = ctypes.create_string_buffer(512)
    _call(_PTRACE_GETFPREGS, tid, 0, ctypes.addressof(area))
    return area.raw


def ptrace_geteventmsg(tid: int) -> int:
    value = ctypes.c_ulong()
    _call(_PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(value))
    return value.value


def ptrace_getsiginfo(tid: int) -> SigInfo:
    info = SigInfo()
    _call(_PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(info))
    return info


def ptrace_setsiginfo(tid: int, info: SigInfo) -> None:
    _call(_PTRACE_SETSIGINFO, tid, 0, ctypes.addressof(info))


def tgkill(tgid: int, tid: int, sig: int) -> None:
    if _libc.syscall(_SYS_TGKILL, tgid, tid, sig) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"tgkill({tgid}, {tid}, {sig}): {os.strerror(err)}")


def same_memory(pid: int, other: int) -> bool:
    """Whether two processes share one address space (a vfork or ``clone(CLONE_VM)`` child), by kcmp(2)."""
    result = _libc.syscall(_SYS_KCMP, pid, other, _KCMP_VM, 0, 0)
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"kcmp({pid}, {other}): {os.strerror(err)}")
    return result == 0


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_process_vm_writev = _libc.process_vm_writev
_process_vm_writev.restype = ctypes.c_ssize_t
_process_vm_writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                               ctypes.c_ulong]
# One buffer and two iovecs, reused: every ptrace call comes from one thread (hazard 26), and this is on the hit
# path of emulated pushes and calls, where building ctypes objects would cost more than the system call.
_WRITE_BUFFER = (ctypes.c_char * 64)()
_LOCAL, _REMOTE = _IoVec(ctypes.addressof(_WRITE_BUFFER), 0), _IoVec(0, 0)
_LOCAL_AT, _REMOTE_AT = ctypes.addressof(_LOCAL), ctypes.addressof(_REMOTE)


def process_vm_writev(pid: int, address: int, data: bytes) -> None:
    """Write ``data`` (at most 64 bytes) at ``address`` as the process itself could: page protections hold
    (EFAULT otherwise)."""
    size = len(data)
    _WRITE_BUFFER[:size] = data
    _LOCAL.len = _REMOTE.len = size
    _REMOTE.base = address
    ctypes.set_errno(0)
    if _process_vm_writev(pid, _LOCAL_AT, 1, _REMOTE_AT, 1, 0) != size:
        err = ctypes.get_errno() or errno.EFAULT
        raise OSError(err, f"process_vm_writev({pid}, {address:#x}): {os.strerror(err)}")


def ptrace_getsigmask(tid: int) -> int:
    mask = ctypes.c_uint64()
    _call(_PTRACE_GETSIGMASK, tid, 8, ctypes.addressof(mask))
    return mask.value


def ptrace_setsigmask(tid: int, mask: int) -> None:
    value = ctypes.c_uint64(mask)
    _call(_PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(value))


def ptrace_peektext(tid: int, address: int) -> int:
    return _call(_PTRACE_PEEKTEXT, tid, address, None) & (1 << 64) - 1


def ptrace_poketext(tid: int, address: int, word: int) -> None:
    _call(_PTRACE_POKETEXT, tid, address, word)


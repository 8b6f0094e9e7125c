"""What ``/proc`` says about one process or thread: auxv, tgid, comm, last CPU, pending signals, CET, and why
ptrace was refused. Each reader answers a default (not an exception) for a process that has gone."""

from __future__ import annotations

import errno
import os

__all__ = ["AT_BASE", "auxv", "cpu_flags", "thread_ids", "start_time", "tgid", "thread_comm", "last_cpu",
           "signal_pending", "shadow_stack", "status_field", "explain_seize_error", "has_ended"]

AT_BASE = 7  # where the dynamic linker is loaded


def auxv(pid: int, key: int) -> int | None:
    """One value of the process's auxiliary vector (``AT_BASE``: where the dynamic linker is loaded)."""
    try:
        with open(f"/proc/{pid}/auxv", "rb") as f:
            data = f.read()
    except OSError:
        return None
    for i in range(0, len(data) - 15, 16):
        if int.from_bytes(data[i:i + 8], "little") == key:
            return int.from_bytes(data[i + 8:i + 16], "little")
    return None


def thread_ids(pid: int) -> set[int]:
    """The ids of the threads of process ``pid`` now; empty when it is gone."""
    try:
        return {int(tid) for tid in os.listdir(f"/proc/{pid}/task")}
    except OSError:
        return set()


def start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (field 22 of /proc/PID/stat); None once gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])  # after the command name, which may hold anything


_PF_EXITING = 0x4  # include/linux/sched.h: the task is on its way out


def has_ended(pid: int) -> bool:
    """Whether process ``pid`` has ended or is ending: gone, a zombie its parent has not reaped yet, or exiting,
    with no other thread left (its first thread ending while others run is not the process ending)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    fields = stat[stat.rindex(b")") + 2:].split()  # after the command name, which may hold anything
    if fields[0] not in (b"Z", b"X") and not int(fields[6]) & _PF_EXITING:
        return False
    return len(thread_ids(pid)) <= 1


def tgid(tid: int) -> int:
    """The process a thread belongs to (``tid`` itself once the thread is gone)."""
    value = status_field(f"/proc/{tid}/status", "Tgid")
    return tid if value is None else int(value)


def namespace_pid(pid: int) -> int | None:
    """The pid process ``pid`` has in its own pid namespace (a container's), when that is another than ours."""
    value = status_field(f"/proc/{pid}/status", "NSpid")
    ids = value.split() if value else []
    return int(ids[-1]) if len(ids) > 1 else None


def thread_comm(pid: int, tid: int) -> str:
    """The thread's name, as the kernel's ``comm`` ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return ""


def cpu_flags() -> frozenset[str]:
    """The flags /proc/cpuinfo gives the first CPU (``rdpid``, ``fsgsbase``...)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def last_cpu(pid: int, tid: int) -> int:
    """The CPU the thread last ran on, -1 if unknown."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[36])  # field 39
    except (OSError, IndexError, ValueError):
        return -1


def signal_pending(pid: int, tid: int, sig: int) -> bool:
    """Whether ``sig`` waits in thread ``tid``'s own pending set."""
    pending = status_field(f"/proc/{pid}/task/{tid}/status", "SigPnd")
    return pending is not None and bool(int(pending, 16) & 1 << sig - 1)


def shadow_stack(pid: int) -> bool:
    """Whether the process runs with a CET user shadow stack."""
    return "shstk" in (status_field(f"/proc/{pid}/status", "x86_Thread_features") or "")


def status_field(path: str, name: str) -> str | None:
    """The value of line ``name`` of a ``/proc/.../status`` file (None: no such line, or the task is gone)."""
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(name + ":")), None)
    except OSError:
        return None


def explain_seize_error(pid: int, exc: OSError) -> str:
    """Why we may not trace ``pid``, the way strace diagnoses EPERM (hazard 29 of the ptrace note)."""
    if exc.errno == errno.ESRCH:
        return f"process {pid} does not exist"
    if exc.errno != errno.EPERM:
        return f"cannot trace process {pid}: {os.strerror(exc.errno)}"
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        status = {}
    tracer = status.get("TracerPid", "0").strip()
    if tracer not in ("", "0"):
        return f"cannot trace process {pid}: it is already traced by process {tracer} (a debugger or tracer)"
    uids = status.get("Uid", "").split()
    if uids and os.geteuid() != 0 and str(os.geteuid()) not in uids[:1]:
        return f"cannot trace process {pid}: it belongs to uid {uids[0]}, not to you (run as that user or root)"
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f.read().strip()
    except OSError:
        scope = "0"
    if scope != "0" and os.geteuid() != 0:
        return (f"cannot trace process {pid}: kernel.yama.ptrace_scope is {scope}, which allows tracing only "
                f"your own children (launch it with -c, or set the sysctl to 0, or run as root)")
    if uids and len(set(uids)) > 1:
        return f"cannot trace process {pid}: it is setuid (its user ids differ); only root may trace it"
    return f"cannot trace process {pid}: permission denied (not dumpable, or refused by a security module)"


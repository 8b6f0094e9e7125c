"""Read tracepoint samples (uprobe events among them) from perf's per-CPU ring buffers, with ctypes only.

One perf event is opened per (tracepoint, thread, online CPU), as the kernel wants for a task event that
is inherited and mapped (system-wide: per (tracepoint, CPU); counting a process needs no buffer, so one per
(tracepoint, thread) on every CPU). Each CPU gets one ring buffer; the other events of that CPU write into it
through ``PERF_EVENT_IOC_SET_OUTPUT``, as do the tracepoints added to a process later and, where the reader
tracks what the processes do, a dummy event per (thread, CPU) whose records tell their executable mappings,
execs and forks. A sample carries the event's perf id, which :class:`TracepointReader` maps back to the
tracepoint id, and the raw tracepoint record that :meth:`~uprobes.engines.kernel.eventformat.EventFormat.decode`
understands. ::

    with TracepointReader([hit_id, ret_id], pid=child.pid) as reader:
        reader.enable()
        while child.poll() is None:
            if reader.poll(0.1):
                show(reader.read())
        show(reader.read())     # what was written before the exit

Lost samples, as the kernel accounts them (kernel/events/ring_buffer.c, ``__perf_output_begin()``): a
sample that does not fit is dropped and counted in the buffer's ``rb->lost`` and in the event's
``lost_samples``. The ``PERF_RECORD_LOST`` that reports ``rb->lost`` is only written in front of the
*next* record that fits in that buffer, so drops at the end of a run stay unreported until more traffic
comes; :attr:`TracepointReader.lost` counts reported drops, :meth:`TracepointReader.count_lost` reads the
exact per-event counters (``PERF_FORMAT_LOST``, Linux 6.0+).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import fcntl
import mmap
import os
import select
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy

from ...errors import KernelEngineError
from ...proc.maps import Mapping
from ...proc.status import has_ended, start_time, thread_ids

__all__ = ["Sample", "Samples", "TaskChange", "TaskRecord", "TracepointReader", "online_cpus"]

_NR_PERF_EVENT_OPEN = 298  # x86-64
_PERF_TYPE_SOFTWARE = 1
_PERF_TYPE_TRACEPOINT = 2
_PERF_COUNT_SW_DUMMY = 9  # counts nothing: a descriptor for the records of what the tasks do (perf's tracking)
_PERF_FLAG_FD_CLOEXEC = 1 << 3
_CLOCK_MONOTONIC = 1
_PERF_ATTR_SIZE_VER8 = 136
_ENOTSUPP = 524  # kernel-internal errno, which arch_uprobe_analyze_insn() returns for refused instructions
# Wake a poller when a buffer is this fraction full, not at every sample: on the 2-vCPU test VM a
# cross-CPU wakeup per sample made a traced hit ~10x slower (23 us instead of 2.3 us).
_WAKEUP_FRACTION = 8

# enum perf_event_sample_format: the record layout below depends on exactly these bits.
_PERF_SAMPLE_TID = 1 << 1
_PERF_SAMPLE_TIME = 1 << 2
_PERF_SAMPLE_CPU = 1 << 7
_PERF_SAMPLE_RAW = 1 << 10
_PERF_SAMPLE_REGS_USER = 1 << 12
_PERF_SAMPLE_STACK_USER = 1 << 13
_PERF_SAMPLE_IDENTIFIER = 1 << 16
_SAMPLE_TYPE = _PERF_SAMPLE_IDENTIFIER | _PERF_SAMPLE_TID | _PERF_SAMPLE_TIME | _PERF_SAMPLE_CPU | _PERF_SAMPLE_RAW
_RAW_SAMPLE_TYPE = _PERF_SAMPLE_IDENTIFIER | _PERF_SAMPLE_RAW  # to tell hits apart by a field, nothing else
# The trailer (sample_id_all) of a task record: pid, tid; time; cpu; identifier (_TRAILER_TIME)
_TRACKING_SAMPLE_TYPE = _PERF_SAMPLE_IDENTIFIER | _PERF_SAMPLE_TID | _PERF_SAMPLE_TIME | _PERF_SAMPLE_CPU
_PERF_FORMAT_LOST = 1 << 4

# ioctls: _IO('$', n), and PERF_EVENT_IOC_ID = _IOR('$', 7, __u64 *)
_PERF_EVENT_IOC_ENABLE = 0x2400
_PERF_EVENT_IOC_DISABLE = 0x2401
_PERF_EVENT_IOC_SET_OUTPUT = 0x2405
_PERF_EVENT_IOC_ID = 0x80082407
_PERF_EVENT_IOC_SET_FILTER = 0x40082406  # _IOW('$', 6, char *)

# enum perf_event_type
_PERF_RECORD_LOST = 2
_PERF_RECORD_COMM = 3
_PERF_RECORD_FORK = 7
_PERF_RECORD_SAMPLE = 9
_PERF_RECORD_MMAP2 = 10
_PERF_RECORD_MISC_COMM_EXEC = 1 << 13
_PROT_READ, _PROT_WRITE, _PROT_EXEC = 1, 2, 4

# struct perf_event_mmap_page: the first page of the mapping; the data area follows at data_offset.
_DATA_HEAD = 1024
_DATA_TAIL = 1032
_DATA_OFFSET = 1040
_DATA_SIZE = 1048

_U64 = struct.Struct("<Q")
# struct perf_event_header (type, misc, size), then for PERF_RECORD_SAMPLE with _SAMPLE_TYPE:
# id; pid, tid; time; cpu, res; raw size -- the raw record follows.
_SAMPLE = struct.Struct("<IHHQIIQIII")
_RAW_SAMPLE = struct.Struct("<IHHQI")  # with _RAW_SAMPLE_TYPE: header; id; raw size
_HEADER = struct.Struct("<IHH")  # struct perf_event_header: type, misc, size
# where _SAMPLE's fields are, to read them from many samples at once
_IDENT_AT, _PID_AT, _TID_AT, _TIME_AT, _CPU_AT, _RAW_SIZE_AT = 8, 16, 20, 24, 32, 40
_TYPE_AND_SIZE = numpy.uint64(0xFFFF_0000_FFFF_FFFF)  # of a header read as one word, all but misc
# A LOST record is shorter than a sample's fixed part; zeros after the last record let every record be
# unpacked as a sample first (one call per record) and told apart by its type afterwards.
_PAD = bytes(_SAMPLE.size)
_LOST = struct.Struct("<8xQQ")  # PERF_RECORD_LOST after the header: id, lost
_FORK = struct.Struct("<8xIIII")  # PERF_RECORD_FORK after the header: pid, ppid, tid, ptid
_TRAILER_TIME = 24  # with sample_id_all, a record ends in pid, tid; time; cpu; identifier: its time is this far back
_MMAP2 = struct.Struct("<8xIIQQQIIQQII")  # pid, tid, addr, len, pgoff, maj, min, ino, ino_generation, prot, flags
_READ_LOST = struct.Struct("<QQ")  # read() with read_format PERF_FORMAT_LOST: value, lost
_EVERY_CPU = -1
_EVERY_TASK = -1
# Rounds of opening every thread's events again while the process keeps starting threads (see add_process).
_ATTACH_ROUNDS = 4

_ERRNO_REASONS = {
    errno.EACCES: "perf_event_open needs root or CAP_PERFMON",
    errno.EPERM: "perf_event_open needs root or CAP_PERFMON",
    errno.EMFILE: "too many open files (one descriptor per event, thread and CPU); raise the hard limit (ulimit -Hn)",
    # perf_trace_init() finds no event with that id; perf_copy_attr() refuses PERF_FORMAT_LOST before 6.0
    errno.EINVAL: "no such tracepoint id (was the event deleted?), or a kernel older than Linux 6.0",
    # perf_trace_init() registers the uprobe at open, so instruction analysis fails here, when a process
    # maps the file (uprobe_register -> arch_uprobe_analyze_insn)
    _ENOTSUPP: "the kernel's uprobes refuse the instruction at this offset (a lock, es, cs, ss or ds prefix, "
               "int3, int N, in/out, hlt, ...)",
    errno.ENOEXEC: "the kernel cannot decode an instruction at this offset (not an instruction boundary?)",
    # probe_event_enable() refuses perf while the event is enabled through tracefs (TP_FLAG_TRACE)
    errno.EINTR: "the event is enabled in tracefs (events/GROUP/EVENT/enable); write 0 there first",
}


class Sample(NamedTuple):
    """One ``PERF_RECORD_SAMPLE``: ``event_id`` is the tracepoint id, ``time_ns`` is CLOCK_MONOTONIC."""

    event_id: int
    pid: int
    tid: int
    time_ns: int
    cpu: int
    raw: bytes


class TaskChange(enum.Enum):
    MAPPED = "mapped"  # an executable mapping
    EXEC = "exec"
    FORKED = "forked"  # a new process (its first thread ``tid``) from thread ``parent_tid`` of ``parent``


class TaskRecord(NamedTuple):
    """What a traced process did to its code, at ``time_ns`` (CLOCK_MONOTONIC), from a ``tracking`` reader."""

    change: TaskChange
    time_ns: int
    pid: int
    mapping: Mapping | None = None
    tid: int = 0
    parent: int = 0
    parent_tid: int = 0


@dataclass
class Samples:
    """Samples in columns, one entry per sample: where each raw record is in ``data`` (``view``, the same bytes
    as an array), and the tracepoint id (-1: not ours), pid, tid, time, CPU and raw record size."""

    data: bytes
    view: numpy.ndarray
    event_id: numpy.ndarray
    pid: numpy.ndarray
    tid: numpy.ndarray
    time_ns: numpy.ndarray
    cpu: numpy.ndarray
    raw_at: numpy.ndarray
    raw_size: numpy.ndarray

    def user_stack(self, row: int, registers: int) -> tuple[list[int], bytes] | None:
        """With a ``user_stack`` reader: sample ``row``'s user registers (``registers`` of them, in the order of
        their bits in the mask) and the bytes of its stack copied from the stack pointer up; None where the
        kernel had none (a sample taken in a kernel thread)."""
        at = int(self.raw_at[row]) + int(self.raw_size[row])  # PERF_SAMPLE_REGS_USER follows the raw record
        abi = _U64.unpack_from(self.data, at)[0]
        if not abi:
            return None
        values = list(struct.unpack_from(f"<{registers}Q", self.data, at + 8))
        at += 8 + 8 * registers
        size = _U64.unpack_from(self.data, at)[0]  # PERF_SAMPLE_STACK_USER: size, data, dyn_size
        copied = _U64.unpack_from(self.data, at + 8 + size)[0] if size else 0
        return values, self.data[at + 8:at + 8 + copied]

    def field(self, rows: numpy.ndarray, offset: numpy.ndarray | int, dtype: str) -> numpy.ndarray:
        """The value of type ``dtype`` at ``offset`` in the raw record of each of ``rows``."""
        return _gather(self.view, self.raw_at[rows] + offset, dtype)


def _gather(view: numpy.ndarray, at: numpy.ndarray, dtype: str) -> numpy.ndarray:
    """The values of type ``dtype`` at byte offsets ``at`` of ``view`` (reads past its end give zeros)."""
    size = numpy.dtype(dtype).itemsize
    index = at[:, None] + numpy.arange(size)
    if len(at) and index[:, -1].max() >= len(view):
        inside = index < len(view)
        return numpy.where(inside, view[numpy.where(inside, index, 0)], 0).astype(numpy.uint8).view(dtype)[:, 0]
    return view[index].view(dtype)[:, 0]


class _Wakeup(ctypes.Union):
    _fields_ = [("wakeup_events", ctypes.c_uint32), ("wakeup_watermark", ctypes.c_uint32)]


class _PerfEventAttr(ctypes.Structure):
    """``struct perf_event_attr`` up to ``config3`` (PERF_ATTR_SIZE_VER8)."""

    _anonymous_ = ("_wakeup",)
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("disabled", ctypes.c_uint64, 1),
        ("inherit", ctypes.c_uint64, 1),
        ("pinned", ctypes.c_uint64, 1),
        ("exclusive", ctypes.c_uint64, 1),
        ("exclude_user", ctypes.c_uint64, 1),
        ("exclude_kernel", ctypes.c_uint64, 1),
        ("exclude_hv", ctypes.c_uint64, 1),
        ("exclude_idle", ctypes.c_uint64, 1),
        ("mmap", ctypes.c_uint64, 1),
        ("comm", ctypes.c_uint64, 1),
        ("freq", ctypes.c_uint64, 1),
        ("inherit_stat", ctypes.c_uint64, 1),
        ("enable_on_exec", ctypes.c_uint64, 1),
        ("task", ctypes.c_uint64, 1),
        ("watermark", ctypes.c_uint64, 1),
        ("precise_ip", ctypes.c_uint64, 2),
        ("mmap_data", ctypes.c_uint64, 1),
        ("sample_id_all", ctypes.c_uint64, 1),
        ("exclude_host", ctypes.c_uint64, 1),
        ("exclude_guest", ctypes.c_uint64, 1),
        ("exclude_callchain_kernel", ctypes.c_uint64, 1),
        ("exclude_callchain_user", ctypes.c_uint64, 1),
        ("mmap2", ctypes.c_uint64, 1),
        ("comm_exec", ctypes.c_uint64, 1),
        ("use_clockid", ctypes.c_uint64, 1),
        ("context_switch", ctypes.c_uint64, 1),
        ("write_backward", ctypes.c_uint64, 1),
        ("namespaces", ctypes.c_uint64, 1),
        ("ksymbol", ctypes.c_uint64, 1),
        ("bpf_event", ctypes.c_uint64, 1),
        ("aux_output", ctypes.c_uint64, 1),
        ("cgroup", ctypes.c_uint64, 1),
        ("text_poke", ctypes.c_uint64, 1),
        ("build_id", ctypes.c_uint64, 1),
        ("inherit_thread", ctypes.c_uint64, 1),
        ("remove_on_exec", ctypes.c_uint64, 1),
        ("sigtrap", ctypes.c_uint64, 1),
        ("__reserved_1", ctypes.c_uint64, 26),
        ("_wakeup", _Wakeup),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("__reserved_2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32),
        ("aux_action", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64),
        ("config3", ctypes.c_uint64),
    ]


assert ctypes.sizeof(_PerfEventAttr) == _PERF_ATTR_SIZE_VER8

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _perf_event_open(attr: _PerfEventAttr, pid: int, cpu: int) -> int:
    """The raw syscall; returns the fd or raises OSError. Arguments are longs: syscall(2) is variadic."""
    fd = _syscall(ctypes.c_long(_NR_PERF_EVENT_OPEN), ctypes.byref(attr), ctypes.c_long(pid),
                  ctypes.c_long(cpu), ctypes.c_long(-1), ctypes.c_long(_PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def online_cpus(path: Path = Path("/sys/devices/system/cpu/online")) -> list[int]:
    """The CPUs in a kernel cpu list such as ``0-3,6,8-9``."""
    cpus: list[int] = []
    for part in path.read_text().strip().split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


class _RingBuffer:
    """One CPU's mapping: the control page (``perf_event_mmap_page``), then ``data_size`` bytes of records."""

    __slots__ = ("fd", "map", "offset", "size", "_head", "_tail")

    def __init__(self, fd: int, pages: int) -> None:
        self.fd = fd
        self.map = mmap.mmap(fd, (1 + pages) * mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.offset = _U64.unpack_from(self.map, _DATA_OFFSET)[0]
        self.size = _U64.unpack_from(self.map, _DATA_SIZE)[0]
        # data_head and data_tail as whole 8-byte loads and stores: struct.pack_into clears a word before it
        # writes it, and the kernel reading data_tail as 0 meanwhile would drop records for a full buffer.
        self._head = ctypes.c_uint64.from_buffer(self.map, _DATA_HEAD)
        self._tail = ctypes.c_uint64.from_buffer(self.map, _DATA_TAIL)

    def pending(self) -> bool:
        return self._head.value != self._tail.value

    def take(self) -> bytes:
        """Every complete record written since the last call, as one contiguous copy followed by ``_PAD``;
        frees their space. Empty when there is nothing new.

        The kernel publishes ``data_head`` after the records are written, and only reuses space behind
        ``data_tail``; on x86 (TSO) plain loads and stores keep that order, which the uapi comments ask
        for with smp_rmb()/smp_mb().
        """
        buf = self.map
        head, tail = self._head.value, self._tail.value
        if head == tail:
            return b""
        start = self.offset + tail % self.size
        end = start + (head - tail)
        limit = self.offset + self.size
        # A record may straddle the end of the data area; copying both pieces into one bytes object
        # makes every record contiguous.
        if end <= limit:
            chunk = buf[start:end] + _PAD
        else:
            chunk = buf[start:limit] + buf[self.offset:end - self.size] + _PAD
        self._tail.value = head
        return chunk

    def close(self) -> None:
        self._head = self._tail = None  # they hold the mapping's buffer
        self.map.close()


@dataclass
class _TaskSet:
    """The descriptors (and buffers) of the events on one process's threads, or on every task."""

    fds: list[int] = field(default_factory=list)
    buffers: dict[int, _RingBuffer] = field(default_factory=dict)  # by CPU
    idents: list[int] = field(default_factory=list)  # of its sampling descriptors (PERF_EVENT_IOC_ID)
    started: int | None = None  # when its process started (a pid is used again by another, later)


class TracepointReader:
    """Samples of the tracepoints ``event_ids`` from process ``pid`` (every thread it has, and the threads and
    children it starts later), of several processes (a sequence of pids; more added with :meth:`add_process`),
    or from every process when ``pid`` is None; ``pages`` (a power of two) data pages per CPU. A process's
    descriptors are closed once it has ended and its samples were read; its counts are kept.

    Events start disabled: call :meth:`enable`. Close it (or use ``with``) before deleting the events:
    the kernel refuses to delete an event a perf descriptor still holds (EBUSY).
    """

    def __init__(self, event_ids: Sequence[int], pid: int | Sequence[int] | None, pages: int = 64,
                 sampling: bool = True, follow_forks: bool = True, enable_on_exec: bool = False,
                 names: dict[int, str] | None = None, raw_only: bool = False,
                 user_stack: tuple[int, int] | None = None, without_stack: set[int] = frozenset(),
                 filters: dict[int, str] | None = None, tracking: bool = False) -> None:
        """``follow_forks`` False leaves the children the process forks alone (not its threads); ``names``:
        what each tracepoint stands for, to name it in an error; ``raw_only``: samples hold the raw record
        and nothing else, read with :meth:`read_field`; ``user_stack`` (a mask of ``enum perf_event_x86_regs``
        bits, a size in bytes): each sample also holds those user registers and that much of the user stack
        (read with :meth:`Samples.user_stack`), but those of the tracepoints ``without_stack``; ``filters``: a
        tracepoint's event filter (tracefs's grammar), applied in the kernel to every descriptor of it;
        ``tracking``: :attr:`task_records` say what the traced processes mapped executable, exec'd and forked
        (what stacks are read against, as ``perf record`` does: the process may be gone when its samples are
        read), taken from the buffers with the samples."""
        if pages < 1 or pages & (pages - 1):
            raise KernelEngineError(f"perf buffer pages must be a power of two, not {pages}")
        self.lost = 0
        self.task_records: list[TaskRecord] = []
        self._event_ids = list(event_ids)
        self._sets: dict[int, _TaskSet] = {}  # by process, or _EVERY_TASK
        self._enabled = False
        self._ended_counts: dict[int, int] = {}  # hits per tracepoint of the processes whose set was closed
        self._ended_lost = 0
        self._checked_ends = 0.0  # time.monotonic() when the processes were last checked for their ends
        self._hung_up = False  # a descriptor reported POLLHUP: a thread or process has ended
        self._tracepoint_of: dict[int, int] = {}  # perf event id (PERF_EVENT_IOC_ID) -> tracepoint id
        self._poll = select.poll()
        self._pages = pages
        self._sampling = sampling
        self._sample_type = _RAW_SAMPLE_TYPE if raw_only else _SAMPLE_TYPE
        self._user_stack = user_stack
        self._without_stack = set(without_stack)
        self._tracking = tracking
        self._follow_forks = follow_forks
        self._enable_on_exec = enable_on_exec
        self._event_of_fd: dict[int, int] = {}
        self._names = dict(names or {})
        self._filters = dict(filters or {})
        try:
            if pid is None:
                self._sets[_EVERY_TASK] = self._open_set([_EVERY_TASK], self._event_ids, tracking, enable_on_exec,
                                                         {})[0]
            else:
                for each in [pid] if isinstance(pid, int) else pid:
                    self.add_process(each)
        except BaseException:
            self.close()
            raise

    def add_process(self, pid: int) -> None:
        """Events on every thread of ``pid``, inherited by the threads (and children) each starts later;
        enabled at once if the reader is.

        perf_event_open takes one thread, and inheritance only reaches what a thread starts once its own
        events exist. A thread started while the events are being opened, by a thread not covered yet, has
        none; one started by a covered thread has inherited copies and would count twice if it got its own.
        Nothing tells the two apart, so while new threads appear during a round, every thread gets a fresh
        set and the previous set is closed, its inherited copies with it. Nothing counts before
        :meth:`enable`, and closing is cheap while the new set keeps each uprobe registered. A process that
        still starts threads from new threads after the last round may have those missed.
        """
        if self._current_set(pid) is not None:
            return
        opened = self._open_process(pid, self._event_ids, self._tracking, self._enable_on_exec, {})
        try:
            for fd in opened.fds if self._enabled else ():
                fcntl.ioctl(fd, _PERF_EVENT_IOC_ENABLE, 0)
        except BaseException:
            self._close_set(opened)
            raise
        self._sets[pid] = opened

    def add_events(self, pid: int, event_ids: Sequence[int], names: dict[int, str] | None = None,
                   filters: dict[int, str] | None = None, without_stack: set[int] = frozenset()) -> None:
        """Tracepoints ``event_ids`` too (of probes defined since; ``names``, ``filters`` and ``without_stack``
        as for the constructor's), on every thread of process ``pid`` and inherited as its own, enabled at once:
        their samples go to its buffers, or, in a process without descriptors of its own (a child that
        inherited the others), to buffers of its own, closed as it ends. Where they cannot all be opened,
        none is."""
        self._names.update(names or {})
        self._filters.update(filters or {})
        self._without_stack |= without_stack
        into = self._current_set(pid)
        opened = self._open_process(pid, event_ids, False, False, into.buffers if into else {})
        try:
            for fd in opened.fds:
                fcntl.ioctl(fd, _PERF_EVENT_IOC_ENABLE, 0)
        except BaseException:
            self._close_set(opened)
            raise
        if into is None:
            self._sets[pid] = opened
        else:
            into.fds += opened.fds
            into.idents += opened.idents
            into.buffers.update(opened.buffers)

    def _current_set(self, pid: int) -> _TaskSet | None:
        """The descriptors of process ``pid``; None where it has none (those of a process that ended, whose pid
        it has now, are closed)."""
        opened = self._sets.get(pid)
        if opened is not None and opened.started != start_time(pid):
            self._close_ended([pid])
            return None
        return opened

    @property
    def processes(self) -> list[int]:
        """The processes whose events are open (none for a reader of every process)."""
        return [pid for pid in self._sets if pid != _EVERY_TASK]

    def _open_process(self, pid: int, event_ids: Sequence[int], tracking: bool, on_exec: bool,
                      buffers: dict[int, _RingBuffer]) -> _TaskSet:
        """:meth:`_open_set` on every thread of ``pid`` (see :meth:`add_process`), again while new threads appear."""
        threads = thread_ids(pid)
        opened = self._open_threads(pid, threads, event_ids, tracking, on_exec, buffers)
        for _ in range(_ATTACH_ROUNDS):
            now = thread_ids(pid)
            if now <= threads:
                break
            threads = now
            previous = opened
            try:
                opened = self._open_threads(pid, threads, event_ids, tracking, on_exec, buffers)
            finally:
                self._close_set(previous)
        opened.started = start_time(pid)
        return opened

    def _open_threads(self, pid: int, threads: set[int], event_ids: Sequence[int], tracking: bool, on_exec: bool,
                      buffers: dict[int, _RingBuffer]) -> _TaskSet:
        # The main thread first: it usually starts the others, so it is covered before it can.
        opened, alive = self._open_set([pid, *sorted(threads - {pid})], event_ids, tracking, on_exec, buffers)
        if not alive:
            self._close_set(opened)
            raise KernelEngineError(f"process {pid} does not exist")
        return opened

    def _open_set(self, tasks: list[int], event_ids: Sequence[int], tracking: bool, on_exec: bool,
                  buffers: dict[int, _RingBuffer]) -> tuple[_TaskSet, set[int]]:
        """Open every event on every task (CPU by CPU when sampling), and with ``tracking`` the descriptors of
        what the tasks do; enabled by an exec with ``on_exec``; their records into ``buffers`` (by CPU) or into
        the set's own. The descriptors, and the tasks that still exist. Where one cannot be opened, those opened
        so far are closed."""
        alive = set()
        opened = _TaskSet()
        try:
            for cpu in online_cpus() if tracking else ():
                for task in tasks:
                    fd = self._open(self._tracking_attr(), "the tracking of mappings and forks", task, cpu, opened,
                                    on_exec)
                    if fd is not None:
                        alive.add(task)
                        self._write_into(fd, cpu, buffers, opened)
            for cpu in online_cpus() if self._sampling or tasks == [_EVERY_TASK] else [_EVERY_CPU]:
                for task in tasks:
                    for event_id in event_ids:
                        fd = self._open(self._tracepoint_attr(event_id), self._names.get(event_id, f"tracepoint "
                                        f"{event_id}"), task, cpu, opened, on_exec, self._filters.get(event_id))
                        if fd is None:
                            break
                        alive.add(task)
                        self._event_of_fd[fd] = event_id
                        if not self._sampling:
                            continue
                        self._write_into(fd, cpu, buffers, opened)
                        ident = bytearray(_U64.size)
                        fcntl.ioctl(fd, _PERF_EVENT_IOC_ID, ident)
                        opened.idents.append(_U64.unpack(ident)[0])
                        self._tracepoint_of[opened.idents[-1]] = event_id
        except BaseException:
            self._close_set(opened)
            raise
        return opened, alive

    def _write_into(self, fd: int, cpu: int, buffers: dict[int, _RingBuffer], opened: _TaskSet) -> None:
        """Send descriptor ``fd``'s records to the buffer of ``cpu`` (of ``buffers``, or of ``opened``), a new one
        of ``opened`` where there is none yet."""
        buffer = buffers.get(cpu) or opened.buffers.get(cpu)
        if buffer is None:
            opened.buffers[cpu] = self._map(fd)
        else:
            fcntl.ioctl(fd, _PERF_EVENT_IOC_SET_OUTPUT, buffer.fd)

    def _close_set(self, opened: _TaskSet) -> None:
        for buffer in opened.buffers.values():
            with contextlib.suppress(KeyError):  # hung up, unregistered already
                self._poll.unregister(buffer.fd)
        for ident in opened.idents:
            self._tracepoint_of.pop(ident, None)
        for fd in opened.fds:
            self._event_of_fd.pop(fd, None)
        _close(opened.buffers.values(), opened.fds)

    def _tracepoint_attr(self, event_id: int) -> _PerfEventAttr:
        attr = _PerfEventAttr(type=_PERF_TYPE_TRACEPOINT, config=event_id)
        if self._sampling:
            attr.sample_period, attr.sample_type = 1, self._sample_type
            if self._user_stack and event_id not in self._without_stack:
                attr.sample_type |= _PERF_SAMPLE_REGS_USER | _PERF_SAMPLE_STACK_USER
                attr.sample_regs_user, attr.sample_stack_user = self._user_stack
        return attr

    @staticmethod
    def _tracking_attr() -> _PerfEventAttr:
        """Executable mappings, execs and forks, each with its time (to be read in order with the samples)."""
        attr = _PerfEventAttr(type=_PERF_TYPE_SOFTWARE, config=_PERF_COUNT_SW_DUMMY, sample_type=_TRACKING_SAMPLE_TYPE)
        attr.mmap = attr.mmap2 = attr.comm = attr.comm_exec = attr.task = attr.sample_id_all = 1
        return attr

    def _open(self, attr: _PerfEventAttr, what: str, task: int, cpu: int, opened: _TaskSet, on_exec: bool,
              event_filter: str | None = None) -> int | None:
        """One descriptor of ``attr`` (``what``, for an error) with what every one of ours has, kept in
        ``opened``; None when the thread ``task`` has ended."""
        process = task != _EVERY_TASK
        attr.size, attr.read_format, attr.disabled = ctypes.sizeof(_PerfEventAttr), _PERF_FORMAT_LOST, 1
        # inherit_thread: only clone(CLONE_THREAD) children inherit, so forked processes are left alone.
        attr.inherit, attr.inherit_thread = int(process), int(process and not self._follow_forks)
        attr.enable_on_exec = int(on_exec)
        # for a mapped buffer (whoever maps it sets when it wakes a poller): without samples, at each record
        attr.watermark = 1
        attr.wakeup_watermark = self._pages * mmap.PAGESIZE // _WAKEUP_FRACTION if self._sampling else 1
        attr.use_clockid, attr.clockid = 1, _CLOCK_MONOTONIC
        try:
            fd = _perf_event_open(attr, task, cpu)
        except OSError as exc:
            if exc.errno == errno.ESRCH and process:
                return None
            raise KernelEngineError(_open_error(exc.errno, what, cpu)) from None
        opened.fds.append(fd)
        if event_filter is not None:
            try:
                fcntl.ioctl(fd, _PERF_EVENT_IOC_SET_FILTER, event_filter.encode() + b"\0")
            except OSError as exc:
                raise KernelEngineError(f"the kernel refuses the filter '{event_filter}' of {what}: "
                                        f"{exc.strerror}") from None
        return fd

    def _map(self, fd: int) -> _RingBuffer:
        pages = self._pages
        try:
            buffer = _RingBuffer(fd, pages)
        except OSError as exc:
            raise KernelEngineError(f"cannot map a perf buffer of {pages} pages: {exc.strerror} "
                                    f"(see /proc/sys/kernel/perf_event_mlock_kb)") from None
        self._poll.register(fd, select.POLLIN)
        return buffer

    def enable(self) -> None:
        """Start sampling (the uprobes are inserted now)."""
        self._enabled = True
        for fd in self._fds():
            fcntl.ioctl(fd, _PERF_EVENT_IOC_ENABLE, 0)

    def disable(self) -> None:
        """Stop sampling; samples already in the buffers can still be read."""
        self._enabled = False
        for fd in self._fds():
            fcntl.ioctl(fd, _PERF_EVENT_IOC_DISABLE, 0)

    def _fds(self) -> list[int]:
        return [fd for opened in self._sets.values() for fd in opened.fds]

    def _buffers(self) -> list[_RingBuffer]:
        return [buffer for opened in self._sets.values() for buffer in opened.buffers.values()]

    def poll(self, timeout_s: float) -> bool:
        """True when :meth:`read` has samples (or :attr:`task_records` some not taken yet): at once if a buffer
        holds some, else after waiting for a buffer to be an eighth full (for a record of what a task did, where
        there are no samples), or at the end of ``timeout_s`` if any arrived meanwhile.

        So at low rates a sample waits at most ``timeout_s``. Once a traced thread has exited, its events
        report POLLHUP and this returns True at once, until its process has ended and been read (then its
        descriptors are closed): loop on the processes' state, not on this.
        """
        if self._pending() or self._ends_due() or self.task_records:
            return True
        ready = self._poll.poll(max(0, round(timeout_s * 1000)))
        for fd, flags in ready:
            if flags & select.POLLHUP:  # for good: its buffer is still read, but no wait ends on it any more
                self._poll.unregister(fd)
                self._hung_up = True
        return bool(ready) or self._pending()

    def _pending(self) -> bool:
        return any(buffer.pending() for buffer in self._buffers())

    def _ends_due(self) -> bool:
        """Whether the processes are to be checked for their ends (by the next read): where a descriptor hung
        up, and every second (one that hung up while its process was still exiting)."""
        return bool(self.processes) and (self._hung_up or time.monotonic() - self._checked_ends >= 1)

    def _ended(self) -> list[int]:
        """The processes that have ended, when they are due to be checked."""
        if not self._ends_due():
            return []
        self._hung_up, self._checked_ends = False, time.monotonic()
        return [pid for pid, opened in self._sets.items()
                if pid != _EVERY_TASK and (has_ended(pid) or start_time(pid) != opened.started)]

    def _close_ended(self, ended: list[int]) -> None:
        """Close the sets of ``ended`` processes (their samples read), keeping their counts."""
        for pid in ended:
            opened = self._sets.pop(pid)
            for fd in opened.fds:
                event_id = self._event_of_fd.get(fd)
                if event_id is None:  # a tracking descriptor
                    continue
                count, lost = _count_and_lost(fd)
                self._ended_counts[event_id] = self._ended_counts.get(event_id, 0) + count
                self._ended_lost += lost
            self._close_set(opened)

    def read(self) -> list[Sample]:
        """Drain every buffer. Samples come sorted by time within one call; a later call can still return
        a sample of another CPU that is older than one returned now."""
        block = self.read_samples()
        data, new = block.data, tuple.__new__  # NamedTuple's own __new__ is Python code: this is C speed
        return [new(Sample, (event_id, pid, tid, time_ns, cpu, data[at:at + size]))
                for event_id, pid, tid, time_ns, cpu, at, size in zip(
                    block.event_id.tolist(), block.pid.tolist(), block.tid.tolist(), block.time_ns.tolist(),
                    block.cpu.tolist(), block.raw_at.tolist(), block.raw_size.tolist())]

    def read_samples(self) -> Samples:
        """Drain every buffer: its samples in columns, sorted by time (stable: one CPU's keep their order)."""
        ended = self._ended()  # before the last of their samples are read
        chunks = [chunk for buffer in self._buffers() if (chunk := buffer.take())]
        data = b"".join(chunks)
        starts, base = [], 0
        for chunk in chunks:
            starts.append(self._sample_offsets(chunk, len(chunk) - len(_PAD)) + base)
            base += len(chunk)
        at = numpy.concatenate(starts) if starts else numpy.empty(0, numpy.intp)
        view = numpy.frombuffer(data, numpy.uint8)
        idents, where = numpy.unique(_gather(view, at + _IDENT_AT, "<u8"), return_inverse=True)
        tracepoints = numpy.array([self._tracepoint_of.get(ident, -1) for ident in idents.tolist()],
                                  numpy.int64)[where]
        self._close_ended(ended)
        time_ns = _gather(view, at + _TIME_AT, "<u8")
        order = numpy.argsort(time_ns, kind="stable")
        at = at[order]
        return Samples(data, view, tracepoints[order], _gather(view, at + _PID_AT, "<u4"),
                       _gather(view, at + _TID_AT, "<u4"), time_ns[order], _gather(view, at + _CPU_AT, "<u4"),
                       at + _SAMPLE.size, _gather(view, at + _RAW_SIZE_AT, "<u4"))

    def read_field(self, offset: int, size: int) -> numpy.ndarray:
        """Drain every buffer of a ``raw_only`` reader: the unsigned field of ``size`` bytes (4 or 8) at
        ``offset`` in each sample's raw record."""
        fields = []
        ended = self._ended()
        for buffer in self._buffers():
            chunk = buffer.take()
            if chunk:
                at = self._sample_offsets(chunk, len(chunk) - len(_PAD))
                fields.append(_gather(numpy.frombuffer(chunk, numpy.uint8), at + _RAW_SAMPLE.size + offset,
                                      f"<u{size}"))
        self._close_ended(ended)
        return numpy.concatenate(fields) if fields else numpy.empty(0, f"<u{size}")

    def _sample_offsets(self, chunk: bytes, end: int) -> numpy.ndarray:
        """Where each ``PERF_RECORD_SAMPLE`` in the first ``end`` bytes of ``chunk`` starts (lost ones counted):
        in one step where every record has the size of the first (samples of one layout, nothing lost)."""
        kind, _misc, size = _HEADER.unpack_from(chunk, 0)
        if kind == _PERF_RECORD_SAMPLE and end % size == 0:
            headers = numpy.ndarray(end // size, "<u8", chunk, 0, (size,)) & _TYPE_AND_SIZE
            if (headers == headers[0]).all():
                return numpy.arange(0, end, size, dtype=numpy.intp)
        offsets, pos = [], 0
        while pos < end:
            kind, misc, size = _HEADER.unpack_from(chunk, pos)
            if kind == _PERF_RECORD_SAMPLE:
                offsets.append(pos)
            elif kind == _PERF_RECORD_LOST:
                self.lost += _LOST.unpack_from(chunk, pos)[1]
            elif kind in (_PERF_RECORD_MMAP2, _PERF_RECORD_COMM, _PERF_RECORD_FORK):
                self._task_record(kind, misc, chunk, pos, size)
            pos += size
        return numpy.array(offsets, numpy.intp)

    def _task_record(self, kind: int, misc: int, chunk: bytes, pos: int, size: int) -> None:
        time_ns = _U64.unpack_from(chunk, pos + size - _TRAILER_TIME)[0]
        if kind == _PERF_RECORD_MMAP2:
            pid, _, address, length, offset, major, minor, inode, _, prot, _ = _MMAP2.unpack_from(chunk, pos)
            end = pos + size - _TRAILER_TIME - 8
            name = chunk[pos + _MMAP2.size:end].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            perms = "".join(c if prot & bit else "-" for c, bit in (("r", _PROT_READ), ("w", _PROT_WRITE),
                                                                   ("x", _PROT_EXEC))) + "p"
            mapping = Mapping(address, address + length, perms, offset, inode, name, os.makedev(major, minor))
            self.task_records.append(TaskRecord(TaskChange.MAPPED, time_ns, pid, mapping))
        elif kind == _PERF_RECORD_COMM:
            if misc & _PERF_RECORD_MISC_COMM_EXEC:
                self.task_records.append(TaskRecord(TaskChange.EXEC, time_ns, _FORK.unpack_from(chunk, pos)[0]))
        else:
            pid, parent, tid, parent_tid = _FORK.unpack_from(chunk, pos)
            if pid != parent:  # a new process, not a new thread
                self.task_records.append(TaskRecord(TaskChange.FORKED, time_ns, pid, None, tid, parent, parent_tid))

    def counts(self) -> dict[int, int]:
        """Hits per tracepoint id as the kernel counts them, summed over CPUs and threads (and over the
        threads and children that ended: the kernel adds an inherited event's count to its parent's)."""
        if not self._sampling:  # no samples to read first: ended processes are closed here
            self._close_ended(self._ended())
        totals = dict.fromkeys(self._event_ids, 0)
        totals.update(self._ended_counts)
        for fd, event_id in self._event_of_fd.items():
            totals[event_id] = totals.get(event_id, 0) + _count_and_lost(fd)[0]
        return totals

    def count_lost(self) -> int:
        """Samples the kernel dropped so far, exactly (``PERF_FORMAT_LOST``): unlike :attr:`lost`, this
        includes drops no ``PERF_RECORD_LOST`` has reported yet."""
        return self._ended_lost + sum(_count_and_lost(fd)[1] for fd in self._event_of_fd)

    def close(self) -> None:
        """Unmap the buffers and close every descriptor; closing twice is harmless."""
        sets, self._sets = self._sets, {}
        for opened in sets.values():
            self._close_set(opened)

    def __enter__(self) -> TracepointReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _open_error(err: int, what: str, cpu: int) -> str:
    where = "" if cpu == _EVERY_CPU else f" on CPU {cpu}"
    return f"{what}{where}: {_ERRNO_REASONS.get(err, os.strerror(err))}"




def _count_and_lost(fd: int) -> tuple[int, int]:
    """An event descriptor's count (its hits) and the samples the kernel dropped (``PERF_FORMAT_LOST``)."""
    return _READ_LOST.unpack(os.read(fd, _READ_LOST.size))


def _close(buffers: Iterable[_RingBuffer], fds: list[int]) -> None:
    for buffer in buffers:
        buffer.close()
    for fd in fds:
        os.close(fd)

"""The perf reader of the kernel engine, against real uprobe events on a tiny C program.

The program calls ``hit(i, "s<i>")`` N times; ``hit`` returns ``3 * i``. Its mode letters: ``b`` waits for a
line on stdin before the loop, ``a`` prints "done" after it and waits for a line before one last
``hit(-1, "flush")``, ``n`` adds ``hit(-2, NULL)`` and ``hit(-3, "")`` after the loop, ``l`` calls ``locked()``,
whose first instruction has a lock prefix, ``e`` calls ``every(-7, "hello", {{1, -2, 3, -4}, 'c'}, {"x", NULL})``.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import error_as_nobody
from uprobes.engines.kernel.eventformat import FAULT, EventFormat, load_event_format
from uprobes.engines.kernel.perfbuf import Sample, TracepointReader, online_cpus
from uprobes.engines.kernel.tracefs import DefinedEvent, Tracefs
from uprobes.errors import KernelEngineError

N = 1000

PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((noinline, noipa, patchable_function_entry(1))) int hit(int i, const char *s)
{
    __asm__ volatile("" : : "r"(s) : "memory");
    return i * 3;
}

/* Every kind of fetch argument at once: a string, an array, a char, an array of strings (one NULL). */
struct data { int arr[4]; char c; };

__attribute__((noinline, noipa, patchable_function_entry(1)))
int every(int i, const char *s, const struct data *d, const char *const *ss)
{
    __asm__ volatile("" : : "r"(s), "r"(d), "r"(ss) : "memory");
    return i;
}

int counter;

/* A lock prefix is one of the prefixes x86 uprobes refuse (uprobe_init_insn). */
__attribute__((noinline, noipa)) void locked(void)
{
    __atomic_fetch_add(&counter, 1, __ATOMIC_SEQ_CST);
}

static void wait_line(void)
{
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        exit(1);
}

int main(int argc, char **argv)
{
    long n = strtol(argv[1], NULL, 10), sum = 0;
    const char *mode = argc > 2 ? argv[2] : "";
    char buf[32];

    if (strchr(mode, 'b'))
        wait_line();
    if (strchr(mode, 'l'))
        locked();
    if (strchr(mode, 'e')) {
        static const struct data d = {{1, -2, 3, -4}, 'c'};
        static const char *const ss[2] = {"x", NULL};
        sum += every(-7, "hello", &d, ss);
    }
    for (long i = 0; i < n; i++) {
        snprintf(buf, sizeof buf, "s%ld", i);
        sum += hit((int)i, buf);
    }
    if (strchr(mode, 'n'))
        sum += hit(-2, NULL) + hit(-3, "");
    if (strchr(mode, 'a')) {
        puts("done");
        fflush(stdout);
        wait_line();
        sum += hit(-1, "flush");
    }
    return sum == 42;
}
"""

# An event with every kind of fetch argument tracefs has, on every(): its format file is the kernel's.
EVERY_KIND = "i=%di:s32 s=+0(%si):string arr=+0(%dx):s32[4] c=+16(%dx):char ss=+0(%cx):string[2]"
# What every() is called with (mode e): the values each of those fetches must give.
EVERY_ARGUMENTS = {"i": -7, "s": "hello", "arr": [1, -2, 3, -4], "c": "c", "ss": ["x", ""]}


@dataclass
class Target:
    path: Path
    offset: int
    locked_offset: int
    every_offset: int


@dataclass
class Events:
    hit: EventFormat
    ret: EventFormat

    @property
    def ids(self) -> list[int]:
        return [self.hit.id, self.ret.id]


def _function_file_offset(binary: Path, name: str) -> int:
    """symbol value - p_vaddr + p_offset of the executable PT_LOAD that holds it (readelf as the oracle)."""
    symbols = subprocess.run(["readelf", "-sW", str(binary)], check=True, capture_output=True, text=True).stdout
    value = next(int(f[1], 16) for f in map(str.split, symbols.splitlines())
                 if len(f) >= 8 and f[3] == "FUNC" and f[7] == name)
    segments = subprocess.run(["readelf", "-lW", str(binary)], check=True, capture_output=True, text=True).stdout
    for fields in map(str.split, segments.splitlines()):
        if fields[:1] == ["LOAD"] and "E" in fields[6:-1]:
            p_offset, p_vaddr, p_memsz = int(fields[1], 16), int(fields[2], 16), int(fields[5], 16)
            if p_vaddr <= value < p_vaddr + p_memsz:
                return value - p_vaddr + p_offset
    raise AssertionError(f"{name} is in no executable PT_LOAD of {binary}")


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Target:
    directory = tmp_path_factory.mktemp("perfbuf")
    source, binary = directory / "hits.c", directory / "hits"
    source.write_text(PROGRAM)
    # patchable_function_entry puts a nop first in hit(), which the kernel emulates: one trap per hit
    # instead of a trap and a single-step, so the 200k-hit tests take a fraction of the time.
    subprocess.run(["gcc", "-O1", "-fno-inline", "-o", str(binary), str(source)], check=True)
    return Target(binary, *(_function_file_offset(binary, name) for name in ("hit", "locked", "every")))


@pytest.fixture(scope="module")
def events(tracefs: Path, target: Target) -> Iterator[Events]:
    fs = Tracefs(tracefs)
    group = f"uprobes_pbtest{os.getpid()}"
    location = f"{target.path}:{target.offset:#x}"
    defined: list[DefinedEvent] = []
    try:
        defined.append(fs.define(f"p:{group}/hit {location} i=%di:s32 s=+0(%si):string", "hit"))
        defined.append(fs.define(f"r:{group}/hitret {location} rv=$retval:s32", "hitret"))
        yield Events(load_event_format(tracefs, group, "hit"), load_event_format(tracefs, group, "hitret"))
    finally:
        for event in defined:
            fs.delete(event)
        assert group not in (tracefs / "uprobe_events").read_text()


def _start(target: Target, count: int, mode: str = "", cpu: int | None = None) -> subprocess.Popen:
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    return subprocess.Popen([str(target.path), str(count), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            preexec_fn=pin)


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.write(b"go\n")
    proc.stdin.flush()


def _collect(reader: TracepointReader, *procs: subprocess.Popen, timeout_s: float = 60) -> list[Sample]:
    """Drain while the programs run, then once more after they exit; sorted by time."""
    samples: list[Sample] = []
    deadline = time.monotonic() + timeout_s
    while any(proc.poll() is None for proc in procs):
        assert time.monotonic() < deadline, "the target did not finish"
        reader.poll(0.05)
        samples += reader.read()
    samples += reader.read()
    return sorted(samples, key=lambda s: s.time_ns)


def _split(samples: list[Sample], events: Events) -> tuple[list[dict], list[dict]]:
    hits = [events.hit.decode(s.raw) for s in samples if s.event_id == events.hit.id]
    rets = [events.ret.decode(s.raw) for s in samples if s.event_id == events.ret.id]
    return hits, rets


@pytest.fixture
def every_kind(tracefs: Path, target: Target) -> Iterator[tuple[EventFormat, str]]:
    """An event of EVERY_KIND on every(): its format as we parse it and the text of its format file, as tracefs
    gives them; deleted after, even when the test fails."""
    fs = Tracefs(tracefs)
    group = f"uprobes_pbtest{os.getpid()}_every"
    event = fs.define(f"p:{group}/every {target.path}:{target.every_offset:#x} {EVERY_KIND}", "every")
    try:
        yield load_event_format(tracefs, group, "every"), (tracefs / "events" / group / "every" / "format").read_text()
    finally:
        fs.delete(event)
        assert f"{group}/" not in (tracefs / "uprobe_events").read_text()


def test_a_format_file_gives_fields_with_offsets_kinds_and_array_lengths(every_kind):
    fmt, text = every_kind
    assert (fmt.name, fmt.id) == ("every", int(re.search(r"^ID: (\d+)$", text, re.M)[1]))
    # each field line of the file: "field:TYPE NAME[...];\toffset:N;\tsize:N;\tsigned:N;"
    lines = re.findall(r"^\tfield:(.*?) ?(\w+)((?:\[\d*\])*);\toffset:(\d+);\tsize:(\d+);\tsigned:(\d);$", text, re.M)
    assert [(f.name, f.offset, f.size, f.signed) for f in fmt.fields] == [
        (name, int(offset), int(size), signed == "1") for _, name, _, offset, size, signed in lines]
    assert [f.name for f in fmt.fields] == ["common_type", "common_flags", "common_preempt_count", "common_pid",
                                            "__probe_ip", *EVERY_ARGUMENTS]
    by_name = {f.name: f for f in fmt.fields}
    assert (by_name["s"].data_loc, by_name["s"].count) == (True, 0)
    assert (by_name["arr"].count, by_name["arr"].signed) == (4, True)
    assert by_name["c"].char and not by_name["common_flags"].char
    assert (by_name["ss"].data_loc, by_name["ss"].count) == (True, 2)


def test_decode_reads_strings_arrays_chars_and_reports_a_zero_length_string_as_a_fault(target, every_kind):
    """A real record of every(): each value the program passed, and ss[1], a NULL the kernel could not read,
    an empty string with its fault."""
    fmt, _ = every_kind
    with TracepointReader([fmt.id], None) as reader:
        reader.enable()
        proc = _start(target, 0, "e")
        (sample,) = _collect(reader, proc)
    record = fmt.decode(sample.raw)
    assert {name: record[name] for name in EVERY_ARGUMENTS} == EVERY_ARGUMENTS
    assert (record["common_type"], record["common_pid"]) == (fmt.id, proc.pid)
    assert record.errors == {"ss[1]": FAULT}


def test_system_wide_reader_sees_every_entry_and_return_in_order(target, events):
    with TracepointReader(events.ids, None) as reader:
        reader.enable()
        proc = _start(target, N)
        samples = _collect(reader, proc)
        assert reader.lost == reader.count_lost() == 0
    hits, rets = _split(samples, events)
    assert [h["i"] for h in hits] == list(range(N))
    assert [h["s"] for h in hits] == [f"s{i}" for i in range(N)]
    assert [r["rv"] for r in rets] == [3 * i for i in range(N)]
    assert {(s.pid, s.tid) for s in samples} == {(proc.pid, proc.pid)}
    assert {h["common_pid"] for h in hits + rets} == {proc.pid}
    assert len({h["__probe_ip"] for h in hits}) == 1 and {r["__probe_func"] for r in rets} == {hits[0]["__probe_ip"]}
    assert all(not h.errors for h in hits)


def test_pid_reader_sees_its_process_and_not_a_concurrent_copy(target, events):
    mine, other = _start(target, N, "b"), _start(target, N, "b")
    with TracepointReader(events.ids, mine.pid) as reader:
        reader.enable()
        _release(mine)
        _release(other)
        samples = _collect(reader, mine, other)
    hits, rets = _split(samples, events)
    assert {s.pid for s in samples} == {mine.pid}
    assert [h["i"] for h in hits] == list(range(N))
    assert [r["rv"] for r in rets] == [3 * i for i in range(N)]


def test_timestamps_are_clock_monotonic_and_within_the_run(target, events):
    proc = _start(target, N, "b")
    with TracepointReader(events.ids, proc.pid) as reader:
        reader.enable()
        started = time.monotonic_ns()
        _release(proc)
        samples = _collect(reader, proc)
        ended = time.monotonic_ns()
    assert all(started <= s.time_ns <= ended for s in samples)
    # In time order, each entry is followed by its own return: the clock agrees with program order.
    assert [s.event_id for s in samples] == [events.hit.id, events.ret.id] * N
    hits, rets = _split(samples, events)
    assert [h["i"] for h in hits] == list(range(N)) and [r["rv"] for r in rets] == [3 * i for i in range(N)]


def test_poll_reports_a_lone_sample_below_the_wakeup_watermark(target, events):
    with TracepointReader([events.hit.id], None) as reader:
        reader.enable()
        assert not reader.poll(0.05) and reader.read() == []
        subprocess.run([str(target.path), "1"], check=True)
        assert reader.poll(0.05)
        assert [events.hit.decode(s.raw)["s"] for s in reader.read()] == ["s0"]
        assert not reader.poll(0)


def test_a_string_fetch_that_faults_is_reported_and_an_empty_string_is_not(target, events):
    with TracepointReader([events.hit.id], None) as reader:
        reader.enable()
        samples = _collect(reader, _start(target, 0, "n"))
    faulted, empty = (events.hit.decode(s.raw) for s in samples)
    assert (faulted["i"], faulted["s"], faulted.errors) == (-2, "", {"s": FAULT})
    assert (empty["i"], empty["s"], empty.errors) == (-3, "", {})


def test_drops_are_counted_exactly_but_reported_only_with_the_next_sample_that_fits(target, events):
    total = 200_000
    cpu = max(os.sched_getaffinity(0))
    # Pinned, so every sample goes to one buffer and the flush hit lands in the buffer that dropped.
    proc = _start(target, total, "ba", cpu=cpu)
    with TracepointReader([events.hit.id], proc.pid, pages=1) as reader:
        reader.enable()
        _release(proc)
        assert proc.stdout.readline() == b"done\n"
        received = len(reader.read())
        dropped = reader.count_lost()
        assert dropped > 0 and received + dropped == total
        # The buffer stayed full until we read it, so no PERF_RECORD_LOST could be written yet.
        assert reader.lost == 0
        _release(proc)
        flush = _collect(reader, proc)
        assert [events.hit.decode(s.raw)["i"] for s in flush] == [-1]
        assert reader.lost == dropped == reader.count_lost()
        assert received + len(flush) + reader.lost == total + 1


def test_read_and_decode_throughput(target, events, capsys):
    count = 100_000
    # Everything stays in one buffer big enough for the run (~80 bytes a sample), so the numbers are
    # the reader's own speed, not how fast the target outruns it.
    proc = _start(target, count, "b", cpu=max(os.sched_getaffinity(0)))
    with TracepointReader(events.ids, proc.pid, pages=4096) as reader:
        reader.enable()
        _release(proc)
        proc.wait()
        started = time.perf_counter()
        samples = reader.read()
        read_s = time.perf_counter() - started
        assert len(samples) == 2 * count and reader.count_lost() == 0
    formats = {events.hit.id: events.hit, events.ret.id: events.ret}
    started = time.perf_counter()
    for sample in samples:
        formats[sample.event_id].decode(sample.raw)
    decode_s = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n{len(samples)} samples: read {len(samples) / read_s:,.0f}/s, "
              f"decode {len(samples) / decode_s:,.0f}/s, both {len(samples) / (read_s + decode_s):,.0f}/s")


def test_a_missing_process_is_named(events):
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(KernelEngineError, match=rf"^process {gone.pid} does not exist$"):
        TracepointReader(events.ids, gone.pid)


def test_an_unknown_tracepoint_id_is_refused_with_the_reason(tracefs):
    with pytest.raises(KernelEngineError, match=r"^tracepoint 999999 on CPU \d+: no such tracepoint id"):
        TracepointReader([999999], None)


def test_an_instruction_the_kernel_refuses_is_named_when_a_process_maps_it(tracefs, target):
    fs = Tracefs(tracefs)
    event = fs.define(f"p:uprobes_pbtest{os.getpid()}/locked {target.path}:{target.locked_offset:#x}", "locked")
    proc = _start(target, 0, "bl")  # holds the file mapped while waiting
    try:
        event_id = fs.event_id(event)
        with pytest.raises(KernelEngineError, match=r"^tracepoint \d+ on CPU \d+: the kernel's uprobes refuse the "
                                                    r"instruction at this offset"):
            TracepointReader([event_id], None)
    finally:
        proc.communicate(b"go\n")
        fs.delete(event)


def test_an_unprivileged_user_is_told_what_is_needed(events):
    message = error_as_nobody(lambda: TracepointReader(events.ids, None).close())
    assert message == f"tracepoint {events.hit.id} on CPU {online_cpus()[0]}: perf_event_open needs root or CAP_PERFMON"

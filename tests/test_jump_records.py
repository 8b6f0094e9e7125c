"""Traced jump probes: a hit writes a record into a ring shared with the tool, and never stops the program.

Every test runs real processes and holds the jump path to the trap path (``--trap``) on the same program:
the same events with the same values, in the same order per thread, named by the right pid and tid, with
every hit either an event or counted as lost. tests/targets/jumps.c checks its own results (a wrong one
aborts); tests/targets/forms.c prints what its markers' arguments are.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import run_cli, run_json

JUMP_SITES = {
    "jump_entry": "x=%di:s64 c=$comm",
    "jump_flags+3": "a=%di b=%si:u32 f=%flags",
    "jump_redzone+8": "v=%di w=%ax",
    "jump_call": "x=%di:s32 k=\\7",
    "jump_jcc": "x=%di:x64",
    "jump_riprel": "x=%di:u8",
}
# The markers whose values do not change from run to run (written_forms' hold whatever the registers held)
FORMS = ["integers", "constants", "fields", "elements", "globals", "symbols", "known_sib", "known_bytes", "noted"]


def _trace(*args: str) -> tuple[list[dict], subprocess.CompletedProcess, int]:
    """Events of ``uprobes trace --json ARGS``, the finished tool, and the events it says it lost."""
    records, proc = run_json("trace", "--engine", "ptrace", *args)
    assert "Traceback" not in proc.stderr
    lost = sum(r["lost"] for r in records if "lost" in r)
    return [r for r in records if "probe" in r], proc, lost


def _comparable(events: list[dict], pid: int) -> list[tuple]:
    """What two runs must agree on: addresses relative to the first event's (the program moves with ASLR)."""
    base = events[0]["ip"]
    return [(e["probe"], e["args"], e.get("errors"), e["ip"] - base, e["tid"] - pid, e["comm"]) for e in events]


def test_each_site_shape_records_the_events_traps_give(targets):
    program, n = str(targets / "jumps"), 3000
    probes = [f"uprobe:{program}:{site} {args}" for site, args in JUMP_SITES.items()]
    runs = {}
    for options in ([], ["--trap"]):
        events, proc, lost = _trace(*options, *probes, "--", program, "run", str(n))
        assert proc.returncode == 0 and proc.stdout == f"run {n} check {_check(program, n)}\n", proc.stderr
        assert lost == 0
        pid = events[0]["pid"]
        assert {e["pid"] for e in events} == {pid} and {e["tid"] for e in events} == {pid}
        assert [e["ts_ns"] for e in events] == sorted(e["ts_ns"] for e in events)
        runs[bool(options)] = (_comparable(events, pid), proc.stderr)
    (jumped, stderr), (trapped, _) = runs[False], runs[True]
    assert "6 of 6 probe points were jumps" in stderr, stderr
    assert len(jumped) == (len(JUMP_SITES) + 1) * n
    assert jumped == trapped
    assert {args["c"] for probe, args, *_ in jumped if probe == "jump_entry"} == {"jumps"}


def test_record_times_of_one_thread_strictly_increase_across_reads():
    """Each read converts counter values with the scale measured again, so a later read can give a thread's
    records times before, or tied with, its last ones: they come out a nanosecond after it instead, so a merge
    by time of several sites' events keeps the thread's order (a tie was ordered by site: a flake in CI)."""
    import numpy

    from uprobes.engines.ptrace.records import Recorder

    recorder, owner = Recorder(probes=[]), object()
    first = recorder._in_order(owner, numpy.array([1, 2, 1, 1], numpy.uint64), numpy.array([100, 50, 100, 99]))
    later = recorder._in_order(owner, numpy.array([1, 2], numpy.uint64), numpy.array([90, 40]))
    assert first.tolist() == [100, 50, 101, 102] and later.tolist() == [103, 51]


def _check(program: str, n: int) -> str:
    return re.search(r"check (\d+)", subprocess.run([program, "run", str(n)], capture_output=True,
                                                     text=True).stdout)[1]


def test_events_written_in_columns_are_the_lines_a_trap_writes_byte_for_byte(targets, tmp_path):
    """JSON lines formatted in bulk from records (numbers as bytes through one template) are the lines each
    trapped event writes, byte for byte: signed values below zero, unsigned and hex words, the thread's name,
    a constant, and the events of two probes interleaved in time order. Only what differs from run to run
    (time, CPU, ids, addresses) is masked."""
    program, n = str(targets / "jumps"), 300
    probes = [f"uprobe:{program}:jump_entry x=%di:s8 w=%di:s64 u=%di:u16 h=%di:x64 c=$comm k=\\-37",
              f"uprobe:{program}:jump_call y=%di:s32"]
    varying = re.compile(r'"(pid|tid|ts_ns|cpu|ip)": \d+')
    lines = {}
    for options in ([], ["--trap"]):
        out = tmp_path / f"trace{len(options)}.jsonl"
        proc = run_cli("trace", "--engine", "ptrace", "--json", "-o", str(out), *options, *probes, "--",
                       program, "run", str(n))
        assert proc.status == 0, proc.stderr
        lines[bool(options)] = [varying.sub(r'"\1": N', line) for line in out.read_text().splitlines()]
    assert "2 of 2 probe points were jumps" in run_cli("trace", "--engine", "ptrace", "--json", "-o",
                                                        str(tmp_path / "again.jsonl"), *probes, "--", program,
                                                        "run", "1").stderr
    assert len(lines[False]) == 2 * n + 1 and lines[False] == lines[True]
    # each iteration i: jump_entry(i), then jump_call(i); an immediate is a u64, as the kernel types it
    assert lines[False][2:4] == [
        '{"probe": "jump_entry", "pid": N, "tid": N, "comm": "jumps", "ts_ns": N, "cpu": N, "ip": N, '
        '"args": {"x": 1, "w": 1, "u": 1, "h": 1, "c": "jumps", "k": 18446744073709551579}}',
        '{"probe": "jump_call", "pid": N, "tid": N, "comm": "jumps", "ts_ns": N, "cpu": N, "ip": N, '
        '"args": {"y": 1}}']
    assert '"args": {"x": -1, "w": 255, "u": 255, "h": 255,' in lines[False][2 * 255]


def test_threads_are_named_and_their_events_keep_their_order(targets):
    """Four threads started after the probes went in (their keys are learned as they start); the ring holds
    every record, so none is lost, and each thread's calls come out in the order it made them."""
    _threads_in_order(targets, 4, 15_000)


@pytest.mark.stress
def test_thirty_two_threads_that_end_apart_keep_their_events_and_order_forty_times(targets):
    """Threads that end while another's record is still being written: what they wrote after it is still theirs
    (it went to the thread that took their key next, or to the process), and records of one thread read apart
    keep their order (the counter's scale, measured again at each read, once turned two around)."""
    for _ in range(40):
        _threads_in_order(targets, 32, 2000)


def _threads_in_order(targets: Path, threads: int, n: int) -> None:
    program = str(targets / "jumps")
    events, proc, lost = _trace(f"uprobe:{program}:jump_entry x=%di:s64", "--", program, "threads", str(threads),
                                str(n))
    assert proc.returncode == 0 and proc.stdout.startswith(f"threads {threads} {n} check"), proc.stderr
    assert lost == 0 and "the probe point was a jump" in proc.stderr
    by_thread = defaultdict(list)
    for event in events:
        by_thread[event["tid"]].append(event["args"]["x"])
    pid = events[0]["pid"]
    assert len(by_thread) == threads and pid not in by_thread
    assert all(calls == list(range(n)) for calls in by_thread.values())


def test_marker_operands_in_registers_and_memory_record_what_traps_read(targets):
    """USDT markers of every operand form: registers and their parts, constants, memory the operands name
    (based on a register, rip-relative symbols), a string an operand points to; those a trampoline cannot take
    (an index register, %xmm) trap, and say why."""
    forms = str(targets / "forms")
    probes = [f"usdt:{forms}:forms:{marker}" for marker in FORMS] + [f"usdt:{forms}:forms:words arg0 t=arg2:string"]
    runs = {}
    for options in ([], ["--trap"]):
        events, proc, _ = _trace(*options, *probes, "--", forms)
        assert proc.returncode == 0, proc.stderr
        runs[bool(options)] = (_comparable(events, events[0]["pid"]), proc.stderr)
    (jumped, stderr), (trapped, _) = runs[False], runs[True]
    assert jumped == trapped and len(jumped) == len(FORMS) + 2  # noted has two sites
    assert re.search(r"[1-9]\d* of 11 probe points were jumps", stderr), stderr
    result = run_cli("resolve", "--engine", "ptrace", "--json", f"usdt:{forms}:forms:known_sib",
                     f"usdt:{forms}:forms:words arg0 t=arg2:string", f"usdt:{forms}:forms:floats", check=True)
    placements = [json.loads(line)["ptrace"] for line in result.stdout.splitlines()]
    assert [p["traced"] for p in placements] == [True, True, False]
    assert placements[2]["why"] == "arg2 reads %xmm0, which needs the thread stopped"


def test_a_load_for_a_record_that_faults_is_never_the_programs(targets):
    """A hand-written marker whose operands point nowhere (forms:sib: an index register holding garbage): the
    trampoline's load faults, the tool takes the fault, the program runs on as untraced, and the site traps
    from then on, reading what it can with the thread stopped, as --trap does."""
    forms = str(targets / "forms")
    untraced = subprocess.run([forms], capture_output=True, text=True)
    events, proc, _ = _trace(f"usdt:{forms}:forms:sib", "--", forms)
    assert (proc.returncode, proc.stdout) == (0, untraced.stdout), proc.stderr
    (event,) = events
    assert event["args"]["arg0"] == 0 and event["errors"]["arg0"].startswith("fault reading 8 bytes at")
    assert "forms:sib trapped after its first hits: a load for its record faulted" in proc.stderr


def test_a_full_ring_counts_what_it_loses_and_every_hit_is_accounted(targets):
    """Two threads call a probed function far faster than the tool reads: records that find the ring full are
    counted as lost, and events plus lost records are exactly the calls."""
    program, n = str(targets / "jumps"), 400_000
    events, proc, lost = _trace(f"uprobe:{program}:jump_entry x=%di:s64", "--", program, "threads", "2", str(n))
    assert proc.returncode == 0, proc.stderr
    assert lost > 0 and len(events) + lost == 2 * n
    assert re.search(rf"lost {lost} events", proc.stderr), proc.stderr
    for tid in {e["tid"] for e in events}:
        calls = [e["args"]["x"] for e in events if e["tid"] == tid]
        assert calls == sorted(calls)  # what is kept of each thread keeps its order


def test_return_probes_record_the_events_traps_give(targets):
    """Returns taken in a return trampoline are recorded there with the registers the function left: the same
    events, values and order as when the entry and the return both trap."""
    program, n = str(targets / "jumps"), 2000
    probes = [f"uretprobe:{program}:jump_entry v=$retval:s64 d=%di", f"uprobe:{program}:jump_call x=%di:s32",
              f"uretprobe:{program}:jump_call"]
    runs = {}
    for options in ([], ["--trap"]):
        events, proc, lost = _trace(*options, *probes, "--", program, "run", str(n))
        assert proc.returncode == 0 and proc.stdout == f"run {n} check {_check(program, n)}\n", proc.stderr
        assert lost == 0
        runs[bool(options)] = ([(e["probe"], e["args"], e.get("retval")) for e in events], proc.stderr)
    (jumped, stderr), (trapped, _) = runs[False], runs[True]
    assert "3 of 3 probe points were jumps" in stderr, stderr
    assert len(jumped) == 3 * n and jumped == trapped
    assert jumped[:3] == [("jump_entry%return", {"v": 1, "d": 0}, 1), ("jump_call", {"x": 0}, None),
                          ("jump_call%return", {}, 11)]


def test_python_handlers_run_from_records_in_order_and_none_is_lost(targets):
    """Four threads call jump_entry(i) for i = 0..N-1 far faster than a Python handler runs: the ring fills,
    and a hit that finds it full is handed to the tool with its thread stopped, after every record before it.
    Every call and every return reaches its handler once, each thread's in order, with the registers of the
    hit."""
    _handlers_in_order(targets)


@pytest.mark.stress
def test_python_handlers_keep_each_threads_order_beside_a_cpu_hog_thirty_times(targets):
    """A hit that found the ring full was reported at once, even while a record reserved before its thread's
    last ones was still being written by another thread, so the reading had stopped short of them: its handler
    ran before theirs (1 run in 8 to 24 with a CPU hog beside it, on the code before 2026-12-06). Such a hit
    now runs again."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for _ in range(30):
            _handlers_in_order(targets)
    finally:
        hog.kill()
        hog.wait()


def _handlers_in_order(targets: Path) -> None:
    from uprobes.api import Session

    program, n = str(targets / "jumps"), 50_000
    calls: dict[int, list[int]] = defaultdict(list)
    rips = set()

    def handler(hit):
        assert hit.regs.rdi == hit.args["x"]
        rips.add(hit.regs.rip)
        calls[hit.tid].append(hit.args["x"])

    def on_return(hit):
        returned[hit.tid].append(hit.args["r"])

    returned: dict[int, list[int]] = defaultdict(list)
    with Session(command=[program, "threads", "4", str(n)], keep_events=False) as session:
        (probe,) = session.probe(f"uprobe:{program}:jump_entry x=%di:s64", handler)
        session.probe(f"uretprobe:{program}:jump_entry r=$retval:s64", on_return)
        status = session.run()
        counts, lost, notices = session.hit_counts(), session.lost, session.notices
    assert status == 0 and lost == 0 and counts == [4 * n, 4 * n], notices
    assert sorted(calls.values()) == [list(range(n))] * 4
    assert sorted(returned.values()) == [list(range(1, n + 1))] * 4 and set(returned) == set(calls)
    (rip,) = rips
    assert (rip - probe.address) % 4096 == 0  # the probe's address, where the program is loaded


def test_dereferences_are_read_by_the_trampoline_with_the_values_and_errors_traps_give(targets):
    """A dereference is read by the trampoline with process_vm_readv on its own process: a bad pointer reads 0
    (as on the kernel engine) with its fault in the event's errors, as at a trap, and never a fault in the
    program; one inside another reads the pointer first (a fault there fails both)."""
    calls = str(targets / "calls")
    probe = (f"uprobe:{calls}:work i=%di:s32 c=+0(%dx):u8 s=+1(%dx):u8 bad=+0(%di):u64 code=+8(+0(%sp)):x64 "
             f"both=+0(+0(%di)):u32")
    runs = {}
    for options in ([], ["--trap"]):
        events, proc, lost = _trace(*options, probe, "--", calls, "40")
        assert proc.returncode == 0 and lost == 0 and len(events) == 40
        runs[bool(options)] = ([(e["args"], e.get("errors")) for e in events], proc.stderr)
    (jumped, stderr), (trapped, _) = runs[False], runs[True]
    assert "the probe point was a jump" in stderr, stderr
    assert jumped == trapped
    args, errors = jumped[3]
    assert (args["i"], args["c"], args["s"], args["bad"], args["both"]) == (3, ord("s"), ord("3"), 0, 0)
    assert set(errors) == {"bad", "both"} and "fault" in errors["bad"]


STRINGS_PROBE = "s=+0(%di):string a=+0(%si):u32[4] i=%dx:s64"


def _without_addresses(events: list[dict]) -> list[str]:
    """Arguments and errors, the addresses in the errors taken out (each run maps its pages elsewhere)."""
    return [re.sub(r"0x[0-9a-f]{5,}", "ADDRESS", json.dumps([e["args"], e.get("errors")])) for e in events]


def test_strings_and_arrays_are_read_by_the_trampoline_as_a_trap_reads_them(targets):
    """Strings read up to their NUL, at most 4,096 bytes, in reads that stop at a page nothing is mapped at (what
    was read before it is the value); arrays read whole or not at all (zeros, as on the kernel engine); a bad
    pointer an error: the events a trap gives, read into the slots after the record's first."""
    program = str(targets / "strings")
    runs = {}
    for options in ([], ["--trap"]):
        events, proc, lost = _trace(*options, f"uprobe:{program}:take {STRINGS_PROBE}", "--", program, "shapes")
        assert proc.returncode == 0 and proc.stdout == "shapes 10\n" and lost == 0, proc.stderr
        runs[bool(options)] = (events, proc.stderr)
    (jumped, stderr), (trapped, _) = runs[False], runs[True]
    assert "the probe point was a jump" in stderr, stderr
    assert _without_addresses(jumped) == _without_addresses(trapped)
    strings = [e["args"]["s"] for e in jumped]
    assert strings[:5] == ["hello", "", "a" * 300, "b" * 4096, "c" * 4096]
    assert strings[5:] == ["e" * 20, None, None, "f" * 20, "\ufffd\ufffd not UTF-8"]
    arrays = [e["args"]["a"] for e in jumped]
    assert arrays == [[0, 1, 0xFFFFFFFF, 7]] * 5 + [[0] * 4] * 3 + [[0, 1, 0xFFFFFFFF, 7]] * 2
    hole = int(jumped[7]["errors"]["s"].split()[-1], 16)  # the page nothing is mapped at
    assert jumped[7]["errors"] == {"s": f"fault reading a string at {hole:#x}", "a": f"fault reading 16 bytes at {hole:#x}"}
    assert jumped[5]["errors"] == {"a": f"fault reading 16 bytes at {hole - 8:#x}"}
    assert jumped[6]["errors"] == {"s": "NULL", "a": "fault reading 16 bytes at 0x0"}


def test_as_many_strings_as_a_record_holds(targets):
    """Eleven strings (with their pointer, the twelve words a record holds), each read just after the one before:
    the values a trap reads, the trampoline's code (5 KiB) still a jump."""
    program = str(targets / "strings")
    probe = f"uprobe:{program}:take " + " ".join(f"s{k}=+{k}(%di):string" for k in range(11))
    runs = {}
    for options in ([], ["--trap"]):
        events, proc, lost = _trace(*options, probe, "--", program, "shapes")
        assert proc.returncode == 0 and lost == 0, proc.stderr
        runs[bool(options)] = (_without_addresses(events), proc.stderr)
    (jumped, stderr), (trapped, _) = runs[False], runs[True]
    assert "the probe point was a jump" in stderr, stderr
    assert jumped == trapped and len(jumped) == 10
    first = json.loads(jumped[0])[0]
    assert [first[f"s{k}"] for k in range(6)] == ["hello", "ello", "llo", "lo", "o", ""]  # then what follows it


def test_string_records_of_threads_keep_each_threads_order(targets):
    """Four threads each write records of a string and an array (many slots each): every one is read whole, in
    each thread's order, none lost."""
    program, n = str(targets / "strings"), 400
    events, proc, lost = _trace(f"uprobe:{program}:take {STRINGS_PROBE}", "--", program, "threads", "4", str(n))
    assert proc.returncode == 0 and proc.stdout == f"threads 4 {n}\n" and lost == 0, proc.stderr
    by_thread = defaultdict(list)
    for event in events:
        args = event["args"]
        thread = args["a"][0]
        assert args["s"] == f"t{thread}-{args['i']}" and args["a"][1] == args["i"]
        by_thread[event["tid"]].append(args["i"])
    assert sorted(by_thread.values()) == [list(range(n))] * 4


def test_records_of_many_slots_run_past_the_rings_end_and_read_whole(targets):
    """Records of 3,010-byte strings, many more than the ring holds at once: a record that runs past the last
    slot goes on at the first (mapped twice in the target), and reads whole; a record that finds the ring full
    is counted lost, and every call is an event or lost."""
    program, n = str(targets / "strings"), 20_000
    events, proc, lost = _trace(f"uprobe:{program}:take {STRINGS_PROBE}", "--", program, "long", str(n))
    assert proc.returncode == 0 and proc.stdout == f"long {n}\n", proc.stderr
    assert len(events) + lost == n and len(events) > 2000  # more than one pass over the ring
    calls = [e["args"]["i"] for e in events]
    assert calls == sorted(calls)
    for event in events:
        args = event["args"]
        assert args["s"] == f"{args['i']}:".ljust(3010, "g") and args["a"] == [args["i"], 0, 0, 0]


def test_python_handlers_get_the_strings_their_records_hold(targets):
    """A handler's record holds every register and what its strings and arrays read (in slots of 256 bytes):
    each call comes with the string and array of the hit."""
    from uprobes.api import Session

    program, n = str(targets / "strings"), 300
    seen: list[tuple] = []
    with Session(command=[program, "threads", "2", str(n)], keep_events=False) as session:
        session.probe(f"uprobe:{program}:take {STRINGS_PROBE}",
                      lambda hit: seen.append((hit.tid, hit.args["s"], hit.args["a"][:2], hit.regs.rdx)))
        status = session.run()
        lost, notices, report = session.lost, session.notices, session._engine.report()
    assert status == 0 and lost == 0 and len(seen) == 2 * n, notices
    assert "the probe point was a jump (no stop per hit)" in report, report
    assert all(s == f"t{a[0]}-{i}" and a[1] == i for _, s, a, i in seen)
    assert sorted([i for tid, *_, i in seen if tid == t] for t in {tid for tid, *_ in seen}) == [list(range(n))] * 2


def test_a_real_interpreters_audit_events_read_their_names_as_a_trap_does():
    """python3.11's audit marker (python:audit: the event's name a string its arg0 points to) on the jump path:
    every event the interpreter raises, with the name a trap reads, in the same order."""
    command = ["/usr/bin/python3.11", "-c", "import sys; sys.audit('hello', 1); open('/dev/null').close()"]
    probe = "usdt:/usr/bin/python3.11:python:audit arg0:string"
    runs = {}
    for options in ([], ["--trap"]):
        events, proc, lost = _trace(*options, probe, "--", *command)
        assert proc.returncode == 0 and lost == 0, proc.stderr
        runs[bool(options)] = ([e["args"]["arg0"] for e in events], proc.stderr)
    (jumped, stderr), (trapped, _) = runs[False], runs[True]
    assert "the probe point was a jump" in stderr, stderr
    assert jumped == trapped and "hello" in jumped and "open" in jumped, jumped


def test_two_reads_of_one_address_with_different_sizes(targets):
    """A 16-bit and an 8-bit read of the same address in one record (a bitfield's container and a byte beside
    it): each gets its own bytes, as a trap reads them (the byte's shorter read once hid the other's)."""
    program = str(targets / "sourcevars-O0")  # at area+0x16, p is at -40(%rbp); p->inner.z is at +28
    probe = f"uprobe:{program}:area+0x16 z=+28(-40(%bp)):u16 low=+28(-40(%bp)):u8"
    runs = {}
    for options in ([], ["--trap"]):
        events, proc, _ = _trace(*options, probe, "--", program, "3")
        assert proc.returncode == 0, proc.stderr
        runs[bool(options)] = [event["args"] for event in events]
        zs = [int(z) for z in re.findall(r" z=(\d+)", proc.stdout)]
    assert runs[False] == runs[True] == [{"z": z, "low": z & 0xFF} for z in zs]

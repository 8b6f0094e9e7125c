"""`uprobes trace --format chrome -o FILE`: Chrome trace-event JSON whose slices nest as the calls did.

Perfetto's own reader (the `perfetto` package's TraceProcessor) downloads its trace_processor_shell binary at
first use, which a machine without the network cannot, so the documents are read here as JSON and checked
for what Perfetto and chrome://tracing build their tracks from: per thread, events in time order, every "E"
closing the innermost open "B" of the same name, "i" events with thread scope, names as "M" events. The
calls each slice stands for are compared with the calls the traced program says it made.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_cli, run_json

from uprobes.output.chrome import ChromeTraceWriter
from uprobes.output.event import Event
from uprobes.probes.resolve import resolve_texts

ENGINES = ["ptrace", "kernel"]
NEST_FUNCTIONS = ("outer", "inner", "fact", "catcher", "thrower")


@pytest.fixture(params=ENGINES)
def engine(request, targets) -> str:
    if request.param == "kernel":
        request.getfixturevalue("tracefs")  # root, tracefs mounted; skipped otherwise
    return request.param


def strict_json(text: str) -> dict:
    """``text`` read as JSON proper: Python's reader takes NaN and Infinity too, which viewers do not."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def trace_chrome(engine: str, probes: list[str], command: list[str], *options: str
                 ) -> tuple[dict, subprocess.CompletedProcess]:
    """Run ``uprobes trace --format chrome -o FILE [OPTIONS] PROBES -- COMMAND``; the document, and the finished
    run (whose stdout is the command's)."""
    out = Path(f"/tmp/uprobes-test-{os.getpid()}-{os.urandom(4).hex()}.json")
    try:
        proc = subprocess.run([sys.executable, "-m", "uprobes", "trace", "--engine", engine, "--format", "chrome",
                               "-o", str(out), *options, *probes, "--", *command], capture_output=True, text=True,
                              timeout=120)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode == 0, proc.stderr
        return strict_json(out.read_text()), proc
    finally:
        out.unlink(missing_ok=True)


@dataclass
class Call:
    """One call, as the program printed it or as the trace's slices show it; ``result`` None: it never returned."""

    name: str
    arg: int
    result: int | None = None
    children: list[Call] | None = None

    def __post_init__(self) -> None:
        self.children = self.children or []


def program_calls(stdout: str) -> dict[int, list[Call]]:
    """The call trees the nest target printed ("TID enter NAME ARG", "TID leave NAME RESULT"), by thread."""
    roots: dict[int, list[Call]] = {}
    open_calls: dict[int, list[Call]] = {}
    for tid, step, name, value in re.findall(r"^(\d+) (enter|leave) (\w+) (-?\d+)$", stdout, re.M):
        tid, calls = int(tid), open_calls.setdefault(int(tid), [])
        if step == "enter":
            call = Call(name, int(value))
            (calls[-1].children if calls else roots.setdefault(tid, [])).append(call)
            calls.append(call)
        else:
            while calls[-1].name != name:  # left by longjmp: it printed no leave
                calls.pop()
            calls.pop().result = int(value)
    return roots


def thread_events(document: dict) -> dict[int, list[dict]]:
    """The document's events other than metadata, by thread, after checking what every viewer relies on."""
    assert document["displayTimeUnit"] == "ns"
    assert document["otherData"] == {"clock": "CLOCK_MONOTONIC", "lost_events": 0}
    threads: dict[int, list[dict]] = {}
    for record in document["traceEvents"]:
        assert record["ph"] in ("B", "E", "i", "M"), record
        assert isinstance(record["pid"], int) and isinstance(record["tid"], int) and isinstance(record["args"], dict)
        if record["ph"] == "M":
            continue
        assert isinstance(record["ts"], float) and isinstance(record["name"], str), record
        assert (record.get("s") == "t") == (record["ph"] == "i"), record
        threads.setdefault(record["tid"], []).append(record)
    for records in threads.values():
        times = [record["ts"] for record in records]
        assert times == sorted(times)
    return threads


def slice_calls(records: list[dict], arg: str = "a") -> tuple[list[Call], list[Call]]:
    """One thread's slices (its events in time order) as call trees, every "E" checked to close the innermost
    open slice, of its name; and the calls still open at the end."""
    roots: list[Call] = []
    open_calls: list[tuple[Call, float]] = []
    for record in records:
        if record["ph"] == "B":
            call = Call(record["name"], record["args"][arg])
            (open_calls[-1][0].children if open_calls else roots).append(call)
            open_calls.append((call, record["ts"]))
        elif record["ph"] == "E":
            assert open_calls, record
            call, began = open_calls.pop()
            assert record["name"] == call.name and began <= record["ts"]
            if record["args"] == {"returned": False}:
                continue  # left without returning: ended when a caller returned
            call.result = record["args"]["retval"]
    return roots, [call for call, _ in open_calls]


def names(document: dict, kind: str) -> dict[int, str]:
    """The names "M" events give processes (by pid) or threads (by tid), the last one of each."""
    key = "pid" if kind == "process_name" else "tid"
    return {record[key]: record["args"]["name"] for record in document["traceEvents"]
            if record["ph"] == "M" and record["name"] == kind}


def trace_nest(engine: str, targets: Path, n: int, depth: int, *options: str,
               functions: tuple[str, ...] = NEST_FUNCTIONS) -> tuple[dict, dict[int, list[Call]]]:
    """The document of a run of ``nest N DEPTH`` with each of ``functions`` probed at its entry and return, and
    the calls the program says it made."""
    nest = str(targets / "nest")
    probes = [probe for name in functions
              for probe in (f"uprobe:{nest}:{name} a=%di:s64", f"uretprobe:{nest}:{name}")]
    document, proc = trace_chrome(engine, probes, [nest, str(n), str(depth)], *options)
    return document, program_calls(proc.stdout)


def pruned(calls: list[Call], levels: int) -> list[Call]:
    """``calls`` without the calls nested more than ``levels`` deep."""
    if not levels:
        return []
    return [Call(call.name, call.arg, call.result, pruned(call.children, levels - 1)) for call in calls]


def test_slices_nest_as_the_calls_did(engine, targets):
    """Two threads, each: calls of outer that call inner, a recursion of fact, and a longjmp out of thrower
    back into catcher (thrower's return never comes: its slice ends when catcher returns)."""
    document, expected = trace_nest(engine, targets, 4, 6)
    assert len(expected) == 2 and all(len(calls) == 6 for calls in expected.values())  # 4 outer, fact, catcher
    threads = thread_events(document)
    assert set(threads) == set(expected)
    for tid, records in threads.items():
        calls, still_open = slice_calls(records)
        assert calls == expected[tid] and not still_open
        assert not [record for record in records if record["ph"] == "i"]
        left = [record for record in records if record["ph"] == "E" and record["args"] == {"returned": False}]
        assert [record["name"] for record in left] == ["thrower"]
    (pid,) = {record["pid"] for record in document["traceEvents"]}
    (worker,) = set(expected) - {pid}  # the main thread's tid is the process id
    assert names(document, "process_name") == {pid: "nest"}
    thread_names = names(document, "thread_name")
    assert set(thread_names) == {pid, worker} and thread_names[pid] == "nest"
    # The kernel names a thread as it is at the hit. The ptrace engine's jump path reads the name once, when it
    # first sees the thread stopped (engines/ptrace/records.py, Recorder.saw): at its clone or a little later,
    # before or after the thread named itself.
    assert thread_names[worker] == "nest-worker" or engine == "ptrace" and thread_names[worker] == "nest"


def test_calls_deeper_than_the_returns_an_engine_keeps_are_instants(engine, targets):
    """Neither engine reports the return of a call nested more than 64 deep (the kernel's limit): fact's calls
    from the 65th level down are instants inside the 64th, and every return ends the call it belongs to."""
    document, expected = trace_nest(engine, targets, 1, 100)
    for tid, records in thread_events(document).items():
        calls, still_open = slice_calls(records)
        assert calls == pruned(expected[tid], 64) and not still_open
        deep = [(record["name"], record["args"]) for record in records if record["ph"] == "i"]
        assert deep == [("fact", {"a": k}) for k in range(100 - 64, -1, -1)]


def _fact_depths(calls: list[Call], depth: int = 0) -> list[int]:
    """How many calls of fact each call of fact is nested in, fact's own included (1 for the outermost)."""
    depths = []
    for call in calls:
        inner = depth + (call.name == "fact")
        depths += ([inner] if call.name == "fact" else []) + _fact_depths(call.children, inner)
    return depths


def test_returns_past_64_nested_calls_are_counted_and_the_ptrace_engine_says_how_many(engine, targets):
    """README: a return probe keeps 64 nested calls per thread: counted, fact's returns are those of its calls
    nested at most 64 deep (as the program's own account of its calls tells), on both engines (the ptrace
    engine's jumps and traps both); the ptrace engine says how many it skipped (the kernel, only in its log)."""
    nest = str(targets / "nest")
    for options in ([], ["--trap"]) if engine == "ptrace" else ([],):
        records, proc = run_json("count", "--engine", engine, *options, f"uprobe:{nest}:fact",
                                 f"uretprobe:{nest}:fact", "--", nest, "1", "100")
        assert proc.returncode == 0, proc.stderr
        depths = [depth for calls in program_calls(proc.stdout).values() for depth in _fact_depths(calls)]
        assert max(depths) > 64
        hits = {record["probe"]: record["hits"] for record in records}
        assert hits == {"fact": len(depths), "fact%return": sum(depth <= 64 for depth in depths)}, options
        skipped = re.findall(r"^uprobes: (\d+) return probes skipped \(nesting deeper than 64", proc.stderr, re.M)
        assert skipped == ([str(sum(depth > 64 for depth in depths))] if engine == "ptrace" else []), proc.stderr


def test_return_probes_on_the_exits_give_every_slice_at_any_depth(engine, targets):
    """With the return probes on each function's ret instructions (--return-mode insn), no return address is
    replaced, so there is no limit of 64 nested calls: fact's 100 levels are slices, each with its value.
    thrower, which only leaves by longjmp, has no ret to probe, so it is left out."""
    functions = tuple(name for name in NEST_FUNCTIONS if name != "thrower")
    document, expected = trace_nest(engine, targets, 2, 100, "--return-mode", "insn", functions=functions)
    for tid, records in thread_events(document).items():
        calls, still_open = slice_calls(records)
        assert calls == without(expected[tid], "thrower") and not still_open
        assert not [record for record in records if record["ph"] == "i"]
        assert _depth(calls) == 101


def without(calls: list[Call], name: str) -> list[Call]:
    """``calls`` without those of function ``name`` (and what they called)."""
    return [Call(call.name, call.arg, call.result, without(call.children, name)) for call in calls
            if call.name != name]


def _depth(calls: list[Call]) -> int:
    return max((1 + _depth(call.children) for call in calls), default=0)


def test_a_probe_without_its_return_is_an_instant_event(engine, targets):
    """work's entry and return make slices (its arguments on the "B", its return value on the "E"); the
    marker, and a return probe without its entry, are instants with their arguments."""
    calls, lib = str(targets / "calls"), str(targets / "libprobed.so")
    document, proc = trace_chrome(engine, [f"uprobe:{calls}:work i=%di:s32 label=+0(%dx):string",
                                           f"uretprobe:{calls}:work", f"usdt:{calls}:calls:step",
                                           f"uretprobe:{lib}:lib_twice"], [calls, "3"])
    n, total, guarded = map(int, re.fullmatch(r"calls (\d+) sum (\d+) guarded (\d+)\n", proc.stdout).groups())
    (records,) = thread_events(document).values()
    slices, still_open = slice_calls(records, arg="i")
    assert [(call.name, call.arg) for call in slices] == [("work", i) for i in range(n)] and not still_open
    assert [record["args"]["label"] for record in records if record["ph"] == "B"] == [f"s{i}" for i in range(n)]
    instants = [(record["name"], record["args"]) for record in records if record["ph"] == "i"]
    steps = [args for name, args in instants if name == "calls:step"]
    twice = [args["retval"] for name, args in instants if name == "lib_twice%return"]
    assert len(instants) == len(steps) + len(twice) and len(twice) == n and len(steps) == guarded == n
    assert steps == [{"arg0": i, "arg1": call.result} for i, call in enumerate(slices)]
    assert sum(call.result for call in slices) + sum(twice) == total
    assert [record["ph"] for record in records] == ["B", "E", "i", "i"] * n  # work, lib_twice's return, step
    (pid,) = {record["pid"] for record in records}
    assert names(document, "process_name") == {pid: "calls"} and names(document, "thread_name") == {pid: "calls"}


@pytest.mark.parametrize("args, message", [
    (["trace", "--format", "chrome", "uprobe:libc:malloc"],
     "uprobes: error: --format chrome writes one JSON document to a file: add -o FILE"),
    (["trace", "--json", "--format", "chrome", "-o", "OUT", "uprobe:libc:malloc"],
     "uprobes: error: --json means --format json: give --format chrome without --json"),
    (["trace", "--json", "--format", "text", "uprobe:libc:malloc"], "give --format text without --json"),
    (["count", "--format", "chrome", "-o", "OUT", "uprobe:libc:malloc"], "unrecognized arguments: --format"),
])
def test_format_errors_are_one_line_and_exit_2(args, message, tmp_path):
    out = tmp_path / "trace.json"
    result = run_cli(*[str(out) if arg == "OUT" else arg for arg in args])
    assert result.status == 2 and message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert not out.exists()


def test_format_json_is_what_json_writes(targets, tmp_path):
    calls = str(targets / "calls")
    probes = [f"uprobe:{calls}:work i=%di:s32", f"uretprobe:{calls}:work", "--", calls, "3"]
    by_flag, _ = run_json("trace", "--engine", "ptrace", *probes)
    out = tmp_path / "trace.jsonl"
    run_cli("trace", "--engine", "ptrace", "--format", "json", "-o", str(out), *probes, check=True)
    by_format = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(by_format) == len(by_flag) == 7 and by_format[-1] == by_flag[-1] == {"lost": 0}
    varying = ("pid", "tid", "ts_ns", "cpu", "ip")  # the same run's, not another's
    for a, b in zip(by_flag[:-1], by_format[:-1]):
        assert list(a) == list(b)
        assert {k: v for k, v in a.items() if k not in varying} == {k: v for k, v in b.items() if k not in varying}


# The writer alone, on events made here: what a trace cannot be made to show on demand.

@dataclass(slots=True)
class StackEvent(Event):
    """An event with frames, whether or not :class:`Event` has its own ``stack`` yet."""

    stack: list[str] | None = None


def write_text(probes: list, events: list[Event]) -> str:
    out = io.StringIO()
    writer = ChromeTraceWriter(out, probes)
    for event in events:
        writer.event(event)
    writer.lost(3)
    writer.close()
    return out.getvalue()


def write(probes: list, events: list[Event]) -> dict:
    return strict_json(write_text(probes, events))


def hit(index: int, ts_ns: int, probes: list, tid: int = 10, **fields) -> Event:
    probe = probes[index]
    return StackEvent(probe.name, 10, tid, "nest", ts_ns, 0, 0, fields.pop("args", {}), fields.pop("retval", None),
                      None, probe.is_return, index, **fields)


@pytest.fixture
def nest_probes(targets) -> list:
    nest = str(targets / "nest")
    # 0 outer, 1 outer's return, 2 fact, 3 fact's return, 4 a second probe on fact's entry, 5 inner's return only
    return resolve_texts([f"uprobe:{nest}:outer", f"uretprobe:{nest}:outer", f"uprobe:{nest}:fact",
                          f"uretprobe:{nest}:fact", f"uprobe:{nest}:fact k=%di", f"uretprobe:{nest}:inner"])


def test_a_return_whose_call_began_before_the_trace_is_an_instant(nest_probes):
    document = write(nest_probes, [hit(3, 1_000, nest_probes, retval=1), hit(1, 2_500, nest_probes, retval=9),
                                   hit(2, 3_000, nest_probes), hit(3, 4_000, nest_probes, retval=2)])
    records = [(r["ph"], r["name"], r["ts"], r["args"]) for r in document["traceEvents"] if r["ph"] != "M"]
    assert records == [("i", "fact%return", 1.0, {"retval": 1}), ("i", "outer%return", 2.5, {"retval": 9}),
                       ("B", "fact", 3.0, {}), ("E", "fact", 4.0, {"retval": 2})]
    assert document["otherData"]["lost_events"] == 3


def test_calls_still_open_at_the_end_stay_open_and_times_keep_their_nanoseconds(nest_probes):
    ts = 70_473_596_264_471_009
    text = write_text(nest_probes, [hit(0, ts, nest_probes, args={"a": 1}), hit(2, ts + 1, nest_probes)])
    records = [(r["ph"], r["name"], r["args"]) for r in strict_json(text)["traceEvents"] if r["ph"] != "M"]
    assert records == [("B", "outer", {"a": 1}), ("B", "fact", {})]
    assert '"ts": 70473596264471.009' in text and '"ts": 70473596264471.010' in text  # exactly, as written


def test_only_the_first_entry_and_return_of_a_function_pair_up(nest_probes):
    document = write(nest_probes, [hit(2, 1_000, nest_probes), hit(4, 1_000, nest_probes, args={"k": 3}),
                                   hit(5, 1_500, nest_probes, retval=7), hit(3, 2_000, nest_probes, retval=6)])
    records = [(r["ph"], r["name"], r["args"]) for r in document["traceEvents"] if r["ph"] != "M"]
    assert records == [("B", "fact", {}), ("i", "fact", {"k": 3}), ("i", "inner%return", {"retval": 7}),
                       ("E", "fact", {"retval": 6})]


def test_an_entry_64_calls_deep_is_an_instant_and_the_returns_still_pair(nest_probes):
    entries = [hit(2, 1_000 + k, nest_probes, args={"k": k}) for k in range(66)]
    returns = [hit(3, 2_000 + k, nest_probes, retval=k) for k in range(64)]
    records = [(r["ph"], r["args"]) for r in write(nest_probes, entries + returns)["traceEvents"] if r["ph"] != "M"]
    assert records == ([("B", {"k": k}) for k in range(64)] + [("i", {"k": 64}), ("i", {"k": 65})]
                       + [("E", {"retval": k}) for k in range(64)])


def test_a_stack_and_odd_values_are_in_the_arguments(nest_probes):
    """A slice has its entry's stack (an "E" event's arguments are added to its slice's, and the stack at the
    return is the caller's); NaN and infinities, which JSON lacks, are strings."""
    document = write(nest_probes, [
        hit(2, 1_000, nest_probes, stack=["nest`fact", "nest`main+0x20"]),
        hit(4, 1_000, nest_probes, args={"k": math.nan, "f": [math.inf, 1.5]}, stack=["nest`fact", "nest`main+0x20"]),
        hit(3, 2_000, nest_probes, retval=1, stack=["nest`main+0x20"])])
    records = [(r["ph"], r["args"]) for r in document["traceEvents"] if r["ph"] != "M"]
    assert records == [("B", {"stack": ["nest`fact", "nest`main+0x20"]}),
                       ("i", {"k": "nan", "f": ["inf", 1.5], "stack": ["nest`fact", "nest`main+0x20"]}),
                       ("E", {"retval": 1})]


def test_threads_and_processes_are_named_by_their_comm(nest_probes):
    first = hit(0, 1_000, nest_probes, tid=11)
    main = hit(0, 2_000, nest_probes, tid=10)
    main.comm = "renamed"
    document = write(nest_probes, [first, hit(1, 1_500, nest_probes, tid=11), main])
    metadata = [(r["name"], r["tid"], r["args"]["name"]) for r in document["traceEvents"] if r["ph"] == "M"]
    # the process is named after its first thread seen until its main thread (tid == pid) is
    assert metadata == [("thread_name", 11, "nest"), ("process_name", 11, "nest"), ("thread_name", 10, "renamed"),
                        ("process_name", 10, "renamed")]

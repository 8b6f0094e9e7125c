"""The kernel engine end to end: real probes on real processes, checked event by event and against the
kernel's own hit counts. Every test leaves uprobe_events without a line of ours."""

from __future__ import annotations

import collections
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from pathlib import Path

from conftest import (RunningTool, children_of, definitions_since, error_as_nobody, kernel_groups,
                      no_run_group_left_behind, run_cli, run_groups_of, run_json)
from oracles import text_differs_from_files, tool_output
from uprobes.cli.tracing import _report_uncounted
from uprobes.engines.kernel import perfbuf
from uprobes.engines.kernel.engine import KernelEngine
from uprobes.engines.kernel.perfbuf import TracepointReader
from uprobes.engines.kernel.tracefs import GROUP_PREFIX, Tracefs, stale_groups
from uprobes.errors import KernelEngineError
from uprobes.probes.resolve import resolve_text
from uprobes.proc.launch import HeldCommand

N = 25

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the kernel engine needs root")


@pytest.fixture(autouse=True)
def nothing_left_behind(tracefs):
    """After every test, no group of a run it made is left in uprobe_events (conftest.no_run_group_left_behind)."""
    with no_run_group_left_behind():
        yield


def _trace_json(*args: str, timeout: float = 60) -> tuple[list[dict], subprocess.CompletedProcess]:
    return run_json("trace", *args, timeout=timeout)


def _work_expected(i: int) -> int:
    return 3 * i + len(f"s{i}")


def test_trace_sees_every_call_with_its_arguments_and_return_value(targets):
    calls = targets / "calls"
    records, proc = _trace_json("-c", f"{calls} {N} 0 3",
                                f"uprobe:{calls}:work i=%di:s32 twice=%si:s64 label=+0(%dx):string",
                                f"uretprobe:{calls}:work")
    assert proc.returncode == 3  # the command's exit status is ours
    assert proc.stdout == f"calls {N} sum {sum(_work_expected(i) + 2 * i for i in range(N))} guarded 0\n"
    entries = [r for r in records if r.get("probe") == "work"]
    returns = [r for r in records if r.get("probe") == "work%return"]
    assert [e["args"] for e in entries] == [{"i": i, "twice": 2 * i, "label": f"s{i}"} for i in range(N)]
    assert [r["retval"] for r in returns] == [_work_expected(i) for i in range(N)]
    pids = {r["pid"] for r in entries + returns}
    assert len(pids) == 1 and {r["comm"] for r in entries} == {"calls"}
    assert all(r["ts_ns"] <= s["ts_ns"] for r, s in zip(records, records[1:]) if "ts_ns" in s)
    assert records[-1] == {"lost": 0}


def test_a_failed_fetch_is_null_with_the_reason(targets):
    calls = targets / "calls"
    records, proc = _trace_json("-c", f"{calls} 3", f"uprobe:{calls}:work i=%di:s32 bad=+0(%di):string")
    events = [r for r in records if "probe" in r]
    assert [e["args"] for e in events] == [{"i": i, "bad": None} for i in range(3)]
    assert all(e["errors"] == {"bad": "fault"} for e in events)


def test_trace_reaches_a_function_in_a_shared_library(targets):
    records, proc = _trace_json("-c", f"{targets / 'calls'} {N}", f"uprobe:{targets / 'libprobed.so'}:lib_add a=%di:s32 b=%si:s32")
    assert proc.returncode == 0
    assert [r["args"] for r in records if "probe" in r] == [{"a": i, "b": i} for i in range(N)]


def test_marker_semaphore_is_raised_only_while_attached(targets):
    calls = targets / "calls"
    records, proc = _trace_json("-c", f"{calls} {N}", f"usdt:{calls}:calls:step")
    assert proc.stdout.endswith(f"guarded {N}\n")
    assert [r["args"] for r in records if "probe" in r] == [{"arg0": i, "arg1": _work_expected(i)} for i in range(N)]
    untraced = subprocess.run([str(calls), str(N)], capture_output=True, text=True)
    assert untraced.stdout.endswith("guarded 0\n")


@pytest.mark.parametrize("counting, alone", [(False, 0), (True, 4), (True, 0)], ids=["events", "counters", "tags"])
def test_counts_agree_with_the_kernels_uprobe_profile(targets, counting, alone):
    """Entry, return, a marker with a semaphore and a library's function: traced, counted by an event's perf
    counter each, and counted by tag in shared events, each probe's hits are what uprobe_profile says."""
    calls, lib = targets / "calls", targets / "libprobed.so"
    probes = [p for text in (f"uprobe:{calls}:work", f"uretprobe:{calls}:work", f"usdt:{calls}:calls:step",
                             f"uprobe:{lib}:lib_twice") for p in resolve_text(text)]
    with KernelEngine(counted_alone=alone) as engine:
        child = HeldCommand([str(calls), str(N)])
        engine.attach(probes, child.pid, counting=counting)
        child.release()
        assert child.wait() == 0
        if counting:
            hits = engine.hit_counts()
        else:
            hits = [0] * len(probes)
            for event in engine.poll(1.0) + engine.poll(0):
                hits[event.probe_index] += 1
        # our definitions, each tagged with its probe's index (__probe=\\N), and the kernel's count of each
        tagged = {int(re.search(r" __probe=\\(\d+):u32", line)[1]): count
                  for line, count in engine.tracefs.profile() if f":{engine.group}/" in line}
        kernel = [tagged[index] for index in range(len(probes))]
    assert hits == kernel == [N, N, N, N]


def test_probes_of_one_signature_share_one_event_and_each_record_names_its_own(targets):
    """Every instruction of insns-O2's functions that the kernel handles, three ways: traced, the probes (no
    arguments of their own) are appended to one event, a definition each under one name, with one perf
    descriptor per CPU for all of them; counted, the same, each hit a record of its probe's tag alone; and
    counted with each probe an event of its own (how a few probes are counted), by its perf counters. Each
    way, every probe's hits are what the kernel's uprobe_profile says of it."""
    from test_every_instruction import ITERATIONS, function_instructions, insns_functions, kernel_mishandles
    from uprobes.engines.kernel.perfbuf import online_cpus

    path = str(targets / "insns-O2")
    probes = [probe for i in function_instructions(path, insns_functions()) if not kernel_mishandles(i.raw)
              for probe in resolve_text(f"p {path}:{i.offset:#x}")]
    untraced = subprocess.run([path, ITERATIONS], capture_output=True)
    shared = (1, 2 * len(online_cpus()))  # events; descriptors: one per CPU, and the copy its mapping keeps
    hits, profiles = {}, {}
    for way, counting, alone, descriptors in (("traced", False, 0, shared), ("tagged", True, 0, shared),
                                              ("counters", True, len(probes), (len(probes),) * 2)):
        with KernelEngine(counted_alone=alone) as engine:
            child = HeldCommand([path, ITERATIONS])
            engine.attach(probes, child.pid, counting=counting)
            ours = [line for line, _ in engine.tracefs.profile() if f":{engine.group}/" in line]
            perf = [fd for fd in os.listdir("/proc/self/fd") if _points_to(f"/proc/self/fd/{fd}", "anon_inode:[perf_event]")]
            events = {line.split()[0] for line in ours}
            child.release()
            assert child.wait() == untraced.returncode
            if counting:
                hits[way] = engine.hit_counts()
            else:
                hits[way] = [0] * len(probes)
                while batch := engine.poll(0.5) + engine.poll(0):
                    for event in batch:
                        hits[way][event.probe_index] += 1
            assert engine.lost == 0
            tagged = {int(re.search(r" __probe=\\(\d+):u32", line)[1]): count
                      for line, count in engine.tracefs.profile() if f":{engine.group}/" in line}
            profiles[way] = [tagged[index] for index in range(len(probes))]
        assert len(ours) == len(probes) > 200
        assert (len(events), len(perf)) == descriptors, way
    assert hits["traced"] == hits["tagged"] == hits["counters"] == profiles["traced"] == profiles["tagged"] \
        == profiles["counters"] and sum(hits["tagged"]) > 0


def test_counting_by_tag_says_what_a_full_buffer_dropped(targets, capsys):
    """Counted by their records in a perf buffer of one page, most hits of a hot probe find it full: the counts
    and what the engine says it lost add up to the kernel's own count of hits, each probe's count is at most
    its hits, and `count` says how many its figures miss."""
    calls = targets / "calls"
    probes = resolve_text(f"uprobe:{calls}:work") + resolve_text(f"uretprobe:{calls}:work")
    n = 20000
    with KernelEngine(pages_per_cpu=1, counted_alone=0) as engine:
        child = HeldCommand([str(calls), str(n)])
        engine.attach(probes, child.pid, counting=True)
        child.release()
        assert child.wait() == 0
        hits, lost = engine.hit_counts(), engine.lost
        profile = [count for line, count in engine.tracefs.profile() if f":{engine.group}/" in line]
    assert profile == [n, n] and lost > 0 and all(count <= n for count in hits)
    assert sum(hits) + lost == 2 * n
    out = io.StringIO()
    _report_uncounted(out, lost, as_json=True)  # what `count` adds after its figures
    assert json.loads(out.getvalue()) == {"lost": lost}
    assert f"uprobes: {lost} hits are missing from the counts" in capsys.readouterr().err


def _points_to(link: str, target: str) -> bool:
    try:
        return os.readlink(link) == target
    except FileNotFoundError:  # the descriptor listdir itself had open
        return False


def test_count_command_reports_hits_per_probe_point(targets):
    calls = targets / "calls"
    result = run_cli("count", "--json", "-c", f"{calls} {N}", f"uprobe:{calls}:work", f"usdt:{calls}:calls:step",
                     f"uretprobe:{calls}:work", check=True)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {(r["probe"], r["hits"]) for r in records} == {("work", N), ("calls:step", N), ("work%return", N)}
    work = next(r for r in records if r["probe"] == "work")
    assert work["path"] == str(calls) and work["offset"] == resolve_text(f"uprobe:{calls}:work")[0].offset


@pytest.mark.parametrize("others", [0, 4], ids=["counter", "tags"])
def test_count_reports_along_the_way_and_loses_nothing_at_the_end(targets, others):
    """Reports every 0.3 s, each of its own interval (numbered, timed), add up to the exact count; so they do with
    more probes than are counted by counters (each hit a tagged record, read as the run goes)."""
    calls = targets / "calls"
    extra = [f"uretprobe:{calls}:work", f"usdt:{calls}:calls:step", f"uprobe:{targets / 'libprobed.so'}:lib_twice",
             f"uprobe:{calls}:main"][:others]
    result = run_cli("count", "--json", "--interval", "0.3", f"uprobe:{calls}:work", *extra, "--", str(calls), "30",
                     "20", check=True)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    reports = [r for r in records if r["probe"] == "work"]
    assert len(reports) >= 2 and [r["interval"] for r in reports] == list(range(1, len(reports) + 1))
    assert all(0 < r["seconds"] < 1 and r["time"].startswith(time.strftime("%Y-")) for r in reports)
    every = {"work": 30, "work%return": 30, "calls:step": 30, "lib_twice": 30, "main": 1}
    totals = collections.Counter()
    for record in records:
        totals[record["probe"]] += record["hits"]
    assert totals == dict(list(every.items())[:1 + others])


def test_events_the_buffers_drop_are_counted_exactly_and_said(targets, tmp_path):
    """README: lost events are counted and reported. A marker hit 1,000,000 times at full speed, each hit an event
    written as text: most find the perf buffers full, and the number the run says it lost is exactly the hits the
    program made (its own count of the marker's guard, open at every hit) less the events written."""
    calls, out = targets / "calls", tmp_path / "events.txt"
    result = run_cli("trace", "--engine", "kernel", "-o", str(out), f"usdt:{calls}:calls:step", "--", str(calls),
                     "1000000", check=True)
    hits = int(re.search(r"guarded (\d+)\n", result.stdout)[1])
    written = [int(i) for i in re.findall(r" calls:step arg0=(\d+) ", out.read_text())]
    lost = re.findall(r"^uprobes: lost (\d+) events \(the ring buffers overflowed", result.stderr, re.M)
    assert hits == 1_000_000 and len(lost) == 1 and int(lost[0]) > 0, result.stderr
    assert int(lost[0]) == hits - len(written)
    assert written == sorted(set(written))  # those written, each once and in order


def test_a_sigkill_of_the_pid_the_user_holds_still_removes_the_runs_group(targets):
    """README: with -p the pid the user holds only waits; its worker defines the events and, when that pid dies
    of SIGKILL, gets a SIGTERM and removes them: the run's group goes, the process lives on."""
    calls = targets / "calls"
    target = subprocess.Popen([str(calls), "100000", "10"], stdout=subprocess.DEVNULL)
    try:
        with RunningTool("trace", "--engine", "kernel", "-p", str(target.pid), f"uprobe:{calls}:work",
                         stdout=False) as tracer:
            tracer.wait_attached()
            workers = children_of(tracer.proc.pid)
            (group,) = run_groups_of(set(workers))  # named after the worker, not the pid killed
            tracer.proc.kill()
            _, err = tracer.ended()  # its worker, which shares its stderr, has ended too
        assert tracer.proc.returncode == -signal.SIGKILL and "Traceback" not in err, err
        assert group not in kernel_groups()
        assert target.poll() is None and text_differs_from_files(target.pid) == []
    finally:
        target.kill()
        target.wait()


def test_a_fetch_argument_cannot_smuggle_a_second_definition(targets):
    result = run_cli("trace", "-d", "1", f"p:grp/ev {targets / 'calls'}:work\n-:grp/other")
    assert result.status == 2 and "bad fetch argument '-:grp/other'" in result.stderr


def _start_tracer(*args: str) -> subprocess.Popen:
    """``uprobes ARGS`` in the background, returned once it says its probes are attached."""
    proc = subprocess.Popen([sys.executable, "-m", "uprobes", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert re.search(r"probe points? attached", line), line + proc.stderr.read()
    return proc


def test_system_wide_mode_catches_processes_started_later(targets):
    calls = targets / "calls"
    with RunningTool("trace", "--json", f"uprobe:{calls}:work i=%di:s32") as tracer:
        tracer.wait_attached()
        first = subprocess.run([str(calls), "3"], capture_output=True)
        second = subprocess.Popen([str(calls), "4"], stdout=subprocess.DEVNULL)
        second.wait()
        tracer.wait_for(lambda: len(tracer.events()) >= 7, "the seven calls' events")
        tracer.finish()
    events = tracer.records()
    by_pid = {}
    for event in events[:-1]:
        by_pid.setdefault(event["pid"], []).append(event["args"]["i"])
    assert first.returncode == 0
    assert by_pid[second.pid] == [0, 1, 2, 3]
    assert sorted(len(v) for v in by_pid.values()) == [3, 4]
    assert events[-1] == {"lost": 0}


def test_pid_mode_catches_only_its_process(targets):
    calls = targets / "calls"
    mine = subprocess.Popen([str(calls), "100000", "10"], stdout=subprocess.DEVNULL)
    other = subprocess.Popen([str(calls), "100000", "10"], stdout=subprocess.DEVNULL)
    try:
        with RunningTool("trace", "--json", "-p", str(mine.pid), f"uprobe:{calls}:work") as tracer:
            tracer.wait_for(lambda: len(tracer.events()) > 10, "ten hits")
            tracer.finish()
        assert tracer.proc.returncode == 128 + signal.SIGINT
        records = tracer.records()
        pids = {r["pid"] for r in records if "probe" in r}
        assert pids == {mine.pid} and records[-1] == {"lost": 0}
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()


def test_detach_leaves_the_semaphore_at_zero(targets):
    calls = targets / "calls"
    target = subprocess.Popen([str(calls), "300", "10"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        with RunningTool("trace", "--json", "-p", str(target.pid), f"usdt:{calls}:calls:step") as tracer:
            tracer.wait_for(lambda: len(tracer.events()) > 10, "ten hits")
            tracer.finish()
        records = tracer.records()
        assert tracer.proc.returncode == 128 + signal.SIGINT and records[-1] == {"lost": 0}
        out, _ = target.communicate(timeout=30)
        guarded = int(out.split()[-1])
        assert len(records) - 1 <= guarded < 300  # open while we listened, closed again after
    finally:
        target.kill()
        target.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_end_in_a_clean_detach(targets, signum):
    calls = targets / "calls"
    tracer = _start_tracer("trace", f"uprobe:{calls}:work", f"usdt:{calls}:calls:step")
    tracer.send_signal(signum)
    out, err = tracer.communicate(timeout=30)
    assert "Traceback" not in err
    assert tracer.returncode == 128 + signum


def test_a_killed_command_passes_its_signal_on(targets):
    _, proc = _trace_json("-c", "sh -c 'kill -SEGV $$'", f"uprobe:{targets / 'calls'}:work")
    assert proc.returncode == 128 + signal.SIGSEGV


def test_the_kernels_refusal_names_the_token(tracefs):
    with pytest.raises(KernelEngineError) as info:
        Tracefs().define(f"p:uprobes_{os.getpid()}/bad /bin/true:0x10 x=$retval", "p /bin/true:0x10 x=$retval")
    assert str(info.value) == ("probe 'p /bin/true:0x10 x=$retval': the kernel refused it: "
                               "$retval is not available on probe (at 'x=$retval')")


@pytest.mark.parametrize("name", ["we#ird", "we ird", "we\nr:evil"])
def test_a_path_that_would_inject_a_second_command_is_refused(targets, tmp_path, tracefs, name):
    """A file name with a newline, blank or '#' would make uprobe_events read a second definition or a comment:
    refused by `resolve` and the kernel engine alike, nothing written; the ptrace engine needs no such line."""
    weird = tmp_path / name
    weird.write_bytes((targets / "demo").read_bytes())
    weird.chmod(0o755)
    link = tmp_path / "link"  # the probe syntax cannot name such a path; a symlink resolves to it
    link.symlink_to(weird)
    before = (Path(tracefs) / "uprobe_events").read_text()
    for command in (["resolve"], ["trace", "-d", "1"]):
        result = run_cli(*command, f"uprobe:{link}:price_of")
        assert result.status == 2
        assert result.stderr.count("\n") == 1 and "cannot take a path with blanks, '#' or control" in result.stderr
    assert definitions_since(before) == []
    records, proc = run_json("trace", "--engine", "ptrace", f"uprobe:{link}:price_of", "--", str(weird), "1")
    hits = [r for r in records if "probe" in r]
    assert proc.returncode == 0 and hits and all(r["probe"] == "price_of" for r in hits)


@pytest.mark.parametrize("text", ["p:grp/ev\nr:grp/evil /bin/true:0x10 /bin/true:0x10",
                                  "uprobe:/bin/true:0x10 x\n=%di", "uprobe:/bin/true:0x10 s=\\\"a\nb\\\"",
                                  "uprobe:/bin/true:0x10 x=%di#comment", "uprobe:/bin/true:0x10 x=%di:string\nr:x"])
def test_names_and_arguments_that_would_inject_a_line_are_rejected(tracefs, text):
    before = (Path(tracefs) / "uprobe_events").read_text()
    result = run_cli("trace", "-d", "1", *text.split(" "))
    assert result.status == 2 and result.stderr.count("\n") == 1, result.stderr
    assert definitions_since(before) == []


def test_system_wide_tracing_with_the_ptrace_engine_is_refused_clearly(targets):
    result = run_cli("trace", "--engine", "ptrace", "-d", "1", f"uprobe:{targets / 'calls'}:work")
    assert result.status == 2 and "system-wide tracing needs the kernel engine" in result.stderr


def test_not_root_suggests_the_ptrace_engine():
    message = error_as_nobody(Tracefs)
    assert "needs root" in message and "--engine ptrace" in message


def _define(tracefs: Path, line: str) -> None:
    fd = os.open(tracefs / "uprobe_events", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def _dead_group() -> str:
    """The name a run that has ended had: its pid is gone (and the start time is no process's)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    return f"{GROUP_PREFIX}{dead.pid}_1_0"


def test_cleanup_removes_groups_of_runs_that_died(tracefs):
    group = _dead_group()
    _define(tracefs, f"p:{group}/left_behind /bin/true:0x10")
    result = run_cli("cleanup", check=True)
    assert re.match(r"removed \d+ events of \d+ finished runs", result.stdout)
    assert f"{group}/" not in (tracefs / "uprobe_events").read_text()


# A KernelEngine inside another Python program: it prints its group and holds its events until a line comes.
_LIVE_ENGINE = """
import sys
from uprobes.engines.kernel.engine import KernelEngine
from uprobes.probes.resolve import resolve_text
with KernelEngine() as engine:
    engine.attach(resolve_text(sys.argv[1]), int(sys.argv[2]), counting=True)
    print(engine.group, flush=True)
    sys.stdin.readline()
"""


def test_cleanup_spares_live_runs_and_goes_past_busy_events(targets, tracefs):
    """A live engine in a program that is not `uprobes` (the API) keeps its events; an event still held by a
    perf descriptor cannot go, which is said, and the other finished runs are cleaned all the same."""
    calls = targets / "calls"
    sleeper = subprocess.Popen([str(calls), "1000", "100"], stdout=subprocess.DEVNULL)
    live = subprocess.Popen([sys.executable, "-c", _LIVE_ENGINE, f"uprobe:{calls}:work", str(sleeper.pid)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    dead, busy = _dead_group(), f"{GROUP_PREFIX}{os.getpid()}_1_0"  # our pid, but not our start time
    fs = Tracefs(tracefs)
    try:
        live_group = live.stdout.readline().strip()
        assert live_group.startswith(f"{GROUP_PREFIX}{live.pid}_")
        _define(tracefs, f"p:{dead}/left_behind /bin/true:0x10")
        work = resolve_text(f"uprobe:{calls}:work")[0]
        _define(tracefs, f"p:{busy}/held {calls}:{work.offset:#x}")
        busy_id = int((tracefs / "events" / busy / "held" / "id").read_text())
        with TracepointReader([busy_id], sleeper.pid, sampling=False):
            result = run_cli("cleanup")
        assert result.status == 1
        assert re.match(r"removed \d+ events of \d+ finished runs\n\Z", result.stdout)
        assert f"uprobes: left group {busy} in place: cannot delete uprobe event {busy}/held: it is in use " \
               f"(perf or BPF still holds it)" in result.stderr.splitlines()
        events = (tracefs / "uprobe_events").read_text()
        assert f"{live_group}/" in events and f"{busy}/" in events and f"{dead}/" not in events
        live.communicate("\n", timeout=60)
        assert live.returncode == 0 and f"{live_group}/" not in (tracefs / "uprobe_events").read_text()
    finally:
        for event in fs.defined_events():
            if event.group == busy:
                fs.delete(event)
        live.kill()
        sleeper.kill()
        sleeper.wait()


def test_a_group_a_dead_run_with_our_pid_left_is_no_obstacle(targets, tracefs):
    """A dead run whose pid is ours now left a group behind, with the event our run defines but other
    arguments: the kernel would refuse ours as its sibling ("Argument type or name is different"), or count
    both together. Our run has a group of its own, counts exactly, and cleanup takes the stale one."""
    calls = targets / "calls"
    probes = resolve_text(f"uprobe:{calls}:work")
    ghost = f"{GROUP_PREFIX}{os.getpid()}_1_0"
    with KernelEngine() as engine:
        _define(tracefs, f"p:{ghost}/e0_{probes[0].event} {calls}:{probes[0].offset:#x} x=%di:s8")
        child = HeldCommand([str(calls), str(N)])
        engine.attach(probes, child.pid, counting=True, held=True)
        child.release()
        assert child.wait() == 0
        assert engine.hit_counts() == [N]
    assert ghost in stale_groups(Tracefs().defined_events())
    run_cli("cleanup", check=True)


def test_tracefs_is_mounted_without_the_mount_program(tmp_path, tracefs):
    """Where tracefs is not mounted yet the engine mounts it with mount(2): no `mount` on PATH needed."""
    root = tmp_path / "tracing"
    root.mkdir()
    program = "import sys; from pathlib import Path; from uprobes.engines.kernel.tracefs import Tracefs; " \
              "Tracefs(Path(sys.argv[1]))"
    try:
        proc = subprocess.run([sys.executable, "-c", program, str(root)], env={**os.environ, "PATH": "/nonexistent"},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert (root / "uprobe_events").exists()
    finally:
        subprocess.run(["umount", str(root)], check=False)
    with pytest.raises(KernelEngineError) as info:
        Tracefs(tmp_path / "missing")
    assert str(info.value) == (f"tracefs is not usable at {tmp_path / 'missing'}: cannot mount it: No such file or "
                               f"directory; use --engine ptrace")


# N threads wait at a gate. Each line "spawn" on stdin starts one more; at "go" each calls getppid() K times, then
# N new threads do, and a forked child once more: the program knows every call, and nothing else in it calls
# getppid().
_GATED = """
import os, sys, threading
n, k = int(sys.argv[1]), int(sys.argv[2])
gate = threading.Event()
def work():
    gate.wait()
    for _ in range(k):
        os.getppid()
def start():
    threads.append(threading.Thread(target=work))
    threads[-1].start()
threads = []
for _ in range(n):
    start()
print("ready", flush=True)
while sys.stdin.readline() == "spawn\\n":
    start()
    print("spawned", flush=True)
gate.set()
for _ in range(n):
    start()
child = os.fork()
if child == 0:
    work()
    os._exit(0)
for thread in threads:
    thread.join()
os.waitpid(child, 0)
"""


def _gated(n: int, k: int) -> subprocess.Popen:
    target = subprocess.Popen([sys.executable, "-c", _GATED, str(n), str(k)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert target.stdout.readline() == "ready\n"
    assert len(os.listdir(f"/proc/{target.pid}/task")) > n
    return target


@pytest.mark.parametrize("follow", [True, False], ids=["follow", "no-follow"])
@pytest.mark.parametrize("command", ["count", "trace"])
def test_pid_mode_covers_the_threads_that_exist_and_those_that_come(command, follow):
    """-p on a process whose threads exist already: each of them, the threads started later and (unless
    --no-follow) the forked child are counted exactly, by the kernel's counters and event by event."""
    n, k = 4, 50
    target = _gated(n, k)
    try:
        tracer = _start_tracer(command, "--engine", "kernel", "--json", "-p", str(target.pid),
                               *(() if follow else ("--no-follow",)), "uprobe:libc:getppid")
        target.communicate("go\n", timeout=60)
        out, err = tracer.communicate(timeout=60)
    finally:
        target.kill()
    assert tracer.returncode == 0 and "Traceback" not in err, err
    records = [json.loads(line) for line in out.splitlines()]
    processes = 2 * n * k + (k if follow else 0)
    if command == "count":
        assert [r["hits"] for r in records] == [processes]
        return
    threads = Counter((r["pid"], r["tid"]) for r in records if "probe" in r)
    in_target = [tid for pid, tid in threads if pid == target.pid]
    assert len(in_target) == 2 * n and all(threads[target.pid, tid] == k for tid in in_target)
    assert sum(threads.values()) == processes and records[-1] == {"lost": 0}


@pytest.mark.parametrize("counting", [True, False], ids=["counters", "events"])
@pytest.mark.parametrize("listing", [1, 2], ids=["before-its-creator-is-covered", "after"])
def test_a_thread_started_while_attaching_is_counted_once(monkeypatch, listing, counting):
    """A thread started after the threads were listed has no events if its creator had none yet (it would be
    missed), and inherited copies of its creator's if it had (it would count twice with a set of its own). The
    reader sees a new thread, opens a fresh set on every thread and closes the first, copies and all."""
    n, k = 3, 20
    target = _gated(n, k)
    listings = []

    def threads_listing(pid: int) -> set[int]:
        listings.append(pid)
        threads = real_listing(pid)
        if len(listings) == listing:  # 1: before any event is open; 2: after every listed thread has its set
            target.stdin.write("spawn\n")
            target.stdin.flush()
            assert target.stdout.readline() == "spawned\n"
        return threads if listing == 1 else real_listing(pid)

    real_listing = perfbuf.thread_ids
    monkeypatch.setattr(perfbuf, "thread_ids", threads_listing)
    try:
        with KernelEngine() as engine:
            engine.attach(resolve_text("uprobe:libc:getppid"), target.pid, counting=counting)
            assert len(listings) == 3  # a second round, after which no thread was new
            target.communicate("go\n", timeout=60)
            hits = engine.hit_counts()[0] if counting else len(engine.poll(1.0) + engine.poll(0))
    finally:
        target.kill()
    assert hits == (2 * n + 1) * k + k


@pytest.mark.parametrize("command", ["count", "trace"])
def test_no_follow_keeps_the_threads_and_leaves_forked_children(targets, command):
    """--no-follow: the 4 threads of `recurse 3 4` each call fact() 1+2+3 times and main's fact(4) 4 more (28,
    as the ptrace engine counts); of `fork 3 5` only the parent's one call of handle() counts (with them: 16)."""
    lifecycle = targets / "lifecycle"

    def hits(probe: str, *argv: str, follow: bool = False) -> int:
        records, proc = run_json(command, "--engine", "kernel", *(() if follow else ("--no-follow",)),
                                 f"uprobe:{lifecycle}:{probe}", "--", str(lifecycle), *argv)
        assert proc.returncode == 0, proc.stderr
        return records[0]["hits"] if command == "count" else len(records) - 1

    assert hits("fact", "recurse", "3", "4") == 28
    assert hits("handle", "fork", "3", "5") == 1
    assert hits("handle", "fork", "3", "5", follow=True) == 16


def _instruction(path: str, address: int, mnemonic: str) -> int:
    """The address of the first instruction at or after ``address`` that objdump spells ``mnemonic``."""
    out = tool_output("objdump", "-d", f"--start-address={address:#x}", f"--stop-address={address + 64:#x}", path)
    return next(int(m[1], 16) for m in re.finditer(rf"^\s*([0-9a-f]+):\t[0-9a-f ]+\t{mnemonic}\b", out, re.M))


@pytest.mark.parametrize("scope", [("--", "{insns}"), ("-d", "1")], ids=["command", "system-wide"])
def test_an_instruction_the_kernel_refuses_is_refused_before_anything_is_defined(targets, tracefs, scope):
    """The kernel checks an instruction only when it first maps the file into a process, and then drops its
    refusal silently: with a command that has not started yet, or system-wide, the probe would never fire."""
    insns = targets / "insns-O2"
    atomics = resolve_text(f"uprobe:{insns}:atomics")[0]
    locked = _instruction(str(insns), atomics.address, "lock")
    scope = tuple(word.format(insns=insns) for word in scope)
    result = run_cli("count", "--engine", "kernel", f"uprobe:{insns}:{locked:#x}", *scope)
    assert result.status == 2 and result.stderr.count("\n") == 1, result.stderr
    assert re.fullmatch(rf"uprobes: error: the kernel cannot probe this instruction: lock cmpxchg %rdx,\S+ at "
                        rf"atomics\+{locked - atomics.address:#x} in {insns} \(lock prefix\); use --engine ptrace\n",
                        result.stderr), result.stderr
    assert f"{insns}:" not in (tracefs / "uprobe_events").read_text()


def test_a_refusal_in_a_process_that_maps_the_file_names_no_syscall(targets, tracefs):
    """Where a process maps the file already, perf_event_open reports the kernel's refusal (errno 524); the
    reason lists what the kernel refuses, which syscall is not: it takes that one (and then runs it wrongly)."""
    insns = targets / "insns-O2"
    locked = _instruction(str(insns), resolve_text(f"uprobe:{insns}:atomics")[0].address, "lock")
    getpid = resolve_text("uprobe:libc:getpid")[0]
    syscall = _instruction(getpid.path, getpid.address, "syscall")
    mapper = subprocess.Popen([sys.executable, "-c", "import mmap, sys; f = open(sys.argv[1], 'rb'); "
                               "m = mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_EXEC); "
                               "print(flush=True); sys.stdin.read()", str(insns)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    fs = Tracefs(tracefs)
    group = f"{GROUP_PREFIX}{os.getpid()}_1_0"
    events = [fs.define(f"p:{group}/locked {insns}:{locked:#x}", "locked"),
              fs.define(f"p:{group}/syscall {getpid.path}:{syscall:#x}", "syscall")]
    try:
        mapper.stdout.readline()  # it maps the file, and libc
        locked_id, syscall_id = map(fs.event_id, events)
        with pytest.raises(KernelEngineError) as info:
            TracepointReader([locked_id], mapper.pid, sampling=False, names={locked_id: "locked"})
        assert str(info.value) == ("locked: the kernel's uprobes refuse the instruction at this offset (a lock, es, "
                                   "cs, ss or ds prefix, int3, int N, in/out, hlt, ...)")
        TracepointReader([syscall_id], mapper.pid, sampling=False).close()
    finally:
        for event in events:
            fs.delete(event)
        mapper.kill()


def test_a_syscall_instruction_is_refused_before_it_kills_the_program(tracefs):
    """The kernel takes a probe on a syscall instruction, but the program dies of a SIGSEGV at its first hit
    (Linux 6.18): refused, like the instructions the kernel refuses itself (and the ptrace engine's too)."""
    getpid = resolve_text("uprobe:libc:getpid")[0]
    syscall = _instruction(getpid.path, getpid.address, "syscall")
    result = run_cli("count", "--engine", "kernel", f"uprobe:libc:{syscall:#x}", "--", sys.executable, "-c",
                     "import os; os.getpid()")
    assert result.status == 2 and result.stderr == (
        f"uprobes: error: the kernel cannot probe this instruction: syscall at getpid+{syscall - getpid.address:#x} in "
        f"{getpid.path} (syscall: the kernel steps it out of line, and the program dies of a SIGSEGV as it returns); "
        f"the ptrace engine cannot probe it either\n")


def test_a_second_and_third_signal_wait_for_every_probe_to_be_removed(tracefs):
    """Removing many uprobe events takes seconds (an RCU grace period each): the run says so, and a Ctrl-C and a
    SIGTERM that come meanwhile wait until every definition is gone. (Probes whose arguments differ in name
    are events of their own.)"""
    python = "/usr/bin/python3.11"
    functions = resolve_text(f"uprobe:{python}:_PyUnicode_*")
    assert len(functions) > 50
    sleeper = subprocess.Popen([python, "-c", "import time; time.sleep(120)"])
    try:
        tracer = _start_tracer("trace", "--engine", "kernel", "--json", "-p", str(sleeper.pid),
                               *(f"p {python}:{p.offset:#x} a{i}=%di" for i, p in enumerate(functions)))
        tracer.send_signal(signal.SIGINT)
        line = tracer.stderr.readline()
        assert re.fullmatch(r"uprobes: removing \d+ kernel probes\.\.\.\n", line), line
        tracer.send_signal(signal.SIGINT)
        tracer.send_signal(signal.SIGTERM)
        _, err = tracer.communicate(timeout=120)
    finally:
        sleeper.kill()
    assert "Traceback" not in err and tracer.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM), err
    # nothing_left_behind checks that every definition went


_RENAMED = """
import ctypes, os
libc = ctypes.CDLL(None)
for name in (b"first", b"second", b"first"):
    libc.prctl(15, name, 0, 0, 0)  # PR_SET_NAME
    for _ in range(3):
        parent = os.getppid()
print(parent)
"""


def test_records_read_in_columns_keep_their_order_and_each_ones_thread_name():
    """A thread that renames itself between hits: trace reads the kernel's records as arrays, grouped by probe,
    thread and name, and writes them back in the order they happened, each with the name the thread had (and
    a return probe's, its return value); beside a probe whose records are read one by one (a string
    argument), in one time order."""
    records, proc = _trace_json("uprobe:libc:getppid", "uprobe:libc:prctl option=%di:s32 name=+0(%si):string",
                                "uretprobe:libc:getppid", "--", sys.executable, "-c", _RENAMED)
    assert proc.returncode == 0
    parent = int(proc.stdout.splitlines()[-1])
    returns = [r for r in records if r.get("probe") == "getppid%return"]
    assert [r["retval"] for r in returns] == [parent] * 9
    events = [(r["probe"], r["comm"], r["args"].get("name")) for r in records if "probe" in r
              and (r["probe"] == "getppid" or r["probe"] == "prctl" and r["args"]["option"] == 15)]
    started = Path(sys.executable).name[:15]  # the name exec gave it
    assert events == [(probe, comm, name) for comm, renamed in ((started, "first"), ("first", "second"),
                                                                ("second", "first"))
                      for probe, comm, name in [("prctl", comm, renamed)] + [("getppid", renamed, None)] * 3]
    times = [r["ts_ns"] for r in records if "probe" in r]
    assert times == sorted(times) and records[-1] == {"lost": 0}

"""The kernel engine end to end: real probes on real processes, checked event by event and against the
kernel's own hit counts. Every test leaves uprobe_events without a line of ours."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from pathlib import Path

from conftest import error_as_nobody, run_cli, run_json
from uprobes.engines.kernel.engine import KernelEngine
from uprobes.engines.kernel.tracefs import Tracefs, stale_groups
from uprobes.errors import KernelEngineError
from uprobes.probes.resolve import resolve_text
from uprobes.proc.launch import HeldCommand

N = 25

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the kernel engine needs root")


@pytest.fixture(autouse=True)
def nothing_left_behind(tracefs):
    """After every test, no run that has ended left an event of its group in uprobe_events (runs still going,
    of other test sessions on this machine, may own groups of their own)."""
    yield
    assert stale_groups(Tracefs().defined_events()) == []


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


@pytest.mark.parametrize("counting", [False, True], ids=["events", "counters"])
def test_counts_agree_with_the_kernels_uprobe_profile(targets, counting):
    calls, lib = targets / "calls", targets / "libprobed.so"
    probes = [p for text in (f"uprobe:{calls}:work", f"uretprobe:{calls}:work", f"usdt:{calls}:calls:step",
                             f"uprobe:{lib}:lib_twice") for p in resolve_text(text)]
    with KernelEngine() as engine:
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
        profile = engine.tracefs.hit_counts()
        kernel = [profile[(p.path, e.event)] for p, e in zip(probes, engine._defined)]
    assert hits == kernel == [N, N, N, N]


def test_count_command_reports_hits_per_probe_point(targets):
    calls = targets / "calls"
    result = run_cli("count", "--json", "-c", f"{calls} {N}", f"uprobe:{calls}:work", f"usdt:{calls}:calls:step",
                     f"uretprobe:{calls}:work", check=True)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {(r["probe"], r["hits"]) for r in records} == {("work", N), ("calls:step", N), ("work%return", N)}
    work = next(r for r in records if r["probe"] == "work")
    assert work["path"] == str(calls) and work["offset"] == resolve_text(f"uprobe:{calls}:work")[0].offset


def test_count_reports_along_the_way_and_loses_nothing_at_the_end(targets):
    calls = targets / "calls"
    result = run_cli("count", "--json", "--interval", "0.3", f"uprobe:{calls}:work", "--", str(calls), "30", "20",
                     check=True)
    reports = [json.loads(line)["hits"] for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) >= 2 and reports == sorted(reports)  # interval reports, then the final one
    assert reports[-1] == 30


def test_a_fetch_argument_cannot_smuggle_a_second_definition(targets):
    result = run_cli("trace", "-d", "1", f"p:grp/ev {targets / 'calls'}:work\n-:grp/other")
    assert result.status == 2 and "bad fetch argument '-:grp/other'" in result.stderr


def _start_tracer(*args: str) -> subprocess.Popen:
    """``uprobes ARGS`` in the background, returned once it says its probes are attached."""
    proc = subprocess.Popen([sys.executable, "-m", "uprobes", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert "probe points attached" in line, line + proc.stderr.read()
    return proc


def test_system_wide_mode_catches_processes_started_later(targets):
    calls = targets / "calls"
    tracer = _start_tracer("trace", "--json", "-d", "30", f"uprobe:{calls}:work i=%di:s32")
    first = subprocess.run([str(calls), "3"], capture_output=True)
    second = subprocess.Popen([str(calls), "4"], stdout=subprocess.DEVNULL)
    second.wait()
    time.sleep(0.3)
    tracer.send_signal(signal.SIGINT)
    out, err = tracer.communicate(timeout=30)
    assert "Traceback" not in err
    events = [json.loads(line) for line in out.splitlines()]
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
        records, proc = _trace_json("-p", str(mine.pid), "-d", "1.5", f"uprobe:{calls}:work")
        assert proc.returncode == 0
        pids = {r["pid"] for r in records if "probe" in r}
        assert pids == {mine.pid}
        assert len(records) > 10
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()


def test_detach_leaves_the_semaphore_at_zero(targets):
    calls = targets / "calls"
    target = subprocess.Popen([str(calls), "300", "10"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        records, proc = _trace_json("-p", str(target.pid), "-d", "1", f"usdt:{calls}:calls:step")
        assert proc.returncode == 0 and len(records) > 10
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
    assert (Path(tracefs) / "uprobe_events").read_text() == before
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
    assert (Path(tracefs) / "uprobe_events").read_text() == before


def test_system_wide_tracing_with_the_ptrace_engine_is_refused_clearly(targets):
    result = run_cli("trace", "--engine", "ptrace", "-d", "1", f"uprobe:{targets / 'calls'}:work")
    assert result.status == 2 and "system-wide tracing needs the kernel engine" in result.stderr


def test_not_root_suggests_the_ptrace_engine():
    message = error_as_nobody(Tracefs)
    assert "needs root" in message and "--engine ptrace" in message


def test_cleanup_removes_groups_of_runs_that_died(tracefs):
    dead = subprocess.Popen(["true"])
    dead.wait()
    fd = os.open(tracefs / "uprobe_events", os.O_WRONLY | os.O_APPEND)
    os.write(fd, f"p:uprobes_{dead.pid}/left_behind /bin/true:0x10\n".encode())
    os.close(fd)
    result = run_cli("cleanup", check=True)
    assert re.match(r"removed \d+ events of \d+ finished runs", result.stdout)
    assert f"uprobes_{dead.pid}/" not in (tracefs / "uprobe_events").read_text()

"""Probes across a program's life, on both engines with equal results: libraries loaded later (their
constructors included), dlclose, fork, vfork, exec, return probes through recursion, longjmp and C++
exceptions, and latency."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import run_cli, run_json

ENGINES = ["kernel", "ptrace"]
# Return probes: the ptrace engine's jump path (returns through a trampoline, no stop) and its trap path
RETURN_ENGINES = ENGINES + ["ptrace-trap"]


def _run(engine: str, command_name: str, probes: list[str], command: list[str], *options: str):
    if engine == "ptrace-trap":
        engine, options = "ptrace", ("--trap", *options)
    return run_json(command_name, "--engine", engine, *options, *probes, "--", *command, timeout=120)


def _hits(records) -> dict[str, int]:
    return {r["probe"]: r["hits"] for r in records}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_library_loaded_later_is_probed_before_its_constructor_runs(targets, engine):
    lifecycle, lib = targets / "lifecycle", targets / "libctor.so"
    records, proc = _run(engine, "count", [f"uprobe:{lib}:lib_ctor", f"uprobe:{lib}:lib_work"],
                         [str(lifecycle), "dlopen", str(lib), "3"])
    assert proc.stdout == "dlopen sum 12\n" and proc.returncode == 0
    assert _hits(records) == {"lib_ctor": 2, "lib_work": 6}  # two dlopen/dlclose rounds


@pytest.mark.parametrize("engine", ENGINES)
def test_a_probed_load_that_faults_is_delivered_at_its_own_address(targets, engine):
    """The handler sees the fault at the load itself (not in our out-of-line area), opens the page and the
    load runs again: the program's result is unchanged and the probe counts both attempts, as the kernel's."""
    lifecycle = targets / "lifecycle"
    records, proc = _run(engine, "count", [f"uprobe:{lifecycle}:load"], [str(lifecycle), "fault"])
    assert proc.returncode == 0 and proc.stdout == "fault load 1 faults 1 at the load\n"
    assert _hits(records) == {"load": 2}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_forking_server_reports_each_child_with_its_pid(targets, engine):
    lifecycle = targets / "lifecycle"
    records, proc = _run(engine, "trace", [f"uprobe:{lifecycle}:handle who=%di:s64 j=%si:s64"],
                         [str(lifecycle), "fork", "3", "4"])
    assert proc.returncode == 0
    children = {int(m[1]): int(m[2]) for m in re.finditer(r"child (\d+) pid (\d+) sum", proc.stdout)}
    events = [r for r in records if "probe" in r]
    for child, pid in children.items():
        assert [e["args"]["j"] for e in events if e["pid"] == pid] == [0, 1, 2, 3]
        assert {e["args"]["who"] for e in events if e["pid"] == pid} == {child}
    assert len(events) == 13  # 3 children x 4 calls, and the parent's one


@pytest.mark.parametrize("engine", ENGINES)
def test_no_follow_leaves_children_alone_and_alive(targets, engine):
    lifecycle = targets / "lifecycle"
    records, proc = _run(engine, "count", [f"uprobe:{lifecycle}:handle"], [str(lifecycle), "fork", "3", "4"],
                         "--no-follow")
    assert proc.returncode == 0 and "parent -100 exits 3" in proc.stdout
    assert len(re.findall(r"child \d pid \d+ sum", proc.stdout)) == 3
    assert _hits(records) == {"handle": 1}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("follow", [True, False], ids=["follow", "no-follow"])
def test_children_that_outlive_their_parent_and_the_tool_run_untouched(targets, engine, follow):
    """The tool ends with the command it launched; children forked just before are let go, not killed, and
    each finds its own code byte-identical to the file a second later."""
    lifecycle = targets / "lifecycle"
    records, proc = _run(engine, "count", [f"uprobe:{lifecycle}:handle"], [str(lifecycle), "orphans", "3"],
                         *([] if follow else ["--no-follow"]))
    assert proc.returncode == 0 and "parent handle -100" in proc.stdout
    assert sorted(re.findall(r"orphan \d handle \d+ \w+", proc.stdout)) == [
        f"orphan {c} handle {c * 100} clean" for c in range(3)]
    assert _hits(records) == {"handle": 1}  # the parent's; the children call handle after the tool is gone


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("follow", [True, False], ids=["follow", "no-follow"])
def test_children_made_by_clone_vm_share_the_probes_of_their_parent(targets, engine, follow):
    """clone(CLONE_VM) without CLONE_THREAD: a process of its own in its parent's memory. Followed, its hits are
    reported; not followed, they are not, and the parent's probes are not taken out of the shared memory."""
    lifecycle = targets / "lifecycle"
    records, proc = _run(engine, "count", [f"uprobe:{lifecycle}:handle"], [str(lifecycle), "clonevm", "3"],
                         *([] if follow else ["--no-follow"]))
    match = re.fullmatch(r"clonevm sum 303 handle -100 areas (\d)\n", proc.stdout)
    assert proc.returncode == 0 and match, proc.stdout
    assert int(match[1]) <= (1 if engine == "ptrace" else 0)  # one out-of-line area at most, never one per child
    assert _hits(records) == {"handle": 4 if follow else 1}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_library_loaded_after_attaching_to_a_running_process(targets, engine):
    lifecycle, lib = targets / "lifecycle", targets / "libctor.so"
    target = subprocess.Popen([str(lifecycle), "later", str(lib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    out = f"/tmp/uprobes-test-{os.getpid()}-later.jsonl"
    try:
        tracer = subprocess.Popen([sys.executable, "-m", "uprobes", "count", "--engine", engine, "--json", "-o",
                                   out, "-p", str(target.pid), f"uprobe:{lib}:lib_ctor", f"uprobe:{lib}:lib_work"],
                                  stderr=subprocess.PIPE, text=True)
        assert "attached" in tracer.stderr.readline()
        assert target.communicate("go\n", timeout=60)[0] == "later sum 6\n"
        _, err = tracer.communicate(timeout=60)
        assert tracer.returncode == 0 and "Traceback" not in err and "never mapped" not in err
        with open(out) as f:
            assert _hits(json.loads(line) for line in f) == {"lib_ctor": 1, "lib_work": 3}
    finally:
        target.kill()
        target.wait()
        if os.path.exists(out):
            os.unlink(out)


@pytest.mark.parametrize("engine", ENGINES)
def test_vfork_then_exec_of_another_probed_program(targets, engine):
    lifecycle, calls = targets / "lifecycle", targets / "calls"
    records, proc = _run(engine, "count", [f"uprobe:{lifecycle}:handle", f"uprobe:{calls}:work"],
                         [str(lifecycle), "vfork", str(calls), "3"])
    assert proc.returncode == 0 and "vfork child" in proc.stdout and "calls 3 sum" in proc.stdout
    assert _hits(records) == {"handle": 2, "work": 3}


@pytest.mark.parametrize("placement", ["jumps", "traps"])
def test_attach_and_detach_again_and_again_while_the_process_vforks_in_a_loop(targets, placement):
    """Each vfork child calls handle() and exits, so a detach often meets a parent at its vfork event, or
    waiting in the kernel for a child the tool holds stopped. Before 2026-12-06 a system call the tool made the
    target run at detach (unmapping its area) could go through such a parent: run on, it waited for its child,
    which the tool held, and the tool waited for it, for good; and stopping the world waited for that parent
    until its 10 s bound. The guard here is the run's timeout, not a time limit."""
    lifecycle = str(targets / "lifecycle")
    # it vforks until told to stop: six rounds of a tool starting, attaching and detaching outlast any fixed time
    target = subprocess.Popen([lifecycle, "vforks", "300"], stdout=subprocess.PIPE, text=True)
    try:
        options = ["--trap"] if placement == "traps" else []
        for _ in range(6):
            result = subprocess.run([sys.executable, "-m", "uprobes", "count", "--engine", "ptrace", "--json",
                                     *options, "-p", str(target.pid), "-d", "0.3", f"uprobe:{lifecycle}:handle"],
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
            assert json.loads(result.stdout.splitlines()[-1])["hits"] > 0
        target.terminate()
        assert target.communicate(timeout=60)[0] == "vforks abnormal 0 of some\n"
        assert target.returncode == 0
    finally:
        target.kill()
        target.wait()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_program_that_execs_itself(targets, engine):
    lifecycle = targets / "lifecycle"
    records, proc = _run(engine, "trace", [f"uprobe:{lifecycle}:handle n=%di:s64"], [str(lifecycle), "exec", "3"])
    assert proc.returncode == 0
    assert [r["args"]["n"] for r in records if "probe" in r] == [3, 2, 1, 0]
    assert len({r["pid"] for r in records if "probe" in r}) == 1


@pytest.mark.parametrize("engine", RETURN_ENGINES)
def test_tail_calls_return_once_through_their_callers_frame(targets, engine):
    """tail_f jumps to tail_g, acc jumps to itself: the return probes of the chain all fire at the one return,
    innermost first, with the value it returns."""
    lifecycle = targets / "lifecycle"
    probes = [f"uretprobe:{lifecycle}:{name}" for name in ("tail_f", "tail_g", "tail_h", "acc")]
    records, proc = _run(engine, "trace", probes, [str(lifecycle), "tail", "4"])
    assert proc.returncode == 0 and proc.stdout == "tail f 15 h 16 acc 10\n"
    returns = [(r["probe"], r["retval"]) for r in records if "probe" in r]
    assert returns == [("tail_g%return", 15), ("tail_f%return", 15), ("tail_g%return", 15),
                       ("tail_f%return", 15), ("tail_h%return", 16)] + [("acc%return", 10)] * 5


@pytest.mark.parametrize("engine", RETURN_ENGINES)
def test_return_values_of_recursion_from_eight_threads_and_a_longjmp(targets, engine):
    lifecycle = targets / "lifecycle"
    records, proc = _run(engine, "trace", [f"uretprobe:{lifecycle}:fact", f"uretprobe:{lifecycle}:deep"],
                         [str(lifecycle), "recurse", "6", "8"])
    assert proc.returncode == 0
    assert proc.stdout == f"recurse total {8 * sum(_fact(i) for i in range(1, 7))} after longjmp 24\n"
    events = [r for r in records if "probe" in r]
    # every thread's returns, innermost first: fact(1)=1 (six times), 2, 6, 24, 120, 720...
    by_thread: dict[int, list[int]] = {}
    for e in events:
        if e["probe"] == "fact%return":
            by_thread.setdefault(e["tid"], []).append(e["retval"])
    expected = [_fact(k) for n in range(1, 7) for k in range(1, n + 1)]
    assert sorted(by_thread.values()) == [expected] * 8 + [[1, 2, 6, 24]]  # 8 threads, then main's fact(4)
    assert not [e for e in events if e["probe"] == "deep%return"]  # left by longjmp: no return to report
    assert records[-1] == {"lost": 0}


@pytest.mark.parametrize("engine", RETURN_ENGINES)
def test_a_function_that_forks_returns_in_both_processes(targets, engine):
    """spawn() forks with its return pending: the child returns through its own copy of it (spawn returns
    1000 + c there), or, not followed, to the address the program wrote, which it finds back in its stack."""
    lifecycle = str(targets / "lifecycle")
    untraced = subprocess.run([lifecycle, "forkret", "3"], capture_output=True, text=True, timeout=30)
    for options in ([], ["--no-follow"]) if engine != "kernel" else ([],):
        records, proc = _run(engine, "trace", [f"uretprobe:{lifecycle}:spawn"], [lifecycle, "forkret", "3"], *options)
        assert proc.returncode == 0, proc.stderr
        assert sorted(proc.stdout.splitlines()) == sorted(untraced.stdout.splitlines())
        events = [r for r in records if "probe" in r]
        parent = {e["pid"] for e in events if e["retval"] < 1000}
        assert sorted(e["retval"] for e in events if e["pid"] in parent) == [0, 1, 2] and len(parent) == 1
        children = {e["pid"]: e["retval"] for e in events if e["pid"] not in parent}
        assert sorted(children.values()) == ([] if options else [1000, 1001, 1002])


@pytest.mark.parametrize("engine", ["ptrace", "ptrace-trap"])
def test_returns_come_back_on_the_stack_of_a_coroutine_that_switched_away(targets, engine):
    """main and a coroutine (its stack in .bss, below main's) switch to each other from inside hop(): each
    return finds the other stack's pending return on top, sets it aside, and the other's comes back later."""
    lifecycle = str(targets / "lifecycle")
    records, proc = _run(engine, "trace", [f"uretprobe:{lifecycle}:hop"], [lifecycle, "coroutines", "50"])
    assert proc.returncode == 0 and proc.stdout == f"coroutines main {10 * sum(range(50))} coroutine " \
        f"{10 * sum(range(1000, 1050))}\n", proc.stderr
    assert [r["retval"] for r in records if "probe" in r] == [v for i in range(50) for v in (10 * i, 10 * (1000 + i))]
    assert "skipped" not in proc.stderr


def _fact(n: int) -> int:
    return 1 if n <= 1 else n * _fact(n - 1)


@pytest.mark.parametrize("engine", ["ptrace", "ptrace-trap"])
def test_a_cxx_exception_through_probed_frames(targets, engine):
    cxx = targets / "cxxthrow"
    probes = [f"uretprobe:{cxx}:_Z5innerl", f"uretprobe:{cxx}:_Z5outerl"]
    records, proc = _run(engine, "trace", probes, [str(cxx)])
    assert proc.returncode == 0 and proc.stdout == "sum 1125\n"
    returns = [(r["probe"], r["retval"]) for r in records if "probe" in r]
    assert returns == [(name, value) for n in (0, 1, 2, 4, 5)
                       for name, value in (("_Z5innerl%return", 10 * n), ("_Z5outerl%return", 10 * n + 1))]


@pytest.mark.parametrize("engine", ["ptrace", "ptrace-trap"])
def test_a_cxx_exception_caught_inside_probed_frames_leaves_them_probed(targets, engine):
    """risky() throws for odd numbers and guarded() catches: only risky's frame is unwound (its return is
    counted as skipped); guarded and total go on returning through the trampoline."""
    cxx = targets / "cxxthrow"
    probes = [f"uretprobe:{cxx}:{name}" for name in ("_Z5riskyl", "_Z7guardedl", "_Z5totall")]
    records, proc = _run(engine, "trace", probes, [str(cxx), "caught"])
    assert proc.returncode == 0 and proc.stdout == "total 20\n"
    returns = [(r["probe"].split("%")[0][3:-1], r["retval"]) for r in records if "probe" in r]
    assert returns == [("risky", 0), ("guarded", 0), ("guarded", -1), ("risky", 2), ("guarded", 2),
                       ("guarded", -3), ("risky", 4), ("guarded", 4), ("total", 20)]
    assert "2 return probes skipped" in proc.stderr


def test_the_kernels_uretprobes_break_a_cxx_exception_that_ours_survive(targets):
    """Why the kernel engine puts return probes on the exits of functions in objects that link the C++
    unwinder (tests/test_return_modes.py): asked to replace the return address instead, the unwinder cannot
    pass the kernel's trampoline and std::terminate runs."""
    cxx = targets / "cxxthrow"
    _, proc = _run("kernel", "count", [f"uretprobe:{cxx}:_Z5innerl"], [str(cxx)], "--return-mode", "stack")
    assert proc.returncode != 0 and "terminate called" in proc.stderr
    records, proc = _run("kernel", "count", [f"uretprobe:{cxx}:_Z5innerl"], [str(cxx)])
    assert proc.returncode == 0 and proc.stdout == "sum 1125\n" and [r["hits"] for r in records] == [5]


@pytest.mark.parametrize("engine", RETURN_ENGINES)
def test_latency_histogram_counts_every_call(targets, engine):
    lifecycle = targets / "lifecycle"
    records, proc = _run(engine, "latency", [f"uprobe:{lifecycle}:fact"], [str(lifecycle), "recurse", "6", "2"])
    (report,) = records
    assert report["count"] == 2 * 21 + 4  # fact(1..6) from two threads, and fact(4)
    assert sum(b["count"] for b in report["buckets"]) == report["count"]
    assert report["min_ns"] <= report["p50_ns"] <= report["p99_ns"] <= report["max_ns"]
    assert ("engine_ns" in report) == engine.startswith("ptrace")
    text = run_cli("latency", "--engine", engine.removesuffix("-trap"), f"uprobe:{lifecycle}:fact", "--",
                   str(lifecycle), "recurse", "3", "1", check=True).stdout
    duration = r"\d+(\.\d+)?(ns|µs|ms|s)"
    assert re.search(rf"count 10  min {duration}  mean {duration}  p50 {duration}  p99 {duration}  max {duration}$",
                     text, re.M), text
    assert re.search(rf"^\[{duration}, {duration}\) +\d+ \|@", text, re.M), text


@pytest.mark.parametrize("trap", [False, True], ids=["jump", "trap"])
def test_latency_says_what_the_ptrace_engine_adds_to_each_call(targets, trap):
    """The engine's own time per call, measured on a call that does nothing timed the same way, is printed
    beside the figures (and in JSON)."""
    calls = targets / "calls"
    records, proc = _run("ptrace-trap" if trap else "ptrace", "latency", [f"uprobe:{calls}:work"], [str(calls), "50"])
    (report,) = records
    assert report["count"] == 50 and 0 < report["engine_ns"], report
    assert ("2 of 2 probe points were jumps" in proc.stderr) != trap, proc.stderr
    text = run_cli("latency", "--engine", "ptrace", *(["--trap"] if trap else []), f"uprobe:{calls}:work", "--",
                   str(calls), "5", check=True).stdout
    assert re.search(r"^each time includes the engine's own, about \S+ \(a call that does nothing, timed the same "
                     r"way\)$", text, re.M), text


@pytest.mark.parametrize("engine", ENGINES)
def test_latency_counts_every_call_or_says_events_were_lost(targets, engine):
    calls = targets / "calls"
    records, proc = _run(engine, "latency", [f"uprobe:{calls}:work"], [str(calls), "20000"])
    (report,) = records
    assert proc.returncode == 0 and proc.stdout.startswith("calls 20000 ")
    if report.get("lost"):
        assert report["count"] < 20000 and f"{report['lost']} events were lost" in proc.stderr
    else:
        assert report["count"] == 20000 and "lost" not in proc.stderr


def test_a_return_probe_must_start_at_a_function_entry(targets):
    result = run_cli("latency", f"uprobe:{targets / 'lifecycle'}:fact+5", "--", str(targets / "calls"))
    assert result.status == 2 and "from its first instruction, not fact+0x5" in result.stderr
    result = run_cli("trace", f"uretprobe:{targets / 'lifecycle'}:fact+5", "--", str(targets / "calls"))
    assert result.status == 2 and "a return probe goes on a function's entry" in result.stderr


def test_a_probe_whose_object_never_loads_is_reported_not_an_error(targets):
    result = run_cli("count", "--engine", "ptrace", f"uprobe:{targets / 'calls'}:work",
                     f"uprobe:{targets / 'libctor.so'}:lib_work", "--", str(targets / "calls"), "2", check=True)
    assert f"never mapped: lib_work ({targets / 'libctor.so'})" in result.stderr
    assert re.search(r"work\s+2\s", result.stdout) and re.search(r"lib_work\s+0\s", result.stdout)

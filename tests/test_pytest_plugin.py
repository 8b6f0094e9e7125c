"""The pytest plugin (``uprobes.testing``): the ``uprobes`` fixture run by pytest itself (``pytester``), on a
real C program, libc functions of a real command and a USDT marker of python3.11, with failing assertions whose
messages are checked as pytest reports them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).parent.parent


@pytest.fixture
def suite(pytester, targets):
    """A test file written for pytester, with CALLS (the calls target) and PYTHON at hand."""
    def write(source: str):
        header = f"CALLS = {str(targets / 'calls')!r}\nPYTHON = '/usr/bin/python3.11'\n"
        return pytester.makepyfile(header + source)
    return write


def test_a_run_gives_status_output_counts_and_hits(suite, pytester):
    suite('''
def test_work(uprobes):
    run = uprobes.run([CALLS, "5"], f"uprobe:{CALLS}:work i=%di:s32 label=+0(%dx):string",
                      f"uretprobe:{CALLS}:work")
    assert run.status == 0 and run.stdout == b"calls 5 sum 60 guarded 0\\n" and run.stderr == b""
    assert run.count("work") == 5 and run.count("work%return") == 5 and run.count("work*") == 10
    assert [hit.args for hit in run.hits("work")] == [{"i": i, "label": f"s{i}"} for i in range(5)]
    assert [hit.retval for hit in run.hits("work%return")] == [3 * i + 2 for i in range(5)]
    assert all(hit.tid == hit.pid and hit.comm == "calls" for hit in run.hits())
    run.assert_called("work", times=5)
    run.assert_called("work", with_args={"i": 3}, times=1)
    run.assert_not_called("lib_twice")
    run.assert_order("work", "work%return")

def test_libc_of_a_command(uprobes):
    run = uprobes.run(["ls", "/"], "uprobe:libc:opendir", "uprobe:libc:closedir")
    assert run.status == 0 and b"usr" in run.stdout.split()
    run.assert_called("opendir")
    run.assert_order("opendir", "closedir")

def test_a_python_marker(uprobes):
    run = uprobes.run([PYTHON, "-c", "import json"],
                      f"usdt:{PYTHON}:python:import__find__load__start module=arg0:string")
    run.assert_called("python:import__find__load__start", with_args={"module": "json"}, times=1)
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_failing_assertions_name_the_probe_what_was_expected_and_the_hits(suite, pytester):
    suite('''
def test_times(uprobes):
    uprobes.run([CALLS, "7"], f"uprobe:{CALLS}:work i=%di:s32").assert_called("work", times=3)

def test_with_args(uprobes):
    uprobes.run([CALLS, "2"], f"uprobe:{CALLS}:work i=%di:s32").assert_called("work", with_args={"i": 9})

def test_not_called(uprobes):
    uprobes.run([CALLS, "1"], f"uprobe:{CALLS}:work i=%di:s32").assert_not_called("work")

def test_order(uprobes):
    uprobes.run([CALLS, "1"], f"uprobe:{CALLS}:work", f"uretprobe:{CALLS}:work").assert_order("work%return", "work")
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines([
        "*AssertionError: work was expected to be hit 3 times, and was hit 7 times; the hits seen:",
        "*  work (tid *) i=0",
        "*  ... and 2 more",
        "*AssertionError: work was expected to be hit at least once with i=9, and was hit 0 times so; the hits seen:",
        "*  work (tid *) i=1",
        "*AssertionError: work was expected not to be hit, and was hit 1 time; the hits seen:",
        "*AssertionError: work was expected after work%return in thread *, and came before it; the hits seen:",
        "*  work%return (tid *) retval=2",
    ])


def test_a_process_the_test_started_is_attached_to(suite, pytester):
    suite('''
import subprocess, time

def test_attach(uprobes):
    child = subprocess.Popen(["sh", "-c", f"read line && exec {CALLS} 3"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL)
    with uprobes.attach(child.pid, f"uprobe:{CALLS}:work i=%di:s32") as run:
        child.stdin.write(b"go\\n")
        child.stdin.close()
        assert child.wait() == 0
    assert run.status is None
    assert [hit.args["i"] for hit in run.hits("work")] == [0, 1, 2]
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_kernel_engine_is_asked_for_with_a_marker(suite, pytester):
    suite('''
import pytest

@pytest.mark.uprobes(engine="kernel")
def test_kernel(uprobes):
    assert uprobes.engine == "kernel"
    run = uprobes.run([CALLS, "4"], f"uprobe:{CALLS}:work i=%di:s32")
    assert [hit.args["i"] for hit in run.hits("work")] == [0, 1, 2, 3]
    assert any("kernel engine" in message for message in run.messages)
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(**({"passed": 1} if os.geteuid() == 0 else {"skipped": 1}))


def test_a_bad_probe_is_the_tool_s_one_line_error(suite, pytester):
    suite('''
def test_bad(uprobes):
    uprobes.run([CALLS, "1"], f"uprobe:{CALLS}:wrok")
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*RuntimeError: uprobes: error: probe 'uprobe:*calls:wrok': no function matches "
                                 "'wrok' in *calls; closest: work*"])


def test_the_example_suite_passes_as_a_user_runs_it():
    """``pytest examples/``, from the project's root, in a pytest of its own."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "examples/"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout + proc.stderr


def test_tests_are_skipped_where_ptrace_is_refused(pytester, targets):
    """Under a seccomp filter that refuses ptrace (as a sandbox's does), a test using the fixture is skipped
    with the reason, not failed; one that does not use it runs."""
    pytester.makepyfile('''
def test_probed(uprobes):
    raise AssertionError("never run")

def test_plain():
    assert True
''')
    proc = subprocess.run([str(targets / "noptrace"), sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs",
                           str(pytester.path)], capture_output=True, text=True, timeout=120, cwd=pytester.path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped" in proc.stdout
    assert "ptrace is not allowed here (a security policy refuses PTRACE_TRACEME)" in proc.stdout

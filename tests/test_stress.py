"""Long runs, behind `make stress` (not part of `make test`): many hits, many threads, repeated attach."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import run_cli, run_json

pytestmark = pytest.mark.stress


def test_eight_threads_times_100000_calls_give_exactly_800000_hits(targets):
    command = [str(targets / "threads"), "8", "100000"]
    expected = subprocess.run(command, capture_output=True, text=True).stdout
    result = run_cli("count", "--engine", "ptrace", "--json", f"uprobe:{targets / 'threads'}:hit", "--", *command,
                     check=True)
    lines = result.stdout.splitlines()
    assert expected in result.stdout
    assert json.loads(lines[-1])["hits"] == 800_000


def test_attach_and_detach_twenty_times_while_threads_run(targets):
    command = [str(targets / "threads"), "8", "60000", "500"]  # outlives 20 attach cycles on a loaded machine
    target = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(20):
            result = run_cli("count", "--engine", "ptrace", "--json", "-p", str(target.pid), "-d", "0.3",
                             f"uprobe:{targets / 'threads'}:hit", f"uprobe:{targets / 'threads'}:hit+4")
            assert result.status == 0, result.stderr
            time.sleep(0.05)
        out, _ = target.communicate(timeout=120)
        assert target.returncode == 0
        expected = subprocess.run([str(targets / "threads"), "8", "60000"], capture_output=True, text=True).stdout
        assert out == expected
    finally:
        target.kill()
        target.wait()


def test_four_threads_stepping_while_the_process_is_stopped_and_continued_twenty_times(targets):
    """Job control (Ctrl-Z, fg) while threads single-step a rip-relative probe: each of 20 SIGSTOP/SIGCONT cycles
    comes while the program runs; every call runs its instruction once and is counted once."""
    from test_ptrace_thread_faults import stop_and_continue

    threads, calls = 4, 50_000
    untraced = subprocess.run([str(targets / "thread_faults"), "stopcont", str(threads), str(calls)],
                              capture_output=True, text=True)
    assert untraced.returncode == 0
    cycles, status, stdout, _, hits = stop_and_continue(targets, threads, calls, cycles=20, pause=0.05, required=20)
    assert (status, stdout) == (0, untraced.stdout)
    assert hits == {f"bump{t}": calls for t in range(threads)}


def test_four_threads_writing_a_ring_that_never_fills_lose_nothing_in_100_runs(targets):
    """60,000 records in a ring of 131,072 slots: none may be counted lost. A writer that loaded the ring's head
    just before the others and the reader moved past it saw head - tail below zero, compared unsigned, and
    called the ring full (1 run in 20 here; a CI run of test_jump_records failed on it)."""
    program, n = str(targets / "jumps"), 15_000
    for run in range(100):
        records, proc = run_json("trace", "--engine", "ptrace", f"uprobe:{program}:jump_entry x=%di:s64", "--",
                                 program, "threads", "4", str(n))
        assert proc.returncode == 0, proc.stderr
        assert [r["lost"] for r in records if "lost" in r] in ([], [0]), f"run {run}: {proc.stderr}"
        assert sum("probe" in r for r in records) == 4 * n

"""Target faults and load under the ptrace engine (tests/targets/faults.c): a crash, an exit and an exec while
other threads are mid-step, thousands of short-lived threads, more threads than out-of-line slots, and a long
run whose memory must stay flat. The probe is a rip-relative load: always single-stepped out of line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli


def _count(targets: Path, *command: str) -> tuple[int, object]:
    faults = str(targets / "faults")
    result = run_cli("count", "--engine", "ptrace", "--json", f"uprobe:{faults}:stepped", "--", faults, *command)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"probe"')]
    return sum(r["hits"] for r in records), result


def _untraced(targets: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(targets / "faults"), *command], capture_output=True, text=True, timeout=60)


def _no_process_left(pid_hint: str) -> bool:
    return not any(pid_hint in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
                   for p in os.listdir("/proc") if p.isdigit() and Path(f"/proc/{p}/cmdline").exists())


def test_a_crash_while_threads_step_is_reported_with_the_targets_status(targets):
    hits, result = _count(targets, "crash", "4", "2000")
    assert result.status == 128 + signal.SIGSEGV
    assert "the command was killed by SIGSEGV (Segmentation fault)" in result.stderr
    assert hits >= 2000
    assert _no_process_left(f"{targets / 'faults'} crash")


def test_an_exit_while_threads_step(targets):
    for _ in range(5):
        hits, result = _count(targets, "exit", "4", "3000")
        assert result.status == 3 and hits >= 3000
    assert _no_process_left(f"{targets / 'faults'} exit")


def test_an_exec_while_threads_step(targets):
    for _ in range(5):
        hits, result = _count(targets, "exec", "4", "3000")
        assert result.status == 0 and result.stdout.startswith("exec-ok\n") and hits >= 3000


def test_thousands_of_threads_created_and_ended_under_a_probe(targets):
    start = time.monotonic()
    hits, result = _count(targets, "churn", "1", "5000")
    rate = 5000 / (time.monotonic() - start)
    assert result.status == 0 and hits == 5000
    assert result.stdout.startswith(_untraced(targets, "churn", "1", "5000").stdout)
    print(f"\n{rate:,.0f} threads created and ended per second under the probe")


def test_more_threads_than_out_of_line_slots_wait_and_lose_nothing(targets):
    hits, result = _count(targets, "wide", "64", "300")
    assert result.status == 0 and hits == 64 * 300
    assert result.stdout.startswith(_untraced(targets, "wide", "64", "300").stdout)


def _memory_of_a_long_run(targets: Path, calls: int) -> list[tuple[int, int]]:
    """(hits so far, the tool's RSS in KiB) sampled while `uprobes count` serves ``calls`` hits (its reports
    give each interval's hits: summed here)."""
    faults = str(targets / "faults")
    tool = subprocess.Popen([sys.executable, "-m", "uprobes", "count", "--engine", "ptrace", "--json",
                             "--interval", "0.5", f"uprobe:{faults}:stepped", "--", faults, "wide", "1", str(calls)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples, hits = [], 0
    for line in tool.stdout:
        if line.startswith('{"probe"'):
            rss = next(int(f.split()[1]) for f in Path(f"/proc/{tool.pid}/status").read_text().splitlines()
                       if f.startswith("VmRSS:"))
            hits += json.loads(line)["hits"]
            samples.append((hits, rss))
    tool.wait(timeout=60)
    assert tool.returncode == 0, tool.stderr.read()
    return samples


def test_the_tools_memory_stays_flat_over_many_hits(targets):
    samples = _memory_of_a_long_run(targets, 100_000)
    assert samples[-1][0] == 100_000
    later = [rss for hits, rss in samples if hits >= 20_000]
    assert max(later) - min(later) < 2048, samples  # KiB


@pytest.mark.stress
def test_a_million_hits_with_the_tools_memory_flat(targets):
    samples = _memory_of_a_long_run(targets, 1_000_000)
    assert samples[-1][0] == 1_000_000
    later = [rss for hits, rss in samples if hits >= 100_000]
    print(f"\nRSS from 100,000 to 1,000,000 hits: {min(later)}-{max(later)} KiB over {len(later)} samples")
    assert max(later) - min(later) < 2048, samples


def test_a_session_that_keeps_no_events_runs_its_handlers_with_flat_memory(targets):
    from uprobes.api import Session

    seen = []
    with Session(command=[str(targets / "faults"), "wide", "2", "5000"], keep_events=False) as session:
        session.probe(f"uprobe:{targets / 'faults'}:stepped x=%di", lambda hit: seen.append(hit.args["x"]))
        assert session.run() == 0
        assert session.events == [] and session.hit_counts() == [10_000]
    assert sorted(seen) == sorted(list(range(5000)) * 2)

"""Kill safety: SIGINT, SIGTERM, SIGHUP and SIGKILL sent to the tool at random moments (while it starts,
attaches, serves hits or has just attached) while it probes a busy multi-threaded process (SIGKILL: the pid
the user holds, whose child does the work and detaches when it dies; src/uprobes/cli/guard.py). After each
trial the target lives on, its text is the file's, its semaphore is back to 0, no out-of-line page is left
and no tracer is attached; the target checks every probed call's result itself (tests/targets/threads.c
aborts on a wrong one).

`make test` runs a few trials per signal; `make stress` runs KILL_TRIALS (100) per signal and prints a tally
(RELIABILITY.md). Random delays come from a seeded generator: a failing trial can be replayed.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RunningTool, children_of
from oracles import (anonymous_executable_mappings, shared_mappings_left, file_offset, objdump_instruction_starts,
                     text_differs_from_files)

KILL_TRIALS = int(os.environ.get("KILL_TRIALS", "100"))
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL]


def _semaphore(pid: int, path: str) -> int:
    """threads_tick_semaphore in process ``pid``, read through the writable mapping of ``path``."""
    offset = file_offset(path, int(subprocess.run(["nm", path], capture_output=True, text=True, check=True).stdout
                                   .split("threads_tick_semaphore")[0].split("\n")[-1].split()[0], 16))
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        map_offset = int(fields[2], 16)
        if len(fields) == 6 and fields[5] == path and "w" in fields[1] and 0 <= offset - map_offset < end - start:
            with open(f"/proc/{pid}/mem", "rb") as mem:
                mem.seek(start + offset - map_offset)
                return int.from_bytes(mem.read(2), "little")
    raise AssertionError(f"no writable mapping of {path} holds the semaphore")


def _left_behind(pid: int, path: str) -> list[str]:
    """What a trial left in the target: changed text, a raised semaphore, an anonymous executable page, a tracer."""
    problems = [f"text differs: {line}" for line in text_differs_from_files(pid)]
    if _semaphore(pid, path):
        problems.append(f"semaphore is {_semaphore(pid, path)}")
    problems += [f"out-of-line page left: {line}" for line in anonymous_executable_mappings(pid)]
    problems += [f"shared mapping left: {line}" for line in shared_mappings_left(pid)]
    tracer = re.search(r"^TracerPid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)[1]
    if tracer != "0":
        problems.append(f"still traced by {tracer}")
    return problems


def _wait_gone(pids: list[int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, f"process {pid} is still there"
            time.sleep(0.01)


def kill_trials(targets: Path, signum: int, trials: int, seed: int, command: str = "trace") -> dict:
    """``trials`` runs of `uprobes COMMAND` on one busy target, each ended by ``signum`` at a random moment:
    trace puts a trap on every instruction of hit() and on the marker, count makes hit()'s entry and the
    marker jumps (tests/test_jump_probes.py checks that they are), with hit()'s returns through a return
    trampoline, trace-jumps makes them jumps that write records (with two arguments at hit(), a dereference
    and a string its trampoline reads with system calls, the string into the slots after the record's first).
    Every other trial waits for the tool to say it attached and sends the signal 0-0.4 s later (while it
    serves hits), the others 0-1 s after the tool started (while Python starts, while the tool attaches, or
    after): however slow start-up is, half the trials hit a tool that has attached. A trial counts as after
    "attached" when the tool had said it before the signal was sent. Returns a tally; raises AssertionError at
    the first trial that leaves the target dead or changed, or that ends with a status the signal cannot
    explain."""
    path = str(targets / "threads")
    if command == "trace":
        probes = [f"p {path}:{file_offset(path, a):#x}" for a in objdump_instruction_starts(path, "hit")]
    else:
        probes = [f"uprobe:{path}:hit" + (" a=%di b=%si r=+0(%sp):x64 s=+0(%sp):string" if command == "trace-jumps" else ""),
                  f"uretprobe:{path}:hit"]
    probes += [f"usdt:{path}:threads:tick"]
    command = command.replace("-jumps", "")
    rng = random.Random(seed)
    target = subprocess.Popen([path, "4", "1000000000", "200"], stdout=subprocess.DEVNULL)
    tally = {"trials": 0, "before_attached": 0, "after_attached": 0, "target_alive": 0, "clean": 0}
    try:
        time.sleep(0.2)
        for trial in range(trials):
            waits_for_attach = trial % 2 == 1
            delay = rng.uniform(0, 0.4) if waits_for_attach else rng.uniform(0, 1.0)
            running = RunningTool(command, "--engine", "ptrace", "-p", str(target.pid), "-o", os.devnull, *probes,
                                  stdout=False)
            tool = running.proc
            if waits_for_attach:
                running.wait_attached()
            time.sleep(delay)
            workers = children_of(tool.pid)
            attached = running.attached.is_set()
            tool.send_signal(signum)
            _, err = running.ended()
            _wait_gone(workers)  # after a SIGKILL of the front, its child detaches on its own
            tally["trials"] += 1
            tally["after_attached" if attached else "before_attached"] += 1
            what = (f"trial {trial} (seed {seed}, {signal.Signals(signum).name} "
                    f"{delay:.3f} s after {'attached' if waits_for_attach else 'the start'})")
            assert target.poll() is None, f"{what}: the target died: {target.returncode}; tool said {err!r}"
            tally["target_alive"] += 1
            if signum == signal.SIGKILL:  # the front dies of it, whatever the worker was doing
                assert tool.returncode == -signal.SIGKILL and "Traceback" not in err, \
                    f"{what}: exit {tool.returncode}: {err!r}"
            elif attached:
                assert "Traceback" not in err, f"{what}: {err}"
                assert tool.returncode == 128 + signum, f"{what}: exit {tool.returncode}: {err!r}"
            elif "Traceback" in err:
                # A SIGINT in the first milliseconds, while the interpreter starts (before our first module has
                # put its handlers in place), ends it with a KeyboardInterrupt: nothing is attached then, and
                # only the target matters. Counted and reported. (The interpreter then exits with 1, or re-raises
                # the SIGINT once its own handler is in place.)
                assert err.rstrip().endswith("KeyboardInterrupt") and " attached (" not in err, f"{what}: {err}"
                assert signum == signal.SIGINT and tool.returncode in (1, -signum), f"{what}: exit {tool.returncode}"
                tally["startup_tracebacks"] = tally.get("startup_tracebacks", 0) + 1
            else:  # killed by the signal before Python handles it, or ended by our handler
                assert tool.returncode in (128 + signum, -signum), f"{what}: exit {tool.returncode}: {err!r}"
            problems = _left_behind(target.pid, path)
            assert not problems, f"{what}: {problems}"
            tally["clean"] += 1
    finally:
        target.kill()
        target.wait()
    return tally


@pytest.mark.parametrize("command", ["trace", "count", "trace-jumps"], ids=["traps", "jumps", "traced-jumps"])
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_few_signals_at_random_moments_leave_the_target_as_it_was(targets, signum, command):
    tally = kill_trials(targets, signum, trials=4, seed=signum, command=command)
    assert tally["clean"] == 4 and tally["after_attached"] >= tally["trials"] / 3, tally


@pytest.mark.stress
@pytest.mark.parametrize("command", ["trace", "count", "trace-jumps"], ids=["traps", "jumps", "traced-jumps"])
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_hundred_signals_at_random_moments_leave_the_target_as_it_was(targets, signum, command):
    tally = kill_trials(targets, signum, trials=KILL_TRIALS, seed=1000 + signum, command=command)
    print(f"\nkill safety, {signal.Signals(signum).name}, {command}: {tally}")
    assert tally["clean"] == KILL_TRIALS and tally["after_attached"] >= tally["trials"] / 3, tally


@pytest.mark.parametrize("command", ["count", "hist"])
def test_a_stop_signal_sent_to_the_tools_process_group_ends_it_once_with_its_output(targets, command):
    """SIGINT sent to the process group of `uprobes count|hist -p PID` (as `timeout -s INT`, or a supervisor, do)
    reaches the worker both directly and passed on by the process in front: it is one stop, and the figures
    are written every time (a second KeyboardInterrupt in the middle of writing them lost them, nearly always)."""
    program = subprocess.Popen([str(targets / "calls"), "100000000", "1"], stdout=subprocess.DEVNULL)
    words = ["uprobe:" + str(targets / "calls") + ":work i=%di:s32", *(["i"] if command == "hist" else [])]
    try:
        for _ in range(4):
            tool = subprocess.Popen([sys.executable, "-m", "uprobes", command, "--engine", "ptrace", "-p",
                                     str(program.pid), *words], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
            said = ""
            while " attached (" not in said:
                line = tool.stderr.readline()
                assert line, said
                said += line
            time.sleep(0.3)
            os.killpg(tool.pid, signal.SIGINT)
            out, err = tool.communicate(timeout=60)
            assert tool.returncode == 130 and "Traceback" not in err, err
            assert ("HITS" if command == "count" else "i\n") in out and "work" in out, (out, err)
        assert program.poll() is None  # and it runs on
    finally:
        program.kill()
        program.wait()

"""Threads under the ptrace engine meeting what a program meets (tests/targets/thread_faults.c): job control
(SIGSTOP/SIGCONT) during steps, a stack overflow into a guard page at an emulated push or call, the
PTRACE_POKETEXT fallback for memory writes, SIGTRAPs that are not the step's, and the name after an exec.

Each test asserts what the program saw (its output and exit status, as untraced) and what the tool saw (exact
hit counts, no traceback)."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_json
from oracles import file_offset, function_symbols, tool_output


def _untraced(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=60)


def _hits(records: list[dict]) -> dict[str, int]:
    return {r["probe"]: r["hits"] for r in records if "hits" in r}


def _bumps(records: list[dict], threads: int) -> dict[str, int]:
    """Hits of bump0..bump7 (worker T calls its own bumpT), the probes that no worker calls left out."""
    hits = _hits(records)
    assert set(hits) == {f"bump{t}" for t in range(8)}, hits
    assert all(hits[f"bump{t}"] == 0 for t in range(threads, 8)), hits
    return {f"bump{t}": hits[f"bump{t}"] for t in range(threads)}


def _launch_count(probes: list[str], command: list[str], out: Path, engine: str = "ptrace",
                  *options: str) -> subprocess.Popen:
    """``uprobes count --engine ENGINE --json -o OUT OPTIONS PROBES -- COMMAND``, running; its stdout is the
    command's."""
    return subprocess.Popen([sys.executable, "-m", "uprobes", "count", "--engine", engine, "--json", "-o", str(out),
                             *options, *probes, "--", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _command_pid(tool: subprocess.Popen, program: str, timeout: float = 20) -> int:
    """The pid of the command ``tool`` launched, once it runs ``program`` (after its exec)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in os.listdir(f"/proc/{tool.pid}/task"):
            try:
                children = Path(f"/proc/{tool.pid}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in children:
                try:
                    if os.path.basename(os.readlink(f"/proc/{child}/exe")) == program:
                        return int(child)
                except OSError:
                    continue
        if tool.poll() is not None:
            break
        time.sleep(0.002)
    raise AssertionError(f"the tool never ran {program}: {tool.communicate()[1].decode()}")


def _finish(tool: subprocess.Popen, out: Path) -> tuple[int, str, str, list[dict]]:
    stdout, stderr = tool.communicate(timeout=120)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    out.unlink(missing_ok=True)
    return tool.returncode, stdout.decode(), stderr.decode(), records


def _out_file() -> Path:
    return Path(f"/tmp/uprobes-test-{os.getpid()}-{os.urandom(4).hex()}.jsonl")


def stop_and_continue(targets: Path, threads: int, calls: int, cycles: int, pause: float, required: int,
                      engine: str = "ptrace") -> tuple[int, int, str, str, dict]:
    """Count hits of bump0..bump7 (`addq $1, counters+8*T(%rip)`: single-stepped when trapped) while worker T of
    THREADS calls bumpT() CALLS times, and SIGSTOP then SIGCONT the process up to CYCLES times, ``pause`` seconds
    apart. At least ``required`` cycles must happen while it runs. Returns (cycles, status, stdout, stderr,
    hits per worker's probe)."""
    program = str(targets / "thread_faults")
    out = _out_file()
    trap = ("--trap",) if engine == "ptrace" else ()  # a jump would take the steps away
    tool = _launch_count([f"uprobe:{program}:bump?"], [program, "stopcont", str(threads), str(calls)], out, engine,
                         *trap)
    done, pid = 0, None
    try:
        pid = _command_pid(tool, "thread_faults")
        time.sleep(0.05)  # into its steps
        for _ in range(cycles):
            if tool.poll() is not None:
                break
            try:
                os.kill(pid, signal.SIGSTOP)
                time.sleep(pause)
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                break
            done += 1
            time.sleep(pause)
    finally:
        if tool.poll() is None and pid is not None:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        status, stdout, stderr, records = _finish(tool, out)
    assert "Traceback" not in stderr, stderr
    assert done >= required, f"the program ended after {done} stop/continue cycles: make it run longer"
    return done, status, stdout, stderr, _bumps(records, threads)


# -- c. job control during steps -------------------------------------------------------------------------------

def test_threads_stepping_while_the_process_is_stopped_and_continued_run_each_instruction_once(targets):
    """Before the engine was rebuilt (2026-12-06), a thread stepping when the group-stop came was PTRACE_LISTENed,
    then PTRACE_CONTed at the SIGCONT: its trap flag was gone, it ran on into the int3 padding after the slot's
    copy, and the tool died with "ValueError: after stepping 'addq $1,0x...' rip <slot end + 1> is not the slot's
    end" (the program was killed with it). Once the step survives the stop, the instruction must still run exactly
    once (the counters)."""
    threads, calls = 4, 4000
    untraced = _untraced(str(targets / "thread_faults"), "stopcont", str(threads), str(calls))
    assert untraced.returncode == 0
    _, status, stdout, _, hits = stop_and_continue(targets, threads, calls, cycles=40, pause=0.005, required=5)
    assert (status, stdout) == (0, untraced.stdout)
    assert hits == {f"bump{t}": calls for t in range(threads)}


# -- e. emulated push and call into a stack guard page ---------------------------------------------------------

def _instruction_at(program: str, symbol: str, offset: int) -> str:
    """objdump's text of the instruction at SYMBOL+OFFSET."""
    address = function_symbols(program)[symbol][0] + offset
    listing = tool_output("objdump", "-d", "--no-show-raw-insn", f"--start-address={address:#x}",
                          f"--stop-address={address + 16:#x}", program)
    first = next(line for line in listing.splitlines() if re.match(r"\s*[0-9a-f]+:\t", line))
    return first.split("\t", 1)[1].strip()


@pytest.mark.parametrize("writer, hits", [
    ("push", {"dive": 101, "dive+0xa": 100}),  # level 100 enters dive and its push %rbp faults
    ("call", {"dive": 100, "dive+0xa": 100}),  # the 100th `call dive` faults: dive is entered 100 times
])
def test_an_emulated_stack_write_into_a_guard_page_faults_as_it_does_untraced(targets, writer, hits):
    """The program overflows a small stack of its own into a PROT_NONE guard page; the first write there is the
    probed `push %rbp` (push) or `call dive` (call), both emulated by the ptrace engine. Its SIGSEGV handler
    reports where it faulted and whether the guard page was written. Before the rebuild the emulated write goes through
    /proc/PID/mem, which ignores the protection: the push or call "succeeds" into the guard page, and the fault
    comes one instruction later ("SIGSEGV at dive+1, address guard_end-16 ..., guard page WRITTEN" instead of
    "SIGSEGV at dive+0, address guard_end-8 ..., guard page untouched"). The hit counts are the kernel engine's."""
    from uprobes.x86_64.analysis import analyze

    program = str(targets / "thread_faults")
    assert _instruction_at(program, "dive", 0) == "push   %rbp"
    assert _instruction_at(program, "dive", 10).startswith("call ")
    dive = function_symbols(program)["dive"][0]
    with open(program, "rb") as f:  # what the ptrace engine decides for each: emulate, not step
        for offset in (0, 10):
            f.seek(file_offset(program, dive + offset))
            assert analyze(f.read(15), dive + offset).kind == "emulate"
    command = [program, "overflow", writer, "100"]
    untraced = _untraced(*command)
    faulting = "dive+0, address guard_end-8" if writer == "push" else "dive+10, address guard_end-8"
    assert untraced.stdout == f"overflow {writer}: SIGSEGV at {faulting}, depth 100, guard page untouched\n"
    records, traced = run_json("count", "--engine", "ptrace", f"uprobe:{program}:dive", f"uprobe:{program}:dive+10",
                               "--", *command)
    assert (traced.returncode, traced.stdout) == (untraced.returncode, untraced.stdout)
    assert _hits(records) == hits


# -- f. the PTRACE_POKETEXT fallback ---------------------------------------------------------------------------

_WALL = 0x40000000
_PTRACE_CONT = 7


def _kill_leftover_children(program: str) -> None:
    """A command a failed Session left with threads stopped in our trace: kill it, and reap every thread (each
    reports its end to us, its tracer, before the process can be reaped)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    for task in os.listdir("/proc/self/task"):
        try:
            children = Path(f"/proc/self/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                if os.readlink(f"/proc/{child}/exe") != program:
                    continue
                tids = {int(t) for t in os.listdir(f"/proc/{child}/task")}
                os.kill(child, signal.SIGKILL)
            except OSError:
                continue
            deadline = time.monotonic() + 5
            while tids and time.monotonic() < deadline:
                for tid in list(tids):
                    try:
                        reported, status = os.waitpid(tid, _WALL | os.WNOHANG)
                    except ChildProcessError:
                        tids.discard(tid)
                        continue
                    if reported and os.WIFSTOPPED(status):
                        libc.ptrace(_PTRACE_CONT, tid, None, None)
                    elif reported:
                        tids.discard(tid)
                time.sleep(0.005)


def test_memory_writes_through_ptrace_poketext_serve_every_thread(targets, monkeypatch, capfd):
    """Where the kernel forbids forced writes to /proc/PID/mem (proc_mem.force_override=never), every write
    goes through PTRACE_POKETEXT, which needs a stopped thread. Forced here in-process: each ProcessMemory starts
    in its poke mode. Four workers call a rip-relative load (a slot and a step), an indirect call (a stepped call
    whose return address is fixed up), a direct call and a push (emulated), and pushf (a step whose TF is fixed
    up) while the main thread waits in pthread_join, running. Before the rebuild the slot, boost-slot, emulated-push and
    call/pushf fixup writes pass no thread, the fallback pokes through the main thread, gets ESRCH, and the
    thread being served is taken for dead: counts stop at a few hits ([4, 0, 0, 0, 0]) and the program hangs,
    its workers left stopped (the run gives up after 3 s)."""
    from uprobes.api import Session
    from uprobes.engines.ptrace import memory

    original_init, original_poke = memory.ProcessMemory.__init__, memory.ptrace_poketext
    pokes = []

    def poking_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.poke = True  # as after its first forced write was refused

    def counted_poke(*args):
        pokes.append(args[0])
        return original_poke(*args)

    monkeypatch.setattr(memory.ProcessMemory, "__init__", poking_init)
    monkeypatch.setattr(memory, "ptrace_poketext", counted_poke)
    program = str(targets / "thread_faults")
    threads, calls = 4, 400
    command = [program, "fixups", str(threads), str(calls)]
    untraced = _untraced(*command)
    assert untraced.returncode == 0
    probes = ["riprel", "indirect+4", "direct+4", "pusher", "flags"]
    capfd.readouterr()
    try:
        with Session(command=command, keep_events=False) as session:
            for probe in probes:
                session.probe(f"uprobe:{program}:{probe}")
            status = session.run(duration=3)
            counts = session.hit_counts()
    finally:
        _kill_leftover_children(program)
    output = capfd.readouterr().out
    assert pokes, "no write went through PTRACE_POKETEXT"
    assert (status, counts) == (0, [threads * calls] * len(probes))
    assert output == untraced.stdout


# -- g. SIGTRAPs that are not the step's -----------------------------------------------------------------------

def test_sigtraps_the_program_sends_during_steps_reach_its_handler(targets):
    """The main thread sends 200 SIGTRAPs to its own process (kill(getpid()), SIGTRAP blocked in the sender, so
    two workers single-stepping their bumpT() take them), each after the last was handled (after 5 s it counts
    that SIGTRAP lost and goes on). Before the rebuild the first SIGTRAP that met a step was taken for the step's
    trap: "ValueError: after stepping 'addq $1,0x...' rip <the slot> is not the slot's end" (the instruction had not
    run yet). Process-directed on purpose: a thread-directed SIGTRAP (tgkill, the `tgkill` mode of the target)
    can be merged by the kernel with the thread's own int3 or single-step SIGTRAP pending at the same instant,
    which no ptrace engine can undo, so its count cannot be asserted exactly."""
    program = str(targets / "thread_faults")
    command = [program, "traps", "2", "3000", "200", "kill"]
    untraced = _untraced(*command)
    assert untraced.stdout == "traps 200 handled 200 foreign 0 lost 0 counter 6000\n"
    records, traced = run_json("count", "--engine", "ptrace", f"uprobe:{program}:bump?", "--", *command, timeout=60)
    assert (traced.returncode, traced.stdout) == (0, untraced.stdout)
    assert _bumps(records, 2) == {"bump0": 3000, "bump1": 3000}


def test_sigtraps_sent_from_outside_during_steps_reach_the_programs_handler(targets):
    """`kill -TRAP` 100 times, each once the program's handler has said it saw the last ('T' on its stdout),
    while two threads step their bumpT() until the handler has seen 100. Before the rebuild: the same ValueError at
    the first SIGTRAP that met a step, and the program died with the tool."""
    program = str(targets / "thread_faults")
    out = _out_file()
    tool = _launch_count([f"uprobe:{program}:bump?"], [program, "waittraps", "2", "100"], out)
    acknowledged = 0
    try:
        pid = _command_pid(tool, "thread_faults")
        time.sleep(0.05)
        for _ in range(100):
            os.kill(pid, signal.SIGTRAP)
            if not select.select([tool.stdout], [], [], 5)[0] or os.read(tool.stdout.fileno(), 1) != b"T":
                break
            acknowledged += 1
    except ProcessLookupError:
        pass
    finally:
        if tool.poll() is None and acknowledged < 100:
            tool.kill()
        status, stdout, stderr, records = _finish(tool, out)
    assert "Traceback" not in stderr, stderr
    assert acknowledged == 100
    lines = stdout.splitlines()
    assert lines[-2] == "waittraps 100 handled 100 foreign 0"
    calls, counter = int(lines[-1].split()[1]), int(lines[-1].split()[3])
    assert status == 0 and calls == counter
    assert sum(_bumps(records, 2).values()) == calls


# -- h. the name after an exec ---------------------------------------------------------------------------------

def _comms_across_exec(engine: str, targets: Path) -> tuple[list[tuple], subprocess.CompletedProcess]:
    first, renamed = targets / "thread_faults", targets / "renamed_image"
    records, proc = run_json("trace", "--engine", engine, f"p:before_exec {first}:tick name=$comm",
                             f"p:after_exec {renamed}:tick name=$comm", "--", str(first), "exec", "2", str(renamed))
    return [(r["probe"], r["comm"], r["args"]["name"]) for r in records if "probe" in r], proc


def test_comm_after_exec_names_the_new_program(targets):
    """thread_faults calls tick() twice, then execs renamed_image (a copy under another name), which calls its
    tick() twice. Before the rebuild the ptrace engine kept the name it read at the first hit: the comm column and
    $comm of the hits after the exec said "thread_faults"."""
    events, proc = _comms_across_exec("ptrace", targets)
    assert proc.returncode == 7 and proc.stdout == "before exec: 5\nafter exec: 5\n"
    assert [e[0] for e in events] == ["before_exec", "before_exec", "after_exec", "after_exec"]
    assert events == [("before_exec", "thread_faults", "thread_faults")] * 2 + \
        [("after_exec", "renamed_image", "renamed_image")] * 2


def test_comm_after_exec_is_the_kernel_engines(targets, tracefs):
    ours, _ = _comms_across_exec("ptrace", targets)
    kernel, proc = _comms_across_exec("kernel", targets)
    assert proc.returncode == 7 and len(kernel) == 4
    assert ours == kernel

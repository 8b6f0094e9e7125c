"""The ptrace engine on real processes: threads, signals, attach and detach, refusals, an unprivileged user,
the Python API. Its counts are checked against the kernel engine's where both can run."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import RunningTool, run_cli, run_json
from oracles import (anonymous_executable_mappings, file_offset, function_symbols, objdump_instruction_starts,
                     text_differs_from_files)
from uprobes.api import REMOVE, Session
from uprobes.probes.resolve import resolve_text
from uprobes.proc.maps import read_maps

ROOT = Path(__file__).parent.parent
LIBC = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")


def _count(engine: str, probes: list[str], command: list[str], *extra: str) -> tuple[dict, subprocess.CompletedProcess]:
    records, proc = run_json("count", "--engine", engine, *extra, *probes, "--", *command)
    return {(r["path"], r["offset"]): r["hits"] for r in records}, proc


def test_counts_of_every_function_match_the_kernel_engine(targets):
    calls = targets / "calls"
    probes = [f"uprobe:{calls}:*", f"uprobe:{targets / 'libprobed.so'}:*"]
    ours, traced = _count("ptrace", probes, [str(calls), "40", "0", "3"])
    kernel, reference = _count("kernel", probes, [str(calls), "40", "0", "3"])
    assert traced.returncode == reference.returncode == 3
    assert traced.stdout == reference.stdout
    assert ours == kernel
    assert ours[(str(calls), file_offset(str(calls), function_symbols(str(calls))["work"][0]))] == 40


def test_eight_threads_lose_no_hit(targets):
    threads, calls = 8, 2000
    ours, proc = _count("ptrace", [f"uprobe:{targets / 'threads'}:hit"],
                        [str(targets / "threads"), str(threads), str(calls)])
    assert proc.returncode == 0
    assert proc.stdout == subprocess.run([str(targets / "threads"), str(threads), str(calls)],
                                         capture_output=True, text=True).stdout
    assert list(ours.values()) == [threads * calls]


def test_a_storm_of_handled_signals_changes_nothing(targets):
    command = [str(targets / "sigstorm"), "3000", "4000"]
    untraced = subprocess.run(command, capture_output=True, text=True)
    # every instruction of work: emulated and stepped ones both meet signals arriving mid-hit
    path = str(targets / "sigstorm")
    probes = [f"p {path}:{file_offset(path, a):#x}" for a in objdump_instruction_starts(path, "work")]
    ours, traced = _count("ptrace", probes, command)
    every_one_as_sent = f"signals 3000 of 3000 values {sum(range(3000))} foreign 0"
    assert untraced.stdout == traced.stdout == f"{every_one_as_sent} check {untraced.stdout.split()[-1]}\n"
    assert traced.returncode == 0
    assert max(ours.values()) == 4000


def test_attach_trace_and_detach_a_running_multithreaded_program(targets):
    command = [str(targets / "threads"), "4", "2500", "2000"]
    target = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        maps_before = Path(f"/proc/{target.pid}/maps").read_text()
        path = str(targets / "threads")
        probes = [f"p {path}:{file_offset(path, a):#x}" for a in objdump_instruction_starts(path, "hit")]
        with RunningTool("trace", "--engine", "ptrace", "--json", "-p", str(target.pid), *probes) as tracer:
            tracer.wait_for(lambda: len({e["tid"] for e in tracer.events()}) == 4, "hits of all four threads")
            tracer.finish()
        assert tracer.proc.returncode == 128 + signal.SIGINT
        events = tracer.records()
        hits = [e for e in events if "probe" in e]
        assert hits and events[-1] == {"lost": 0}
        assert {e["pid"] for e in hits} == {target.pid} and len({e["tid"] for e in hits}) == 4
        assert all(e["comm"] == "threads" for e in hits)
        # after detach: text byte-identical to the file, no out-of-line area, the same mappings
        assert text_differs_from_files(target.pid) == []
        assert anonymous_executable_mappings(target.pid) == []
        assert Path(f"/proc/{target.pid}/maps").read_text() == maps_before
        out, _ = target.communicate(timeout=60)
        assert target.returncode == 0
        assert out == "threads 4 calls 2500 total " + str(sum(t * 3 * 2500 + sum(i & 7 for i in range(2500))
                                                               for t in range(4))) + "\n"
    finally:
        target.kill()
        target.wait()


def test_refused_instruction_gives_its_reason_and_changes_no_byte(targets):
    path = LIBC
    start, size = function_symbols(path, dynamic=True)["getpid"]
    listing = subprocess.run(["objdump", "-d", f"--start-address={start:#x}", f"--stop-address={start + size:#x}",
                              path], capture_output=True, text=True).stdout
    syscall_at = int(re.search(r"^\s+([0-9a-f]+):\s+0f 05\s+syscall", listing, re.M)[1], 16)
    target = subprocess.Popen([str(targets / "calls"), "1000", "5"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        result = run_cli("trace", "--engine", "ptrace", "-p", str(target.pid), "-d", "1",
                         f"uprobe:{targets / 'calls'}:work", f"p {path}:{file_offset(path, syscall_at):#x}")
        assert result.status == 2
        assert re.search(r"cannot probe 'syscall' at 0x[0-9a-f]+: .*system call", result.stderr), result.stderr
        assert text_differs_from_files(target.pid) == [] and anonymous_executable_mappings(target.pid) == []
        assert target.poll() is None  # it goes on
    finally:
        target.kill()
        target.wait()


def test_a_process_that_is_gone_is_a_clear_error():
    gone = subprocess.Popen(["true"])
    gone.wait()
    result = run_cli("trace", "--engine", "ptrace", "-p", str(gone.pid), "uprobe:libc:malloc")
    assert result.status == 2 and f"process {gone.pid} does not exist" in result.stderr


def test_an_unprivileged_user_traces_a_command_it_launches(targets):
    if os.geteuid() != 0:
        pytest.skip("needs root to become nobody")
    # The checkout may sit where nobody cannot read (a private temporary directory): give nobody a copy of
    # the package, its dependencies and the target in a directory it can read.
    work = Path(tempfile.mkdtemp(prefix="uprobes-nobody-"))
    try:
        site = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"))
        shutil.copytree(ROOT / "src" / "uprobes", work / "lib" / "uprobes")
        for package in ("elftools", "iced_x86", "numpy", "numpy.libs"):
            if (site / package).exists():  # numpy.libs: the libraries of numpy's wheel, where it has them
                shutil.copytree(site / package, work / "lib" / package)
        (work / "bin").mkdir()
        for name in ("calls", "libprobed.so"):
            shutil.copy2(targets / name, work / "bin" / name)
        subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(work / "lib"), "HOME": str(work)}
        probes = ["uprobe:./calls:*", "usdt:./calls:calls:step"]  # as the README's user would write them
        result = subprocess.run([shutil.which("runuser"), "-u", "nobody", "--", "/usr/bin/python3.11", "-m", "uprobes",
                                 "count", "--json", *probes, "--", "./calls", "30"],
                                capture_output=True, text=True, env=env, cwd=work / "bin", timeout=120)
        assert "Traceback" not in result.stderr and result.returncode == 0, result.stderr
        assert "ptrace engine" in result.stderr  # auto picks it: the kernel engine needs root
        records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        ours = {(r["path"], r["offset"]): r["hits"] for r in records}
        calls = str(work / "bin" / "calls")
        assert ours[(calls, file_offset(calls, function_symbols(calls)["work"][0]))] == 30
        assert "guarded 30" in result.stdout  # the marker's semaphore was raised for it
        kernel, _ = _count("kernel", [p.replace("./", f"{work / 'bin'}/") for p in probes], [calls, "30"])
        assert ours == kernel  # exactly the kernel engine's counts
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_python_handlers_see_registers_memory_and_arguments(targets):
    """A handler that reads the program's memory at the hit asks for the thread stopped there (stop=True);
    the others run from records of their hits, with every register and argument as they were, in order."""
    seen, returned, removed = [], [], []
    work = f"uprobe:{targets / 'calls'}:work"

    def on_work(hit):
        seen.append((hit.args["i"], hit.memory.read_string(hit.regs.rdx), hit.tid == hit.pid))

    def on_return(hit):
        returned.append((hit.args["r"], hit.regs.rax, hit.regs.rip, hit.regs.rsp > 0, hit.tid == hit.pid))

    def once(hit):
        removed.append((hit.args["a"], hit.regs.rdi, hit.regs.rsi))
        return REMOVE

    with Session(command=[str(targets / "calls"), "4"]) as session:
        session.probe(f"{work} i=%di:s32", on_work, stop=True)
        session.probe(f"uretprobe:{targets / 'calls'}:work r=$retval:s64", on_return)
        session.probe(f"uprobe:{targets / 'libprobed.so'}:lib_add a=%di:s32", once)
        status = session.run()
        counts = session.hit_counts()
        events = session.events
    assert status == 0
    assert seen == [(i, f"s{i}".encode(), True) for i in range(4)]
    address = next(e.ip for e in events if e.probe == "work")
    assert returned == [(3 * i + 2, 3 * i + 2, address, True, True) for i in range(4)]
    assert removed == [(0, 0, 0)] and counts[:2] == [4, 4] and 1 <= counts[2] <= 4  # lib_add went with its handler
    assert len([e for e in events if e.probe == "lib_add"]) == 1


def _run_until(session: Session, condition, what: str, timeout: float = 120) -> None:
    """Service the session's process until ``condition()`` holds (a generous ``timeout`` for a loaded machine)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        assert session.run(duration=0.05) is None, "the process ended"


def _tracer_of(pid: int) -> int:
    return int(re.search(r"TracerPid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])


@pytest.mark.parametrize("stop", [False, True], ids=["records", "stopped"])
def test_the_last_handler_removed_takes_its_probe_out_at_once_and_filters_pick_a_process(targets, stop):
    """Stopped at each hit, the handler that removes itself sees one hit; run from records, the hits recorded
    before the probe went are dropped with it (its jump stays for the other probe on the same instruction)."""
    calls = str(targets / "calls")
    target = subprocess.Popen([calls, "100000", "5"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        (work,) = resolve_text(f"uprobe:{calls}:work")
        address = next(m.start - m.offset + work.offset for m in read_maps(target.pid)
                       if m.path == work.path and m.executable)
        ours, others = [], []
        with Session(pid=target.pid) as session:
            session.probe(f"uprobe:{calls}:work", lambda hit: ours.append(hit.pid) or REMOVE, pid=target.pid,
                          stop=stop)
            session.probe(f"uprobe:{calls}:work", others.append, pid=1, stop=stop)  # never this process
            _run_until(session, lambda: ours, "the handler's first hit")
            removed_with = session.hit_counts()[0]
            _run_until(session, lambda: session.hit_counts()[1] >= removed_with + 5, "five more hits")
            with open(f"/proc/{target.pid}/mem", "rb") as mem:
                mem.seek(address)
                byte_while_attached = mem.read(1)
            counts = session.hit_counts()
        assert ours == [target.pid] and others == [] and (counts[0] == 1 if stop else counts[0] >= 1)
        assert counts[0] == removed_with  # no hit of the removed probe counted since
        assert counts[1] > counts[0]  # the other probe on the same instruction kept its breakpoint until detach
        assert byte_while_attached == (b"\xcc" if stop else b"\xe9")
    finally:
        target.kill()
        target.wait()


@pytest.mark.parametrize("stop", [False, True], ids=["records", "stopped"])
def test_a_lone_handler_removed_restores_its_byte_while_attached(targets, stop):
    calls = str(targets / "calls")
    target = subprocess.Popen([calls, "100000", "5"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        with Session(pid=target.pid) as session:
            removed = []
            session.probe(f"uprobe:{calls}:work", lambda hit: removed.append(hit) or REMOVE, stop=stop)
            _run_until(session, lambda: removed, "the handler's first hit")
            counts = session.hit_counts()
            assert counts == [1] if stop else counts[0] >= 1
            assert len(removed) == 1
            # while still attached (ld.so keeps the engine's own breakpoint at the rendezvous)
            assert [line for line in text_differs_from_files(target.pid) if line.endswith(calls)] == []
            assert _tracer_of(target.pid) != 0
        assert target.poll() is None
    finally:
        target.kill()
        target.wait()


def test_a_bad_pointer_gives_the_kernels_value_and_an_error_not_a_crash(targets):
    records = run_cli("trace", "--engine", "ptrace", "--json", f"uprobe:{targets / 'calls'}:work bad=+0(%di):string",
                      "x=+8(%di):u64", "--", str(targets / "calls"), "2", check=True).stdout.splitlines()
    events = [json.loads(line) for line in records if line.startswith('{"probe"')]
    assert [e["args"] for e in events] == [{"bad": None, "x": 0}] * 2
    assert set(events[0]["errors"]) == {"bad", "x"}


@pytest.mark.parametrize("stop", [False, True], ids=["records", "stopped"])
def test_a_handlers_memory_read_of_a_bad_address_raises_oserror(targets, stop):
    """README (the Python API): hit.memory reads the target's memory and raises OSError on a bad address, never
    harming the target: each call's label buffer is read, page 0 is not, and the program computes what it does
    alone. (Run from records, the buffer is read as it is then: the program may have written a later label.)"""
    calls = str(targets / "calls")
    seen = []

    def handler(hit):
        label = hit.memory.read_string(hit.regs.rdx)
        try:
            hit.memory.read(0, 8)
            seen.append((label, "read"))
        except OSError as error:
            seen.append((label, errno.errorcode[error.errno]))

    untraced = subprocess.run([calls, "3"], capture_output=True, text=True)
    with Session(command=[calls, "3"]) as session:
        session.probe(f"uprobe:{calls}:work", handler, stop=stop)
        assert session.run() == untraced.returncode == 0
    assert len(seen) == 3 and all(reason in ("EFAULT", "EIO") for _, reason in seen), seen
    labels = [label for label, _ in seen]
    assert labels == [b"s0", b"s1", b"s2"] if stop else all(label in (b"s0", b"s1", b"s2") for label in labels)


def test_a_handler_that_raises_ends_in_a_clean_detach(targets):
    def boom(hit):
        raise RuntimeError("handler failed")

    session = Session(command=[str(targets / "calls"), "5", "20", "9"])
    with pytest.raises(RuntimeError):
        with session:
            session.probe(f"uprobe:{targets / 'calls'}:work", boom)
            session.run()
    assert session.wait() == 9  # the command went on untraced and ended as it would have


def test_a_handler_that_raises_detaches_even_without_a_with_block(targets):
    calls = str(targets / "calls")
    target = subprocess.Popen([calls, "100000", "5"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        session = Session(pid=target.pid)
        session.probe(f"uprobe:{calls}:work", lambda hit: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            session.run(duration=10)
        assert _tracer_of(target.pid) == 0 and target.poll() is None
        assert text_differs_from_files(target.pid) == [] and anonymous_executable_mappings(target.pid) == []
    finally:
        target.kill()
        target.wait()


def test_semaphores_are_raised_while_attached_and_lowered_after(targets):
    calls = targets / "calls"
    target = subprocess.Popen([str(calls), "300", "10"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        with RunningTool("trace", "--engine", "ptrace", "--json", "-p", str(target.pid), f"usdt:{calls}:calls:step",
                         f"usdt:{targets / 'libprobed.so'}:demo:order__done") as tracer:
            tracer.wait_for(lambda: sum(e["probe"] == "calls:step" for e in tracer.events()) >= 5, "five steps")
            tracer.finish()
        assert tracer.proc.returncode == 128 + signal.SIGINT
        events = tracer.events()
        steps = [e for e in events if e["probe"] == "calls:step"]
        done = [e for e in events if e["probe"] == "demo:order__done"]
        assert len(steps) >= 5 and abs(len(done) - len(steps)) <= 1  # the library's marker: once per loop
        assert text_differs_from_files(target.pid) == []
        out, _ = target.communicate(timeout=30)
        guarded = int(out.split()[-1])
        assert len(steps) <= guarded < 300  # open while we listened, closed again after
    finally:
        target.kill()
        target.wait()


def test_list_of_a_process_shows_which_markers_are_enabled_now(targets):
    calls = targets / "calls"
    target = subprocess.Popen([str(calls), "100000", "10"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        before = run_cli("list", "-p", str(target.pid), "calls:*", check=True).stdout
        tracer = subprocess.Popen([sys.executable, "-m", "uprobes", "trace", "--engine", "ptrace", "-p",
                                   str(target.pid), "-d", "30", f"usdt:{calls}:calls:step"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert "attached" in tracer.stderr.readline()
        during = run_cli("list", "-p", str(target.pid), "calls:*", "--json", check=True).stdout
        tracer.terminate()
        tracer.communicate(timeout=30)
        after = run_cli("list", "-p", str(target.pid), "calls:*", check=True).stdout
        assert "= 0 (disabled)" in before and "= 0 (disabled)" in after
        (site,) = json.loads(during)["objects"][0]["markers"][0]["sites"]
        assert site["semaphore_value"] == 1
        assert "libc" not in before  # objects with nothing that matches are left out
    finally:
        target.kill()
        target.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_the_tool_ends_in_a_clean_detach(targets, signum):
    path = str(targets / "threads")
    command = [path, "4", "20000", "300"]
    target = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.2)
        probes = [f"p {path}:{file_offset(path, a):#x}" for a in objdump_instruction_starts(path, "hit")]
        tracer = subprocess.Popen([sys.executable, "-m", "uprobes", "count", "--engine", "ptrace", "-p",
                                   str(target.pid), *probes], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert "attached" in tracer.stderr.readline()
        time.sleep(0.5)
        tracer.send_signal(signum)
        out, err = tracer.communicate(timeout=60)
        assert "Traceback" not in err and tracer.returncode == 128 + signum
        assert re.search(r"hit\s+\d+", out)  # the counts so far are still printed
        assert text_differs_from_files(target.pid) == [] and anonymous_executable_mappings(target.pid) == []
        result, _ = target.communicate(timeout=60)
        expected = subprocess.run([path, "4", "20000"], capture_output=True, text=True).stdout
        assert target.returncode == 0 and result == expected
    finally:
        target.kill()
        target.wait()


def test_a_process_that_ends_as_we_attach_is_a_clear_error(targets):
    """The race the attach/detach stress run met: the process is gone by the time its memory is opened."""
    from uprobes.engines.ptrace.memory import ProcessMemory
    from uprobes.errors import ProcessError

    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(ProcessError, match=rf"process {child.pid} does not exist \(it has ended\)"):
        ProcessMemory(child.pid)


@pytest.mark.parametrize("trial", range(3))
def test_ctrl_c_in_the_terminal_reaches_tool_and_command_and_ends_both_cleanly(targets, trial):
    """A terminal's Ctrl-C signals the whole process group: the command dies of SIGINT as it would alone, the
    tool detaches every thread first (none is left stopped at its exit for a tracer gone) and exits 130."""
    path = str(targets / "threads")
    tool = subprocess.Popen([sys.executable, "-m", "uprobes", "count", "--engine", "ptrace", f"uprobe:{path}:hit",
                             "--", path, "4", "20000", "300"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert "attached" in tool.stderr.readline()
        time.sleep(0.5 + 0.3 * trial)
        os.killpg(tool.pid, signal.SIGINT)
        out, err = tool.communicate(timeout=60)
    finally:
        if tool.poll() is None:
            os.killpg(tool.pid, signal.SIGKILL)
    assert "Traceback" not in err and tool.returncode == 130, err
    assert "the command was killed by SIGINT" in err and re.search(r"hit\s+\d+", out)


def test_a_probe_covers_every_name_of_the_file(targets):
    """A probe is on a file (device and inode), not on a name: a hard link runs the same probed code."""
    calls = targets / "calls"
    link = targets / f"calls-link-{os.getpid()}"
    os.link(calls, link)
    try:
        records, proc = run_json("count", "--engine", "ptrace", f"uprobe:{calls}:work", "--", str(link), "3")
        assert proc.returncode == 0 and [r["hits"] for r in records] == [3]
    finally:
        link.unlink()


@pytest.mark.parametrize("trap", [False, True], ids=["jumps", "traps"])
def test_return_probes_survive_a_signal_handler_on_an_alternate_stack_above_the_threads_own(targets, trap):
    """outer's pending return lies below the stack pointer while the handler runs inner on the alternate
    stack; it is set aside, not forgotten, and outer returns to its caller (the kernel's uretprobes, and this
    engine before, sent it SIGILL). On jumps, the return trampoline leaves that return to the tool."""
    command = [str(targets / "stacks"), "50"]
    untraced = subprocess.run(command, capture_output=True, text=True)
    assert untraced.stdout.startswith("altstack above the thread's stack: yes\n")
    path = str(targets / "stacks")
    ours, traced = _count("ptrace", [f"uretprobe:{path}:outer", f"uretprobe:{path}:inner"], command,
                          *(["--trap"] if trap else []))
    assert (traced.returncode, traced.stdout) == (0, untraced.stdout)
    assert sorted(ours.values()) == [50, 50]
    assert ("jumps" in traced.stderr) != trap

"""Where the ptrace engine places its bytes, and what it takes out again: a user probe on one of the engine's
own hook functions, a semaphore marker in a library loaded and unloaded in cycles, code the program rewrote
under a probe, a library mapped where a closed one was, and a hook function another tracer has already taken.

Each test runs a real program and compares what it printed (and its exit status) with an untraced run, and
the hits the tool counted with the kernel engine's or with the program's own count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import run_json
from oracles import anonymous_executable_mappings, text_differs_from_files
from uprobes.api import REMOVE, Session
from uprobes.probes.resolve import resolve_text
from uprobes.proc.maps import read_maps

LD_SO = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
LIBGCC_S = os.path.realpath("/lib/x86_64-linux-gnu/libgcc_s.so.1")
LIBSTDCXX = os.path.realpath("/lib/x86_64-linux-gnu/libstdc++.so.6")


def _count(engine: str, probes: list[str], command: list[str]) -> tuple[dict[str, int], subprocess.CompletedProcess]:
    records, proc = run_json("count", "--engine", engine, *probes, "--", *command, timeout=60)
    return {r["probe"]: r["hits"] for r in records}, proc


def _untraced(command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=30)


def _runtime_address(pid: int, probe_text: str) -> int:
    (probe,) = resolve_text(probe_text)
    return next(m.start - m.offset + probe.offset for m in read_maps(pid) if m.path == probe.path and m.executable)


class _Attached:
    """``uprobes count --json -p PID PROBES`` running beside a test: started, waited for ("attached" on stderr),
    stopped with Ctrl-C; ``hits`` and ``stderr`` once it is done."""

    def __init__(self, engine: str, pid: int, probes: list[str]) -> None:
        self.out = Path(f"/tmp/uprobes-test-{os.getpid()}-{os.urandom(4).hex()}.jsonl")
        self.tool = subprocess.Popen([sys.executable, "-m", "uprobes", "count", "--engine", engine, "--json", "-o",
                                      str(self.out), "-p", str(pid), *probes], stderr=subprocess.PIPE, text=True)
        self.said = []
        while True:  # until it says it is attached, or ends
            line = self.tool.stderr.readline()
            if not line:
                break
            self.said.append(line)
            if "attached" in line:
                break
        self.stderr = "".join(self.said)
        self.hits: dict[str, int] = {}

    @property
    def attached(self) -> bool:
        return self.tool.poll() is None and any("attached" in line for line in self.said)

    def stop(self) -> int:
        """Ctrl-C, as a user ends a run with -p (its status is then 130); the status it ended with."""
        if self.tool.poll() is None:
            self.tool.send_signal(signal.SIGINT)
        _, rest = self.tool.communicate(timeout=60)
        self.stderr += rest
        assert "Traceback" not in self.stderr, self.stderr
        if self.out.exists():
            self.hits = {r["probe"]: r["hits"] for r in map(json.loads, self.out.read_text().splitlines())}
            self.out.unlink()
        return self.tool.returncode

    def kill(self) -> None:
        if self.tool.poll() is None:
            self.tool.kill()
            self.tool.wait()
        self.out.unlink(missing_ok=True)


def _line(process: subprocess.Popen) -> str:
    return process.stdout.readline()


def _say(process: subprocess.Popen, text: str) -> None:
    process.stdin.write(text + "\n")
    process.stdin.flush()


# -- a. a user probe on one of the engine's own hook functions ---------------------------------------------


def test_probe_on_dl_debug_state_keeps_libraries_loaded_later_probed(targets, tracefs):
    """The user's probe counts the rendezvous as the kernel does, and the library dlopened twice is still
    placed at each load (its constructor's call and every lib_work)."""
    lib = targets / "libctor.so"
    probes = [f"uprobe:{LD_SO}:_dl_debug_state", f"uprobe:{lib}:lib_ctor", f"uprobe:{lib}:lib_work"]
    command = [str(targets / "lifecycle"), "dlopen", str(lib), "3"]
    untraced = _untraced(command)
    kernel, reference = _count("kernel", probes, command)
    ours, traced = _count("ptrace", probes, command)
    assert (traced.stdout, traced.returncode) == (reference.stdout, reference.returncode) \
        == (untraced.stdout, untraced.returncode) == ("dlopen sum 12\n", 0)
    assert kernel["lib_ctor"] == 2 and kernel["lib_work"] == 6 and kernel["_dl_debug_state"] > 0
    assert ours == kernel, traced.stderr


def test_removing_the_last_handler_of_a_dl_debug_state_probe_keeps_the_rendezvous(targets, capfd):
    """The user's handler on _dl_debug_state goes at its first hit: its probe goes, but the engine's own
    breakpoint on the same instruction stays, so the library dlopened later is still placed."""
    lib = targets / "libctor.so"
    command = [str(targets / "lifecycle"), "dlopen", str(lib), "3"]
    untraced = _untraced(command)
    with Session(command=command) as session:
        session.probe(f"uprobe:{LD_SO}:_dl_debug_state", lambda hit: REMOVE)
        session.probe(f"uprobe:{lib}:lib_ctor")
        session.probe(f"uprobe:{lib}:lib_work")
        status = session.run(duration=20)
        counts = session.hit_counts()
    assert (capfd.readouterr().out, status) == (untraced.stdout, untraced.returncode) == ("dlopen sum 12\n", 0)
    assert counts == [1, 2, 6]


def test_probe_on_unwind_raise_exception_keeps_a_throw_through_return_probes_working(targets, tracefs):
    """risky() throws for 1 and 3 through its probed return: the engine's unwinder hook must still put the
    return addresses back, or the unwinder meets the trampoline and calls std::terminate."""
    cxx = str(targets / "cxxthrow")
    shared = [f"uprobe:{LIBGCC_S}:_Unwind_RaiseException", f"uretprobe:{cxx}:_Z7guardedl",
              f"uretprobe:{cxx}:_Z5totall"]
    untraced = _untraced([cxx, "caught"])
    # the kernel cannot return-probe a frame a throw passes through (std::terminate): risky is left out there
    kernel, reference = _count("kernel", shared, [cxx, "caught"])
    ours, traced = _count("ptrace", shared + [f"uretprobe:{cxx}:_Z5riskyl"], [cxx, "caught"])
    assert (traced.stdout, traced.returncode) == (reference.stdout, reference.returncode) \
        == (untraced.stdout, untraced.returncode) == ("total 20\n", 0), traced.stderr
    assert kernel == {"_Unwind_RaiseException": 2, "_Z7guardedl%return": 5, "_Z5totall%return": 1}
    assert ours == {**kernel, "_Z5riskyl%return": 3}  # risky(0), (2), (4) return; (1) and (3) throw
    assert "2 return probes skipped" in traced.stderr


def test_probe_on_cxa_begin_catch_keeps_return_probes_of_the_catching_frames_counted(targets, tracefs):
    """guarded() catches what risky() throws: after each catch the engine's hook puts the trampoline back
    into guarded's and total's frames, so every return is counted, as the kernel counts them."""
    cxx = str(targets / "cxxthrow")
    probes = [f"uprobe:{LIBSTDCXX}:__cxa_begin_catch", f"uretprobe:{cxx}:_Z7guardedl", f"uretprobe:{cxx}:_Z5totall"]
    untraced = _untraced([cxx, "caught"])
    kernel, reference = _count("kernel", probes, [cxx, "caught"])
    ours, traced = _count("ptrace", probes, [cxx, "caught"])
    assert (traced.stdout, traced.returncode) == (reference.stdout, reference.returncode) \
        == (untraced.stdout, untraced.returncode) == ("total 20\n", 0)
    assert kernel == {"__cxa_begin_catch": 2, "_Z7guardedl%return": 5, "_Z5totall%return": 1}
    assert ours == kernel


# -- b. a semaphore marker in a library dlclosed and dlopened again ----------------------------------------


def test_a_semaphore_marker_fires_in_every_dlopen_cycle_and_detach_lowers_only_its_own_count(targets):
    """libsemcycle.so is loaded three times: twice at one base, then (a page of the program's own holding the
    first cycle's semaphore address, value 7) at another. The marker must be enabled in every cycle, and
    detach must lower the semaphore of the library mapped now, not the 7 at the old address."""
    lib = targets / "libsemcycle.so"
    command = [str(targets / "placement"), "semcycle", str(lib), "5"]
    untraced = _untraced(command, "go\ncheck\n")
    assert untraced.returncode == 0 and "enabled 0 times, same base yes" in untraced.stdout
    target = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    tool = None
    try:
        assert _line(target) == "ready\n"
        tool = _Attached("ptrace", target.pid, [f"usdt:{lib}:cycle:tick"])
        assert tool.attached, tool.stderr
        _say(target, "go")
        cycles = [_line(target) for _ in range(3)]
        tool.stop()
        assert "error" not in tool.stderr, tool.stderr
        _say(target, "check")
        after, _ = target.communicate(timeout=30)
        assert target.returncode == 0
        # one assertion for both faults: the second cycle's silence and the old address decremented at detach
        seen = "".join(cycles) + after
        assert seen == ("cycle 1 enabled 5 times\n"
                        "cycle 2 enabled 5 times, same base yes\n"
                        "cycle 3 enabled 5 times, another base yes\n"
                        "after: old semaphore page intact (7), semaphore now 0\n"), seen
        assert tool.hits == {"cycle:tick": 15}  # every time the program saw the marker enabled
    finally:
        if tool is not None:
            tool.kill()
        target.kill()
        target.wait()


# -- d. code the program rewrote under a probe --------------------------------------------------------------


def test_code_the_program_rewrote_under_a_probe_survives_detach_with_a_warning(targets):
    """answer() (mov $1,%eax) is hit once, then the program writes xor %eax,%eax; add $2,%eax over it (the
    int3 with it). At detach the engine must not put its stale first byte (b8) back over the program's 31, and
    must say so: one warning line naming the address."""
    placement = targets / "placement"
    untraced = _untraced([str(placement), "selfmod"], "go\nafter\n")
    assert untraced.stdout == "ready\nanswer 1, rewritten 2\nafter: answer 2, code as written\n"
    target = subprocess.Popen([str(placement), "selfmod"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    tool = None
    try:
        assert _line(target) == "ready\n"
        address = _runtime_address(target.pid, f"uprobe:{placement}:answer")
        tool = _Attached("ptrace", target.pid, [f"uprobe:{placement}:answer"])
        assert tool.attached, tool.stderr
        _say(target, "go")
        rewritten = _line(target)
        tool.stop()
        assert "error" not in tool.stderr, tool.stderr
        _say(target, "after")
        after, _ = target.communicate(timeout=30)
        assert ("ready\n" + rewritten + after, target.returncode) == (untraced.stdout, 0)
        assert tool.hits == {"answer": 1}
        warnings = [line for line in tool.stderr.splitlines() if "warning" in line]
        assert len(warnings) == 1 and f"{address:#x}" in warnings[0], tool.stderr
    finally:
        if tool is not None:
            tool.kill()
        target.kill()
        target.wait()


# -- i. a library mapped where a closed one was --------------------------------------------------------------


def test_a_library_mapped_where_a_closed_one_was_runs_its_own_probed_instruction(targets):
    """libscale3.so and libscale7.so have one layout and load at one base: scale() is imul $3 in one and imul $7
    in the other, each run from a boost slot. The second must not run the first one's copy."""
    lib3, lib7 = targets / "libscale3.so", targets / "libscale7.so"
    command = [str(targets / "placement"), "reuse", str(lib3), str(lib7)]
    untraced = _untraced(command)
    assert untraced.stdout == "first 15, second 35, traps 0, same base yes\n"
    records, traced = run_json("count", "--engine", "ptrace", f"uprobe:{lib3}:scale", f"uprobe:{lib7}:scale", "--",
                               *command, timeout=60)
    assert (traced.stdout, traced.returncode) == (untraced.stdout, 0)
    assert sorted((r["path"], r["hits"]) for r in records) == [(str(lib3), 1), (str(lib7), 1)]


def test_the_programs_own_int3_where_a_removed_probe_was_reaches_its_handler(targets, capfd):
    """The probe on libscale3.so's scale() goes with its handler at its first hit; libscaletrap.so then loads
    at the same base with an int3 of its own at that address. The program's SIGTRAP handler must see it once,
    not a thread rewound to it forever."""
    command = [str(targets / "placement"), "reuse", str(targets / "libscale3.so"), str(targets / "libscaletrap.so")]
    untraced = _untraced(command)
    assert untraced.stdout == "first 15, second 5, traps 1, same base yes\n"
    session = Session(command=command)
    with session:
        session.probe(f"uprobe:{targets / 'libscale3.so'}:scale", lambda hit: REMOVE)
        status = session.run(duration=3)  # None: the program was still running (looping) after 3 s
        counts = session.hit_counts()
    if status is None:
        session.wait()  # detached: the program takes its own trap now and ends
    assert (status, counts) == (0, [1])
    assert capfd.readouterr().out == untraced.stdout


# -- j. a hook function another tracer has taken -------------------------------------------------------------


def test_a_kernel_uprobe_on_dl_debug_state_leaves_a_ptrace_run_working_with_a_warning(targets, tracefs):
    """A kernel uprobe (uprobes --engine kernel -p PID, so only this process) holds _dl_debug_state's first byte;
    the ptrace engine's rendezvous hook cannot go there. Its run must go on with the program's probes, say so in
    a warning naming _dl_debug_state, and leave no byte behind once both tracers are gone."""
    placement, lib = targets / "placement", targets / "libctor.so"
    command = [str(placement), "later", str(lib)]
    untraced = _untraced(command, "go\nend\n")
    assert untraced.stdout == "ready\nlater steps 33, lib sum 6\n"
    target = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    kernel = ours = None
    try:
        assert _line(target) == "ready\n"
        kernel = _Attached("kernel", target.pid, [f"uprobe:{LD_SO}:_dl_debug_state"])
        assert kernel.attached, kernel.stderr
        ours = _Attached("ptrace", target.pid, [f"uprobe:{placement}:step"])
        attached = ours.attached
        _say(target, "go")
        result = _line(target)
        status = ours.stop()
        kernel.stop()
        assert result == "later steps 33, lib sum 6\n"
        assert (attached, status) == (True, 130), ours.stderr  # attached, and still running at Ctrl-C
        assert "error" not in ours.stderr and "error" not in kernel.stderr
        warnings = [line for line in ours.stderr.splitlines() if "warning" in line]
        assert len(warnings) == 1 and "_dl_debug_state" in warnings[0], ours.stderr
        assert ours.hits == {"step": 3}
        assert kernel.hits["_dl_debug_state"] > 0  # the kernel kept its traps: the dlopen went through them
        assert text_differs_from_files(target.pid) == [] and anonymous_executable_mappings(target.pid) == []
        _say(target, "end")
        target.communicate(timeout=30)
        assert target.returncode == 0
    finally:
        for tool in (ours, kernel):
            if tool is not None:
                tool.kill()
        target.kill()
        target.wait()

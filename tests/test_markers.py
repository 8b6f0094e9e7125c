"""USDT markers end to end on our own targets, in both engines: every argument form checked value by value
against what the program prints, a marker inlined at several sites, and a marker in a library loaded with
dlopen whose semaphore can only be raised once the library is mapped."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from conftest import run_json
from oracles import file_offset, readelf_sdt_notes
from uprobes.probes.resolve import resolve_text

ENGINES = ["ptrace", "kernel"]


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    if request.param == "kernel":
        request.getfixturevalue("tracefs")
    return request.param


def _trace(engine: str, probes: list[str], command: list[str]) -> tuple[list[dict], str]:
    records, proc = run_json("trace", "--engine", engine, *probes, "--", *command)
    untraced = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == untraced.returncode == 0, proc.stderr
    return [r for r in records if "probe" in r], proc.stdout


def _printed(stdout: str, label: str) -> list[str]:
    (line,) = [line for line in stdout.splitlines() if line.startswith(label + " ")]
    return line.split()[1:]


def test_compiler_emitted_forms_match_what_the_program_prints(targets, engine):
    forms = targets / "forms"
    markers = ["integers", "words", "constants", "fields", "elements", "globals"]
    probes = [f"usdt:{forms}:forms:{m}" for m in markers if m != "words"]
    probes.append(f"usdt:{forms}:forms:words arg0 arg1 text=arg2:string")
    events, stdout = _trace(engine, probes, [str(forms)])
    seen = {e["probe"]: e["args"] for e in events}
    c, uc, s, us, i, l, p, x, y, z, a2, ak = stdout.splitlines()[0].split()
    assert seen["forms:integers"] == {"arg0": int(c), "arg1": int(uc), "arg2": int(s), "arg3": int(us)}
    assert seen["forms:words"] == {"arg0": int(i), "arg1": int(l), "text": p}
    assert seen["forms:constants"] == {"arg0": -1, "arg1": 255, "arg2": 1234567890123}
    assert seen["forms:fields"] == {"arg0": int(x), "arg1": int(y), "arg2": int(z)}
    assert seen["forms:elements"] == {"arg0": int(a2), "arg1": int(ak)}
    assert seen["forms:globals"] == {"arg0": 42, "arg1": 20}


def test_forms_tracefs_cannot_express_are_decoded_by_the_ptrace_engine(targets, engine):
    forms = targets / "forms"
    events, stdout = _trace(engine, [f"usdt:{forms}:forms:known_*"], [str(forms)])
    seen = {e["probe"]: e for e in events}
    assert list(seen["forms:known_bytes"]["args"].values()) == [int(v) for v in _printed(stdout, "known_bytes")]
    sib, floats = seen["forms:known_sib"], seen["forms:known_floats"]
    d, f, bits, pi = _printed(stdout, "known_floats")
    assert floats["args"]["arg3"] == pytest.approx(float(pi))  # 4f@%eax: tracefs reads it, typed as a float
    if engine == "kernel":  # index registers and xmm registers: left out, with the reason, never wrong
        assert sib["args"] == {"arg0": None, "arg1": None, "arg2": None}
        assert all("index register" in reason for reason in sib["errors"].values())
        assert [floats["args"][n] for n in ("arg0", "arg1", "arg2")] == [None] * 3
        assert all("%xmm" in floats["errors"][n] for n in ("arg0", "arg1", "arg2"))
    else:
        assert list(sib["args"].values()) == [int(v) for v in _printed(stdout, "known_sib")]
        assert [floats["args"][n] for n in ("arg0", "arg1", "arg2")] == [float(d), float(f), int(bits)]
        assert "errors" not in sib and "errors" not in floats


def test_a_marker_inlined_at_two_sites_fires_at_each_with_its_own_spec(targets, engine):
    forms = str(targets / "forms")
    events, stdout = _trace(engine, [f"usdt:{forms}:forms:noted"], [forms])
    sites = sorted(file_offset(forms, n.location) for n in readelf_sdt_notes(forms) if n.name == "noted")
    assert len(sites) == 2
    assert [e["args"]["arg0"] for e in events] == [int(v) for v in _printed(stdout, "noted")]
    assert len({e["ip"] for e in events}) == 2  # one event per site


def test_a_marker_in_a_library_loaded_later_has_its_semaphore_raised_after_the_load(targets, engine):
    lib = targets / "libprobed.so"
    command = [str(targets / "lifecycle"), "marker", str(lib), "5"]
    events, stdout = _trace(engine, [f"usdt:{lib}:demo:order__done"], command)
    sites = resolve_text(f"usdt:{lib}:demo:order__done")
    # raised once per site by the time the program looked, right after dlopen
    assert _printed(stdout, "semaphore") == [str(len(sites))]
    assert [(e["args"]["arg0"], e["args"]["arg1"]) for e in events] == [(i, 2 * i) for i in range(5)]
    untraced = subprocess.run(command, capture_output=True, text=True).stdout
    assert _printed(untraced, "semaphore") == ["0"]
    assert _printed(stdout, "total") == _printed(untraced, "total")


def test_both_engines_give_the_same_marker_events(targets, tracefs):
    forms = str(targets / "forms")
    command = ["setarch", "-R", forms]  # no address randomisation: pointers are the same in both runs
    ptrace, _ = _trace("ptrace", [f"usdt:{forms}:forms:*"], command)
    kernel, _ = _trace("kernel", [f"usdt:{forms}:forms:*"], command)
    assert [e["probe"] for e in ptrace] == [e["probe"] for e in kernel]
    for ours, theirs in zip(ptrace, kernel):
        # What the kernel fetched, the ptrace engine fetched the same; what it left out (with the reason),
        # only the ptrace engine decodes.
        fetched = {name for name, value in theirs["args"].items() if value is not None}
        assert {n: ours["args"][n] for n in fetched} == {n: theirs["args"][n] for n in fetched}, ours["probe"]
        assert set(theirs["args"]) - fetched == set(theirs.get("errors", {}))


def test_kernel_and_ptrace_consumers_of_one_semaphore_each_undo_only_their_own(targets, tracefs):
    lib = targets / "libprobed.so"
    target = subprocess.Popen([str(targets / "lifecycle"), "watch", str(lib)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def semaphore() -> int:
        target.stdin.write("?\n")
        target.stdin.flush()
        return int(target.stdout.readline().split()[1])

    def consumer(engine: str, probe: str = f"usdt:{lib}:demo:order__done") -> tuple[subprocess.Popen, str]:
        tool = subprocess.Popen([sys.executable, "-m", "uprobes", "count", "--engine", engine, "-p", str(target.pid),
                                 probe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return tool, tool.stderr.readline()

    def leave(tool: subprocess.Popen) -> None:
        tool.send_signal(signal.SIGINT)
        _, err = tool.communicate(timeout=60)
        assert "Traceback" not in err

    # Two sites of one marker share its semaphore: one consumer on each, as PATH:OFFSET(REF_CTR_OFFSET).
    first, second = (f"p {lib}:{site.offset:#x}({site.ref_ctr_offset:#x})"
                     for site in resolve_text(f"usdt:{lib}:demo:order__done"))
    try:
        assert semaphore() == 0
        ptrace, said = consumer("ptrace", first)
        assert "attached" in said and semaphore() == 1
        kernel, said = consumer("kernel", second)
        assert "attached" in said and semaphore() == 2
        leave(ptrace)
        assert semaphore() == 1
        ptrace, said = consumer("ptrace", first)
        assert "attached" in said and semaphore() == 2
        leave(kernel)
        assert semaphore() == 1
        leave(ptrace)
        assert semaphore() == 0
        # On one site, the kernel's int3 is already there and the kernel takes its traps: the ptrace engine
        # refuses, saying so, and touches nothing.
        kernel, _ = consumer("kernel")
        assert semaphore() == 2  # once per site
        refused, said = consumer("ptrace")
        assert refused.wait(timeout=60) != 0 and "another tracer's breakpoint" in said
        assert semaphore() == 2
        leave(kernel)
        assert semaphore() == 0
    finally:
        target.kill()
        target.wait()

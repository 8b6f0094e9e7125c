"""The USDT markers of Debian's /usr/bin/python3.11 end to end, with both engines: each script reports what
the interpreter did (its audit hooks, sys.modules, gc.callbacks) and the events must say exactly the same,
while the script's own output and exit status stay what they are untraced."""

from __future__ import annotations

import ast
import json
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import OutputLines, RunningTool, no_run_group_left_behind, run_cli, run_json, wait_until

PYTHON = "/usr/bin/python3.11"  # Debian's, built with the markers (python3.11 in PATH may be a pyenv shim)
ENGINES = ["ptrace", "kernel"]


def _marker(name: str, *fetchargs: str) -> str:
    return " ".join([f"usdt:{PYTHON}:python:{name}", *fetchargs])


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    """Each engine in turn; the kernel's needs tracefs, and its runs must leave no group of theirs behind
    (conftest.no_run_group_left_behind: the test's own groups, not every group on the machine)."""
    if request.param == "kernel":
        request.getfixturevalue("tracefs")
        with no_run_group_left_behind():
            yield request.param
    else:
        yield request.param


def _script(tmp_path: Path, name: str, source: str) -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return [PYTHON, "-I", "-S", str(path)]  # isolated, no site: nothing of this machine's own gets imported


def _traced_and_untraced(engine: str, probes: list[str], command: list[str]):
    """Trace ``command``, after running it once untraced (which also warms any cache it fills); the traced
    run must print the same and end with the same status. Returns the events and both runs."""
    untraced = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert untraced.returncode == 0, untraced.stderr
    records, traced = run_json("trace", "--engine", engine, *probes, "--", *command, timeout=60)
    assert traced.returncode == untraced.returncode
    assert traced.stdout == untraced.stdout
    assert records and records[-1] == {"lost": 0}
    events = [r for r in records if "probe" in r]
    assert {(e["pid"], e["comm"]) for e in events} == {(events[0]["pid"], "python3.11")}
    return events, traced, untraced


AUDIT_SCRIPT = """\
    import sys
    kept = []
    def hook(event, args):
        if event == "uprobes.test":
            kept.append(args)  # kept alive: every tuple has an address of its own
    sys.addaudithook(hook)
    for i in range(7):
        sys.audit("uprobes.test", 100 + i)
    print("audited", len(kept))
    print("tuples", *(id(args) for args in kept), file=sys.stderr)
"""


def _audit_run(engine: str, tmp_path: Path):
    # arg1 points to the args tuple: its first item (+24) is an int whose first 30-bit digit is at +24 too
    probe = _marker("audit", "arg0:string", "arg1", "value=+24(+24(arg1)):u32")
    events, traced, _ = _traced_and_untraced(engine, [probe], _script(tmp_path, "audit.py", AUDIT_SCRIPT))
    (tuples,) = [line.split()[1:] for line in traced.stderr.splitlines() if line.startswith("tuples ")]
    return events, [int(t) for t in tuples], traced


def test_audit_marker_sees_each_sys_audit_with_its_args_tuple(engine, tmp_path):
    events, tuples, traced = _audit_run(engine, tmp_path)
    assert traced.stdout == "audited 7\n"
    ours = [e["args"] for e in events if e["args"]["arg0"] == "uprobes.test"]
    assert ours == [{"arg0": "uprobes.test", "arg1": address, "value": 100 + i} for i, address in enumerate(tuples)]
    assert len(set(tuples)) == 7 and all(address > 0 for address in tuples)
    assert len(events) > len(ours)  # the interpreter raises audit events of its own


def test_both_engines_see_the_same_audit_events(tracefs, tmp_path):
    """Not only our seven events: the interpreter's own, in the same order, are the same with either engine."""
    seen = {}
    for engine in ENGINES:
        with no_run_group_left_behind():
            events, _, _ = _audit_run(engine, tmp_path)
        seen[engine] = [(e["probe"], e["args"]["arg0"], e["args"]["value"] if e["args"]["arg0"] == "uprobes.test"
                         else None) for e in events]
    assert seen["ptrace"] == seen["kernel"]
    assert [event for event in seen["ptrace"] if event[1] == "uprobes.test"] == [
        ("python:audit", "uprobes.test", 100 + i) for i in range(7)]


IMPORT_SCRIPT = """\
    import sys
    before = set(sys.modules)
    import json, fractions, xml.dom.minidom
    try:
        import uprobes_no_such_module
    except ModuleNotFoundError:
        pass
    print("before", *sorted(before))
    print("new", *sorted(set(sys.modules) - before))
"""

# Modules the interpreter's C initialization makes itself, without importlib's _find_and_load.
MADE_BY_THE_INTERPRETER = {"__main__", "_frozen_importlib", "_imp", "_thread", "_warnings", "_weakref", "builtins",
                           "sys"}


def test_import_markers_name_every_module_the_script_loads(engine, tmp_path):
    """import__find__load__start/done surround importlib's _find_and_load, which the C import runs for a name not
    yet in sys.modules: every module loaded (its parent packages included: 3.11 passes __import__ as the import
    function for those), each once, and each failed import with found == 0."""
    events, traced, _ = _traced_and_untraced(engine, [_marker("import__find__load__start", "arg0:string"),
                                                      _marker("import__find__load__done", "arg0:string",
                                                              "found=arg1")],
                                             _script(tmp_path, "imports.py", IMPORT_SCRIPT))
    lines = dict(line.split(" ", 1) for line in traced.stdout.splitlines())
    before, new = set(lines["before"].split()), set(lines["new"].split())
    assert {"json", "json.decoder", "_json", "fractions", "decimal", "xml", "xml.dom", "xml.dom.minidom"} <= new
    open_imports, loaded, failed, started = [], [], [], []
    for event in events:  # one thread: each done closes the innermost start
        name = event["args"]["arg0"]
        if event["probe"] == "python:import__find__load__start":
            open_imports.append(name)
            started.append(name)
        else:
            assert open_imports.pop() == name
            (loaded if event["args"]["found"] == 1 else failed).append(name)
    assert open_imports == []
    assert len(started) == len(set(started))  # once loaded, a module comes from sys.modules
    assert set(loaded) - before == new  # exactly what the script saw appear
    assert before - set(loaded) == MADE_BY_THE_INTERPRETER  # the probes were there before the first import
    assert "uprobes_no_such_module" in failed and not set(failed) & (before | new)
    assert failed[-1] == "uprobes_no_such_module"


GC_SCRIPT = """\
    import gc, sys
    gc.disable()
    seen = []
    def watch(phase, info):
        seen.append((phase, info["generation"], info["collected"] + info["uncollectable"]))
    gc.callbacks.append(watch)
    class Node:
        pass
    def cycles(n):
        for _ in range(n):
            a, b = Node(), Node()
            a.other, b.other = b, a
    sys.audit("uprobes.gc", "begin")
    for n in (10, 0, 25):
        cycles(n)
        gc.collect(2)
    cycles(5)
    gc.collect(0)
    sys.audit("uprobes.gc", "end")
    gc.callbacks.remove(watch)
    print(seen)
"""


def test_gc_markers_match_what_gc_callbacks_saw(engine, tmp_path):
    """gc__start gives the generation, gc__done collected + uncollectable. The interpreter also collects on its
    own, before gc.disable() and at shutdown (where no callback runs), so the script's collections are the ones
    between its two audit events."""
    probes = [_marker("gc__start", "arg0"), _marker("gc__done", "arg0"), _marker("audit", "arg0:string")]
    events, traced, _ = _traced_and_untraced(engine, probes, _script(tmp_path, "gc.py", GC_SCRIPT))
    seen = ast.literal_eval(traced.stdout)
    assert [(phase, generation) for phase, generation, _ in seen] == [("start", 2), ("stop", 2)] * 3 + [
        ("start", 0), ("stop", 0)]
    names = [e["args"]["arg0"] if e["probe"] == "python:audit" else None for e in events]
    begin, end = [i for i, name in enumerate(names) if name == "uprobes.gc"]
    between = [(e["probe"], e["args"]["arg0"]) for e in events[begin + 1:end]]
    assert between == [("python:gc__start", generation) if phase == "start" else ("python:gc__done", collected)
                       for phase, generation, collected in seen]
    assert [arg for probe, arg in between if probe == "python:gc__start"] == [2, 2, 2, 0]
    assert [arg for probe, arg in between if probe == "python:gc__done"] == [20, 0, 50, 10]  # two objects a cycle
    assert any(e["probe"] == "python:gc__start" for e in events[end:])  # shutdown collects, unseen by callbacks


TICK_SCRIPT = """\
    import sys, time
    for n in range(100000):
        sys.audit("uprobes.tick", n)
        print("tick", n, flush=True)
        time.sleep(0.01)
"""


def _audit_semaphore(pid: int) -> int:
    listing = json.loads(run_cli("list", "-p", str(pid), "python:audit", "--json", check=True).stdout)
    (obj,) = [o for o in listing["objects"] if o["markers"]]
    assert obj["path"] == PYTHON
    (site,) = obj["markers"][0]["sites"]
    return site["semaphore_value"]


def _ticks(events: list[dict]) -> list[int]:
    return [event["args"]["n"] for event in events if event["args"]["arg0"] == "uprobes.tick"]


def test_audit_semaphore_is_raised_while_attached_and_lowered_after(engine, tmp_path):
    """python3.11's markers have semaphores: a trace attached with -p raises python:audit's in its process (and
    in no other python3.11) for as long as it traces, and lowers it again at SIGINT; the process goes on
    printing as before."""
    command = _script(tmp_path, "tick.py", TICK_SCRIPT)
    target = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout.readline() == bystander.stdout.readline() == "tick 0\n"
        output = OutputLines(target.stdout)  # from "tick 1"
        assert _audit_semaphore(target.pid) == 0
        assert "= 0 (disabled)" in run_cli("list", "-p", str(target.pid), "python:audit", check=True).stdout
        with RunningTool("trace", "--engine", engine, "--json", "-p", str(target.pid),
                         _marker("audit", "arg0:string", "n=+24(+24(arg1)):u32")) as tracer:
            tracer.wait_for(lambda: len(_ticks(tracer.events())) >= 10, "ten ticks traced")
            during = _audit_semaphore(target.pid), _audit_semaphore(bystander.pid)
            assert "= 1 (enabled)" in run_cli("list", "-p", str(target.pid), "python:audit", check=True).stdout
            tracer.finish()
        assert tracer.proc.returncode == 128 + signal.SIGINT
        after = _audit_semaphore(target.pid), _audit_semaphore(bystander.pid)
        records = tracer.records()
        ticks = _ticks(records[:-1])
        wait_until(lambda: output.lines and int(output.lines[-1].split()[1]) > ticks[-1] + 5,
                   "five more ticks printed after the tracer left")
        assert target.poll() is None and bystander.poll() is None  # still running
        target.terminate()
        target.wait(timeout=30)
        printed = [int(line.split()[1]) for line in output.closed().splitlines()]
    finally:
        for process in (target, bystander):
            process.kill()
            process.wait()
    assert (during, after) == ((1, 0), (0, 0))
    assert records[-1] == {"lost": 0}
    assert len(ticks) >= 10 and ticks == list(range(ticks[0], ticks[0] + len(ticks)))
    assert {r["pid"] for r in records[:-1]} == {target.pid}
    assert printed == list(range(1, len(printed) + 1))  # every line, in order, before, during and after
    assert printed[-1] > ticks[-1] + 5  # it went on after the tracer left

"""The kernel engine's probes in a library a traced process loads after attach (``later``, what a glob's PATH
asks for): placed as perf reports the mapping, in each process that maps it once, and reported and counted
under the indexes after the others. tests/targets/loadlater waits for a line before each step, so that every
call it makes comes after the probes are placed (the hits between the load and the placement are missed on
this engine, by design)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import TRACEFS, no_run_group_left_behind
from uprobes.engines.kernel.engine import KernelEngine
from uprobes.output.event import Event
from uprobes.probes.resolve import Probe, resolve_texts
from uprobes.proc.launch import HeldCommand
from uprobes.stacks import StackLimits

N = 200
SUM = sum(2 * i for i in range(N))  # lib_twice(i) for i < N

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the kernel engine needs root")


@pytest.fixture(autouse=True)
def nothing_left_behind(tracefs):
    with no_run_group_left_behind():
        yield


class _Program:
    """A run of tests/targets/loadlater in ``mode``: it goes on a step each time it is released."""

    def __init__(self, targets: Path, mode: str) -> None:
        self.lib, self.path = str(targets / "libprobed.so"), str(targets / "loadlater")
        self.proc = subprocess.Popen([self.path, self.lib, str(N), mode], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.pid, self.input, self.output = self.proc.pid, self.proc.stdin, self.proc.stdout
        assert self.said() == "ready"

    def wait(self) -> int:
        return self.proc.wait(30)

    def release(self) -> None:
        self.input.write("go\n")
        self.input.flush()

    def said(self) -> str:
        return self.output.readline().strip()

    def runs_on_unharmed(self) -> None:
        """Its last calls (made once nothing of ours is left) give what they should, and it ends well."""
        self.release()
        assert self.said() == f"sum {SUM}"
        assert self.wait() == 0


class _HeldProgram(_Program):
    """loadlater launched as the CLI's -c launches a command: held before its exec until :meth:`start`, through
    sh (whose exec comes first), its input and output two FIFOs in ``directory``."""

    def __init__(self, targets: Path, mode: str, directory: Path) -> None:
        self.lib, self.path = str(targets / "libprobed.so"), str(targets / "loadlater")
        self.fifos = directory / "in", directory / "out"
        for fifo in self.fifos:
            os.mkfifo(fifo)
        self.command = HeldCommand(["sh", "-c", f'exec "$0" "$@" <{self.fifos[0]} >{self.fifos[1]}', self.path,
                                    self.lib, str(N), mode])
        self.pid = self.command.pid

    def start(self) -> None:
        self.command.release()
        self.input, self.output = open(self.fifos[0], "w"), open(self.fifos[1])
        assert self.said() == "ready"

    def wait(self) -> int:
        return self.command.wait()


class _Later:
    """The ``later`` of a run whose probe text names ``lib_twice`` (``probe``: what follows PATH:) in any file
    called libprobed.so; what it was asked."""

    def __init__(self, probe: str = "lib_twice i=%di:s32") -> None:
        self.probe = probe
        self.asked: list[tuple[int, str]] = []

    def __call__(self, pid: int, path: str) -> list[Probe]:
        self.asked.append((pid, path))
        return resolve_texts([f"uprobe:{path}:{self.probe}"]) if os.path.basename(path) == "libprobed.so" else []

    def asked_for_the_library(self) -> list[tuple[int, str]]:
        return [(pid, path) for pid, path in self.asked if os.path.basename(path) == "libprobed.so"]


def _tick(program: _Program) -> list[Probe]:
    return resolve_texts([f"uprobe:{program.path}:tick i=%di:s32"])


def _drained(engine: KernelEngine) -> list[Event]:
    """Every event in the buffers now (of calls the program has finished making)."""
    events = []
    while got := engine.poll(0):
        events += got
    return events


def _calls(events: list[Event], index: int) -> dict[int, list[int]]:
    """The arguments of probe ``index``'s hits, by process, in the order they came."""
    calls: dict[int, list[int]] = {}
    for event in events:
        if event.probe_index == index:
            calls.setdefault(event.pid, []).append(event.args["i"])
    return calls


def _nothing_of_ours_left(engine: KernelEngine) -> None:
    for listing in ("dynamic_events", "uprobe_events"):
        assert f"{engine.group}/" not in (TRACEFS / listing).read_text()


def _loaded_and_placed(program: _Program, engine: KernelEngine, loads: int = 1) -> list[Event]:
    """Release ``program`` to load the library (in ``loads`` processes); once it says so, perf has the records of
    the mappings, which a poll reads: the probes are placed when it returns. The events it read."""
    program.release()
    for _ in range(loads):
        assert program.said() == "loaded"
    return _drained(engine)


@pytest.mark.parametrize("first", [True, False], ids=["after-a-probe", "no-probe-yet"])
def test_a_library_loaded_later_is_probed_from_then_on_under_the_next_index(targets, first):
    program = _Program(targets, "alone")
    probes = _tick(program) if first else []
    later = _Later()
    with KernelEngine() as engine:
        engine.attach(probes, program.pid, later=later)
        events = _loaded_and_placed(program, engine)
        assert later.asked_for_the_library() == [(program.pid, program.lib)]
        program.release()
        assert program.said() == f"sum {SUM}"
        events += _drained(engine)
        assert _calls(events, len(probes)) == {program.pid: list(range(N))}
        if first:
            assert _calls(events, 0) == {program.pid: [0]}
        assert {e.probe for e in events if e.probe_index == len(probes)} == {"lib_twice"}
        assert engine.hit_counts() == ([1, N] if first else [N])
    assert engine.hit_counts() == ([1, N] if first else [N])
    _nothing_of_ours_left(engine)
    program.runs_on_unharmed()


def test_a_launched_command_gets_the_probes_of_the_library_it_loads(targets, tmp_path):
    """Held before its exec, its mappings are told from the exec on: sh's, then the program's, then the
    library's."""
    program = _HeldProgram(targets, "alone", tmp_path)
    later = _Later()
    with KernelEngine() as engine:
        engine.attach([], program.pid, held=True, later=later)
        program.start()
        events = _loaded_and_placed(program, engine)
        assert [os.path.basename(path) for _, path in later.asked][-2:] == ["loadlater", "libprobed.so"]
        program.release()
        assert program.said() == f"sum {SUM}"
        assert _calls(events + _drained(engine), 0) == {program.pid: list(range(N))}
        assert engine.hit_counts() == [N]
    _nothing_of_ours_left(engine)
    program.runs_on_unharmed()


@pytest.mark.parametrize("mode", ["inherit", "reexec", "early"])
def test_a_child_forked_around_the_placement_is_counted_once_per_call(targets, mode):
    """``inherit``: forked once the probes are placed, the child inherits them; ``reexec``: then it execs and
    maps the library again, and must not get them a second time; ``early``: forked between the load and the
    placement, it has the library but not the probes, which are opened on it."""
    program = _Program(targets, mode)
    later = _Later()
    with KernelEngine() as engine:
        engine.attach(_tick(program), program.pid, later=later)
        events = _loaded_and_placed(program, engine)
        program.release()
        if mode != "early":
            assert program.said() == ("forked" if mode == "inherit" else "loaded")
            events += _drained(engine)  # the child's records read before it makes the calls
            program.release()
        assert [program.said(), program.said()] == [f"sum {SUM}"] * 2
        events += _drained(engine)
        calls = _calls(events, 1)
        assert len(calls) == 2 and all(each == list(range(N)) for each in calls.values())
        assert engine.hit_counts() == [1, 2 * N]
        assert len(later.asked_for_the_library()) == 1
    _nothing_of_ours_left(engine)
    program.runs_on_unharmed()


def test_a_child_forked_before_the_load_gets_the_probes_where_it_loads_the_library(targets):
    program = _Program(targets, "both")
    later = _Later()
    with KernelEngine() as engine:
        engine.attach([], program.pid, later=later)
        events = _loaded_and_placed(program, engine, loads=2)
        program.release()
        assert [program.said(), program.said()] == [f"sum {SUM}"] * 2
        events += _drained(engine)
        calls = _calls(events, 0)
        assert len(calls) == 2 and program.pid in calls and all(each == list(range(N)) for each in calls.values())
        assert engine.hit_counts() == [2 * N]
        assert len(later.asked_for_the_library()) == 1
    _nothing_of_ours_left(engine)
    program.runs_on_unharmed()


def test_a_process_added_with_the_library_mapped_gets_its_probes(targets):
    first, added = _Program(targets, "alone"), _Program(targets, "alone")
    later = _Later()
    with KernelEngine() as engine:
        engine.attach([], [first.pid], later=later)
        _loaded_and_placed(first, engine)
        added.release()
        assert added.said() == "loaded"  # not traced yet: no record of it
        engine.add_process(added.pid)
        for program in (first, added):
            program.release()
            assert program.said() == f"sum {SUM}"
        calls = _calls(_drained(engine), 0)
        assert calls == {first.pid: list(range(N)), added.pid: list(range(N))}
        assert engine.hit_counts() == [2 * N]
    _nothing_of_ours_left(engine)
    for program in (first, added):
        program.runs_on_unharmed()


@pytest.mark.parametrize("predicate", [False, True], ids=["every-hit", "if"])
@pytest.mark.parametrize("counted_alone", [4, 0], ids=["alone", "tallied"])
def test_later_probes_are_counted_exactly(targets, counted_alone, predicate):
    """Counted by their own event's counter, or by their tag with the others' records (``counted_alone`` 0),
    their predicate applied by the kernel in either case."""
    program = _Program(targets, "early")
    later = _Later("lib_twice i=%di:s32 if i >= 50" if predicate else "lib_twice i=%di:s32")
    with KernelEngine(counted_alone=counted_alone) as engine:
        engine.attach(_tick(program), program.pid, counting=True, later=later)
        assert _loaded_and_placed(program, engine) == []
        program.release()
        assert [program.said(), program.said()] == [f"sum {SUM}"] * 2
        assert engine.poll(0) == []
        assert engine.hit_counts() == [1, 2 * (N - 50 if predicate else N)]
    assert engine.hit_counts() == [1, 2 * (N - 50 if predicate else N)]
    _nothing_of_ours_left(engine)
    program.runs_on_unharmed()


def test_later_probes_with_stacks_unwind_through_a_later_return_probe(targets):
    """lib_twice's return address is the kernel's trampoline when lib_add (its tail call) is hit: the stack
    reads through it with the address the entry of lib_twice saw."""
    program = _Program(targets, "alone")
    library = str(targets / "libprobed.so")

    def later(pid: int, path: str) -> list[Probe]:
        return (resolve_texts([f"uprobe:{path}:lib_add a=%di:s32", f"uretprobe:{path}:lib_twice"])
                if path == library else [])

    with KernelEngine() as engine:
        engine.attach(_tick(program), program.pid, stacks=StackLimits(), later=later)
        events = _loaded_and_placed(program, engine)
        program.release()
        assert program.said() == f"sum {SUM}"
        events += _drained(engine)
        adds = [event for event in events if event.probe_index == 1]
        assert [event.args["a"] for event in adds] == list(range(N))
        assert [event.retval for event in events if event.probe_index == 2] == [2 * i for i in range(N)]
        for event in adds:
            assert event.stack[0].startswith("libprobed.so`lib_add") and "loadlater`main" in " ".join(event.stack)
        assert engine.hit_counts() == [1, N, N]
    _nothing_of_ours_left(engine)
    program.runs_on_unharmed()

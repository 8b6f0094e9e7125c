"""User stacks on both engines, checked against the stacks the program prints itself at the same moments:
libgcc's unwinder through backtrace(3), or its own walk of the frame pointers when it has no unwind tables
(tests/targets/unwound.c). Frame names are turned back into addresses with readelf's symbols, so the check is
of the addresses, not of how we name them."""

from __future__ import annotations

import collections
import itertools
import os
import re
import subprocess

import pytest

from conftest import run_cli, run_json
from oracles import function_addresses, shared_libraries

ENGINES = ["ptrace", "kernel"]
VARIANTS = ["fp", "nofp", "nocfi", "cxx"]


@pytest.fixture(params=ENGINES)
def engine(request, targets):
    if request.param == "kernel" and os.geteuid() != 0:
        pytest.skip("the kernel engine needs root")
    return request.param


def _objects(program: str) -> dict[str, str]:
    """File name (as mapped: libstdc++.so.6.0.30, not its soname) -> path, of the program and its libraries."""
    paths = [program, *shared_libraries(program).values()]
    return {os.path.basename(path): path for path in paths}


def _program_stacks(stdout: str, label: str) -> list[list[tuple[str, int]]]:
    """The ``label`` lines the program printed: (object, address) per frame, innermost first."""
    stacks = []
    for line in stdout.splitlines():
        words = line.split()
        if words and words[0] == label:
            stacks.append([(name, int(offset, 16)) for name, offset in (word.split("+") for word in words[1:])])
    return stacks


def _address(frame: str, objects: dict[str, str]) -> tuple[str, int]:
    """``object`function+0xoff`` as (object, address) by readelf's symbols of that object."""
    obj, _, where = frame.partition("`")
    name, _, offset = where.partition("+")
    return obj, function_addresses(objects[obj])[name] + int(offset or "0", 16)


def _function(program: str, name: str) -> tuple[str, int]:
    return os.path.basename(program), function_addresses(program)[name]


def _stacks(records: list[dict], probe: str) -> list[list[str]]:
    return [record["stack"] for record in records if record.get("probe") == probe]


@pytest.mark.parametrize("variant", VARIANTS)
def test_stacks_are_those_the_program_sees(targets, engine, variant):
    program = str(targets / f"unwound-{variant}")
    objects = _objects(program)
    records, proc = run_json("trace", "--engine", engine, "--stack", f"uprobe:{program}:leaf", "--", program, "2")
    assert proc.returncode == 0, proc.stderr
    expected = _program_stacks(proc.stdout, "stack")
    ours = _stacks(records, "leaf")
    assert len(ours) == len(expected) == 2 + 1 + 1 + (variant == "cxx")
    for stack, seen in zip(ours, expected):
        # The program's first frame is the call of backtrace in print_stack, its second that of print_stack in
        # leaf: our probe is at leaf's first instruction.
        wanted = [_function(program, "leaf")] + seen[2:]
        addresses = [_address(frame, objects) for frame in stack]
        if variant == "nocfi":  # the program's own walk ends at main's return address; ours goes on, by CFI
            assert addresses[:len(wanted)] == wanted, stack
            assert stack[-1].startswith(f"unwound-{variant}`_start+"), stack
        else:
            assert addresses == wanted, stack


@pytest.mark.parametrize("variant", ["fp", "nofp"])
def test_a_stack_through_a_signal_handler(targets, engine, variant):
    """A handler's stack goes through the signal frame (libc's __restore_rt, whose unwind information restores
    every register from the signal's context) to the interrupted code in raise, then on to main."""
    program = str(targets / f"unwound-{variant}")
    objects = _objects(program)
    records, proc = run_json("trace", "--engine", engine, "--stack", f"uprobe:{program}:leaf", "--", program, "0",
                             "signal")
    assert proc.returncode == 0, proc.stderr
    seen = _program_stacks(proc.stdout, "stack")[-1]
    ours = _stacks(records, "leaf")[-1]
    assert "libc.so.6`__restore_rt" in ours, ours
    assert [_address(frame, objects) for frame in ours] == [_function(program, "leaf")] + seen[2:]


def test_a_stack_through_a_qsort_callback_crosses_libc(targets, engine):
    program = str(targets / "unwound-nofp")
    records, proc = run_json("trace", "--engine", engine, "--stack", f"uprobe:{program}:compare", "--", program, "0")
    assert proc.returncode == 0, proc.stderr
    stacks = _stacks(records, "compare")
    assert stacks and all(stack[0] == "unwound-nofp`compare" for stack in stacks)
    for stack in stacks:
        callers = [frame.partition("`") for frame in stack[1:]]
        libc = [where for obj, _, where in itertools.takewhile(lambda frame: frame[0] == "libc.so.6", callers)]
        assert stack[len(libc)].startswith("libc.so.6`qsort_r+"), stack  # libc's part ends in qsort_r
        assert re.fullmatch(r"unwound-nofp`main\+0x[0-9a-f]+", stack[len(libc) + 1]), stack


def test_stacks_through_a_cxx_exception(targets, engine):
    """At __cxa_throw, in the personality routine libgcc's unwinder calls (through libgcc_s), and in a
    destructor that runs while the exception unwinds: every stack agrees with the program's own."""
    program = str(targets / "unwound-cxx")
    objects = _objects(program)
    libstdcxx = shared_libraries(program)["libstdc++.so.6"]
    cxx, gcc = os.path.basename(libstdcxx), os.path.basename(shared_libraries(program)["libgcc_s.so.1"])
    records, proc = run_json("trace", "--engine", engine, "--stack", f"uprobe:{program}:leaf",
                             f"uprobe:{libstdcxx}:__cxa_throw", f"uprobe:{libstdcxx}:__gxx_personality_v0",
                             "--", program, "0")
    assert proc.returncode == 0, proc.stderr
    (thrown,) = _program_stacks(proc.stdout, "throw")
    (at_throw,) = _stacks(records, "__cxa_throw")
    assert at_throw[0] == f"{cxx}`__cxa_throw"
    assert re.match(r"unwound-cxx`thrower(\.cold)?\+", at_throw[1])  # GCC puts the throw in a cold part
    assert re.fullmatch(r"unwound-cxx`unwound::deeper\(long\)\+0x[0-9a-f]+", at_throw[2])  # demangled
    assert [_address(frame, objects) for frame in at_throw[2:]] == thrown[2:]
    personalities = _stacks(records, "__gxx_personality_v0")
    callers = set()
    for stack in personalities:
        # libgcc's unwinder calls it from __cxa_throw's _Unwind_RaiseException (both phases), then from the
        # _Unwind_Resume that thrower's landing pad calls once the Guard is destroyed.
        assert stack[0] == f"{cxx}`__gxx_personality_v0", stack
        first = next(i for i, frame in enumerate(stack) if i and not frame.startswith(f"{gcc}`"))
        assert first > 1, stack
        if stack[first].startswith(f"{cxx}`__cxa_throw+"):
            assert stack[first + 1:] == at_throw[1:], stack
            callers.add("__cxa_throw")
        else:
            assert re.match(r"unwound-cxx`thrower(\.cold)?\+", stack[first]) and stack[first + 1:] == at_throw[2:]
            callers.add("thrower")
    assert callers == {"__cxa_throw", "thrower"}
    during = _program_stacks(proc.stdout, "stack")[-1]  # the Guard's destructor calls leaf last
    assert [_address(frame, objects) for frame in _stacks(records, "leaf")[-1]] == \
        [_function(program, "leaf")] + during[2:]


def test_return_probes_have_their_callers_stack(targets, engine):
    """A return probe's stack is where the function returns to; a probe inside functions whose returns are
    pending has its whole stack: the return addresses replaced by our trampoline, or the kernel's, are read
    as they were."""
    program = str(targets / "unwound-fp")
    objects = _objects(program)
    records, proc = run_json("trace", "--engine", engine, "--stack", f"uprobe:{program}:leaf",
                             f"uretprobe:{program}:middle", f"uretprobe:{program}:outer", "--", program, "1")
    assert proc.returncode == 0, proc.stderr
    # The program's own unwinder stops at the return address a return probe replaced: its stack comes from a
    # run without probes (the same offsets: only the load addresses change).
    seen = _program_stacks(subprocess.run([program, "1"], capture_output=True, text=True, check=True).stdout,
                           "stack")[0]
    middle, outer = (next(record["stack"] for record in records if record["probe"].startswith(name))
                     for name in ("middle", "outer"))
    assert [_address(frame, objects) for frame in middle] == seen[3:]  # from outer's call of middle on
    assert [_address(frame, objects) for frame in outer] == seen[4:]
    leaf = _stacks(records, "leaf")[0]
    assert [_address(frame, objects) for frame in leaf] == [_function(program, "leaf")] + seen[2:]


def test_a_stack_through_recursive_calls_with_pending_returns(targets, engine):
    program = str(targets / "unwound-nofp")
    objects = _objects(program)
    records, proc = run_json("trace", "--engine", engine, "--stack", f"uprobe:{program}:leaf",
                             f"uretprobe:{program}:recurse", "--", program, "0")
    assert proc.returncode == 0, proc.stderr
    seen = _program_stacks(subprocess.run([program, "0"], capture_output=True, text=True, check=True).stdout,
                           "stack")[-1]
    (leaf,) = [stack for stack in _stacks(records, "leaf") if stack[1].startswith("unwound-nofp`recurse+")]
    assert [_address(frame, objects) for frame in leaf] == [_function(program, "leaf")] + seen[2:]
    returns = [record["stack"] for record in records if record.get("probe", "").startswith("recurse")]
    assert [len(stack) for stack in returns] == [len(seen) - 3 - depth for depth in range(4)]  # 4 levels, innermost first


def test_stacks_counts_hits_per_stack_as_folded_lines(targets, engine):
    program = str(targets / "unwound-nofp")
    objects = _objects(program)
    result = run_cli("stacks", "--engine", engine, f"uprobe:{program}:leaf", "--", program, "3")
    assert result.status == 0, result.stderr
    seen = collections.Counter(tuple([_function(program, "leaf")] + stack[2:])
                               for stack in _program_stacks(result.stdout, "stack"))
    folded = [line for line in result.stdout.splitlines() if line.startswith("unwound-nofp`_start")]
    ours = collections.Counter()
    for line in folded:
        frames, _, hits = line.rpartition(" ")
        ours[tuple(_address(frame, objects) for frame in reversed(frames.split(";")))] += int(hits)
    assert ours == seen
    assert [int(line.rpartition(" ")[2]) for line in folded] == [3, 1, 1]  # most hits first

    records, proc = run_json("stacks", "--engine", engine, f"uprobe:{program}:leaf", "--", program, "3")
    assert proc.returncode == 0, proc.stderr
    assert sorted(record["hits"] for record in records) == [1, 1, 3]
    assert {record["probe"] for record in records} == {"leaf"}
    assert {tuple(record["stack"]) for record in records} == \
        {tuple(reversed(line.rpartition(" ")[0].split(";"))) for line in folded}


def test_a_stack_deeper_than_the_limit_is_cut_and_marked(targets, engine):
    program = str(targets / "unwound-fp")
    result = run_cli("stacks", "--engine", engine, "--max-stack", "3", f"uprobe:{program}:leaf", "--", program, "1")
    assert result.status == 0, result.stderr
    folded = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert folded and all(line.startswith("[truncated];") and line.count(";") == 3 for line in folded), folded


def test_a_stack_deeper_than_its_copy_is_marked_incomplete(targets, engine):
    """64 bytes of stack hold the frames of leaf and middle (nofp: 8 and 16 bytes each) and not outer's."""
    program = str(targets / "unwound-nofp")
    records, proc = run_json("trace", "--engine", engine, "--stack", "--stack-size", "64", f"uprobe:{program}:leaf",
                             "--", program, "1")
    assert proc.returncode == 0, proc.stderr
    first = _stacks(records, "leaf")[0]
    assert first[:3] == ["unwound-nofp`leaf", "unwound-nofp`middle+0xc", "unwound-nofp`outer+0xd"]
    assert first[-1] == "[incomplete]" and len(first) < 7, first


@pytest.mark.parametrize("option, value, message", [
    ("--max-stack", "0", "--max-stack takes a number of frames from 1 to 1024, not '0'"),
    ("--max-stack", "x", "--max-stack takes a number of frames from 1 to 1024, not 'x'"),
    ("--max-stack", "2000", "--max-stack takes a number of frames from 1 to 1024, not '2000'"),
    ("--stack-size", "100", "--stack-size takes a number of bytes from 64 to 65528, a multiple of 8, not '100'"),
    ("--stack-size", "65536", "--stack-size takes a number of bytes from 64 to 65528, a multiple of 8, not '65536'"),
])
def test_a_bad_stack_limit_is_one_line(targets, option, value, message):
    result = run_cli("stacks", "--engine", "ptrace", option, value, f"uprobe:{targets}/unwound-fp:leaf",
                     "--", f"{targets}/unwound-fp", "1")
    assert result.status == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_stacks_of_a_running_process_s_threads(targets, engine):
    """Attached with -p: every thread's stack goes from its start in libc (clone3, whose unwind information
    ends the stack) through the thread's function to the probe."""
    worker = subprocess.Popen([str(targets / "threads"), "3", "1000000", "500"], stdout=subprocess.DEVNULL)
    try:
        result = run_cli("stacks", "--engine", engine, "-d", "1", "-p", str(worker.pid), f"uprobe:{targets}/threads:hit")
    finally:
        worker.kill()
        worker.wait()
    assert result.status == 0, result.stderr
    folded = result.stdout.splitlines()
    assert folded, result.stderr
    for line in folded:
        frames, _, hits = line.rpartition(" ")
        assert re.fullmatch(r"libc\.so\.6`clone3\+0x[0-9a-f]+;libc\.so\.6`start_thread\+0x[0-9a-f]+;"
                            r"threads`worker\+0x[0-9a-f]+;threads`hit", frames), line
        assert int(hits) > 0


def test_stacks_of_programs_a_shell_forks_and_execs(targets, engine):
    """A shell forks and execs one program, then another: each hit is unwound against the code its process
    had then (the kernel engine reads the stacks later, from perf's records of the forks, execs and mappings)."""
    first, second = str(targets / "unwound-nofp"), str(targets / "unwound-fp")
    records, proc = run_json("trace", "--engine", engine, "--stack", f"uprobe:{first}:leaf", f"uprobe:{second}:leaf",
                             "--", "sh", "-c", f"{first} 1; {second} 1")
    assert proc.returncode == 0, proc.stderr
    for program in (first, second):
        name = os.path.basename(program)
        objects = _objects(program)
        seen = [stack for stack in _program_stacks(proc.stdout, "stack") if stack[1][0] == name]
        ours = [record["stack"] for record in records if record.get("stack", [""])[0] == f"{name}`leaf"]
        assert len(ours) == len(seen) == 3
        for stack, expected in zip(ours, seen):
            assert [_address(frame, objects) for frame in stack] == [_function(program, "leaf")] + expected[2:]


def test_a_stack_through_code_a_jit_compiler_lists_in_its_perf_map(targets, engine):
    """jitted runs a copy of hop() from anonymous memory and lists it in /tmp/perf-PID.map, as a JIT compiler
    does: the frame is named from that map (the return address inside the copy, past its call), and the stack
    is unwound on through it by its frame pointer, down to _start."""
    program = str(targets / "jitted")
    records, proc = run_json("stacks", "--engine", engine, f"uprobe:{program}:leaf", "--", program, "4")
    try:
        assert proc.returncode == 0 and proc.stdout == "jitted 16\n", proc.stderr
        (record,) = records
        disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", program], capture_output=True,
                                     text=True, check=True).stdout
        hop = re.search(r"^([0-9a-f]+) <hop>:\n(.*?)\n\n", disassembly, re.M | re.S)
        calls = re.findall(r"^\s+([0-9a-f]+):\tcall\s+\*%\w+\n\s+([0-9a-f]+):", hop[2], re.M)
        (_, after_call), = calls
        assert record["hits"] == 4 and record["stack"][:2] == ["jitted`leaf",
                                                               f"[jit]`jitted_hop+{int(after_call, 16) - int(hop[1], 16):#x}"]
        assert record["stack"][2].startswith("jitted`main+") and record["stack"][-1].startswith("jitted`_start")
    finally:
        for path in os.listdir("/tmp"):
            if re.fullmatch(r"perf-\d+\.map", path) and "jitted_hop" in open(f"/tmp/{path}").read():
                os.unlink(f"/tmp/{path}")

"""Issue 26, probe addressing the way people write it: several processes at once (``-p A -p B``, ``-p A,B``),
marker names as the notes store them (quotes included)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import Caller, RunningTool, run_cli, run_json
from oracles import file_offset, readelf_sdt_notes

@pytest.mark.parametrize("spelling", ["repeated", "comma"])
def test_several_processes_are_traced_each_as_one(engine, spelling):
    """Two processes, each making its own number of calls: the run counts each one's by pid, and ends when both
    have; a third pid that does not exist is named, and the others traced."""
    first, second = Caller("pids_first"), Caller("pids_second")
    pids = ["-p", str(first.proc.pid), "-p", f"{second.proc.pid},999999"] if spelling == "repeated" else \
        ["-p", f"{first.proc.pid},{second.proc.pid},999999"]
    with RunningTool("count", "--engine", engine, "--json", *pids, "--by", "$pid", "uprobe:libc:getppid") as tool:
        tool.wait_attached()
        first.calls(30)
        second.calls(20)
        assert first.end() == 0 and second.end() == 0
        out, err = tool.finish(None)  # it ends by itself once both have
    assert tool.proc.returncode == 0, err
    assert "process 999999 does not exist; the other processes are traced" in err
    assert f"pid {first.proc.pid}, pid {second.proc.pid})" in err
    rows = [json.loads(line) for line in out.splitlines()]
    by_pid = {row["key"]["$pid"]: row["hits"] for row in rows if "key" in row}
    assert by_pid == {first.proc.pid: 30, second.proc.pid: 20}, rows


def test_all_or_nothing_refuses_a_list_with_a_process_that_cannot_be_traced():
    caller = Caller("pids_alone")
    try:
        result = run_cli("count", "--engine", "ptrace", "--all-or-nothing", "-p", f"{caller.proc.pid},999999",
                         "uprobe:libc:getppid")
        assert result.status == 2
        assert result.stderr == "uprobes: error: process 999999 does not exist (--all-or-nothing)\n"
        caller.calls(5)  # untouched
        with open(f"/proc/{caller.proc.pid}/status") as status:
            assert "TracerPid:\t0\n" in status.read()
    finally:
        assert caller.end() == 0


@pytest.mark.parametrize("text", ["0", "12,", "a,b", "-3", "1,,2", "\u00b2"])
def test_a_bad_pid_list_is_one_line(text):
    result = run_cli("count", "--engine", "ptrace", "-p", text, "uprobe:libc:getppid")
    assert result.status == 2 and result.stderr.count("\n") == 1
    assert f"-p takes process ids (1234, or 1234,5678), not {text!r}" in result.stderr


def test_every_marker_list_shows_is_probe_syntax_quotes_and_all(targets, engine):
    """A marker whose name carries quotes (STAP_PROBE(test, "probe1")), as readelf shows the note: `list` shows
    it as PROVIDER:NAME, and that text (and a glob over it) after usdt:PATH: traces its hits."""
    quoted = str(targets / "quoted")
    notes = readelf_sdt_notes(quoted)
    assert {(note.provider, note.name) for note in notes} == {("test", '"probe1"'), ("test", "probe2")}
    listed = re.findall(r"^  marker (\S+)", run_cli("list", quoted, check=True).stdout, re.M)
    assert sorted(listed) == sorted(f"{note.provider}:{note.name}" for note in notes)
    for name in [*listed, 'test:"probe*"', '"probe1"']:
        records, proc = run_json("trace", "--engine", engine, f"usdt:{quoted}:{name} i=arg0", "--", quoted, "4")
        shown = name if ":" in name else f"test:{name}"
        assert proc.returncode == 0 and proc.stdout.startswith("4\n"), proc.stderr
        hits = [r for r in records if "probe" in r]
        assert [(r["probe"], r["args"]["i"]) for r in hits] == [(shown.replace("*", "1"), i) for i in range(4)]


def test_a_glob_in_the_path_probes_every_file_it_matches(targets, tmp_path, engine):
    """Two builds of a program (copies), a link to one and a file that is not ELF, matched by one glob: each
    build's calls are counted once (the link is the same file), and `list` lists both."""
    for build in ("server-a", "server-b"):
        shutil.copy(targets / "calls", tmp_path / build)
    shutil.copy(targets / "libprobed.so", tmp_path)  # what calls needs, found beside it ($ORIGIN)
    (tmp_path / "server-link").symlink_to(tmp_path / "server-a")
    (tmp_path / "server-notes").write_text("not a program\n")
    records, proc = run_json("count", "--engine", engine, f"uprobe:{tmp_path}/server*:work", "--", "sh", "-c",
                             f"{tmp_path}/server-a 3 && {tmp_path}/server-b 4")
    assert proc.returncode == 0, proc.stderr
    assert sorted((r["path"], r["hits"]) for r in records) == [(str(tmp_path / "server-a"), 3),
                                                               (str(tmp_path / "server-b"), 4)]
    listed = run_cli("list", "--json", f"{tmp_path}/server-?", "work", check=True)
    assert [(o["path"], [f["name"] for f in o["functions"]]) for o in json.loads(listed.stdout)["objects"]] == [
        (str(tmp_path / "server-a"), ["work"]), (str(tmp_path / "server-b"), ["work"])]


def test_a_glob_that_matches_no_elf_file_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a program\n")
    result = run_cli("count", "--engine", "ptrace", f"uprobe:{tmp_path}/*.txt:work", "--", "true")
    assert result.status == 2 and result.stderr == f"uprobes: error: {tmp_path}/*.txt: no ELF file matches\n"


def test_star_as_path_is_every_object_the_process_maps(targets, engine):
    """-p PID 'usdt:*:demo:order__done': the marker is in a library the program loads (libprobed.so), found
    only through '*'; beside it 'uprobe:*:lib_twice', the function that hits it once a call: the same calls seen
    by both, each once, in order. Without -p, '*' is a one-line error saying why."""
    target = subprocess.Popen([str(targets / "calls"), "1000000", "2"], stdout=subprocess.DEVNULL)
    try:
        with RunningTool("trace", "--engine", engine, "--json", "-p", str(target.pid),
                         "usdt:*:demo:order__done a=arg0", "uprobe:*:lib_twice a=%di:s32") as tool:
            tool.wait_attached()
            tool.wait_for(lambda: len(tool.events()) >= 40, "twenty calls")
            tool.finish()
        events = tool.events()
        library = os.path.realpath(targets / "libprobed.so")
        resolved = run_cli("resolve", "--json", "-p", str(target.pid), "usdt:*:demo:order__done",
                           "uprobe:*:lib_twice", "usdt::demo:order__done", "usdt:::order__done", "uprobe::lib_twice",
                           check=True)  # bpftrace's spellings too
        assert {json.loads(line)["path"] for line in resolved.stdout.splitlines()} == {library}
    finally:
        target.kill()
        target.wait()
    marked = [e["args"]["a"] for e in events if e["probe"] == "demo:order__done"]
    called = [e["args"]["a"] for e in events if e["probe"] == "lib_twice"]
    assert marked == list(range(marked[0], marked[0] + len(marked))) and len(marked) >= 19
    assert called == list(range(called[0], called[0] + len(called)))
    assert len(set(marked) ^ set(called)) <= 2  # a call under way as the run began or ended
    result = run_cli("resolve", "usdt:*:demo:order__done")
    assert result.status == 2 and result.stderr == ("uprobes: error: PATH '*' (or none) is every object a process "
                                                    "maps: give -p PID (or, to trace, a command to run), or a path, or "
                                                    "a glob of paths\n")


@pytest.mark.parametrize("spelling", ["uprobe:{flat}:0x0 x=%di:s64", "p {flat}:0 x=%di:s64"])
def test_code_mapped_from_a_file_that_is_not_elf_is_probed_by_offset(targets, engine, spelling):
    """flat.bin is one function's machine code and nothing else (objcopy -O binary); flatcode maps it executable
    and calls it: probed at file offset 0, each call is seen with its argument, after one warning that the
    offset cannot be checked. (-p: the ptrace engine finds a file a program maps itself when it attaches, or at
    the next library the linker loads; the kernel finds it at the mmap.)"""
    flat = os.path.realpath(targets / "flat.bin")
    program = subprocess.Popen([str(targets / "flatcode"), flat, "5", "wait"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert program.stdout.readline() == "mapped\n"
        with RunningTool("trace", "--engine", engine, "--json", "-p", str(program.pid),
                         spelling.format(flat=flat)) as tool:
            tool.wait_attached()
            out, _ = program.communicate("go\n", timeout=60)
            _, err = tool.finish(None)
    finally:
        program.kill()
        program.wait()
    assert out == f"flat {sum(2 * x + 1 for x in range(5))}\n"
    assert [e["args"]["x"] for e in tool.events()] == list(range(5))
    assert err.count("is not an ELF file: 0x0 is taken as the start of an instruction, unchecked") == 1, err


def test_a_file_that_is_not_elf_takes_offsets_only(targets):
    flat = os.path.realpath(targets / "flat.bin")
    for text in (f"uprobe:{flat}:twice_plus_one", f"uretprobe:{flat}:0x0", f"usdt:{flat}:a:b"):
        result = run_cli("resolve", text)
        assert result.status == 2 and result.stderr == (
            f"uprobes: error: probe '{text}': {flat} is not an ELF file: probe its code by file offset, as "
            f"uprobe:{flat}:0xOFFSET or p {flat}:0xOFFSET (no symbols, markers or returns)\n")
    result = run_cli("resolve", f"p {flat}:0x1000")
    assert result.status == 2 and "offset 0x1000 is past the end of" in result.stderr


def test_every_fetch_type_prints_the_same_on_both_engines(targets, tracefs):
    """Every FETCHARG and TYPE of README's table on one function and its return, and a marker's arguments, run
    on each engine over the same program (address-space randomisation off, so that addresses agree): the events
    are the same, field by field, in the same order, and so is the text each engine writes."""
    calls = os.path.realpath(targets / "calls")
    semaphore = next(int(line.split()[0], 16) for line in subprocess.run(
        ["nm", calls], capture_output=True, text=True, check=True).stdout.splitlines()
        if line.endswith(" calls_step_semaphore"))
    entry = (f"uprobe:{calls}:work a=%di:u8 b=%di:u16 c=%di:u32 d=%di:u64 e=%si:s8 f=%si:s16 g=%si:s32 "
             f"h=%si:s64 i=%di:x8 j=%di:x16 k=%di:x32 l=%di:x64 m=+0(%dx):string n=+0(%dx):ustring "
             f"o=+0(%dx):char p=+0(%dx):u8[3] q=+0(%dx):char[4] r=+0(%dx):b4@0/8 s=$stack0 t=$stack u=$comm "
             f"v=\\7 w=\\\"hi\" x=$arg1 y=+1(%dx):s8[2] z=+0(+0(%sp)):x64 sem=@+{file_offset(calls, semaphore):#x}:u16")
    probes = [entry, f"uretprobe:{calls}:work r=$retval rv=$retval:s32 rx=$retval:x16",
              f"usdt:{calls}:calls:step a0=arg0 a1=arg1:x64"]
    seen = {}
    for engine in ("ptrace", "kernel"):
        for output in ("--json", "text"):
            command = [sys.executable, "-m", "uprobes", "trace", "--engine", engine, *probes, "--", "setarch", "-R",
                       calls, "3"]
            if output == "--json":
                command.insert(4, "--json")
            proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
            seen[engine, output] = proc.stdout
    events = {engine: [json.loads(line) for line in seen[engine, "--json"].splitlines() if '"probe"' in line]
              for engine in ("ptrace", "kernel")}
    assert len(events["ptrace"]) == 9 and [e["probe"] for e in events["ptrace"]] == [
        e["probe"] for e in events["kernel"]]
    for mine, kernel in zip(events["ptrace"], events["kernel"]):
        assert list(mine["args"]) == list(kernel["args"])  # the same names, in order
        for field in ("args", "retval", "errors", "ip", "comm"):
            assert mine.get(field) == kernel.get(field), (field, mine, kernel)
    text = {engine: [line.split(None, 3)[3] for line in seen[engine, "text"].splitlines() if " work" in line
                     or " calls:step" in line] for engine in ("ptrace", "kernel")}
    assert text["ptrace"] == text["kernel"] and len(text["ptrace"]) == 9


def test_each_process_of_several_is_probed_in_its_own_files(targets, tmp_path, engine):
    """-p A,B 'uprobe:*:work' where A runs calls and B a copy of it: '*' is each process's own objects, so both
    are probed (not only what the first maps); an address under a glob that matches several files is refused."""
    shutil.copy(targets / "calls", tmp_path / "calls2")
    shutil.copy(targets / "libprobed.so", tmp_path)
    first = subprocess.Popen([str(targets / "calls"), "1000000", "2"], stdout=subprocess.DEVNULL)
    second = subprocess.Popen([str(tmp_path / "calls2"), "1000000", "2"], stdout=subprocess.DEVNULL)
    try:
        with RunningTool("trace", "--engine", engine, "--json", "-p", f"{first.pid},{second.pid}",
                         "uprobe:*:work i=%di:s32") as tool:
            tool.wait_attached()
            tool.wait_for(lambda: {e["pid"] for e in tool.events()} == {first.pid, second.pid}, "both processes")
            tool.finish()
        for pid in (first.pid, second.pid):
            seen = [e["args"]["i"] for e in tool.events() if e["pid"] == pid]
            assert seen == list(range(seen[0], seen[0] + len(seen)))  # its calls, each once, in order
        result = run_cli("resolve", "-p", str(first.pid), "uprobe:*:0x1310")
        assert result.status == 2 and result.stderr.count("\n") == 1
        assert "an address is a place in one file, and '*' matches" in result.stderr
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()


def test_a_predicate_on_a_string_constant_is_judged_on_both_engines(targets, engine):
    calls = str(targets / "calls")
    records, proc = run_json("trace", "--engine", engine, f'uprobe:{calls}:work s=\\"abc" i=%di:s32 '
                             'if s == "abc" && i < 2', "--", calls, "5")
    assert proc.returncode == 0, proc.stderr
    assert [r["args"] for r in records if "probe" in r] == [{"s": "abc", "i": 0}, {"s": "abc", "i": 1}]


def test_a_read_that_faults_gives_the_kernels_values_on_both_engines(targets, tracefs):
    """Reads through a bad pointer (%si is 2*i, a small number) of every type: the values are the kernel's (a
    string null, any other type its zero) on both engines; the ptrace engine names each fault, the kernel only a
    string's."""
    calls = str(targets / "calls")
    probe = (f"uprobe:{calls}:work si=%si:s32 a=+0(%si):u32 b=+4(%si):s16 c=+0(%si):u8[2] d=+0(%si):char[3] "
             f"e=+0(%si):b4@0/8 f=+0(%si):char g=+0(%si) s=+0(%si):string")
    events = {}
    for engine in ("ptrace", "kernel"):
        records, proc = run_json("trace", "--engine", engine, probe, "--", calls, "2")
        assert proc.returncode == 0, proc.stderr
        events[engine] = [r for r in records if "probe" in r]
    expected = {"a": 0, "b": 0, "c": [0, 0], "d": "", "e": 0, "f": "\0", "g": 0, "s": None}
    for engine, seen in events.items():
        assert [e["args"] for e in seen] == [{"si": 0, **expected}, {"si": 2, **expected}], engine
    assert [e["errors"] for e in events["kernel"]] == [{"s": "fault"}] * 2
    first, second = (e["errors"] for e in events["ptrace"])
    assert first == {**{name: f"fault reading {size} bytes at {offset:#x}" for name, size, offset in (
        ("a", 4, 0), ("b", 2, 4), ("c", 2, 0), ("d", 3, 0), ("e", 1, 0), ("f", 1, 0), ("g", 8, 0))}, "s": "NULL"}
    assert second["s"] == "fault reading a string at 0x2" and second["b"] == "fault reading 2 bytes at 0x6"


def _added_in(tool: RunningTool, path: str) -> bool:
    return any(" added in " in line and line.rstrip().split(" added in ")[1].startswith(path + " ")
               for line in tool.err.lines)


@pytest.mark.parametrize("how", ["command", "pid"])
@pytest.mark.parametrize("command", ["trace", "count"])
def test_star_probes_a_library_mapped_after_the_start(targets, tmp_path, engine, how, command):
    """'uprobe:*:lib_work' on a program that dlopens its library only when told (lifecycle stages): the library
    is not mapped at the start (with -p: said once, and not an error), and once it is, its function is probed
    (the tool says so) and every call after that is seen, once, with its argument, or counted (no probe at the
    start: the kernel engine counts by tag, none yet), on both engines."""
    lifecycle, library = str(targets / "lifecycle"), os.path.realpath(targets / "libctor.so")
    events_file = tmp_path / "events.json"
    read, write = os.pipe()
    program = None
    if how == "pid":
        program = subprocess.Popen([lifecycle, "stages", library, "5"], stdin=read, stdout=subprocess.PIPE, text=True)
        where = ["-p", str(program.pid)]
    else:
        where = ["--", lifecycle, "stages", library, "5"]
    try:
        with RunningTool(command, "--engine", engine, "--json", "-o", str(events_file),
                         "uprobe:*:lib_work i=%di:s32", *where, stdin=None if program else read) as tool:
            os.close(read)
            tool.wait_attached()
            assert not _added_in(tool, library)
            os.write(write, b"load\n")
            tool.wait_for(lambda: _added_in(tool, library), "the library's probe placed")
            os.write(write, b"call\n")
            os.close(write)
            if program:
                assert program.stdout.read() == "loaded\nstages sum 20\n"
                program.wait(30)
            out, err = tool.finish(None)
    finally:
        if program is not None and program.poll() is None:
            program.kill()
            program.wait()
    if not program:
        assert out == "loaded\nstages sum 20\n"
    assert ("names nothing in the objects mapped now" in err) == (how == "pid"), err
    assert f"uprobes: 1 probe point added in {library} (mapped by process " in err
    assert "never found" not in err
    records = [json.loads(line) for line in events_file.read_text().splitlines()]
    if command == "count":
        assert records == [{"probe": "lib_work", "path": library, "offset": records[0]["offset"], "hits": 5}]
    else:
        assert [(e["probe"], e["args"]) for e in records if "probe" in e] == [("lib_work", {"i": i}) for i in range(5)]


def test_star_counts_in_a_library_a_command_loads_twice(targets, engine):
    """count 'uprobe:*:lib_work' 'uprobe::lib_ctor' on a command that dlopens a library, calls it, closes it, and
    again: each probe point is counted once, with the hits the program made where the ptrace engine places a
    library's probes before its code runs (the kernel engine, once it has read the mapping, may miss the first
    calls), a predicate's probe only the hits it keeps; a text that named nothing anywhere is said at the end."""
    lifecycle, library = str(targets / "lifecycle"), os.path.realpath(targets / "libctor.so")
    result = run_cli("count", "--engine", engine, "--json", "uprobe:*:lib_work", "uprobe::lib_ctor",
                     "p:big *:lib_work i=%di:s32 if i > 0", "uprobe:*:no_such_function", "--", lifecycle, "dlopen",
                     library, "3")
    assert result.status == 0, result.stderr
    counts = {(r["probe"], r["path"]): r["hits"] for r in map(json.loads, result.stdout.splitlines()[1:])
              if "hits" in r}
    assert result.stdout.splitlines()[0] == "dlopen sum 12"
    if engine == "ptrace":  # before the library's constructor, each time it is loaded
        assert counts == {("lib_work", library): 6, ("lib_ctor", library): 2, ("big", library): 4}
    else:
        assert set(counts) <= {("lib_work", library), ("lib_ctor", library), ("big", library)}
    assert "never found: 'uprobe:*:no_such_function' named nothing in any object the processes mapped" in \
        result.stderr


def test_a_marker_found_through_star_in_a_library_loaded_later_is_armed_before_it_runs(targets):
    """'usdt:::order__done' (bpftrace's spelling: any object, any provider) on a command that dlopens the
    library with the marker and reads its semaphore at once: the ptrace engine has raised it by then, as it does
    for the library named by its path, and every marker hit is seen with its arguments."""
    lifecycle, library = str(targets / "lifecycle"), os.path.realpath(targets / "libprobed.so")
    outputs = {}
    for text in ("usdt:::order__done a=arg0 b=arg1", f"usdt:{library}:demo:order__done a=arg0 b=arg1"):
        proc = subprocess.run([sys.executable, "-m", "uprobes", "trace", "--engine", "ptrace", "--json", text, "--",
                               lifecycle, "marker", library, "4"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        events = [json.loads(line)["args"] for line in lines if line.startswith('{"probe"')]
        outputs[text.split()[0]] = ([line for line in lines if not line.startswith("{")], events)
    (star, named) = outputs.values()
    assert star == named and star[0] == ["semaphore 2", "total 18"] and star[1] == [{"a": i, "b": 2 * i}
                                                                                    for i in range(4)]


def test_star_on_a_command_is_its_program_and_linked_libraries_from_the_first_instruction(targets, engine):
    """count 'uprobe:*:lib_twice' -- calls 5: the library the program links (libprobed.so, found as ldd finds
    it) is probed before the program starts, on both engines: every call counted, none missed at the start."""
    library = os.path.realpath(targets / "libprobed.so")
    result = run_cli("count", "--engine", engine, "--json", "uprobe:*:lib_twice", "uprobe:*:work", "--",
                     str(targets / "calls"), "5")
    assert result.status == 0, result.stderr
    counts = {(r["probe"], r["path"]): r["hits"] for r in map(json.loads, result.stdout.splitlines()[1:])}
    assert counts == {("lib_twice", library): 5, ("work", os.path.realpath(targets / "calls")): 5}
    assert "2 probe points attached" in result.stderr and " added in " not in result.stderr


def test_a_star_probe_that_is_wrong_where_it_is_found_is_named_and_an_address_under_star_refused(targets, engine):
    """'uprobe:*:lib_work nosuchvar': the library loaded later has lib_work, without that variable: said there
    (not hidden as a name found nowhere), and the run goes on; 'uprobe:*:0x1140' is refused in one line (an
    address is a place in one file)."""
    lifecycle, library = str(targets / "lifecycle"), os.path.realpath(targets / "libctor.so")
    result = run_cli("trace", "--engine", engine, "uprobe:*:lib_work nosuchvar", "--", lifecycle, "dlopen",
                     library, "1")
    assert result.status == 0 and result.stdout == "dlopen sum 0\n", result.stderr
    assert "no variable 'nosuchvar' at lib_work" in result.stderr and f"(in {library}): left out" in result.stderr
    assert "never found" not in result.stderr and "Traceback" not in result.stderr
    refused = run_cli("trace", "--engine", engine, "uprobe:*:0x1140", "--", lifecycle, "dlopen", library, "1")
    assert refused.status == 2 and refused.stderr == (
        "uprobes: error: probe 'uprobe:*:0x1140': an address is a place in one file, and '*' is every object the "
        "process maps: give the file's path\n")

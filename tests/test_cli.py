"""The command line as a user meets it: `uprobes list`, `uprobes resolve`, and one-line errors with exit 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from oracles import (file_offset, function_symbols, readelf_marker_arguments, readelf_sdt_notes,
                     tracefs_register_fetcharg)

PYTHON = "/usr/bin/python3.11"


def test_list_python_markers_shows_every_semaphore_readelf_shows():
    result = run_cli("list", PYTHON, "python:*", check=True)
    notes = readelf_sdt_notes(PYTHON)
    assert len(notes) == 8
    for note in notes:
        block = re.search(rf"marker {note.provider}:{note.name} .*\n\s+offset (0x[0-9a-f]+) .*semaphore offset "
                          rf"(0x[0-9a-f]+)\s+args: (.*)\n", result.stdout)
        assert block, note
        assert int(block[1], 16) == file_offset(PYTHON, note.location)
        assert int(block[2], 16) == file_offset(PYTHON, note.semaphore)
        assert block[3] == note.arguments
    assert "FUNCTION" not in result.stdout  # the pattern selects markers only


def test_list_json_agrees_with_nm_and_readelf(targets):
    path = str(targets / "demo")
    listing = json.loads(run_cli("list", path, "--json", check=True).stdout)
    assert listing["path"] == path and listing["kind"] == "pie"
    functions = {f["name"]: f for f in listing["functions"]}
    for name, (address, size) in function_symbols(path).items():
        assert functions[name]["address"] == address and functions[name]["size"] == size
        assert functions[name]["offset"] == file_offset(path, address)
    sites = {(m["provider"], m["name"]): m["sites"] for m in listing["markers"]}
    for note in readelf_sdt_notes(path):
        (site,) = sites[(note.provider, note.name)]
        assert site["offset"] == file_offset(path, note.location)
        assert site["semaphore_offset"] == file_offset(path, note.semaphore)
        assert site["args"] == note.arguments
        assert [a["text"] for a in site["arguments"]] == note.arguments.split()


def test_list_glob_filters_functions(targets):
    out = run_cli("list", str(targets / "demo"), "pr*", check=True).stdout
    assert [line.split()[-1] for line in out.splitlines()[2:]] == ["price_of", "process_order"]
    assert "marker" not in out


def test_list_finds_libraries_and_programs_by_name():
    out = run_cli("list", "libc", "malloc", check=True).stdout
    assert out.startswith(os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6"))
    assert re.search(r"\smalloc@@GLIBC_2\.2\.5\n", out)
    assert run_cli("list", "python3.11", "Py_Initialize", check=True).stdout.startswith(PYTHON)


def test_list_of_a_process_covers_every_mapped_object(targets):
    demo = subprocess.Popen([str(targets / "demo"), "100000", "50"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        listing = json.loads(run_cli("list", "-p", str(demo.pid), "--json", check=True).stdout)
        paths = [o["path"] for o in listing["objects"]]
        assert paths[0] == str(targets / "demo")
        assert os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6") in paths
        assert listing["pid"] == demo.pid
        demo_functions = function_symbols(str(targets / "demo"))
        assert listing["objects"][0]["function_count"] == len(demo_functions) > 0
        # text: one line per object, the same counts; --functions lists every function of each
        lines = run_cli("list", "-p", str(demo.pid), check=True).stdout.splitlines()
        assert len(lines) == len(paths) + 1 and lines[-1].startswith(f"({len(paths)} objects;")
        assert lines[0].split()[:3] == [str(targets / "demo"), "pie", str(len(demo_functions))]
        every = json.loads(run_cli("list", "-p", str(demo.pid), "--functions", "--json", check=True).stdout)
        assert [len(o["functions"]) for o in every["objects"]] == [o["function_count"] for o in listing["objects"]]
        text = run_cli("list", "-p", str(demo.pid), "process_order", check=True).stdout
        assert "process_order" in text and "marker" not in text
    finally:
        demo.kill()
        demo.wait()


def test_list_of_a_gone_process_is_a_clear_error(targets):
    proc = subprocess.Popen(["true"])
    proc.wait()
    result = run_cli("list", "-p", str(proc.pid))
    assert result.status == 2
    assert result.stderr == f"uprobes: error: process {proc.pid} does not exist\n"


def test_resolve_prints_uprobe_events_lines(targets):
    demo = str(targets / "demo")
    result = run_cli("resolve", f"uprobe:{demo}:price_of", "item=+0(%di):string", f"usdt:{demo}:demo:order__done",
                     check=True)
    offset = file_offset(demo, function_symbols(demo)["price_of"][0])
    lines = result.stdout.splitlines()
    assert lines[0] == f"p:uprobes/price_of {demo}:{offset:#x} item=+0(%di):string"
    assert lines[1].startswith(f"p:uprobes/demo_order__done {demo}:")
    (done,) = readelf_marker_arguments(demo, "demo", "order__done")
    assert lines[1].endswith(" " + " ".join(f"arg{i}={tracefs_register_fetcharg(word)}" for i, word in enumerate(done)))


def test_resolve_reports_arguments_tracefs_cannot_fetch(targets):
    forms = str(targets / "forms")
    result = run_cli("resolve", f"usdt:{forms}:forms:floats", check=True)
    (floats,) = readelf_marker_arguments(forms, "forms", "floats")
    *registers, xmm = floats  # two general registers, then an SSE one
    assert xmm.endswith("@%xmm0")
    assert result.stdout.strip().endswith(" " + " ".join(f"arg{i}={tracefs_register_fetcharg(word)}"
                                                         for i, word in enumerate(registers)))
    assert f"the kernel leaves out arg2: {xmm}: tracefs cannot read %xmm0" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["list", "/nonexistent/prog"], "uprobes: error: /nonexistent/prog: no such file\n"),
    (["list", "no-such-program-anywhere"], "no such file, program in PATH or library"),
    (["list", "/etc/passwd"], "uprobes: error: /etc/passwd: not an ELF file\n"),
    (["list", "/tmp"], "not a regular file"),
    (["list"], "list needs a TARGET file or -p PID"),
    (["resolve", "uprobe:/usr/bin/python3.11:no_such_function_here"], "no function matches"),
    (["resolve", "p /usr/bin/python3.11:0xzz"], "offset '0xzz' is not a number"),
    (["resolve", "uprobe:/usr/bin/python3.11:Py_Initialize", "x=%foo"], "unknown register '%foo'"),
    (["resolve", "kprobe:do_sys_open"], "unknown probe type 'kprobe'"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run_cli(*args)
    assert result.status == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_console_script_and_module_are_the_same_command():
    script = shutil.which("uprobes") or os.path.join(os.path.dirname(sys.executable), "uprobes")
    via_script = subprocess.run([script, "list", PYTHON, "python:audit"], capture_output=True, text=True)
    via_module = run_cli("list", PYTHON, "python:audit", check=True)
    assert via_script.returncode == 0 and via_script.stdout == via_module.stdout


@pytest.mark.parametrize("path", ["/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
                                  "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so"])
def test_listing_big_objects_reports_its_time(path):
    """Speed is a benchmark figure, not an assertion: the time is printed (pytest -s shows it)."""
    if not os.path.exists(path):
        pytest.skip(f"{path} is not installed")
    start = time.perf_counter()
    listing = json.loads(run_cli("list", path, "--json", check=True).stdout)
    elapsed = time.perf_counter() - start
    print(f"\nuprobes list --json {path}: {elapsed:.2f} s for {len(listing['functions'])} functions, "
          f"{sum(len(m['sites']) for m in listing['markers'])} marker sites (includes interpreter start-up)")
    assert listing["functions"] and listing["markers"]


def test_readme_python_example_runs_as_written():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = re.search(r"```python\nfrom uprobes.api import Session\n(.*?)```", readme, re.S)[0]
    code = example.removeprefix("```python\n").removesuffix("```")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("0 [(0, b's0'), (1, b's1'), (2, b's2')] [2, 5, 8]\n")


@pytest.mark.parametrize("is_return", [False, True])
def test_json_events_are_what_json_reads_back(is_return):
    """Events are formatted by hand for speed: names, strings and errors with quotes, newlines, non-ASCII
    text and nulls must still read back as the same values."""
    from uprobes.output.event import Event

    event = Event('a"b\\c', 7, 8, "wörk\n\t\x01", 2**63, 1, 0x55D0, {"s": 'x"y\n', "v": [1, -2], "f": 1.5, "n": None},
                  None if is_return else 3, {"n": "fault"}, is_return, 0)
    record = json.loads(event.to_json())
    expected = {"probe": event.probe, "pid": 7, "tid": 8, "comm": event.comm, "ts_ns": 2**63, "cpu": 1, "ip": 0x55D0,
                "args": event.args, "errors": {"n": "fault"}}
    assert record == expected | ({"retval": None} if is_return else {})
    assert list(record)[:8] == ["probe", "pid", "tid", "comm", "ts_ns", "cpu", "ip", "args"]
    assert "ö" in event.to_json()  # kept as it is, not \u-escaped


@pytest.mark.parametrize("ending, said", [(["-d", "1"], "1 s"), (["-n", "2"], "2 events")],
                         ids=["duration", "max-events"])
def test_a_command_still_running_when_the_run_ends_is_stopped_as_asked(targets, ending, said):
    """Issue 24, item 8: the tool stopped it, as asked: said so, and the status is 0 (it was 143, 'killed by
    SIGTERM'); a command that ended by itself keeps its own status."""
    calls = str(targets / "calls")
    result = run_cli("trace", "--engine", "ptrace", *ending, f"uprobe:{calls}:work i=%di:s32", "--", calls, "1000",
                     "20")
    assert result.status == 0 and f"uprobes: stopped the command after {said}, as asked\n" in result.stderr
    assert "killed by" not in result.stderr
    seen = [int(i) for i in re.findall(r" work i=(\d+)$", result.stdout, re.M)]
    assert "calls 1000" not in result.stdout  # it was stopped before its last line: not after its 1000 calls
    # its first calls, each once: two with -n 2; with -d 1, however many a loaded machine let it make (no minimum)
    assert seen == list(range(len(seen))) and len(seen) < 1000
    if ending[0] == "-n":
        assert len(seen) == 2
    failed = run_cli("trace", "--engine", "ptrace", "-d", "30", f"uprobe:{calls}:work", "--", "sh", "-c", "exit 3")
    assert failed.status == 3 and "stopped the command" not in failed.stderr


def test_an_output_file_that_cannot_be_written_is_one_line(targets):
    calls = str(targets / "calls")
    result = run_cli("trace", "--engine", "ptrace", "-o", "/dev/full", f"uprobe:{calls}:work", "--", calls, "3")
    assert result.status == 2
    assert result.stderr.splitlines()[-1] == "uprobes: error: cannot write /dev/full: No space left on device"


def test_latency_refuses_fetch_arguments(targets):
    lifecycle = str(targets / "lifecycle")
    result = run_cli("latency", f"uprobe:{lifecycle}:fact n=%di", "--", lifecycle, "recurse", "3", "1")
    assert result.status == 2 and "drop the fetch arguments" in result.stderr


def test_list_of_a_process_says_when_nothing_matches(targets):
    target = subprocess.Popen([str(targets / "calls"), "100000", "10"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        result = run_cli("list", "-p", str(target.pid), "no_such_function*", check=True)
        assert re.fullmatch(rf"process {target.pid}: nothing matches 'no_such_function\*' in the \d+ objects it "
                            rf"maps\n", result.stdout)
    finally:
        target.kill()
        target.wait()


def test_make_demo_lists_the_demos_markers_and_traces_each_order(targets):
    """README's first command: the Makefile's demo target itself (its installation steps already done: this run's
    virtualenv and the built targets, given as done), which lists the demo's markers as readelf shows them and
    traces a run of 3 orders, each order's marker, call and return with the values the demo prints."""
    if os.geteuid() != 0:
        pytest.skip("make demo traces with the kernel engine: it needs root")
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "uprobes").exists():
        pytest.skip(f"{sys.executable} is not in a virtualenv with uprobes installed, which the Makefile runs")
    root = Path(__file__).parent.parent
    proc = subprocess.run(["make", "-s", "-o", "venv", "-o", "targets", f"VENV={venv}", "demo"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    demo = str(targets / "demo")
    for note in readelf_sdt_notes(demo):
        assert re.search(rf"marker {note.provider}:{note.name} .*\n\s+offset {file_offset(demo, note.location):#x} "
                         rf".*args: {re.escape(note.arguments)}\n", proc.stdout), (note, proc.stdout)
    orders = re.findall(r"^order (\d+): (\d+) x (\w+) = (\d+)$", proc.stdout, re.M)  # the demo's own lines
    assert [int(order[0]) for order in orders] == [1, 2, 3]
    events = re.findall(r"^\S+ demo +\d+/\d+ (.*)$", proc.stdout, re.M)
    assert events == [event for number, quantity, item, total in orders for event in (
        f'demo:order__start id={number} item="{item}" quantity={quantity}',
        f'price_of item="{item}" quantity={quantity}', f"price_of%return retval={total}",
        f"demo:order__done arg0={number} arg1={total}")]
    assert "uprobes: 4 probe points attached (kernel engine, the command)" in proc.stderr


def test_readme_dwarf_examples_run_as_written(targets):
    """The shell block of the README's DWARF section, run from tests/targets as it says (ptrace engine)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Source lines and variables (DWARF)"):]
    block = section[section.index("```sh\n") + 6:section.index("```", section.index("```sh\n") + 6)]
    commands = [line.split("   #")[0].strip() for line in block.replace("\\\n", " ").splitlines()
                if line.startswith("uprobes ")]
    assert len(commands) == 4
    for command in commands:
        proc = subprocess.run(f"{sys.executable} -m {command}", shell=True, capture_output=True, text=True,
                              cwd=Path(__file__).parent / "targets", timeout=120)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (command, proc.stderr)
        if command.startswith("uprobes count"):  # the line the README counts is the one marked COUNTED
            line = re.search(r"sourcevars\.c:(\d+)'", command)[1]
            assert "/* COUNTED */" in (Path(__file__).parent / "targets" / "sourcevars.c").read_text().splitlines()[
                int(line) - 1]
            assert re.search(rf"sourcevars\.c:{line}\s+5\s", proc.stdout), proc.stdout
        if command.startswith("uprobes trace"):
            assert re.search(r"area p_x=10 p_name=\"zero\" p_inner_y=0 p_color=\"BLUE\" scale=1", proc.stdout)


@pytest.mark.parametrize("engine", ["ptrace", "kernel"])
def test_events_seen_just_before_ctrl_c_are_written(targets, engine, tmp_path):
    """Ctrl-C right after the hits: the poll that took them from the ring (a jump probe's, or the kernel's perf
    buffer) ends with the interrupt, and they must still be written (they were lost nearly every time)."""
    if engine == "kernel" and os.geteuid() != 0:
        pytest.skip("the kernel engine needs root")
    placement, lib = str(targets / "placement"), str(targets / "libctor.so")
    for attempt in range(5):
        program = subprocess.Popen([placement, "later", lib], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert program.stdout.readline() == "ready\n"
        out = tmp_path / f"events{attempt}.jsonl"
        tool = subprocess.Popen([sys.executable, "-m", "uprobes", "trace", "--engine", engine, "--json", "-o", str(out),
                                 "-p", str(program.pid), f"uprobe:{placement}:step", f"uprobe:{lib}:lib_work"],
                                stderr=subprocess.PIPE, text=True)
        said = ""
        while "attached" not in said:
            line = tool.stderr.readline()
            assert line, said
            said += line
        program.stdin.write("\n")
        program.stdin.flush()
        assert program.stdout.readline().startswith("later steps 33")  # step(0..2) and lib_work(0..2) are done
        tool.send_signal(signal.SIGINT)
        _, rest = tool.communicate(timeout=60)
        program.communicate("\n", timeout=30)
        assert tool.returncode == 130 and "Traceback" not in rest, rest
        probes = [json.loads(line).get("probe") for line in out.read_text().splitlines()]
        assert (probes.count("step"), probes.count("lib_work")) == (3, 3), (attempt, rest)


@pytest.mark.parametrize("command, option, value, message", [
    ("trace", "-d", "-1", "-d takes a number of seconds above 0, not '-1'"),
    ("trace", "-d", "nan", "-d takes a number of seconds above 0, not 'nan'"),
    ("count", "-d", "inf", "-d takes a number of seconds above 0, not 'inf'"),
    ("trace", "-n", "0", "-n takes a number of events above 0, not '0'"),
    ("trace", "-n", "-3", "-n takes a number of events above 0, not '-3'"),
    ("count", "--interval", "0", "--interval takes a number of seconds above 0, not '0'"),
    ("count", "--interval", "-1", "--interval takes a number of seconds above 0, not '-1'"),
])
def test_durations_counts_and_intervals_must_be_above_zero(command, option, value, message):
    """-d -1 used to stop the command before it ran (then said the library was never mapped)."""
    result = run_cli(command, option, value, "uprobe:libc:malloc", "--", "true")
    long_option = {"-d": "-d/--duration", "-n": "-n/--max-events"}.get(option, option)
    assert result.status == 2 and result.stderr == \
        f"uprobes: error: argument {long_option}: {message} (see uprobes {command} --help)\n"


@pytest.mark.parametrize("command, message", [
    (["-c", 'ls "unclosed'], "-c 'ls \"unclosed': no closing quotation: -c splits the command as a shell would, "
                             "without running one"),
    (["-c", ""], "-c '': empty command"),
    (["--", "/tmp"], "/tmp is a directory, not a command"),
    (["--", "/etc/passwd"], "/etc/passwd is not executable (chmod +x it, or run it with its interpreter)"),
    (["--", "no-such-command-here"], "command not found: no-such-command-here"),
])
def test_a_command_that_cannot_run_is_one_line(command, message):
    """Issue 24, items 1 and 6: a -c the shell splitting refuses was a traceback; a directory or a file that is
    not executable was 'command not found'."""
    result = run_cli("count", "--engine", "ptrace", "uprobe:libc:malloc", *command)
    assert result.status == 2 and result.stderr == f"uprobes: error: {message}\n"


@pytest.mark.parametrize("args, message", [
    (["resolve", "p:/bin/ls:main"], "probe 'p:/bin/ls:main': 'p:/bin/ls:main' must be followed by PATH:OFFSET; did you "
                                    "mean 'p /bin/ls:main'?"),
    (["resolve", "uretprobe:libc:malloc r="], "bad fetch argument 'r=': there is no fetch argument after '=' (if it "
                                              "was $retval, $comm or $stack, the shell replaced it: quote the probe, "
                                              "'uretprobe:libc:malloc ret=$retval')"),
    (["count", "--engine", "ptrace", "-p", str(os.getpid()), "uprobe:libc:malloc", "x=%di", "ls"],
     "bad fetch argument 'ls': ..."),
])
def test_common_mistakes_get_a_hint(args, message):
    """Issue 24, item 4: a kernel-form probe whose PATH went into the event name, a $retval the shell ate, a
    command given without --."""
    result = run_cli(*args)
    assert result.status == 2, result.stderr
    if message.endswith("..."):
        assert result.stderr.startswith(f"uprobes: error: {message[:-3]}")
        assert result.stderr.endswith(" (to run ls, give it after --: ... -- ls)\n")
    else:
        assert result.stderr == f"uprobes: error: {message}\n"


def test_a_kernel_thread_a_thread_and_a_zombie_are_named_as_such(targets):
    """Issue 24, item 5: -p 2 said the process had ended; -p TID of a thread silently traced its process."""
    result = run_cli("trace", "--engine", "ptrace", "-p", "2", "uprobe:libc:malloc")
    assert result.status == 2 and result.stderr == \
        "uprobes: error: process 2 (kthreadd) is a kernel thread: it runs no user code to probe\n"
    threads = subprocess.Popen([str(targets / "threads"), "2", "100000", "1000"], stdout=subprocess.DEVNULL)
    zombie = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{threads.pid}/task")) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        tid = max(int(task) for task in os.listdir(f"/proc/{threads.pid}/task"))
        result = run_cli("trace", "--engine", "ptrace", "-p", str(tid), "uprobe:libc:malloc")
        assert result.status == 2 and result.stderr == (
            f"uprobes: error: {tid} is a thread of process {threads.pid}: -p takes the process, whose threads are "
            f"all traced; give -p {threads.pid}\n")
        while not open(f"/proc/{zombie.pid}/status").read().count("zombie") and time.monotonic() < deadline:
            time.sleep(0.01)
        result = run_cli("trace", "--engine", "ptrace", "-p", str(zombie.pid), "uprobe:libc:malloc")
        assert result.status == 2 and result.stderr == \
            f"uprobes: error: process {zombie.pid} has ended (a zombie its parent has not reaped)\n"
    finally:
        threads.kill()
        threads.wait()
        zombie.wait()


@pytest.mark.parametrize("probe, message", [
    ("uprobe:libc:malloc+99999999999999999999999999", "symbol offset '99999999999999999999999999' is out of range "
                                                      "(more than 64 bits)"),
    ("p libc:0xffffffffffffffffff", "offset '0xffffffffffffffffff' is out of range (more than 64 bits)"),
])
def test_numbers_past_64_bits_are_out_of_range(probe, message):
    """Issue 24, item 9: they were 'not a number'."""
    result = run_cli("resolve", probe)
    assert result.status == 2 and result.stderr == f"uprobes: error: probe '{probe}': {message}\n"


def test_version_and_cleanup_say_what_they_are():
    """Issue 24, item 7 (part): uprobes --version, and cleanup --help describes it."""
    from importlib.metadata import version

    assert run_cli("--version", check=True).stdout == f"uprobes {version('uprobes')}\n"
    assert "left behind by uprobes runs whose process died" in " ".join(run_cli("cleanup", "--help").stdout.split())


def test_a_list_that_would_show_nothing_says_why(targets):
    """Issue 24, item 10 (part): a stripped file says so and what to do; a pattern nothing matches offers the
    closest names; both exit 2."""
    stripped = "/usr/bin/sleep"  # Debian's: stripped, and no markers
    result = run_cli("list", stripped)
    assert result.status == 2 and result.stderr.startswith(f"uprobes: error: {stripped} is stripped: it has no "
                                                           f"function symbols")
    assert result.stderr.endswith(f"or probe it by offset, 'p {stripped}:0xOFFSET'\n")
    calls = str(targets / "calls")
    result = run_cli("list", calls, "wrok*")
    assert result.status == 2 and result.stderr == \
        f"uprobes: error: no function or marker matches 'wrok*' in {calls}; closest: work\n"


@pytest.mark.parametrize("command", ["list", "trace", "count", "latency", "hist", "stacks", "resolve", "cleanup"])
def test_each_help_page_has_its_own_examples(command):
    """Issue 24, item 7 (part): every page showed one block of everyone's examples, misaligned."""
    page = run_cli(command, "--help", check=True).stdout
    examples = page.split("examples:\n", 1)[1].splitlines()
    assert examples and all(line.startswith(f"  uprobes {command}") for line in examples[0::2])
    assert all(line.startswith("      ") and not line.startswith("       ") for line in examples[1::2])
    if command == "latency":
        assert "FUNCTION [FUNCTION ...]" in page and "without fetch arguments" in page


def test_list_of_one_object_a_process_maps(targets):
    """Issue 24, item 10 (part): list -p PID OBJECT PATTERN lists that object as the process maps it (it was
    'give either a TARGET or -p PID, not both')."""
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        result = run_cli("list", "--json", "-p", str(sleeper.pid), "libc", "malloc_tr*", check=True)
        document = json.loads(result.stdout)
        assert document["pid"] == sleeper.pid and len(document["objects"]) == 1
        (libc,) = document["objects"]
        assert libc["path"].endswith("/libc.so.6") and [f["name"] for f in libc["functions"]] == \
            ["malloc_trim@@GLIBC_2.2.5"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_text_output_writes_pointers_in_hex_and_a_null_string_as_null(targets, engine):
    """The argument types decide how text writes them; a string whose pointer is NULL is NULL on both engines
    (JSON: null, with the reason "NULL"); the run says '1 probe point' of one."""
    calls = targets / "calls"
    probes = [f"uprobe:{calls}:work i label=%dx:x64 same=%dx:u64 text=+0(%dx):string"]
    text = run_cli("trace", "--engine", engine, *probes, "--", str(calls), "2", check=True)
    lines = [line for line in text.stdout.splitlines() if " work " in line]
    assert len(lines) == 2, text.stdout
    for i, line in enumerate(lines):
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        assert fields["i"] == str(i) and fields["text"] == f'"s{i}"'
        assert fields["label"] == hex(int(fields["same"])) and fields["label"].startswith("0x7ff"), line
    assert "uprobes: 1 probe point attached" in text.stderr
    getenv = "uretprobe:libc:getenv value=+0($retval):string"
    program = [sys.executable, "-c", "import ctypes; libc = ctypes.CDLL(None); libc.getenv(b'HOME'); "
                                     "libc.getenv(b'UPROBES_NOT_SET')"]
    env = {**os.environ, "HOME": "/home/of/test"}
    text = subprocess.run([sys.executable, "-m", "uprobes", "trace", "--engine", engine, getenv, "--", *program],
                          capture_output=True, text=True, env={k: v for k, v in env.items()
                                                               if k != "UPROBES_NOT_SET"}, timeout=60)
    assert text.returncode == 0, text.stderr
    values = [line.split("value=", 1)[1].split()[0] for line in text.stdout.splitlines() if "value=" in line]
    assert '"/home/of/test"' in values and values[-1] == "NULL" and "NULL)" not in text.stdout, text.stdout


def test_json_events_give_wall_clock_time_when_asked(targets, engine):
    calls = targets / "calls"
    before = time.time_ns()
    result = run_cli("trace", "--json", "--wall-clock", "--engine", engine, f"uprobe:{calls}:work i", "--", str(calls),
                     "3", check=True)
    after = time.time_ns()
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"probe"')]
    assert [e["args"]["i"] for e in events] == [0, 1, 2]
    assert all(before < e["realtime_ns"] < after for e in events), (before, events, after)
    offsets = {e["realtime_ns"] - e["ts_ns"] for e in events}
    assert len(offsets) == 1  # the same moment on the other clock
    result = run_cli("trace", "--wall-clock", f"uprobe:{calls}:work", "--", str(calls))
    assert result.status == 2 and "--wall-clock adds each event's wall-clock time to JSON: give --json" in result.stderr


def test_interval_reports_are_headed_with_the_time_and_never_cumulative(targets):
    calls = targets / "calls"
    result = run_cli("count", "--engine", "ptrace", "--interval", "0.3", f"uprobe:{calls}:work", "--", str(calls),
                     "8", "100", check=True)
    headings = re.findall(r"^\d\d:\d\d:\d\d  interval (\d+): the last (\d+\.\d) s \(not cumulative\)$",
                          result.stdout, re.M)
    hits = [int(n) for n in re.findall(r"^work +(\d+) ", result.stdout, re.M)]
    assert [int(n) for n, _ in headings] == list(range(1, len(headings) + 1)) and len(headings) >= 2
    assert len(hits) == len(headings) and sum(hits) == 8, result.stdout

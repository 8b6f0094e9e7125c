"""Probes in the program's own terms (issue 19): source lines and variables read through DWARF, on both engines,
against what tests/targets/sourcevars.c prints about itself, built -O0 and -O2. Line numbers come from the
source's own markers and addresses from objdump's decoded line table, never from uprobes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import TARGETS_DIR, run_cli, run_json
from oracles import statement_lines

ENGINES = ["ptrace", "kernel"]
BUILDS = ["O0", "O2"]
SOURCE = (TARGETS_DIR / "sourcevars.c").read_text().splitlines()


def _line(marker: str) -> int:
    """The 1-based number of the source line holding ``marker``."""
    return next(n for n, text in enumerate(SOURCE, 1) if marker in text)


COUNTED = _line("/* COUNTED */")
SINK_IN_AREA = _line("sink += p->big;")
AREA_FIRST = _line("long area(struct point *p")
TWICE_BODY = _line("return v * 2 + (int)(sink & 1);")


@pytest.fixture(params=ENGINES)
def engine(request, targets):
    if request.param == "kernel" and os.geteuid() != 0:
        pytest.skip("the kernel engine needs root")
    return request.param


def _program(targets, build: str) -> str:
    # O0, O2, dwz (-O2, its DWARF partly in build/sourcevars.dwz), dwarf4 (-O2 -gdwarf-4), dwarf2 (-O0, strict 2)
    return str(targets / f"sourcevars-{build}")


def _printed(stdout: str, word: str) -> int:
    return int(re.search(rf"^{word} (\d+)$", stdout, re.M)[1])


def _counts(engine: str, program: str, *probes: str, n: int = 5) -> tuple[list[dict], str]:
    records, proc = run_json("count", "--engine", engine, *probes, "--", program, str(n))
    assert proc.returncode == 0, proc.stderr
    return records, proc.stdout


@pytest.mark.parametrize("build", BUILDS)
def test_a_line_probe_fires_once_per_execution_of_the_line(targets, engine, build):
    program = _program(targets, build)
    records, stdout = _counts(engine, program, f"uprobe:{program}:sourcevars.c:{COUNTED}",
                              f"uprobe:{program}:sourcevars.c:{SINK_IN_AREA}")
    hits = {}
    for record in records:
        hits[record["probe"]] = hits.get(record["probe"], 0) + record["hits"]
    assert hits == {f"sourcevars.c:{COUNTED}": _printed(stdout, "counted"),
                    f"sourcevars.c:{SINK_IN_AREA}": _printed(stdout, "counted")}
    rows = statement_lines(program)
    for record in records:  # each probe point is one of the line's statement rows
        line = int(record["probe"].rsplit(":", 1)[1])
        assert record["offset"] in rows[("sourcevars.c", line)], record


def test_a_line_of_an_inlined_function_is_probed_in_every_copy(targets, engine):
    program = _program(targets, "O0")  # twice() is always_inline; at -O0 each copy keeps its own code
    records, stdout = _counts(engine, program, f"uprobe:{program}:sourcevars.c:{TWICE_BODY}")
    assert len(records) == 2  # one per copy, though each copy's code has several statement rows of the line
    assert {record["offset"] for record in records} <= set(statement_lines(program)[("sourcevars.c", TWICE_BODY)])
    assert sum(record["hits"] for record in records) == _printed(stdout, "twice")
    assert {record["hits"] for record in records} == {_printed(stdout, "counted")}


LINES = (TARGETS_DIR / "lines.c").read_text().splitlines()
LINE_OF = {word: next(n for n, text in enumerate(LINES, 1) if f"COUNTED {word} " in text)
           for word in ("CLAMP", "SPREAD", "AFTER")}
BUMPED = "lines.h:" + str(next(n for n, text in enumerate((TARGETS_DIR / "lines.h").read_text().splitlines(), 1)
                               if "bump_runs++" in text))  # bump:+2, as events name it


@pytest.mark.parametrize("build", ["O0", "O2", "clang-O2"])
def test_lines_that_inlining_a_loop_exit_and_a_spread_statement_make_hard_to_count(targets, engine, build):
    """Each line once per execution, as lines.c counts it: clampx()'s first line in both of its copies inlined
    into both() (gcc -O2 merges them into one instruction and starts each copy where its ranges do not: a
    probe point per copy, at one address); the line after a loop, which clang -O2 enters by a branch into the
    middle of its code (a row that is not a statement); a printf written over three lines, whose -O0 code goes
    back and forth between them; the first line of bump(), a static function of two files (FUNCTION:+N probes
    both)."""
    program = str(targets / f"lines-{build}")
    probes = {"clamp": f"lines.c:{LINE_OF['CLAMP']}", "spread": f"lines.c:{LINE_OF['SPREAD']}",
              "spread_2": f"lines.c:{LINE_OF['SPREAD'] + 1}", "after": f"lines.c:{LINE_OF['AFTER']}",
              "bump": "bump:+2"}
    if build == "clang-O2":
        # clang's DWARF gives clampx's merged first line to the first copy only: no tool can tell the other's
        del probes["clamp"]
    if build == "O2":
        del probes["spread_2"]  # no code of its own at -O2
    records, proc = run_json("count", "--engine", engine,
                             *(f"uprobe:{program}:{where}" for where in probes.values()), "--", program, "4")
    assert proc.returncode == 0, proc.stderr
    printed = dict(zip(*[iter(proc.stdout.splitlines()[-1].split())] * 2))  # clamp C after A spread S bump B
    expected = {"clamp": printed["clamp"], "spread": printed["spread"], "spread_2": printed["spread"],
                "after": printed["after"], "bump": printed["bump"]}
    hits = {name: 0 for name in probes}
    for record in records:
        name = next(name for name, where in probes.items() if record["probe"] == where.replace("bump:+2", BUMPED))
        hits[name] += record["hits"]
    assert {name: str(n) for name, n in hits.items()} == {name: expected[name] for name in probes}, records


@pytest.mark.parametrize("build", BUILDS)
def test_function_relative_lines_are_the_same_probe_points(targets, build):
    program = _program(targets, build)
    relative = run_cli("resolve", f"uprobe:{program}:area:+{SINK_IN_AREA - AREA_FIRST}", check=True).stdout
    absolute = run_cli("resolve", f"uprobe:{program}:sourcevars.c:{SINK_IN_AREA}", check=True).stdout
    assert relative.split()[-2:] == absolute.split()[-2:]
    assert relative == absolute and f"uprobes/area_L{SINK_IN_AREA} " in absolute


def test_a_line_without_code_names_the_nearest_lines_with_code(targets):
    program = _program(targets, "O0")
    with_code = sorted(line for name, line in statement_lines(program) if name == "sourcevars.c")
    empty = next(line for line in range(TWICE_BODY, 0, -1) if line not in with_code)
    result = run_cli("resolve", f"uprobe:{program}:sourcevars.c:{empty}")
    below = max(line for line in with_code if line < empty)
    above = min(line for line in with_code if line > empty)
    assert result.status == 2
    assert result.stderr.strip().endswith(f"sourcevars.c:{empty} has no code; the nearest lines with code are "
                                          f"{below} and {above}"), result.stderr


@pytest.mark.parametrize("probe, message", [
    ("uprobe:{stripped}:demo.c:10", "has no DWARF debug information: rebuild it with -g"),
    ("uprobe:{program}:nosuch.c:10", "no source file 'nosuch.c' in the line tables"),
    ("uprobe:{program}:nosuch:+2", "no function 'nosuch' with code in the DWARF"),
    ("uretprobe:{program}:sourcevars.c:10", "a return probe goes on a function's entry, not a source line"),
    ("uprobe:{program}:sourcevars.c:0", "lines count from 1, not 0"),
])
def test_bad_line_probes_are_one_line_errors(targets, probe, message):
    text = probe.format(stripped=targets / "demo-stripped", program=_program(targets, "O2"))
    result = run_cli("resolve", text)
    assert result.status == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"probe '{text}'" in result.stderr


COLORS = {0: "RED", 5: "GREEN", 6: "BLUE"}  # enum color in sourcevars.c
AREA_ARGS = ("p->x p->big p->name:string p->inner.y p->inner.z p->flag p->level p->tag[2] p->color p->ratio scale "
             "label:string p->grid[1][2] row=p->grid[1]")
# What the program prints about area()'s arguments -> our argument name and how the printed text reads.
PRINTED = {"x": ("p_x", int), "big": ("p_big", int), "name": ("p_name", str), "y": ("p_inner_y", int),
           "z": ("p_inner_z", int), "flag": ("p_flag", int), "level": ("p_level", int), "tag2": ("p_tag_2", int),
           "color": ("p_color", lambda text: COLORS[int(text)]), "ratio": ("p_ratio", float),
           "scale": ("scale", int), "label": ("label", str), "g12": ("p_grid_1_2", int)}


def _printed_lines(stdout: str, word: str) -> list[dict[str, str]]:
    return [dict(item.split("=", 1) for item in line.split()[1:])
            for line in stdout.splitlines() if line.startswith(word + " ") and "=" in line]


def _events(records: list[dict], probe: str) -> list[dict]:
    return [record for record in records if record.get("probe") == probe]


@pytest.mark.parametrize("build", [*BUILDS, "dwz", "dwarf4", "dwarf2"])
def test_variables_by_name_are_what_the_program_sees(targets, engine, build):
    program = _program(targets, build)
    records, proc = run_json("trace", "--engine", engine, f"uprobe:{program}:area {AREA_ARGS}",
                             f"uprobe:{program}:consume dead keep", f"uretprobe:{program}:area $retval",
                             "--", program, "4")
    assert proc.returncode == 0, proc.stderr
    printed = _printed_lines(proc.stdout, "area")
    entries = [e for e in records if e.get("probe", "").startswith("area") and not e["probe"].endswith("%return")]
    assert len(entries) == len(printed) == 4
    for event, seen in zip(entries, printed):
        i = int(seen["x"]) - 10  # grid[r][c] is 100 * i + 10 * r + c
        assert event["args"] == {name: parse(seen[key]) for key, (name, parse) in PRINTED.items()} | {
            "row": [100 * i + 10, 100 * i + 11, 100 * i + 12]}, event
    returns = _events(records, "area%return")
    assert [event["retval"] for event in returns] == [int(seen["x"]) * int(seen["scale"]) for seen in printed]
    assert [event["args"]["arg1"] for event in returns] == [event["retval"] for event in returns]
    calls = _printed_lines(proc.stdout, "consume")
    consumed = [e["args"] for e in records if e.get("probe", "").startswith("consume")]
    assert consumed == [{"dead": int(seen["dead"]), "keep": int(seen["keep"])} for seen in calls]


@pytest.mark.parametrize("build", BUILDS)
def test_variables_at_a_line_are_what_the_program_sees(targets, engine, build):
    program = _program(targets, build)
    records, proc = run_json("trace", "--engine", engine,
                             f"uprobe:{program}:sourcevars.c:{SINK_IN_AREA} x=p->x scale name=p->name:string",
                             "--", program, "3")
    assert proc.returncode == 0, proc.stderr
    printed = _printed_lines(proc.stdout, "area")
    assert [event["args"] for event in records if "args" in event] == [
        {"x": int(seen["x"]), "scale": int(seen["scale"]), "name": seen["name"]} for seen in printed]


def _perf_definitions(program: str, probe: str) -> list[str]:
    """The uprobe_events lines ``perf probe -D`` would write for ``probe`` (perf's own DWARF reading)."""
    proc = subprocess.run(["perf", "probe", "-x", program, "-D", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.startswith("p:")]


@pytest.mark.skipif(shutil.which("perf") is None, reason="perf (linux-perf) is not installed")
@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("where", ["area", f"sourcevars.c:{SINK_IN_AREA}"])
def test_variables_translate_as_perf_probe_translates_them(targets, build, where):
    program = _program(targets, build)
    expressions = ["p->x", "p->big", "p->name:string", "p->inner.y", "scale", "label:string"]
    ours = run_cli("resolve", f"uprobe:{program}:{where} {' '.join(expressions)}", check=True).stdout.split()
    theirs = {line.split()[1]: line.split()[2:] for line in _perf_definitions(program, f"{where} {' '.join(expressions)}")}
    where_ours = ours[1]
    assert where_ours in theirs, (ours, theirs)  # the same probe address (perf also skips an -O0 prologue)
    # Names differ (perf calls p->x "x"); where each value is read and its type must not.
    assert [arg.split("=", 1)[1] for arg in ours[2:]] == [arg.split("=", 1)[1] for arg in theirs[where_ours]]


CONSUME_PRINT = _line('printf("consume %d\\n", keep);')
SINK_IN_CONSUME = _line("sink += dead;")


@pytest.mark.parametrize("probe, message", [
    ("uprobe:{O2}:sourcevars.c:{consume_print} dead", "'dead' is optimised out at consume+0x"),
    ("uprobe:{O2}:area nosuch", "no variable 'nosuch' at area (sourcevars.c:{area_brace}); there: p, scale, label, result, names, sink"),
    ("uprobe:{O0}:area p->nosuch", "struct point has no member 'nosuch'; it has x, big, name, inner, flag, level, tag, ratio, color"),
    ("uprobe:{O0}:area p.x", "'p' is a pointer: write p->x"),
    ("uprobe:{O0}:area p->x->y", "'p->x' is int, not a pointer: write p->x.y"),
    ("uprobe:{O0}:area p->tag[4]", "'p->tag' has 4 elements; [4] is past its end"),
    ("uprobe:{O0}:area p->inner", "'p->inner' is struct inner; name a member (p->inner.x) or give a type"),
    ("uprobe:{O0}:area scale:string", "'scale' is int; ':string' reads what a char pointer or a char array holds"),
    ("uretprobe:{O0}:area p", "a return probe has only $retval"),
    ("uprobe:{minidebug}:main argc", "variables by name need DWARF"),
])
def test_bad_variables_are_one_line_errors(targets, probe, message):
    names = dict(O0=_program(targets, "O0"), O2=_program(targets, "O2"), minidebug=targets / "demo-minidebug",
                 consume_print=CONSUME_PRINT, area_brace=AREA_FIRST + 1)
    result = run_cli("resolve", probe.format(**names))
    assert result.status == 2, result.stdout
    assert message.format(**names) in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_optimised_out_variable_names_the_lines_where_it_lives(targets):
    program = _program(targets, "O2")
    result = run_cli("resolve", f"uprobe:{program}:sourcevars.c:{CONSUME_PRINT} dead")
    lives = re.search(r"it lives at lines ([\d, ]+) of sourcevars.c", result.stderr)
    assert lives, result.stderr
    lines = [int(n) for n in lives[1].split(", ")]
    assert SINK_IN_CONSUME in lines and CONSUME_PRINT not in lines
    # and at a line where it lives, it is read
    assert run_cli("resolve", f"uprobe:{program}:sourcevars.c:{SINK_IN_CONSUME} dead").status == 0


needs_perf = pytest.mark.skipif(shutil.which("perf") is None, reason="perf (linux-perf) is not installed")


def _perf_lines(program: str, function: str) -> set[int]:
    proc = subprocess.run(["perf", "probe", "-x", program, "-L", function], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return {int(line.split()[0]) for line in proc.stdout.splitlines()[1:] if line.split()[:1] != [] and line.split()[0].isdigit()}


@needs_perf
@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("function", ["main", "area", "consume"])
def test_list_lines_agrees_with_perf_probe(targets, build, function):
    program = _program(targets, build)
    listing = json.loads(run_cli("list", "--lines", "--json", program, function, check=True).stdout)
    ours = {line["relative"] for line in listing["lines"] if line["code"]}
    assert [line["text"] for line in listing["lines"]] == SOURCE[listing["first_line"] - 1:listing["lines"][-1]["line"]]
    # perf names the function's entry by its declaration line (0); we by the line its first code belongs to
    entry = min(ours)
    theirs = {entry if n == 0 else n for n in _perf_lines(program, function)}
    if build == "O0":
        assert ours == theirs
    else:  # perf leaves out a line whose code starts where another line's does; it runs, and we probe it
        assert ours >= theirs
    for relative in ours:  # and each line listed takes a probe
        assert run_cli("resolve", f"uprobe:{program}:{function}:+{relative}").status == 0


def _perf_variables(program: str, where: str) -> set[str]:
    proc = subprocess.run(["perf", "probe", "-x", program, "-V", where], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return {line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("\t\t")}


@needs_perf
@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("where", ["area", "consume", f"sourcevars.c:{SINK_IN_AREA}", f"sourcevars.c:{CONSUME_PRINT}"])
def test_list_vars_agrees_with_perf_probe(targets, build, where):
    program = _program(targets, build)
    places = json.loads(run_cli("list", "--vars", "--json", program, where, check=True).stdout)
    assert len(places) == 1
    # perf lists what the DWARF gives a value for there, readable by a fetch argument or not
    available = {v["name"] for v in places[0]["variables"] if v["available"] and v["kind"] != "global"}
    assert available == _perf_variables(program, where)
    for variable in places[0]["variables"]:  # what is listed as readable reads; the rest says why not
        probe = f"uprobe:{program}:{where} {variable['name']}:x64"
        result = run_cli("resolve", probe)
        assert (result.status == 0) == (variable["location"] is not None), (variable, result.stderr)
        if variable["location"] is None:
            assert variable["note"] in result.stderr


@pytest.mark.parametrize("trap", [False, True], ids=["jump", "trap"])
def test_a_computed_variable_is_read_by_the_ptrace_engine(targets, trap):
    """At -O2, area()'s result lives at its line as rbx * rbp sign-extended: a DWARF expression no fetch
    argument can say, which the ptrace engine evaluates from the registers of each hit."""
    program = _program(targets, "O2")
    listed = json.loads(run_cli("list", "--vars", "--json", program, f"sourcevars.c:{SINK_IN_AREA}", check=True).stdout)
    result = next(v for v in listed[0]["variables"] if v["name"] == "result")
    assert result["location"].startswith("computed (DW_OP_breg"), result
    records, proc = run_json("trace", "--engine", "ptrace", *(["--trap"] if trap else []),
                             f"uprobe:{program}:sourcevars.c:{SINK_IN_AREA} result", "--", program, "4")
    assert proc.returncode == 0, proc.stderr
    printed = _printed_lines(proc.stdout, "area")
    assert [event["args"]["result"] for event in records if "args" in event] == [
        int(seen["x"]) * int(seen["scale"]) for seen in printed]
    assert ("the probe point was a jump" in proc.stderr) != trap, proc.stderr


def test_the_kernel_engine_names_a_computed_variable_it_cannot_fetch(targets):
    if os.geteuid() != 0:
        pytest.skip("the kernel engine needs root")
    program = _program(targets, "O2")
    records, proc = run_json("trace", "--engine", "kernel", f"uprobe:{program}:sourcevars.c:{SINK_IN_AREA} result x=p->x",
                             "--", program, "2")
    assert proc.returncode == 0, proc.stderr
    assert "left out result: 'result' at area+" in proc.stderr and "tracefs cannot evaluate" in proc.stderr
    events = [event for event in records if "args" in event]
    assert [event["args"] for event in events] == [{"result": None, "x": int(seen["x"])}
                                                   for seen in _printed_lines(proc.stdout, "area")]
    assert all("tracefs cannot evaluate" in event["errors"]["result"] for event in events)


@pytest.mark.parametrize("build", BUILDS)
def test_a_float_argument_and_a_returned_string(targets, engine, build):
    """label_of(int i, double factor) returns a char *: $retval:string is the string; factor is in memory at
    -O0 and in %xmm0 at -O2, where only the ptrace engine can read it."""
    program = _program(targets, build)
    records, proc = run_json("trace", "--engine", engine, f"uprobe:{program}:label_of i factor",
                             f"uretprobe:{program}:label_of name=$retval:string", "--", program, "3")
    assert proc.returncode == 0, proc.stderr
    calls = _printed_lines(proc.stdout, "label_of")
    labels = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("label ")]
    entries = [event for event in records if event.get("probe", "").startswith("label_of") and "%" not in event["probe"]]
    returns = [event for event in records if event.get("probe") == "label_of%return"]
    assert [event["args"]["name"] for event in returns] == labels
    assert [event["args"]["i"] for event in entries] == [int(call["i"]) for call in calls]
    factors = [event["args"]["factor"] for event in entries]
    if engine == "kernel" and build == "O2":
        assert factors == [None] * len(calls) and "is in %xmm0, which tracefs cannot read" in proc.stderr
    else:
        assert factors == [float(call["factor"]) for call in calls]


def test_a_dwz_file_that_is_not_there_is_a_one_line_error(targets, tmp_path):
    alone = tmp_path / "sourcevars-dwz"
    shutil.copy(targets / "sourcevars-dwz", alone)  # without build/sourcevars.dwz beside it
    result = run_cli("resolve", f"uprobe:{alone}:area p->x")
    assert result.status == 2
    assert "its DWARF continues in the dwz file sourcevars.dwz (build-id " in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_dwarf_in_a_separate_debug_file(targets, engine):
    """demo-debuglink is stripped; its DWARF is in demo.debug, found through .gnu_debuglink."""
    stripped, whole = targets / "demo-debuglink", targets / "demo"
    line = next(n for n, text in enumerate((TARGETS_DIR / "demo.c").read_text().splitlines(), 1)
                if "grand_total += total;" in text)
    for probe in ("process_order item:string quantity id", f"demo.c:{line} total id"):
        assert run_cli("resolve", f"uprobe:{stripped}:{probe}", check=True).stdout.split()[1:] == \
            [word.replace(str(whole), str(stripped)) for word in
             run_cli("resolve", f"uprobe:{whole}:{probe}", check=True).stdout.split()[1:]]
    records, proc = run_json("trace", "--engine", engine, f"uprobe:{stripped}:process_order item:string quantity id",
                             f"uprobe:{stripped}:demo.c:{line} total id", "--", str(stripped), "3")
    assert proc.returncode == 0, proc.stderr
    orders = [re.match(r"order (\d+): (\d+) x (\S+) = (\d+)", text).groups()
              for text in proc.stdout.splitlines() if text.startswith("order ")]
    assert [event["args"] for event in records if event.get("probe") == "process_order"] == [
        {"item": item, "quantity": int(quantity), "id": int(order)} for order, quantity, item, _ in orders]
    assert [event["args"] for event in records if event.get("probe") == f"demo.c:{line}"] == [
        {"total": int(total), "id": int(order)} for order, _, _, total in orders]


def test_a_parameter_of_each_inlined_copy(targets, engine):
    """twice(v) is inlined twice per iteration, with v = i and v = i + 7: each copy reads its own v."""
    program = _program(targets, "O0")
    records, proc = run_json("trace", "--engine", engine, f"uprobe:{program}:sourcevars.c:{TWICE_BODY} v",
                             "--", program, "3")
    assert proc.returncode == 0, proc.stderr
    values = [event["args"]["v"] for event in records if "args" in event]
    assert values == [v for i in range(_printed(proc.stdout, "counted")) for v in (i, i + 7)]


@pytest.mark.parametrize("build", [*BUILDS, "dwarf4", "dwarf2"])
def test_a_function_on_one_line_and_a_returned_double(targets, engine, build):
    """thrice(v) is written on one line: at -O0 its prologue's end is a second row of that line, where v is
    stored. half(x) returns a double in %xmm0: the ptrace engine reads it, the kernel engine names it."""
    program = _program(targets, build)
    records, proc = run_json("trace", "--engine", engine, f"uprobe:{program}:thrice v",
                             f"uretprobe:{program}:half $retval", "--", program, "3")
    assert proc.returncode == 0, proc.stderr
    thrice = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("thrice ")]
    halves = [float(line.split()[2]) for line in proc.stdout.splitlines() if line.startswith("half ")]
    assert [event["args"]["v"] for event in records if event.get("probe", "").startswith("thrice")] == thrice
    returned = [event["args"]["arg1"] for event in records if event.get("probe") == "half%return"]
    if engine == "kernel":
        assert returned == [None] * len(halves) and "$retval is in %xmm0, which tracefs cannot read" in proc.stderr
    else:
        assert returned == halves


@pytest.mark.parametrize("build", BUILDS)
def test_cxx_members_through_this_a_base_a_static_and_a_reference(targets, engine, build):
    program = str(targets / f"cxxvars-{build}")
    records, proc = run_json("trace", "--engine", engine,
                             f"uprobe:{program}:_ZNK4shop4Item5valueEi this->price this->tag count_ k",
                             f"uprobe:{program}:_Z5totalRKN4shop4ItemE item.price", "--", program, "3")
    assert proc.returncode == 0, proc.stderr
    values = [event["args"] for event in records if event.get("probe", "").startswith("_ZNK4shop4Item5valueEi")]
    totals = [event["args"] for event in records if event.get("probe", "").startswith("_Z5totalRKN4shop4ItemE")]
    assert values == [{"this_price": int(seen["price"]), "this_tag": int(seen["tag"]), "count_": int(seen["count"]),
                       "k": int(seen["k"])} for seen in _printed_lines(proc.stdout, "value")]
    assert totals == [{"item_price": int(seen["price"])} for seen in _printed_lines(proc.stdout, "total")]


def test_a_return_probe_that_fetches_retval_typed_is_not_followed_by_the_raw_register(targets, engine):
    """Text writes a return probe's raw retval= (%rax, 64 bits) only where the probe does not fetch $retval
    itself: typed by the DWARF, a double from %xmm0 (left out, named, by the kernel engine)."""
    program = _program(targets, "O2")
    result = run_cli("trace", "--engine", engine, f"uretprobe:{program}:half value=$retval",
                     f"uretprobe:{program}:half", "--", program, "3", check=True)
    halves = [float(line.split()[2]) for line in result.stdout.splitlines() if line.startswith("half ")]
    typed = [line for line in result.stdout.splitlines() if "half%return value=" in line]
    raw = [line for line in result.stdout.splitlines() if re.search(r"half%return retval=-?\d+$", line)]
    assert len(typed) == len(raw) == len(halves) == 3 and not any("retval=" in line for line in typed), result.stdout
    if engine == "ptrace":
        assert [float(line.split("value=")[1].split()[0]) for line in typed] == halves

"""Probes in the program's own terms (issue 19): source lines and variables read through DWARF, on both engines,
against what tests/targets/sourcevars.c prints about itself, built -O0 and -O2. Line numbers come from the
source's own markers and addresses from objdump's decoded line table, never from uprobes."""

from __future__ import annotations

import os
import re

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

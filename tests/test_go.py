"""A Go program (built by tests/targets with Debian's golang-go): return probes on the functions' exits while
the runtime grows and copies goroutine stacks, arguments by the Go register ABI, goroutine ids, Go names.

The oracle is the program itself: goexits prints, per goroutine, its runtime id and what depth and add
returned; depth(n, g) returns the sum of k + g for k = 0..n, each level's value known.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict

import pytest

from conftest import run_cli, run_json

GOROUTINES, DEPTH = 4, 300


def _depth(n: int, g: int) -> int:
    return n * (n + 1) // 2 + g * (n + 1)


def _printed(stdout: str) -> dict[int, tuple[int, int, int]]:
    """What goexits printed, by goroutine number g: (its runtime id, what depth returned, what add returned)."""
    lines = re.findall(r"^goroutine (\d+) g (\d+) depth (-?\d+) add (-?\d+)$", stdout, re.M)
    assert len(lines) == len(stdout.splitlines())
    return {int(g): (int(goid), int(depth), int(add)) for goid, g, depth, add in lines}


def test_every_return_of_deep_recursion_in_goroutines_with_its_value(engine, targets):
    """Four goroutines recurse 300 deep through frames that make the runtime copy their stacks again and
    again, with return probes on depth and (*counter).add (Go objects get return probes on the functions' exits
    by default: a replaced return address makes the runtime abort). Every call is seen at its entry with its
    arguments by the Go register ABI and at its return with its value, grouped by the goroutine id read from
    %r14, which is the id the program prints; the program's result is as without probes."""
    goexits = str(targets / "goexits")
    probes = [f"uprobe:{goexits}:main.depth n=$arg1 g=$arg2 $goid", f"uretprobe:{goexits}:main.depth r=$retval $goid",
              f"uprobe:{goexits}:main.(*counter).add c=$arg1:x64 v=$arg2 $goid",
              f"uretprobe:{goexits}:main.(*counter).add $goid"]
    records, proc = run_json("trace", "--engine", engine, *probes, "--", goexits, str(GOROUTINES), str(DEPTH))
    assert proc.returncode == 0, proc.stderr
    if engine == "ptrace":  # each exit's probe goes before its epilogue, where a jump fits: no stop per hit
        assert "6 of 6 probe points were jumps" in proc.stderr
    printed = _printed(proc.stdout)
    assert sorted(printed) == list(range(GOROUTINES))
    assert all(depth == _depth(DEPTH, g) and add == 3 * g for g, (_, depth, add) in printed.items())
    assert records[-1] == {"lost": 0}
    by_goroutine = defaultdict(list)
    for record in records[:-1]:
        by_goroutine[record["args"]["goid"]].append(record)
    assert set(by_goroutine) == {goid for goid, _, _ in printed.values()}
    counters = set()
    for g, (goid, _, _) in printed.items():
        events = [(e["probe"], {k: v for k, v in e["args"].items() if k not in ("goid", "c")}, e.get("retval"))
                  for e in by_goroutine[goid]]
        # A function whose stack check finds too little room starts over once the runtime has grown the stack:
        # its entry is hit again, at once, with the same arguments.
        restarts = [i for i in range(1, len(events)) if events[i] == events[i - 1] and events[i][2] is None]
        events = [event for i, event in enumerate(events) if i not in restarts]
        assert restarts  # the stacks did grow under the probes
        assert events == ([("main.depth", {"n": n, "g": g}, None) for n in range(DEPTH, -1, -1)]
                          + [("main.depth%return", {"r": _depth(n, g)}, _depth(n, g)) for n in range(DEPTH + 1)]
                          + [("main.(*counter).add", {"v": g}, None), ("main.(*counter).add%return", {}, 3 * g)])
        counters |= {e["args"]["c"] for e in by_goroutine[goid] if "c" in e["args"]}
    assert len(counters) == 1  # the receiver: one counter, shared


def test_go_return_probes_go_on_the_exits_by_default(targets):
    """resolve says why (the program is Go), on both engines' view; Go's names are written as Go prints them."""
    goexits = str(targets / "goexits")
    for engine in ([], ["--engine", "ptrace"]):
        result = run_cli("resolve", "--json", *engine, f"uretprobe:{goexits}:main.(*counter).add", check=True)
        records = [json.loads(line) for line in result.stdout.splitlines()]
        assert records and all(r["return_mode"].startswith("insn (a Go object): the ret 'ret' at main.(*counter).add+")
                               and r["line"].startswith("p:uprobes/main___counter__add__return ") for r in records)
    listed = run_cli("list", goexits, "main.*", check=True).stdout
    assert "main.(*counter).add" in listed and "main.depth" in listed


def test_a_replaced_return_address_is_what_the_go_runtime_cannot_take(targets):
    """Why Go gets return probes on its exits: asked to replace return addresses instead (--return-mode
    stack), the runtime meets one it does not know while it copies a growing stack and aborts."""
    goexits = str(targets / "goexits")
    proc = subprocess.run([sys.executable, "-m", "uprobes", "count", "--engine", "ptrace", "--return-mode", "stack",
                           f"uretprobe:{goexits}:main.depth", "--", goexits, "1", str(DEPTH)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unexpected return pc for main.depth" in proc.stderr


@pytest.mark.parametrize("token, message", [
    ("$arg10", "bad fetch argument '$arg10': Go passes the first 9 integer words in registers; where the others "
               "are depends on their types"),
    ("$arg0", "bad fetch argument '$arg0': arguments are numbered from $arg1"),
])
def test_go_argument_errors_are_one_line(targets, token, message):
    result = run_cli("resolve", f"uprobe:{targets / 'goexits'}:main.depth {token}")
    assert result.status == 2 and result.stderr == f"uprobes: error: {message}\n"

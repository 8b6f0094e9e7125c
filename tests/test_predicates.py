"""Predicates, ``PROBE ... if EXPR``: only the hits for which EXPR holds are reported and counted.

The oracle is the program: takes prints every call it made, with its arguments and result, and the test applies
the same condition to those lines in Python. The kernel engine applies what an event filter can say in the
kernel (resolve says which), and judges the rest itself; the ptrace engine judges every hit.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import run_cli, run_json
from oracles import takes_calls

N = 400


def _probe(takes: str, condition: str) -> str:
    return f"uprobe:{takes}:take size=%di:s64 name=+0(%si):string flags=%dx:u32 lo=%di:s8 w=%dx:u16 if {condition}"


def _s8(value: int) -> int:
    return ((value & 0xFF) ^ 0x80) - 0x80


CONDITIONS = [
    # condition, the same in Python over (size, name, flags), whether the kernel can apply it
    ("size >= 2500", lambda size, name, flags: size >= 2500, True),
    ('name == "beta" && !(flags & 8)', lambda size, name, flags: name == "beta" and not flags & 8, True),
    ('(size < 100 || size > 4900) && name != "gamma"',
     lambda size, name, flags: (size < 100 or size > 4900) and name != "gamma", True),
    ("flags & 4", lambda size, name, flags: bool(flags & 4), True),
    ("size > flags", lambda size, name, flags: size > flags, False),  # two fields: not a filter
    ("$pid > 0 && 0x8 > flags", lambda size, name, flags: flags < 0x8, False),  # the kernel has no tgid
    # narrower views of the registers: a signed byte, a 16-bit word; a constant wider than 32 bits
    ("lo < 0 && !(w == 3)", lambda size, name, flags: _s8(size) < 0 and flags != 3, True),
    # ... a constant an s8 cannot hold: the kernel would cut it to 8 bits, so the tool judges
    ("lo & 0x100 || size == 0x100000000", lambda size, name, flags: bool(_s8(size) & 0x100), False),
]


@pytest.mark.parametrize("condition, python, in_kernel", CONDITIONS, ids=[c[0] for c in CONDITIONS])
def test_only_the_hits_the_predicate_keeps_are_traced_and_counted(engine, targets, condition, python, in_kernel):
    takes = str(targets / "takes")
    resolved = json.loads(run_cli("resolve", "--json", _probe(takes, condition), check=True).stdout)
    assert (resolved["predicate"]["kernel_filter"] is not None) == in_kernel
    records, proc = run_json("trace", "--engine", engine, _probe(takes, condition), "--", takes, str(N))
    assert proc.returncode == 0, proc.stderr
    calls = takes_calls(proc.stdout)
    expected = [(size, name, flags) for size, name, flags, _ in calls if python(size, name, flags)]
    assert 0 < len(expected) < N
    assert [(r["args"]["size"], r["args"]["name"], r["args"]["flags"]) for r in records if "probe" in r] == expected
    counted, proc = run_json("count", "--engine", engine, _probe(takes, condition), "--", takes, str(N))
    assert proc.returncode == 0 and [r["hits"] for r in counted] == [len(expected)], proc.stderr


def test_a_return_probe_keeps_the_returns_its_predicate_asks_for(engine, targets):
    """On $retval (named r): take returns 2 * size when flags & 4, else -size."""
    takes = str(targets / "takes")
    records, proc = run_json("trace", "--engine", engine, f"uretprobe:{takes}:take r=$retval:s64 if r > 5000",
                             "--", takes, str(N))
    assert proc.returncode == 0, proc.stderr
    assert [r["retval"] for r in records if "probe" in r] == [result for *_, result in takes_calls(proc.stdout)
                                                              if result > 5000]


def test_a_bad_pointer_reads_a_number_as_0_and_a_string_it_cannot_read_makes_the_predicate_false(targets):
    """+0(%dx) reads at address flags (0..15), which faults: a number read there is 0, as on the kernel engine
    (so ``bad == 0`` holds at every hit), and a string read there cannot be fetched, so a predicate that reads
    it is false, whatever else it says."""
    takes = str(targets / "takes")
    runs = {}
    for condition in ("flags == 3", "bad == 0 || flags == 3", 'text == "x" || flags == 3'):
        records, proc = run_json("trace", "--engine", "ptrace", f"uprobe:{takes}:take bad=+0(%dx):u64 "
                                 f"text=+0(%dx):string flags=%dx:u32 if {condition}", "--", takes, "40")
        assert proc.returncode == 0, proc.stderr
        runs[condition] = [r["args"]["flags"] for r in records if "probe" in r]
    every = [flags for _, _, flags, _ in takes_calls(proc.stdout, 40)]
    assert runs == {"flags == 3": [3, 3, 3], "bad == 0 || flags == 3": every, 'text == "x" || flags == 3': []}


def test_predicates_on_what_is_not_a_varying_integer(engine, targets):
    """A predicate over no argument that varies ($pid, $comm, a constant), over a char (a one-character
    string), and over u64 values past 2^63 (compared exactly, as the integers they are, masks too)."""
    takes = str(targets / "takes")
    cases = [
        (f"uprobe:{takes}:take if $pid == 1", lambda size, name, flags, result: False),
        (f'uprobe:{takes}:take k=\\7 if $comm == "takes" && k == 7', lambda *call: True),
        (f'uprobe:{takes}:take c=+0(%si):char if c == "a"', lambda size, name, flags, result: name == "alpha"),
        (f"uretprobe:{takes}:take r=$retval:u64 if r > 0xfffffffffffff000",
         lambda size, name, flags, result: result % (1 << 64) > 0xfffffffffffff000),
        (f"uretprobe:{takes}:take r=$retval:u64 if r & 0x8000000000000000 && !(r & 1)",
         lambda size, name, flags, result: result < 0 and not result & 1),
        (f"uprobe:{takes}:take lo=%di:s8 if lo & 0x10000000000000000",  # a signed value's sign bits past 64
         lambda size, name, flags, result: bool(_s8(size) & 0x10000000000000000)),
    ]
    for probe, python in cases:
        counted, proc = run_json("count", "--engine", engine, probe, "--", takes, str(N))
        assert proc.returncode == 0, proc.stderr
        assert [r["hits"] for r in counted] == [sum(python(*call) for call in takes_calls(proc.stdout))], probe


@pytest.mark.parametrize("condition, message", [
    ("siz > 3", "unknown name 'siz' (the probe's arguments: flags, lo, name, size, w; and $pid, $tid, $comm)"),
    ('size == "big"', "'size == \"big\"' compares an integer with a string"),
    ("name > 3", "'name > 3' compares a string with an integer"),
    ('name < "b"', "strings compare with == and != only, not '<'"),
    ("size >", "it ends too soon"),
    ("(size > 3", "a '(' is not closed"),
    ("size > 3 size", "unexpected 'size'"),
    ("size ~ 3", "cannot read '~ 3'"),
    ("name", "a string is not a condition: compare it with == or !="),
    ("size == 08", "'08' is not a number (write 8, 0x8 or -8)"),
    ('name == "\\N{nope}"', 'cannot read the string "\\N{nope}"'),
])
def test_a_bad_predicate_is_one_line_naming_the_token(targets, condition, message):
    takes = str(targets / "takes")
    result = run_cli("trace", "--engine", "ptrace", _probe(takes, condition), "--", takes, "1")
    assert result.status == 2 and result.stderr == f"uprobes: error: bad predicate 'if {condition}': {message}\n"
    assert run_cli("resolve", f"uprobe:{takes}:take if").stderr == \
        f"uprobes: error: probe 'uprobe:{takes}:take if': 'if' must be followed by a condition, e.g. 'if size > 4096'\n"


def test_strings_in_predicates_are_as_written(targets):
    """A string beyond ASCII reaches the kernel's filter as written, and matches as written in the tool."""
    takes = str(targets / "takes")
    record = json.loads(run_cli("resolve", "--json", f'uprobe:{takes}:take n=+0(%si):string if n != "café"',
                                check=True).stdout)
    assert record["predicate"] == {"text": 'n != "café"', "kernel_filter": 'n != "café"'}


def test_the_predicate_s_words_need_no_quotes(targets):
    """On the command line, the words after 'if' belong to the probe, even one that looks like a kernel
    probe's 'p' or 'r'; a word that starts a probe with a colon starts the next probe."""
    takes = str(targets / "takes")
    result = run_cli("count", "--engine", "ptrace", "--json", f"uprobe:{takes}:take", "p=%dx:u32", "if", "p", "==", "2",
                     f"uprobe:{takes}:take", "--", takes, "32")
    assert result.status == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["hits"] for r in records) == [2, 32]
    # a kernel-form probe given as one word after a predicate is a probe of its own
    result = run_cli("count", "--engine", "ptrace", "--json", f"uprobe:{takes}:take s=%di:s64 if s > 4900",
                     f"p {takes}:take", "--", takes, "400")
    assert result.status == 0, result.stderr
    assert sorted(json.loads(line)["hits"] for line in result.stdout.splitlines() if line.startswith("{")) == \
        sorted([400, sum(size > 4900 for size, *_ in takes_calls(result.stdout[:result.stdout.index("{")]))])


def test_the_kernel_engine_filters_in_the_kernel(tracefs, targets):
    """Where the predicate is a filter, the hits it leaves out never leave the kernel: the engine itself reads
    only the kept ones, and its counters count only those (in a forked child too)."""
    import subprocess
    import time

    from uprobes.engines.kernel.engine import KernelEngine
    from uprobes.probes.resolve import resolve_text

    takes = str(targets / "takes")
    (probe,) = resolve_text(f"uprobe:{takes}:take size=%di:s64 if size >= 4990")
    alone = subprocess.run([takes, "2000"], capture_output=True, text=True, check=True).stdout
    expected = sorted(size for size, *_ in takes_calls(alone) if size >= 4990)
    for counting in (False, True):
        child = subprocess.Popen(["sh", "-c", f"sleep 0.3; {takes} 2000 > /dev/null; true"])
        with KernelEngine() as engine:
            engine.attach([probe], child.pid, counting=counting)
            assert child.wait() == 0
            time.sleep(0.1)
            events = engine.poll(0.1)
            assert engine.hit_counts() == [len(expected)]
            if not counting:
                assert sorted(event.args["size"] for event in events) == expected


def test_the_ptrace_engine_tests_register_predicates_in_the_trampoline(targets):
    """A predicate that compares arguments read from registers with constants is tested by the jump probe's
    trampoline: the hits it leaves out are never recorded (the engine's count is of records); one that compares
    two arguments is judged in the tool, every hit recorded."""
    from uprobes.engines.ptrace.engine import PtraceEngine
    from uprobes.probes.resolve import resolve_text
    from uprobes.proc.launch import HeldCommand

    takes = str(targets / "takes")
    calls = takes_calls(subprocess.run([takes, "2000"], capture_output=True, text=True, check=True).stdout)
    for condition, kept in (("size >= 4990 || lo < -126", sum(s >= 4990 or _s8(s) < -126 for s, *_ in calls)),
                            ("size > flags", 2000)):
        probes = resolve_text(f"uprobe:{takes}:take size=%di:s64 flags=%dx:u32 lo=%di:s8 if {condition}")
        child = HeldCommand([takes, "2000"])
        child.traced = True
        with PtraceEngine() as engine:
            engine.attach(probes, child.pid, held=True)
            child.release()
            while engine.exited(child.pid) is None:
                engine.poll(0.05)
            engine.close()
            assert engine.hit_counts() == [kept] and engine.report()[0] == "the probe point was a jump (no stop per hit)"
        resolved = run_cli("resolve", "--engine", "ptrace", probes[0].spec, check=True).stderr
        assert ("its predicate tested there" in resolved) == (kept < 2000), resolved

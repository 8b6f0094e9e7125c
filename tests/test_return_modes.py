"""Return probes on a function's exits (``--return-mode insn``): a probe on each ``ret`` and tail call, found by
decoding the whole function, instead of a replaced return address.

The exits are checked against objdump's disassembly; the return values against what the programs print they
got, on both engines; a C++ exception crossing probed frames under the kernel engine (whose replaced return
addresses make it end in std::terminate) against the program's own result.
"""

from __future__ import annotations

import bisect
import json
import re
import subprocess
from collections import defaultdict

import pytest

from conftest import run_cli, run_json

from uprobes.elf.objfile import ElfObject
from uprobes.x86_64.exits import function_exits

EXITS_FUNCTIONS = ("classify", "pick", "relay", "scaled", "depth", "fall", "leap")
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


def _objdump(path: str) -> tuple[dict[int, str], set[int]]:
    """Every instruction objdump decodes in ``path``'s code, by address (its mnemonic and operands), and where
    the PLT's stubs start."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                         check=True).stdout
    instructions = {int(address, 16): text.strip()
                    for address, text in re.findall(r"^\s+([0-9a-f]+):\t(.*)$", out, re.M)}
    return instructions, {int(address, 16) for address in re.findall(r"^([0-9a-f]+) <[^>]*@plt>:", out, re.M)}


@pytest.mark.parametrize("path", ["exits", LIBC])
def test_exits_are_the_rets_and_the_jumps_out_that_objdump_shows(targets, path):
    """For every function with a size whose exits can all be found: its exits are exactly the ``ret``s objdump
    shows inside it and its ``.cold`` parts, and the ``jmp``s from there to outside them (to another function,
    or through a pointer); a function whose exits cannot be found says why."""
    path = str(targets / path) if "/" not in path else path
    obj, (instructions, stubs) = ElfObject.open(path), _objdump(path)
    addresses = sorted(instructions)
    checked = refused = shared = 0
    starts = {function.value for function in obj.symbols.functions} | stubs
    for function in obj.symbols.functions:
        if not function.size or ".cold" in function.name:
            continue
        exits = function_exits(obj, function.value)
        if isinstance(exits, str):
            refused += 1
            assert re.search(r"conditional tail call|cannot be told|bounds are unknown|decode|not a part of its own",
                             exits), exits
            continue
        ranges = [(function.value, function.value + function.size), *obj.outlined_parts(function.value)]
        inside = [a for low, high in ranges
                  for a in addresses[bisect.bisect_left(addresses, low):bisect.bisect_left(addresses, high)]]
        targets = {target for a in inside if (target := _branch_target(instructions[a])) is not None}
        if any(not any(low <= t < high for low, high in ranges) and t not in starts for t in targets):
            shared += 1  # it branches into the middle of code outside it (glibc's string functions): its exits
            continue     # are that code's too, which objdump's listing does not say
        rets = {a for a in inside if re.match(r"(bnd |rep |repz )?ret", instructions[a])}
        jumps_out = {a for a in inside if re.match(r"(bnd |notrack )?jmp\s", instructions[a])
                     and not any(low <= (_branch_target(instructions[a]) or -1) < high for low, high in ranges)}
        assert {e.address for e in exits if not e.tail_call} == rets, function.name
        assert {e.address for e in exits if e.tail_call} <= jumps_out, function.name  # less: jump tables' jumps
        checked += 1
    assert checked > (3000 if "libc" in path else 7) and refused <= checked / 20 + 1 and shared < checked / 20


def _branch_target(text: str) -> int | None:
    """Where a direct jump or conditional jump goes (None: not one, or through a register or memory)."""
    direct = re.match(r"(?:bnd )?j[a-z]+\s+([0-9a-f]+)\b", text)
    return int(direct[1], 16) if direct else None


def _program_results(stdout: str) -> dict[str, list[int]]:
    """What the exits target printed each call returned ("NAME ARG RESULT"), by function, in order."""
    results = defaultdict(list)
    for name, _, result in re.findall(r"^(\w+) (-?\d+) (-?\d+)$", stdout, re.M):
        results[name].append(int(result))
    return results


def _trace_exits(engine: str, targets, *options: str, n: int = 12) -> tuple[list[dict], subprocess.CompletedProcess]:
    exits = str(targets / "exits")
    probes = [f"uretprobe:{exits}:{name} r=$retval:s64" for name in EXITS_FUNCTIONS]
    return run_json("trace", "--engine", engine, *options, *probes, "--", exits, str(n))


def test_every_return_is_seen_with_its_value_and_nothing_on_the_stack_changes(engine, targets):
    """Return probes on the exits of functions that return from a jump table's cases and a .cold part
    (classify), by early returns (pick), by a tail call (relay: its return value is scaled's, not seen at the
    jmp), by recursion (depth), and by longjmp (fall, for odd arguments: no return at all): each return is an
    event with the value the program printed, in order; the program's output and status are as without probes."""
    n = 12
    alone = subprocess.run([str(targets / "exits"), str(n)], capture_output=True, text=True, check=True).stdout
    records, proc = _trace_exits(engine, targets, "--return-mode", "insn", n=n)
    assert proc.returncode == 0 and proc.stdout == alone, proc.stderr
    printed = _program_results(alone)
    events = [record for record in records if "probe" in record]
    assert records[-1] == {"lost": 0}
    seen = defaultdict(list)
    for event in events:
        seen[event["probe"].removesuffix("%return")].append(event)
    for name in ("classify", "pick", "depth", "leap"):
        assert [e["retval"] for e in seen[name]] == printed[name], name
        assert all(e["args"] == {"r": e["retval"]} for e in seen[name])
    assert [e["retval"] for e in seen["scaled"]] == printed["relay"]
    assert [e["retval"] for e in seen["fall"]] == [i + 1 for i in range(0, n, 2)]
    # relay leaves by 'jmp scaled': a return without a value, its r left out (and said so once at the start)
    assert len(seen["relay"]) == n and all(e["retval"] is None and e["args"] == {} for e in seen["relay"])
    assert re.search(r"warning: relay%return at .*: left out r: relay leaves by a tail call at relay\+0x4 "
                     r"\('jmp .*'\); what it returns is what scaled returns", proc.stderr), proc.stderr
    if engine == "ptrace":  # classify's eight rets each follow a write of %rax: traps, said in one line
        assert "classify%return trapped at an int3, not a jump (8 probe points): the path ends at 'ret'" in proc.stderr
    # every return of one function carries its entry's address, whichever ret it was
    for name, hits in seen.items():
        assert len({e["ip"] for e in hits}) == 1, name
    assert [e["ts_ns"] for e in events] == sorted(e["ts_ns"] for e in events)


def test_arguments_by_number_are_where_the_c_abi_puts_them(engine, targets):
    """$arg1..$arg6 are the System V registers at the entry, $arg7 and $arg8 the stack past the return address."""
    exits = str(targets / "exits")
    records, proc = run_json("trace", "--engine", engine,
                             f"uprobe:{exits}:spread " + " ".join(f"$arg{n}:s64" for n in range(1, 9)),
                             f"uretprobe:{exits}:spread", "--", exits, "5")
    assert proc.returncode == 0, proc.stderr
    entries = [r["args"] for r in records if r.get("probe") == "spread"]
    assert entries == [{f"arg{n}": i + n - 1 for n in range(1, 9)} for i in range(5)]
    assert [r["retval"] for r in records if r.get("probe") == "spread%return"] == _program_results(proc.stdout)["spread"]
    line = run_cli("resolve", f"uprobe:{exits}:spread $arg1 $arg6 $arg7 x=+0($arg8)", check=True).stdout
    assert line.rstrip().endswith(" arg1=%di arg6=%r9 arg7=$stack1 x=+0($stack2)")


def test_the_two_modes_agree_where_both_see_the_return(engine, targets):
    """Where a return address can be replaced safely (no tail call, no longjmp), both modes give the same
    returns with the same values, in the same order, each event naming the function's entry."""
    exits = str(targets / "exits")
    runs = {}
    for mode in ("insn", "stack"):
        records, proc = run_json("trace", "--engine", engine, "--return-mode", mode,
                                 *(f"uretprobe:{exits}:{name}" for name in ("classify", "pick", "depth")),
                                 "--", exits, "9")
        assert proc.returncode == 0, proc.stderr
        base = min(r["ip"] for r in records if "ip" in r)
        runs[mode] = [(r["probe"], r["retval"], r["ip"] - base) for r in records if "probe" in r]
    assert runs["insn"] == runs["stack"] and len(runs["insn"]) == 9 + 9 + sum(range(10))


def test_a_cxx_exception_crosses_return_probed_frames_under_the_kernel_engine(tracefs, targets):
    """cxxthrow links the C++ unwinder, so the kernel engine's return probes there go on the functions' exits by
    default: the exceptions thrown through inner and outer, and those caught in guarded, unwind only the
    program's own frames, and it ends as it does alone, every return that happened reported with its value
    (the kernel's replaced return addresses would end it in std::terminate)."""
    cxx = str(targets / "cxxthrow")
    probes = [f"uretprobe:{cxx}:{name}" for name in ("_Z5innerl", "_Z5outerl", "_Z5riskyl", "_Z7guardedl", "_Z5totall")]
    resolved = run_cli("resolve", "--json", *probes, check=True)
    modes = {json.loads(line)["return_mode"].split(":")[0] for line in resolved.stdout.splitlines()}
    assert modes == {"insn (C++ exceptions may unwind its frames)"}
    for argv, output in (([cxx], "sum 1125\n"), ([cxx, "caught"], "total 20\n")):
        records, proc = run_json("trace", "--engine", "kernel", *probes, "--", *argv)
        assert proc.returncode == 0 and proc.stdout == output, proc.stderr
        got = [(r["probe"].removesuffix("%return"), r["retval"]) for r in records if "probe" in r]
        if argv[1:] == ["caught"]:  # guarded(i) returns risky(i) for even i, -i for odd; total(5) returns 10 * sum
            expected = [call for i in range(5) for call in
                        ([("_Z5riskyl", i), ("_Z7guardedl", i)] if i % 2 == 0 else [("_Z7guardedl", -i)])]
            assert got == expected + [("_Z5totall", 20)]
        else:  # outer(n) returns inner(n) + 1 = 10n + 1, except for n = 3, which throws through both
            assert got == [call for n in range(6) if n != 3 for call in (("_Z5innerl", 10 * n), ("_Z5outerl", 10 * n + 1))]


def test_latency_times_calls_that_leave_by_any_exit(engine, targets):
    """latency with its return probes on pick's three rets: one duration per call."""
    exits = str(targets / "exits")
    records, proc = run_json("latency", "--engine", engine, "--return-mode", "insn", f"uprobe:{exits}:pick",
                             "--", exits, "20")
    assert proc.returncode == 0, proc.stderr
    (summary,) = records
    assert summary["probe"] == "pick" and summary["count"] == 20
    assert sum(bucket["count"] for bucket in summary["buckets"]) == 20


def test_resolve_says_how_each_return_probe_is_placed(targets):
    """resolve shows a line per exit in mode insn, the mode and why; where the exits cannot all be found it
    falls back to the stack and says why; a function that never returns has no return probe."""
    exits, nest = str(targets / "exits"), str(targets / "nest")
    result = run_cli("resolve", "--return-mode", "insn", f"uretprobe:{exits}:pick r=$retval", check=True)
    lines = result.stdout.splitlines()
    offsets = [int(re.search(r":(0x[0-9a-f]+) ", line)[1], 16) for line in lines]
    obj = ElfObject.open(exits)
    pick = obj.symbols.match("pick")[0]
    assert all(line.startswith("p:uprobes/pick__return ") and line.endswith(" r=%ax:s64") for line in lines)
    assert offsets == [obj.vaddr_to_offset(e.address) for e in function_exits(obj, pick.value)] and len(lines) == 3
    assert result.stderr.count("# pick%return: return mode insn (asked for): the ret 'ret' at pick+0x") == 3
    # C, default mode: the stack on both engines
    assert run_cli("resolve", f"uretprobe:{exits}:pick", check=True).stdout.startswith("r:uprobes/pick__return ")
    fallback = run_cli("resolve", "--json", "--return-mode", "insn", f"uretprobe:{LIBC}:__memcpy_chk_erms",
                       check=True)
    (record,) = map(json.loads, fallback.stdout.splitlines())
    assert record["return_mode"] == "stack" and record["line"].startswith("r:")
    assert re.fullmatch(r"return mode stack, not insn \(asked for\): the exits of __mem\w+_chk_erms cannot all be "
                        r"found: 'jb 0x[0-9A-F]+' at 0x[0-9a-f]+ is a conditional tail call \(a probe on it would fire "
                        r"whether or not it is taken\)", record["notes"][0])
    # depth ends in 'pop %r12; pop %r13; pop %rbp; ret': a probe reading only %ax (and what the pops leave alone)
    # goes five bytes before the ret, where a jump fits; one reading a register they change stays on the ret
    ret = next(e for e in function_exits(obj, obj.symbols.match("depth")[0].value))
    assert obj.read(ret.seen_from, ret.address - ret.seen_from + 1) == bytes.fromhex("415c415d5dc3")
    assert ret.written == {"r12", "r13", "rbp", "rsp"}
    for args, at in (("r=$retval b=%bx", ret.seen_from), ("r=$retval v=%r13", ret.address)):
        line = run_cli("resolve", "--return-mode", "insn", f"uretprobe:{exits}:depth {args}", check=True).stdout
        assert f":{obj.vaddr_to_offset(at):#x} " in line
    placed = run_cli("resolve", "--engine", "ptrace", "--return-mode", "insn", f"uretprobe:{exits}:depth", check=True)
    assert "probed from depth+0x" in placed.stderr and "a jump, counted or traced (pop %r12; pop %r13; pop %rbp)" \
        in placed.stderr
    never = run_cli("resolve", "--return-mode", "insn", f"uretprobe:{nest}:thrower")
    assert never.status == 2 and never.stderr == (f"uprobes: error: probe 'uretprobe:{nest}:thrower': thrower never "
                                                  f"returns (it has no ret and no tail call)\n")


def test_what_a_probe_on_the_exits_cannot_see_is_left_out_or_placed_on_the_stack(targets):
    """ftail returns a double by a tail call: its DWARF-typed $retval (%xmm0) is left out there, as an integer's
    is, not read as the callee's argument. hop tail-calls through a table holding hop itself: every call is
    still one return. cgoto's computed goto makes its indirect jump unknowable: it falls back to the stack,
    and says so."""
    exits = str(targets / "exits")
    runs = {}
    for mode in ("insn", "stack"):
        records, proc = run_json("trace", "--engine", "ptrace", "--return-mode", mode, f"uretprobe:{exits}:ftail r=$retval",
                                 f"uretprobe:{exits}:hop", f"uretprobe:{exits}:cgoto r=$retval:s64", "--", exits, "6")
        assert proc.returncode == 0, proc.stderr
        runs[mode] = (records, proc)
    printed = _program_results(runs["stack"][1].stdout)
    by_probe = {mode: defaultdict(list) for mode in runs}
    for mode, (records, _) in runs.items():
        for record in records[:-1]:
            by_probe[mode][record["probe"]].append(record)
    assert [r["args"]["r"] for r in by_probe["stack"]["ftail%return"]] == printed["ftail"]
    assert all(r["args"] == {} and r["retval"] is None for r in by_probe["insn"]["ftail%return"])
    assert len(by_probe["insn"]["ftail%return"]) == 6
    assert "left out r: ftail leaves by a tail call" in runs["insn"][1].stderr
    assert len(by_probe["insn"]["hop%return"]) == len(by_probe["stack"]["hop%return"]) == 6 + 3
    assert [r["retval"] for r in by_probe["insn"]["cgoto%return"]] == printed["cgoto"]
    assert "the exits of cgoto cannot all be found: which of its indirect jumps ('jmp *%" in runs["insn"][1].stderr
    assert "it takes addresses of its own code (a computed goto)" in runs["insn"][1].stderr


def test_arguments_by_number_and_variables_read_past_the_prologue_do_not_mix(targets):
    """At -O0 a variable lives in the frame the prologue builds, so its probe moves past the prologue, where
    $argN's registers no longer hold the arguments: one line saying to use two probes."""
    program = str(targets / "sourcevars-O0")
    result = run_cli("resolve", f"uprobe:{program}:area $arg1 p")
    assert result.status == 2 and result.stderr == (
        f"uprobes: error: probe 'uprobe:{program}:area $arg1 p': $argN is where the ABI puts it at the function's "
        f"entry, and p only past its prologue: give them in two probes\n")

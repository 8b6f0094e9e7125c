"""A probe on every instruction: the ptrace engine must leave the program's behaviour unchanged and count
exactly what the kernel's own uprobes count.

For each function defined in tests/targets/insns.c (built at -O0, -O2 and -O3), and for a handful of functions
of /usr/bin/python3.11 that run at every start of the interpreter, every instruction ``objdump -d`` lists inside
the function's symbol gets a probe (its file offset through the PT_LOAD segment ``readelf -lW`` shows). The
program runs untraced, under ``uprobes count --engine ptrace`` with every probe (a jump wherever the site
allows, an int3 elsewhere), and under ``--engine kernel``:
both traced runs must print what the untraced run printed and exit with its status, and every probe must have
the same hit count under both engines.

Most of the run time is the kernel's: it takes some 70 ms to unregister each uprobe when its perf events close.

The kernel is an oracle only for the instructions it handles, so some are left out of its run (never out of
the ptrace run). Which ones is decided from objdump's raw bytes with the rules of arch/x86/kernel/uprobes.c,
never from our own decoder: see :func:`kernel_mishandles`. Each instruction left out that falls through is
still checked against the kernel: its ptrace count must equal the kernel's count of the next probed instruction
when no branch can land in between.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import TARGETS_DIR
from oracles import file_offset, function_symbols
from uprobes.x86_64.analysis import analyze

PYTHON = "/usr/bin/python3.11"
ITERATIONS = "3"

# Small exported functions of python3.11 that run at every start, between them covering the ordinary
# instruction mix of optimised C (prologues, epilogues, rip-relative loads, stores and read-modify-writes, tail
# calls, calls through the PLT) and some less ordinary: div, movabs and an indirect tail call through a
# rip-relative pointer (PyObject_Calloc), an indirect call through one and a rip-relative movdqa (PySet_New),
# cmov and setcc (PyTuple_GetSlice), rep stos and a rip-relative movhps (PyWideStringList_Insert), calls through
# registers and a 66-prefixed nop (PyObject_IsTrue).
PYTHON_FUNCTIONS = ("PyUnicode_InternInPlace", "PyUnicode_FromString", "_PyObject_LookupAttr", "PyObject_IsTrue",
                    "PyObject_Calloc", "PySet_New", "PyTuple_GetSlice", "PyWideStringList_Insert")
PYTHON_SCRIPT = ("import sys; d = {str(i): i * i for i in range(50)}; print(sorted(d.items())[:5]); "
                 "sys.exit(len(d) % 7)")
# The same work in every run, so that two runs take the same branches: a fixed hash seed, no address
# randomisation (pointer hashes place objects in dicts and sets), and nothing looked up in the current directory
# (-P) or the user's site directory (-s), which may change between runs.
PYTHON_COMMAND = ("env", "PYTHONHASHSEED=0", "setarch", "-R", PYTHON, "-s", "-P", "-c", PYTHON_SCRIPT)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the kernel engine (the oracle) needs root")


# -- the instructions, from binutils --------------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    function: str
    address: int
    offset: int  # in the file
    raw: bytes
    text: str  # objdump's disassembly


def insns_functions() -> list[str]:
    """Names of the functions insns.c defines (main included), read from the source."""
    source = (TARGETS_DIR / "insns.c").read_text()
    return re.findall(r"^(?![#\s]).*?\b(\w+)\([^()]*\)\s*(?:\{|$)", source, re.M)


def objdump_instructions(path: str, function: str, address: int, size: int) -> list[Instruction]:
    """Every instruction ``objdump -d`` shows in [address, address + size), with its raw bytes."""
    out = subprocess.run(["objdump", "-d", "--wide", "--insn-width=15", f"--start-address={address:#x}",
                          f"--stop-address={address + size:#x}", path], check=True, capture_output=True,
                         text=True).stdout
    found = []
    for m in re.finditer(r"^\s*([0-9a-f]+):\t((?:[0-9a-f]{2} )+)\s*\t(.*)$", out, re.M):
        vaddr = int(m[1], 16)
        found.append(Instruction(function, vaddr, file_offset(path, vaddr), bytes.fromhex(m[2]), m[3].strip()))
    assert found and found[0].address == address, f"objdump shows no instruction at {function} in {path}"
    assert found[-1].address + len(found[-1].raw) == address + size, f"objdump's {function} ends elsewhere"
    return found


def function_instructions(path: str, names: list[str] | tuple[str, ...], dynamic: bool = False) -> list[Instruction]:
    symbols = function_symbols(path, dynamic=dynamic)
    missing = [name for name in names if name not in symbols]
    assert not missing, f"{path} has no symbol for {missing}"
    return [i for name in names for i in objdump_instructions(path, name, *symbols[name])]


# -- what the kernel does with an instruction (arch/x86/kernel/uprobes.c) -------------------------------------

_LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})
_KERNEL_BAD_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0xF0: "lock"}  # is_prefix_bad()
# Zero bits of good_insns_64: opcodes uprobe_init_insn() refuses (0f is good, so two-byte opcodes all pass).
_KERNEL_BAD_OPCODES = frozenset({0x06, 0x07, 0x0E, 0x16, 0x17, 0x1E, 0x1F, 0x27, 0x2F, 0x37, 0x3F, 0x60, 0x61, 0x62,
                                 0x6C, 0x6D, 0x6E, 0x6F, 0x82, 0x9A, 0xCC, 0xCD, 0xCE, 0xCF, 0xD4, 0xD5, 0xD6, 0xE4,
                                 0xE5, 0xE6, 0xE7, 0xEA, 0xEC, 0xED, 0xEE, 0xEF, 0xF1, 0xF4, 0xFA, 0xFB})
# Opcode bytes arch_uprobe_analyze_insn() treats specially: emulated as a branch or nop by branch_setup_xol_ops()
# (jcc, jmp, call, nop), popf's TF fixup, and the returns, far jumps and calls whose rip it does not fix up.
_KERNEL_BRANCH_OPCODES = frozenset({*range(0x70, 0x80), 0x90, 0xE8, 0xE9, 0xEB})
_KERNEL_SPECIAL_OPCODES = _KERNEL_BRANCH_OPCODES | {0x9A, 0x9D, 0xC2, 0xC3, 0xCA, 0xCB, 0xEA, 0xFF}


def kernel_mishandles(raw: bytes) -> str | None:
    """Why the kernel's uprobes cannot be the oracle for the instruction ``raw``, or None.

    * es/cs/ss/ds and lock prefixes: refused at attach (ENOTSUPP, errno 524);
    * a 66 prefix on a branch the kernel emulates (``66 90`` among them): refused at attach;
    * pushf: stepped with TF set and never fixed up, so the program's flags word gets TF, and a later popf
      kills it with SIGTRAP;
    * a VEX or EVEX instruction whose opcode byte, read as a one-byte opcode, is refused or special: the kernel's
      decoder keeps only the byte after the VEX prefix as OPCODE1, so ``vmovq %rax,%xmm0`` (c4 e1 f9 6e) is
      "outs" and silently never installed, ``vmovq %xmm0,%rax`` (c4 e1 f9 7e) is "jle" and emulated as a jump,
      its effect lost, and ``vzeroupper`` (c5 f8 77) is "ja".
    """
    i = 0
    prefixes = set()
    while i < len(raw) and raw[i] in _LEGACY_PREFIXES:
        prefixes.add(raw[i])
        i += 1
    if bad := prefixes & _KERNEL_BAD_PREFIXES.keys():
        return f"{_KERNEL_BAD_PREFIXES[min(bad)]} prefix"
    if i < len(raw) and raw[i] in (0xC4, 0xC5, 0x62):  # always VEX/EVEX in 64-bit mode
        opcode = raw[i + {0xC5: 2, 0xC4: 3, 0x62: 4}[raw[i]]]
        if opcode in _KERNEL_BAD_OPCODES or opcode in _KERNEL_SPECIAL_OPCODES:
            return f"vector instruction whose opcode {opcode:02x} the kernel reads as a one-byte opcode"
        return None
    while i < len(raw) and 0x40 <= raw[i] <= 0x4F:  # REX
        i += 1
    opcode = raw[i]
    if 0x66 in prefixes and (opcode in _KERNEL_BRANCH_OPCODES or opcode == 0x0F and 0x80 <= raw[i + 1] <= 0x8F):
        return "66 prefix on a branch"
    if opcode == 0x9C:
        return "pushf"
    return None


# -- running ---------------------------------------------------------------------------------------------------

def run_untraced(command: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def count_hits(engine: str, path: str, instructions: list[Instruction], command: tuple[str, ...],
               output: Path) -> tuple[dict[int, int], subprocess.CompletedProcess]:
    """``uprobes count --engine ENGINE --json -o OUTPUT`` with a probe on each instruction, running
    ``command``: hits per file offset, and the finished uprobes process (whose stdout is the command's)."""
    probes = [f"p {path}:{i.offset:#x}" for i in instructions]
    proc = subprocess.run([sys.executable, "-m", "uprobes", "count", "--engine", engine, "--json", "-o",
                           str(output), *probes, "--", *command], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"{len(probes)} probe point{'s' if len(probes) != 1 else ''} attached ({engine} engine" in proc.stderr, \
        proc.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert all(r["path"] == path for r in records)
    hits = {r["offset"]: r["hits"] for r in records}
    assert sorted(hits) == sorted(i.offset for i in instructions), "one record per probe point"
    return hits, proc


_BRANCH_TARGET = re.compile(r"^(?:(?:bnd|notrack|ds|cs)\s+)*(?:j\w+|call\w*|loop\w*|xbegin\w*)\s+([0-9a-f]+)\b")
_INDIRECT_JUMP = re.compile(r"^(?:(?:bnd|notrack|ds|cs)\s+)*jmp\w*\s+\*")
_NO_FALL_THROUGH = re.compile(r"^(?:(?:bnd|notrack|ds|cs|lock|data16)\s+)*(?:j|ret|call|loop|rep|ud|hlt|int)")


def check_left_out(instructions: list[Instruction], left_out: set[int], ptrace: dict[int, int],
                   kernel: dict[int, int]) -> int:
    """Each left-out instruction that falls through must have the hits the kernel counts on the next probed
    instruction, if no branch can land on an instruction in between. Returns how many were checked."""
    checked = 0
    by_function: dict[str, list[Instruction]] = {}
    for ins in instructions:
        by_function.setdefault(ins.function, []).append(ins)
    for body in by_function.values():
        if any(_INDIRECT_JUMP.match(i.text) for i in body):
            continue  # a jump table may land anywhere
        targets = {int(m[1], 16) for i in body if (m := _BRANCH_TARGET.match(i.text))}
        for n, ins in enumerate(body):
            if ins.offset not in left_out or _NO_FALL_THROUGH.match(ins.text):
                continue
            following = next((j for j in body[n + 1:] if j.offset not in left_out), None)
            between = [j for j in body[n + 1:] if j.address <= (following.address if following else -1)]
            if following is None or any(j.address in targets for j in between):
                continue
            assert ptrace[ins.offset] == kernel[following.offset], \
                f"{ins.function} {ins.address:#x} '{ins.text}': {ptrace[ins.offset]} hits under ptrace, " \
                f"{kernel[following.offset]} on '{following.text}' after it under the kernel"
            checked += 1
    return checked


def plan_kinds(path: str, instructions: list[Instruction]) -> Counter:
    """How the ptrace engine runs each probed instruction (our analysis of the file's bytes)."""
    data = Path(path).read_bytes()
    return Counter(analyze(data[i.offset:i.offset + 15], i.address).kind for i in instructions)


def probe_every_instruction(path: str, instructions: list[Instruction], command: tuple[str, ...],
                            tmp_path: Path) -> None:
    """The whole check for one program."""
    untraced = run_untraced(command)
    ptrace, traced = count_hits("ptrace", path, instructions, command, tmp_path / "ptrace.jsonl")
    assert (traced.stdout, traced.returncode) == (untraced.stdout, untraced.returncode), traced.stderr
    # Counted, a probe is a jump where its site allows: here an instruction of 5 bytes or more, the next
    # instruction having a probe of its own.
    jumps = re.search(r"^uprobes: (\d+) of \d+ probe points were jumps", traced.stderr, re.M)
    assert jumps and int(jumps[1]) > 0, traced.stderr

    reasons = {i.offset: reason for i in instructions if (reason := kernel_mishandles(i.raw))}
    kernel_probed = [i for i in instructions if i.offset not in reasons]
    kernel, oracle = count_hits("kernel", path, kernel_probed, command, tmp_path / "kernel.jsonl")
    assert (oracle.stdout, oracle.returncode) == (untraced.stdout, untraced.returncode), oracle.stderr

    differ = [f"{i.function} {i.address:#x} {i.raw.hex(' ')} '{i.text}': ptrace {ptrace[i.offset]}, kernel "
              f"{kernel[i.offset]}" for i in kernel_probed if ptrace[i.offset] != kernel[i.offset]]
    assert not differ, "hit counts differ:\n" + "\n".join(differ)
    entries = {i.function: i.offset for i in reversed(instructions)}  # each function's first instruction
    assert [name for name, offset in entries.items() if kernel.get(offset, ptrace[offset]) == 0] == [], \
        "functions that never ran"
    neighbours = check_left_out(instructions, set(reasons), ptrace, kernel)

    kinds = plan_kinds(path, instructions)
    left_out = Counter(reasons.values())
    print(f"\n{path}: {len(instructions)} probes ({kinds['emulate']} emulated, {kinds['step']} stepped when "
          f"trapped, {jumps[1]} jumps), "
          f"{sum(ptrace.values())} hits; left out of the kernel run: {dict(left_out)}, {neighbours} of them "
          f"checked against the next instruction")


# -- the tests -------------------------------------------------------------------------------------------------

def test_insns_defines_the_functions_we_probe():
    assert insns_functions() == ["twice", "rip_relative", "branches", "stack_ops", "conditional", "strings",
                                 "vectors", "x87", "arithmetic", "atomics", "main"]


@pytest.mark.parametrize("level", ["O0", "O2", "O3"])
def test_every_instruction_of_insns(targets, tmp_path, level):
    path = str(targets / f"insns-{level}")
    instructions = function_instructions(path, insns_functions())
    probe_every_instruction(path, instructions, (path, ITERATIONS), tmp_path)


@pytest.mark.skipif(not os.path.exists(PYTHON), reason=f"{PYTHON} is not installed")
def test_every_instruction_of_python_functions(tmp_path):
    """On a copy of the interpreter (the same code in a file of its own): the kernel engine's events count the
    launched child from its fork, so probes on the file uprobes itself runs on (a virtualenv made from
    /usr/bin/python3.11, as on a fresh Debian) would also count the tool's own code in the child before the exec."""
    copy = tmp_path / "python3.11"
    shutil.copy2(PYTHON, copy)
    instructions = function_instructions(str(copy), PYTHON_FUNCTIONS, dynamic=True)
    command = tuple(str(copy) if word == PYTHON else word for word in PYTHON_COMMAND)
    probe_every_instruction(str(copy), instructions, command, tmp_path)

"""Which instructions the kernel's x86-64 uprobes refuse, or run wrongly: decided before a probe is defined.

The kernel analyses a probed instruction (``arch_uprobe_analyze_insn()``, arch/x86/kernel/uprobes.c) only when
it first puts the breakpoint into a process: at ``perf_event_open`` when a process maps the file already, else
when one maps it, and then a refusal (ENOTSUPP, errno 524) is dropped and the probe silently never fires. So
the engine applies the kernel's rules itself, to the bytes the kernel reads (the file's, not a process's
memory), before it defines anything.

=============================================  ================================================================
Instruction                                    What the kernel does
=============================================  ================================================================
undecodable                                    refuses it (ENOEXEC)
es, cs, ss, ds or lock prefix                  refuses it (``is_prefix_bad()``)
mov to %ss                                     refuses it (``insn_masking_exception()``)
first opcode byte not in ``good_insns_64``     refuses it: int3, int N, into, iret, int1, hlt, cli, sti,
                                               in/out/ins/outs, and bytes invalid in 64-bit mode. Only the
                                               first byte is looked up, so every ``0f xx`` passes (syscall and
                                               ud2 too), and a VEX or EVEX instruction is judged by the byte
                                               after its prefix
jmp, call or jcc with a 66 prefix              refuses it (``branch_setup_xol_ops()``: Intel and AMD differ)
syscall                                        steps it out of line, and the program dies of a SIGSEGV at the
                                               first hit, as it returns
VEX or EVEX whose opcode byte is a branch,     runs it as that one-byte instruction: emulates a jump, call or
nop, ret or popf opcode (70-7f, 90, e8, e9,    nop instead (``vmovq %xmm0,%rax``, c4 e1 f9 7e, is read as jle
eb, 9d, c2, c3, ca, cb)                        and skipped), or leaves rip or TF wrong after the step
pushf                                          steps it with TF set and leaves TF in the pushed flags: a later
                                               popf kills the program with SIGTRAP
=============================================  ================================================================

The kernel accepts the last three, but the program breaks (all seen on Linux 6.18), so they are refused too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import ExitStack

from ...errors import KernelEngineError, UnprobeableInstruction
from ...probes.resolve import Probe
from ...x86_64.analysis import analyze
from ...x86_64.decode import decode_at

__all__ = ["kernel_refusal", "refuse_unprobeable"]

_MAX_UINSN_BYTES = 16  # what the kernel copies from the file
_LEGACY_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})
_BAD_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0xF0: "lock"}
_VEX_PREFIX_LENGTH = {0xC5: 2, 0xC4: 3, 0x62: 4}  # VEX2, VEX3, EVEX: always these in 64-bit mode
# The zero bits of good_insns_64, by what they are.
_BAD_OPCODES = {
    **dict.fromkeys((0x06, 0x07, 0x0E, 0x16, 0x17, 0x1E, 0x1F, 0x27, 0x2F, 0x37, 0x3F, 0x60, 0x61, 0x62, 0x82,
                     0x9A, 0xCE, 0xD4, 0xD5, 0xD6, 0xEA), "an opcode invalid in 64-bit mode"),
    **dict.fromkeys((0x6C, 0x6D, 0x6E, 0x6F), "ins or outs"),
    **dict.fromkeys((0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF), "in or out"),
    0xCC: "int3", 0xCD: "int N", 0xCF: "iret", 0xF1: "int1", 0xF4: "hlt", 0xFA: "cli", 0xFB: "sti",
}
_BRANCHES = {**dict.fromkeys(range(0x70, 0x80), "a conditional jump"), 0xE8: "call", 0xE9: "jmp", 0xEB: "jmp"}
# What branch_setup_xol_ops() and the fixups of arch_uprobe_analyze_insn() single out by the first opcode byte.
_SPECIAL_OPCODES = {**_BRANCHES, 0x90: "nop", 0x9D: "popf", 0xC2: "ret", 0xC3: "ret", 0xCA: "lret", 0xCB: "lret"}
_TWO_BYTE, _SYSCALL = 0x0F, 0x05  # syscall is 0f 05
_MOV_SEG, _SS = 0x8E, 2
_PUSHF = 0x9C


def kernel_refusal(code: bytes) -> str | None:
    """Why the kernel's uprobes refuse, or run wrongly, the instruction whose first byte is ``code[0]`` (up to
    16 bytes of the file); None when they handle it."""
    if decode_at(code, 0).invalid:
        return "undecodable bytes"
    code += bytes(2)  # room for the bytes after an instruction that ends the file (the kernel's copy is zeroed)
    at = 0
    while code[at] in _LEGACY_PREFIXES:
        at += 1
    prefixes = set(code[:at])
    if bad := sorted(prefixes & _BAD_PREFIXES.keys()):
        return f"{_BAD_PREFIXES[bad[0]]} prefix"
    while 0x40 <= code[at] <= 0x4F:  # REX
        at += 1
    vex = _VEX_PREFIX_LENGTH.get(code[at])
    at += vex or 0
    opcode, after = code[at], code[at + 1]  # after: the ModRM byte, or a two-byte opcode's second byte
    read_as = f"the kernel reads its opcode byte {opcode:02x}, after the VEX prefix, as"
    never = "mov to %ss" if opcode == _MOV_SEG and after >> 3 & 7 == _SS else _BAD_OPCODES.get(opcode)
    if never:
        return f"{read_as} {never}, which it never probes" if vex else f"{never}, which the kernel never probes"
    if vex and opcode in _SPECIAL_OPCODES:
        return f"{read_as} {_SPECIAL_OPCODES[opcode]} and would run it as that"
    if 0x66 in prefixes and (opcode in _BRANCHES or opcode == _TWO_BYTE and 0x80 <= after <= 0x8F):
        return "a branch with an operand-size (66) prefix, which Intel and AMD execute differently"
    if opcode == _PUSHF and not vex:
        return "pushf: the kernel steps it with the trap flag set and leaves that flag in the pushed word"
    if opcode == _TWO_BYTE and after == _SYSCALL and not vex:
        return "syscall: the kernel steps it out of line, and the program dies of a SIGSEGV as it returns"
    return None


def refuse_unprobeable(probes: Iterable[Probe]) -> None:
    """Raise :class:`KernelEngineError` for the first probe on an instruction :func:`kernel_refusal` objects to."""
    with ExitStack() as stack:
        files: dict[str, int] = {}
        for probe in probes:
            if probe.path not in files:
                files[probe.path] = stack.enter_context(open(probe.path, "rb")).fileno()
            code = os.pread(files[probe.path], _MAX_UINSN_BYTES, probe.offset)
            reason = kernel_refusal(code)
            if reason is not None:
                text = decode_at(code, probe.address).text
                raise KernelEngineError(f"the kernel cannot probe this instruction: {text} at {probe.location} in "
                                        f"{probe.path} ({reason}); {_other_engine(code, probe.address)}")


def _other_engine(code: bytes, address: int) -> str:
    try:
        analyze(code, address)
    except UnprobeableInstruction:
        return "the ptrace engine cannot probe it either"
    return "use --engine ptrace"

"""Unwinding an x86-64 user stack from a copy of it: the return addresses of the calls in progress.

The input is what perf gives with ``PERF_SAMPLE_REGS_USER`` + ``PERF_SAMPLE_STACK_USER`` and what the ptrace
engine reads at a stop: the registers at the hit and a copy of the stack from ``%rsp`` up. Each frame is
unwound by a CFI row (:mod:`uprobes.elf.cfi`); code without CFI gets the row its frame pointer implies
(:func:`frame_pointer_row`). Nothing is read from the live process: a rule that points outside the copy
ends the stack, marked incomplete.

Registers are DWARF numbers (the x86-64 psABI, figure 3.36): 0 rax, 1 rdx, 2 rcx, 3 rbx, 4 rsi, 5 rdi,
6 rbp, 7 rsp, 8-15 r8-r15, 16 the return address (rip).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

from elftools.common.exceptions import DWARFError, ELFError as _PyelftoolsELFError
from elftools.dwarf.dwarf_expr import DWARFExprParser
from elftools.dwarf.structs import DWARFStructs
from iced_x86 import Code, Decoder, DecoderOptions, Register

from ..dwarf.expression import evaluate
from ..elf.cfi import Rule, UnwindRow

__all__ = ["RBP", "RSP", "RIP", "UNWOUND_REGISTERS", "PERF_REGISTER_BITS", "DEFAULT_DEPTH", "STACK_BYTES", "StackCopy", "Ending", "unwind", "frame_pointer_row"]

RBX, RBP, RSP, RIP = 3, 6, 7, 16
# What a caller's frame can need (the callee-saved registers, the stack and frame pointers, the pc), by
# DWARF number: its ``struct user_regs_struct`` field, and its bit in perf's ``enum perf_event_x86_regs``
# (arch/x86/include/uapi/asm/perf_regs.h), the order perf writes PERF_SAMPLE_REGS_USER in.
UNWOUND_REGISTERS = {RBX: "rbx", RBP: "rbp", RSP: "rsp", 12: "r12", 13: "r13", 14: "r14", 15: "r15", RIP: "rip"}
PERF_REGISTER_BITS = {RBX: 1, RBP: 6, RSP: 7, RIP: 8, 12: 20, 13: 21, 14: 22, 15: 23}
DEFAULT_DEPTH = 127
# How much of the stack is copied at a hit, from %rsp up, unless asked otherwise: what perf record
# --call-graph dwarf copies, enough for dozens of ordinary frames and one with a PATH_MAX buffer.
STACK_BYTES = 8192

_WORD = struct.Struct("<Q")
_MASK = (1 << 64) - 1
_expressions = DWARFExprParser(DWARFStructs(little_endian=True, dwarf_format=32, address_size=8))
_RETURN_ADDRESS = Rule("OFFSET", -8)
_SAVED_RBP = Rule("OFFSET", -16)


class Ending(enum.Enum):
    """How an unwound stack ends: at its root, cut at the depth limit, or where it could not go on."""

    COMPLETE = "complete"
    TRUNCATED = "truncated"
    INCOMPLETE = "incomplete"


@dataclass(frozen=True, slots=True)
class StackCopy:
    """A thread's registers at a hit (DWARF numbers) and its stack's bytes from ``base`` (its ``%rsp``) up."""

    registers: dict[int, int]
    base: int
    data: bytes

    def word(self, address: int) -> int | None:
        """The 8 bytes at ``address`` if the copy holds them."""
        at = address - self.base
        return _WORD.unpack_from(self.data, at)[0] if 0 <= at <= len(self.data) - 8 else None

    def with_words(self, words: dict[int, int]) -> StackCopy:
        """This copy with the 8-byte ``words`` (by address) written where it holds them: return addresses a
        return probe's trampoline took, put back as the program wrote them."""
        inside = {address - self.base: word for address, word in words.items()
                  if 0 <= address - self.base <= len(self.data) - 8}
        if not inside:
            return self
        data = bytearray(self.data)
        for at, word in inside.items():
            _WORD.pack_into(data, at, word)
        return StackCopy(self.registers, self.base, bytes(data))


def unwind(stack: StackCopy, row_at: Callable[[int], UnwindRow | None],
           depth: int = DEFAULT_DEPTH) -> tuple[list[int], Ending]:
    """The pcs of ``stack``'s frames, innermost first, and how the walk ended. ``row_at(pc)`` gives the rules
    of the code at ``pc`` (None: not code, or code nobody can unwind). A caller's pc is looked up one byte
    before its return address, inside the call (a call can be a function's last instruction), but where a
    signal came: the pc a signal frame restores is the interrupted instruction's own."""
    registers = stack.registers
    pcs = [registers[RIP]]
    exact = True  # pcs[-1] is an instruction's own address, not a return address
    while True:
        row = row_at(pcs[-1] if exact else pcs[-1] - 1)
        if row is not None and row.cfa_register == RBP and registers.get(RBP) == 0:
            return pcs, Ending.COMPLETE  # the frame pointers' chain ends with a null %rbp (_start clears it)
        caller = _caller(row, registers, stack) if row is not None else None
        if caller is None or RIP not in caller:  # code we cannot unwind, or a return address outside the copy
            return pcs, Ending.INCOMPLETE
        pc = caller[RIP]
        if not pc:  # undefined (the CFI of _start and of a new thread say so) or null, as libunwind takes it
            return pcs, Ending.COMPLETE
        if caller[RSP] <= registers[RSP]:  # a stack only unwinds upwards: anything else loops
            return pcs, Ending.INCOMPLETE
        if len(pcs) == depth:
            return pcs, Ending.TRUNCATED
        pcs.append(pc)
        registers, exact = caller, row.signal_frame


def _caller(row: UnwindRow, registers: dict[int, int], stack: StackCopy) -> dict[int, int] | None:
    """The caller's registers by ``row`` (a register left out is unknown); None where the CFA needs what the
    copy or the registers lack, or where the row has no rule for the return address (code with no frame to
    leave)."""
    if RIP not in row.rules:
        return None
    if row.cfa_expression is not None:
        cfa = _evaluate(row.cfa_expression, registers, stack)
    elif row.cfa_register in registers:
        cfa = (registers[row.cfa_register] + row.cfa_offset) & _MASK
    else:
        return None
    if cfa is None:
        return None
    caller = registers.copy()  # a register without a rule keeps its value (callee-saved: the same value)
    caller[RSP] = cfa
    for register, rule in row.rules.items():
        if rule.kind == "SAME_VALUE":
            continue
        value = _apply(rule, cfa, registers, stack)
        if value is not _MISSING:
            caller[register] = value
        elif register == RIP and rule.kind == "UNDEFINED":
            caller[RIP] = None  # the end of the stack
        else:
            caller.pop(register, None)
    return caller


_MISSING = object()


def _apply(rule: Rule, cfa: int, registers: dict[int, int], stack: StackCopy):
    """A register's value in the caller by ``rule``; ``_MISSING`` where it is unknown to us (undefined, or
    outside the copy)."""
    kind = rule.kind
    if kind == "OFFSET":
        value = stack.word(cfa + rule.arg)
        return _MISSING if value is None else value
    if kind == "VAL_OFFSET":
        return (cfa + rule.arg) & _MASK
    if kind == "REGISTER":
        return registers.get(rule.arg, _MISSING)
    if kind in ("EXPRESSION", "VAL_EXPRESSION"):
        value = _evaluate(rule.arg, registers, stack, push=cfa)
        if value is None:
            return _MISSING
        if kind == "VAL_EXPRESSION":
            return value
        value = stack.word(value)
        return _MISSING if value is None else value
    return _MISSING  # UNDEFINED; ARCHITECTURAL is never x86-64's


def _evaluate(expression: bytes, registers: dict[int, int], stack: StackCopy, push: int | None = None) -> int | None:
    """A CFI DWARF expression's value (the arithmetic the PLT's and signal frames' CFI use); None if it uses
    an operation we do not evaluate, or memory outside the copy."""
    try:
        operations = _expressions.parse_expr(list(expression))
    except (KeyError, IndexError, ValueError, _PyelftoolsELFError, DWARFError):  # a damaged expression
        return None
    return evaluate(operations, registers.get, stack.word, push=push)


def frame_pointer_row(function_start: int, pc: int, code: bytes) -> UnwindRow:
    """The rules for code without CFI, at ``pc`` in a function that begins at ``function_start`` with
    ``code``: before its ``push %rbp`` the return address is at ``(%rsp)``; between that and
    ``mov %rsp,%rbp`` under the saved ``%rbp``; after it, the frame pointer's chain."""
    pushed = framed = False
    decoder = Decoder(64, code, DecoderOptions.NONE, ip=function_start)
    for instruction in decoder:
        if instruction.ip >= pc or framed:
            break
        if instruction.code == Code.PUSH_R64 and instruction.op0_register == Register.RBP:
            pushed = True
        elif pushed and instruction.code in (Code.MOV_R64_RM64, Code.MOV_RM64_R64) \
                and instruction.op0_register == Register.RBP and instruction.op1_register == Register.RSP:
            framed = True
        elif instruction.code not in (Code.ENDBR64, Code.NOPD, Code.NOPW, Code.NOPQ) and not pushed:
            framed = True  # not a prologue we know: assume the frame pointer chain
    if framed or pc - function_start > len(code):
        return UnwindRow(pc, RBP, 16, None, {RIP: _RETURN_ADDRESS, RBP: _SAVED_RBP})
    if pushed:
        return UnwindRow(pc, RSP, 16, None, {RIP: _RETURN_ADDRESS, RBP: _SAVED_RBP})
    return UnwindRow(pc, RSP, 8, None, {RIP: _RETURN_ADDRESS})

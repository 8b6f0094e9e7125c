"""Where a function leaves: each ``ret``, and each jump out of it (a tail call), found by decoding the whole
function and the parts of it moved out of line.

A return probe on these instructions (return mode "insn") sees every return without replacing a return address:
nothing on the stack changes, so the Go runtime's stack walks and copies, C++ unwinding, ``longjmp`` and deep
recursion meet only the program's own frames. At a ``ret`` the return value is in ``%rax``; at a tail call the
function's frame is gone and what it returns is the callee's, not seen there.

A ``ret`` is one byte, too short for a jump probe; but the instructions just before it often run only into it
and change neither ``%rax`` nor memory (an epilogue: ``mov 0x818(%rsp),%rbp; add $0x820,%rsp; ret``), so a
probe five bytes or more before it, where no branch lands in between, sees the return value the ``ret`` would
(:attr:`FunctionExit.seen_from`).

A function cannot be read whole where it holds bytes that do not decode, where its bounds are unknown, where it
leaves by a conditional jump to another function (a probe on the jump would fire whether or not it is taken),
and where an indirect jump may be a tail call or a jump table's dispatch and the two cannot be told apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from iced_x86 import (FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
                      RegisterInfo)

from .analysis import format_instruction
from .function import DIRECT_BRANCHES, CodeObject, FunctionCode, function_code
from .jumps import JUMP_LENGTH
from .registers import GENERAL_REGISTERS

__all__ = ["FunctionExit", "function_exits"]

_INFO = InstructionInfoFactory()
_FIELDS = {getattr(Register, register.field.upper()): register.field for register in GENERAL_REGISTERS}
_WRITES = frozenset({OpAccess.WRITE, OpAccess.READ_WRITE, OpAccess.COND_WRITE, OpAccess.READ_COND_WRITE})


@dataclass(frozen=True)
class FunctionExit:
    """An instruction that leaves the function: a ``ret``, or a tail call (to ``target``, None when through a
    pointer). ``seen_from``: where a probe sees this exit as well as on it, %rax and memory as they will be,
    at least five bytes before a ``ret`` where the code allows (a jump fits), else the exit itself; ``written``:
    the registers (``user_regs`` fields) the instructions from there to the exit change."""

    address: int
    instruction: str
    tail_call: bool = False
    target: int | None = None
    seen_from: int | None = None
    written: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.seen_from is None:
            object.__setattr__(self, "seen_from", self.address)


def function_exits(obj: CodeObject, entry: int) -> tuple[FunctionExit, ...] | str:
    """Every exit of the function whose first instruction is at link-time ``entry``, in address order, or why
    they cannot all be known."""
    bounds = obj.function_bounds(entry)
    if bounds is None or bounds[0] != entry:
        return "its bounds are unknown (no symbol size or unwind entry)"
    code = function_code(obj, *bounds)
    if isinstance(code, str):
        return code
    for low, _ in code.ranges[1:]:
        if not obj.owns_part(entry, low):
            return (f"it goes on in code at {low:#x} that is not a part of its own (shared with another function, "
                    f"or without a symbol to say whose it is)")
    exits = []
    dispatches = _dispatches(code, obj)
    if isinstance(dispatches, str):
        return dispatches
    arrivals = None
    for i, ins in enumerate(code.instructions):
        flow = ins.flow_control
        if flow == FlowControl.RETURN:
            arrivals = _arrivals(code, obj) if arrivals is None else arrivals
            start, written = _seen_from(code, i, arrivals)
            exits.append(FunctionExit(ins.ip, format_instruction(ins), seen_from=start, written=written))
        elif flow in (FlowControl.UNCONDITIONAL_BRANCH, FlowControl.CONDITIONAL_BRANCH) \
                and not code.holds(ins.near_branch_target):
            if flow == FlowControl.CONDITIONAL_BRANCH:
                return (f"'{format_instruction(ins)}' at {ins.ip:#x} is a conditional tail call (a probe on it would "
                        f"fire whether or not it is taken)")
            exits.append(FunctionExit(ins.ip, format_instruction(ins), True, ins.near_branch_target))
        elif flow == FlowControl.INDIRECT_BRANCH and ins.ip not in dispatches:
            exits.append(FunctionExit(ins.ip, format_instruction(ins), True))
    return tuple(sorted(exits, key=lambda e: e.address))


def _seen_from(code: FunctionCode, at: int, arrivals: frozenset[int]) -> tuple[int, frozenset[str]]:
    """The latest start, at least :data:`JUMP_LENGTH` bytes before the ``ret`` ``code.instructions[at]``, of a
    straight run into it that no branch enters and that writes neither %rax nor memory, and the registers the
    run writes; the ret's own address where there is none."""
    ret = code.instructions[at]
    start, written = ret.ip, set()
    for ins in reversed(code.instructions[:at]):
        registers = _written_registers(ins)
        if ins.ip + ins.len != start or start in arrivals or ins.flow_control != FlowControl.NEXT \
                or registers is None or "rax" in registers:
            break
        start = ins.ip
        written |= registers
        if ret.ip - start >= JUMP_LENGTH:
            return start, frozenset(written)
    return ret.ip, frozenset()


def _written_registers(ins: Instruction) -> set[str] | None:
    """The general registers ``ins`` writes, by ``user_regs`` field (and ``eflags``); None if it writes memory."""
    info = _INFO.info(ins)
    if any(used.access in _WRITES for used in info.used_memory()):
        return None
    written = {_FIELDS.get(RegisterInfo(used.register).full_register, "other")
               for used in info.used_registers() if used.access in _WRITES}
    return written | ({"eflags"} if ins.rflags_modified else set())


def _arrivals(code: FunctionCode, obj: CodeObject) -> frozenset[int]:
    """Every address a branch of the function, an entry of its jump tables or an address of its code it takes
    (a computed goto's label) may go to."""
    direct = {ins.near_branch_target for ins in code.instructions if ins.flow_control in DIRECT_BRANCHES}
    return frozenset(direct | {target for _, target in code.table_entries(obj)} | _labels(code))


def _labels(code: FunctionCode) -> set[int]:
    """Addresses of the function's own code, but its entry, that its instructions take (``lea label(%rip)``,
    ``mov $label``): where a computed ``goto`` may go."""
    entry, found = code.ranges[0][0], set()
    for ins in code.instructions:
        if ins.mnemonic == Mnemonic.LEA and ins.is_ip_rel_memory_operand:
            found.add(ins.ip_rel_memory_address)
        for i in range(ins.op_count):
            if ins.op_kind(i) in (OpKind.IMMEDIATE32, OpKind.IMMEDIATE32TO64, OpKind.IMMEDIATE64):
                found.add(ins.immediate(i) & ((1 << 64) - 1))
    return {address for address in found if address != entry and code.holds(address)}


def _dispatches(code: FunctionCode, obj: CodeObject) -> frozenset[int] | str:
    """The indirect jumps of ``code`` that go through its jump tables (not out of the function), by address; or
    why they cannot be told from tail calls through a pointer.

    A jump through a pointer in memory named by itself (``jmp *0x2fe2(%rip)``, the GOT) is a tail call; the
    others (``jmp *%rax``, ``jmp *table(,%rax,8)``) dispatch through the function's tables where it has as many
    tables as such jumps, and are tail calls where it has none."""
    through_register = [ins for ins in code.indirect_jumps if not _through_own_pointer(ins)]
    if not through_register:
        return frozenset()
    entries: dict[int, set[int]] = {}
    for table, target in code.table_entries(obj):
        if target != code.ranges[0][0]:  # a pointer to the function itself (a vtable, a table of handlers)
            entries.setdefault(table, set()).add(target)
    tables = [table for table, targets in entries.items() if len(targets) > 1]
    labels = _labels(code)
    if not tables and not labels:
        return frozenset()  # tail calls through a pointer
    if labels or len(through_register) > len(tables):
        jumps = ", ".join(f"'{format_instruction(ins)}' at {ins.ip:#x}" for ins in through_register[:3])
        more = f" and {len(through_register) - 3} more" if len(through_register) > 3 else ""
        why = "it takes addresses of its own code (a computed goto)" if labels else \
            f"they outnumber its {len(tables)} jump table(s)"
        return f"which of its indirect jumps ({jumps}{more}) leave the function cannot be told: {why}"
    return frozenset(ins.ip for ins in through_register)


def _through_own_pointer(ins: Instruction) -> bool:
    """``jmp *ADDRESS``: through a pointer at a fixed place (rip-relative or absolute, no register)."""
    if ins.op0_kind != OpKind.MEMORY or ins.memory_index != Register.NONE:
        return False
    return ins.is_ip_rel_memory_operand or ins.memory_base == Register.NONE

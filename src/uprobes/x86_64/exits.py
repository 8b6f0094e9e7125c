"""Where a function leaves: each ``ret``, and each jump out of it (a tail call), found by decoding the whole
function and the parts of it moved out of line.

A return probe on these instructions (return mode "insn") sees every return without replacing a return address:
nothing on the stack changes, so the Go runtime's stack walks and copies, C++ unwinding, ``longjmp`` and deep
recursion meet only the program's own frames. At a ``ret`` the return value is in ``%rax``; at a tail call the
function's frame is gone and what it returns is the callee's, not seen there.

A function cannot be read whole where it holds bytes that do not decode, where its bounds are unknown, where it
leaves by a conditional jump to another function (a probe on the jump would fire whether or not it is taken),
and where an indirect jump may be a tail call or a jump table's dispatch and the two cannot be told apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from iced_x86 import FlowControl, Instruction, OpKind, Register

from .analysis import format_instruction
from .function import CodeObject, FunctionCode, function_code

__all__ = ["FunctionExit", "function_exits"]


@dataclass(frozen=True)
class FunctionExit:
    """An instruction that leaves the function: a ``ret``, or a tail call (to ``target``, None when through a
    pointer)."""

    address: int
    instruction: str
    tail_call: bool = False
    target: int | None = None


def function_exits(obj: CodeObject, entry: int) -> tuple[FunctionExit, ...] | str:
    """Every exit of the function whose first instruction is at link-time ``entry``, in address order, or why
    they cannot all be known."""
    bounds = obj.function_bounds(entry)
    if bounds is None or bounds[0] != entry:
        return "its bounds are unknown (no symbol size or unwind entry)"
    code = function_code(obj, *bounds)
    if isinstance(code, str):
        return code
    exits = []
    dispatches = _dispatches(code, obj)
    if isinstance(dispatches, str):
        return dispatches
    for ins in code.instructions:
        flow = ins.flow_control
        if flow == FlowControl.RETURN:
            exits.append(FunctionExit(ins.ip, format_instruction(ins)))
        elif flow in (FlowControl.UNCONDITIONAL_BRANCH, FlowControl.CONDITIONAL_BRANCH) \
                and not code.holds(ins.near_branch_target):
            if flow == FlowControl.CONDITIONAL_BRANCH:
                return (f"'{format_instruction(ins)}' at {ins.ip:#x} is a conditional tail call (a probe on it would "
                        f"fire whether or not it is taken)")
            exits.append(FunctionExit(ins.ip, format_instruction(ins), True, ins.near_branch_target))
        elif flow == FlowControl.INDIRECT_BRANCH and ins.ip not in dispatches:
            exits.append(FunctionExit(ins.ip, format_instruction(ins), True))
    return tuple(sorted(exits, key=lambda e: e.address))


def _dispatches(code: FunctionCode, obj: CodeObject) -> frozenset[int] | str:
    """The indirect jumps of ``code`` that go through its jump tables (not out of the function), by address; or
    why they cannot be told from tail calls through a pointer.

    A jump through a pointer in memory named by itself (``jmp *0x2fe2(%rip)``, the GOT) is a tail call; the
    others (``jmp *%rax``, ``jmp *table(,%rax,8)``) dispatch through the function's tables where it has as many
    tables as such jumps, and are tail calls where it has none."""
    through_register = [ins for ins in code.indirect_jumps if not _through_own_pointer(ins)]
    if not through_register:
        return frozenset()
    tables = {table for table, _ in code.table_entries(obj)}
    if not tables:
        return frozenset()
    if len(through_register) > len(tables):
        jumps = ", ".join(f"'{format_instruction(ins)}' at {ins.ip:#x}" for ins in through_register)
        return (f"its indirect jumps ({jumps}) outnumber its {len(tables)} jump table(s): which leave the function "
                f"cannot be told")
    return frozenset(ins.ip for ins in through_register)


def _through_own_pointer(ins: Instruction) -> bool:
    """``jmp *ADDRESS``: through a pointer at a fixed place (rip-relative or absolute, no register)."""
    if ins.op0_kind != OpKind.MEMORY or ins.memory_index != Register.NONE:
        return False
    return ins.is_ip_rel_memory_operand or ins.memory_base == Register.NONE

"""Whether the bytes at a probe site can become a 5-byte ``jmp`` to a trampoline, and which instructions it displaces.

A jump probe replaces whole instructions, not one byte: the instructions it covers (at least five bytes of
them) run from the trampoline instead, re-encoded there by iced-x86's ``BlockEncoder``. That is safe only if
no code path can arrive strictly inside the replaced bytes, and only if each displaced instruction means the
same thing when it runs elsewhere. :func:`jump_site` checks, in this order:

================================================  ==============================================================
Check                                             Why
================================================  ==============================================================
the function's bounds are known (a symbol with a  the branch scan needs the whole function (Frida PR #1139: a
size, or its unwind entry)                        scan that skipped part of it let a branch land in the patch)
the function decodes and the site is on one of    otherwise we cannot tell which bytes are whole instructions
its instruction boundaries
each displaced instruction could also be probed   the same refusals as the int3 path (system calls, traps,
with an int3                                      privileged and far transfers...)
the path does not end (``jmp``, ``ret``) before   the bytes after it may be reached from anywhere
five bytes are covered; a ``call`` only as the
last displaced instruction, and only ``call
rel32`` (run as: push the original return
address, jmp)
the displaced bytes stay inside the function      the next function may be entered by anyone
with more than one instruction displaced:
- no direct branch, in the function or in the     a branch would land inside the jump (kprobes' can_optimize,
  parts of it moved out of line that it branches  uftrace's bad-symbol list)
  to (``foo.cold``), lands strictly inside the
  displaced bytes
- with an indirect ``jmp`` there, no entry of a   a jump table may land anywhere; kprobes refuses every function
  table the code refers to points inside them     with an indirect jump, which would leave 7% of libc's function
                                                  entries as traps (``bench/jumpable.py``)
- the site is the function's entry, when the      C++ landing pads are reached by the unwinder, not by branches
  object has C++ exception tables
================================================  ==============================================================

Jump tables are found as :mod:`uprobes.x86_64.function` says.

A thread may stand at the start of any displaced instruction but the first when the jump is written, or
when it is taken out; the trampoline keeps a place for each (:mod:`uprobes.x86_64.trampolines`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from iced_x86 import Code, Decoder, DecoderOptions, FlowControl, Instruction, RflagsBits

from .analysis import format_instruction, refusal
from .codegen import encode
from .function import DIRECT_BRANCHES, CodeObject, decode, function_code

__all__ = ["JUMP_LENGTH", "CodeObject", "JumpSite", "jump_site", "jump_bytes"]

JUMP_LENGTH = 5
_ENDS_PATH = frozenset({FlowControl.UNCONDITIONAL_BRANCH, FlowControl.INDIRECT_BRANCH, FlowControl.RETURN})
_STATUS_FLAGS = RflagsBits.OF | RflagsBits.SF | RflagsBits.ZF | RflagsBits.AF | RflagsBits.CF | RflagsBits.PF
_FLAGS_DEAD_AFTER = frozenset({FlowControl.CALL, FlowControl.INDIRECT_CALL, FlowControl.RETURN})  # the ABI's rule
_FLAGS_LOOKAHEAD = 16


@dataclass(frozen=True)
class JumpSite:
    """A site the jump can replace: ``displaced`` are decoded at their link-time addresses."""

    address: int
    code: bytes  # the displaced instructions' bytes, as in the file
    displaced: tuple[Instruction, ...]
    flags_live: bool  # the program may read the status flags as they are at the site

    @property
    def length(self) -> int:
        return len(self.code)

    def inside(self, address: int) -> bool:
        """Whether ``address`` lies strictly inside the replaced bytes (a thread there must be moved)."""
        return self.address < address < self.address + self.length

    def rebased(self, bias: int) -> JumpSite:
        """The same site at run-time addresses (``bias`` added): each instruction re-decoded there."""
        decoded = tuple(Decoder(64, self.code, DecoderOptions.NONE, ip=self.address + bias))
        return JumpSite(self.address + bias, self.code, decoded, self.flags_live)


def jump_site(address: int, obj: CodeObject) -> JumpSite | str:
    """The site at link-time ``address`` of ``obj`` as a :class:`JumpSite`, or why it cannot be one."""
    function = obj.function_bounds(address)
    if function is None:
        return "the function's bounds are unknown (no symbol size or unwind entry)"
    start, end = function
    instructions = decode(obj, start, end)
    if instructions is None:
        return "the function holds bytes that do not decode"
    at = _starts(obj, start, end).get(address)
    if at is None:
        return "the site is not on an instruction boundary of the function"
    displaced: list[Instruction] = []
    for ins in instructions[at:]:
        if ins.ip + ins.len > end:
            return "the jump would run past the end of the function"
        reason = refusal(ins, obj.read(ins.ip, ins.len))
        if reason is not None:
            return f"it would displace '{format_instruction(ins)}': {reason}"
        displaced.append(ins)
        covered = ins.ip + ins.len - address
        if ins.flow_control == FlowControl.CALL and covered < JUMP_LENGTH:
            return f"a call ('{format_instruction(ins)}') would not be the last instruction displaced"
        if ins.flow_control == FlowControl.INDIRECT_CALL:
            return f"it would displace an indirect call ('{format_instruction(ins)}')"
        if covered >= JUMP_LENGTH:
            break
        if ins.flow_control in _ENDS_PATH:
            return f"the path ends at '{format_instruction(ins)}' within {JUMP_LENGTH} bytes"
    else:
        return "the function ends within 5 bytes"
    site = JumpSite(address, obj.read(address, covered), tuple(displaced),
                    flags_live=address != start and _flags_live(instructions[at:]))
    if len(displaced) > 1:
        reason = _lands_inside(site, instructions, obj)
        if reason is not None:
            return reason
    return site


def jump_bytes(site: int, target: int) -> bytes:
    """``jmp target`` encoded at ``site`` (rel32: five bytes)."""
    return encode([Instruction.create_branch(Code.JMP_REL32_64, target)], site)[0]


def _flags_live(instructions: list[Instruction]) -> bool:
    """Whether the status flags at the first of ``instructions`` may be read before they are all written: looking
    ahead along the straight path, up to a call or a return (across which the ABI keeps no flags)."""
    written = 0
    for ins in instructions[:_FLAGS_LOOKAHEAD]:
        if ins.rflags_read & _STATUS_FLAGS & ~written:
            return True
        written |= ins.rflags_modified & _STATUS_FLAGS
        if written == _STATUS_FLAGS or ins.flow_control in _FLAGS_DEAD_AFTER:
            return False
        if ins.flow_control != FlowControl.NEXT:
            return True
    return True


def _lands_inside(site: JumpSite, instructions: list[Instruction], obj: CodeObject) -> str | None:
    """Why some path could arrive strictly inside the displaced bytes, or None."""
    start = instructions[0].ip
    if obj.exception_tables and site.address != start:
        return "the object has C++ exception tables, and a landing pad may lie inside the displaced bytes"
    end = instructions[-1].ip + instructions[-1].len
    arrivals = _arrivals(obj, start, end)
    if isinstance(arrivals, str):
        return arrivals
    inside = next((why for target, why in arrivals.items() if site.inside(target)), None)
    if inside is not None:
        return inside
    for low, high in obj.neighbours(start, _NEIGHBOURS):  # glibc's string functions jump into each other's middle
        for target, text, at in _branches(obj, low, high):
            if site.inside(target):
                return f"'{text}' at {at:#x}, in a neighbouring function, branches inside the displaced bytes"
    return None


@functools.lru_cache(maxsize=16384)  # each function of an object read once, however many sites ask
def _branches(obj: CodeObject, low: int, high: int) -> tuple[tuple[int, str, int], ...]:
    """(target, instruction, address) of the direct branches and calls of the code ``[low, high)``."""
    return tuple((ins.near_branch_target, format_instruction(ins), ins.ip) for ins in decode(obj, low, high) or ()
                 if ins.flow_control in DIRECT_BRANCHES | {FlowControl.CALL})


_NEIGHBOURS = 8


@functools.lru_cache(maxsize=64)  # every site of one function asks the same
def _arrivals(obj: CodeObject, start: int, end: int) -> dict[int, str] | str:
    """Every address a branch of the function ``[start, end)``, or of its parts moved out of line, or of a jump
    table they use may arrive at, each with the reason to give; or why that cannot be known."""
    code = function_code(obj, start, end)
    if isinstance(code, str):
        return code
    arrivals = {}
    if code.indirect_jumps:
        for table, target in code.table_entries(obj):
            arrivals.setdefault(target, f"the jump table at {table:#x} holds {target:#x}, inside the displaced bytes")
    for ins in code.instructions:
        if ins.flow_control in DIRECT_BRANCHES | {FlowControl.CALL}:
            arrivals[ins.near_branch_target] = \
                f"'{format_instruction(ins)}' at {ins.ip:#x} branches inside the displaced bytes"
    return arrivals


@functools.lru_cache(maxsize=256)
def _starts(obj: CodeObject, start: int, end: int) -> dict[int, int]:
    """Where each instruction of the function starts -> its index."""
    return {ins.ip: i for i, ins in enumerate(decode(obj, start, end))}

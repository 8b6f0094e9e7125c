"""Control flow inside a piece of x86-64 code: where each instruction can be reached from.

    >>> flow = predecessors(bytes.fromhex("85ff7402ffc7c3"), 4096)  # test %edi,%edi; je +2; inc %edi; ret
    >>> {address: (p.fall_through, p.branches) for address, p in flow.items()}
    {4096: (None, []), 4098: (4096, []), 4100: (4098, []), 4102: (4100, [4098])}

Direct branches and fall-through only: the targets of indirect jumps (switch tables) are not known, and a call
is assumed to return.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from iced_x86 import Decoder, DecoderOptions, FlowControl

__all__ = ["Predecessors", "predecessors"]

_FALLS_THROUGH = {FlowControl.NEXT, FlowControl.CONDITIONAL_BRANCH, FlowControl.CALL, FlowControl.INDIRECT_CALL,
                  FlowControl.INTERRUPT, FlowControl.XBEGIN_XABORT_XEND}
_BRANCHES = {FlowControl.UNCONDITIONAL_BRANCH, FlowControl.CONDITIONAL_BRANCH}


@dataclass
class Predecessors:
    """The instructions that can run just before one: the one that falls through into it, and the direct
    branches to it (an instruction with branches to it starts a basic block)."""

    fall_through: int | None
    branches: list[int] = field(default_factory=list)

    def __iter__(self):
        if self.fall_through is not None:
            yield self.fall_through
        yield from self.branches


def predecessors(code: bytes, start: int) -> dict[int, Predecessors]:
    """Every instruction of ``code`` (located at ``start``), by address, with its predecessors inside the code."""
    found: dict[int, Predecessors] = {}
    branches: list[tuple[int, int]] = []
    previous = None
    for instr in Decoder(64, code, DecoderOptions.NONE, ip=start):
        found[instr.ip] = Predecessors(previous)
        flow = instr.flow_control
        previous = instr.ip if flow in _FALLS_THROUGH and not instr.is_invalid else None
        if flow in _BRANCHES:
            branches.append((instr.ip, instr.near_branch_target))
    for source, target in branches:
        if target in found and source not in found[target].branches:
            found[target].branches.append(source)
    return found

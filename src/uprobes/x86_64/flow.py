"""Control flow inside a piece of x86-64 code: where each instruction can be reached from.

    >>> predecessors(bytes.fromhex("85ff7402ffc7c3"), 4096)  # test %edi,%edi; je +2; inc %edi; ret
    {4096: [], 4098: [4096], 4100: [4098], 4102: [4100, 4098]}

Direct branches and fall-through only: the targets of indirect jumps (switch tables) are not known, and a call
is assumed to return.
"""

from __future__ import annotations

from iced_x86 import Decoder, DecoderOptions, FlowControl

__all__ = ["predecessors"]

_FALLS_THROUGH = {FlowControl.NEXT, FlowControl.CONDITIONAL_BRANCH, FlowControl.CALL, FlowControl.INDIRECT_CALL,
                  FlowControl.INTERRUPT, FlowControl.XBEGIN_XABORT_XEND}
_BRANCHES = {FlowControl.UNCONDITIONAL_BRANCH, FlowControl.CONDITIONAL_BRANCH}


def predecessors(code: bytes, start: int) -> dict[int, list[int]]:
    """Every instruction of ``code`` (located at ``start``), by address, with the instructions inside the code
    that can run just before it: the one falling through into it and the direct branches to it."""
    found: dict[int, list[int]] = {}
    branches: list[tuple[int, int]] = []
    previous = None
    for instr in Decoder(64, code, DecoderOptions.NONE, ip=start):
        found[instr.ip] = [previous] if previous is not None else []
        flow = instr.flow_control
        previous = instr.ip if flow in _FALLS_THROUGH and not instr.is_invalid else None
        if flow in _BRANCHES:
            branches.append((instr.ip, instr.near_branch_target))
    for source, target in branches:
        if target in found and source not in found[target]:
            found[target].append(source)
    return found

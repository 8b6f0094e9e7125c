"""User stacks: where a hit came from, unwound from a copy of the stack and named by the objects mapped."""

from dataclasses import dataclass

from ..x86_64.unwind import DEFAULT_DEPTH, STACK_BYTES
from .space import INCOMPLETE, TRUNCATED, ProcessStacks, StackReader

__all__ = ["StackLimits", "ProcessStacks", "StackReader", "INCOMPLETE", "TRUNCATED"]


@dataclass(frozen=True)
class StackLimits:
    """What each hit's stack holds: at most ``depth`` frames, unwound from ``size`` bytes of its stack copied
    from the stack pointer up (a multiple of 8)."""

    depth: int = DEFAULT_DEPTH
    size: int = STACK_BYTES

"""User stacks: where a hit came from, unwound from a copy of the stack and named by the objects mapped."""

from .space import INCOMPLETE, TRUNCATED, ProcessStacks, StackReader

__all__ = ["ProcessStacks", "StackReader", "INCOMPLETE", "TRUNCATED"]

"""Pending returns: a function's return address replaced by the trampoline, until the function returns.

At a return probe's function entry the return-address slot (:data:`~uprobes.x86_64.abi.RETURN_ADDRESS`) is
sent to the trampoline, an ``int3`` in the out-of-line area (section 6 of the kernel note); the thread keeps
what it replaced, innermost last. Entries found below the stack pointer are set aside, not forgotten: after a
``longjmp`` their frames are gone, but a thread that switched stacks (a ``sigaltstack`` handler, a
``swapcontext`` coroutine) comes back to them, and its return is matched by the exact slot it pops.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...x86_64.abi import RETURN_ADDRESS
from .memory import ProcessMemory
from .syscalls import Regs
from .tracee import Thread
from .xol import XolArea

__all__ = ["Return", "MAX_RETURN_DEPTH", "hijack", "returned", "caught", "put_back"]

MAX_RETURN_DEPTH = 64  # the kernel's MAX_URETPROBE_DEPTH


@dataclass(slots=True)
class Return:
    """A pending return: the return address at ``stack`` was ``original``. ``chained``: a tail call found
    the trampoline there already and shares the caller's return (the kernel's RP_CHECK_CHAIN_CALL)."""

    stack: int
    original: int
    breakpoint: object
    probes: list[int]
    chained: bool = False


def hijack(thread: Thread, breakpoint: object, regs: Regs, probes: list[int]) -> bool:
    """At a function's first instruction, send its return to the trampoline; False if it cannot be (too
    deep, an unreadable stack)."""
    memory, trampoline = thread.process.memory, thread.process.area.trampoline
    stack = RETURN_ADDRESS.address(regs)
    try:
        original = int.from_bytes(memory.read(stack, RETURN_ADDRESS.size), "little")
    except OSError:
        return False
    chained = original == trampoline  # a tail call: the caller's return is already ours, in this slot
    while thread.returns and (thread.returns[-1].stack < stack
                              or thread.returns[-1].stack == stack and not chained):
        thread.set_aside.append(thread.returns.pop())
    if len(thread.returns) >= MAX_RETURN_DEPTH:
        return False
    try:
        if chained:
            if not thread.returns:
                return True
            original = thread.returns[-1].original
        else:
            memory.write(stack, trampoline.to_bytes(RETURN_ADDRESS.size, "little"), thread.tid)
    except OSError:
        return False
    thread.returns.append(Return(stack, original, breakpoint, probes, chained))
    return True


def returned(thread: Thread, regs: Regs) -> list[Return]:
    """A hijacked function returned to the trampoline (its ``ret`` popped the slot at ``rsp - 8``): the
    returns that end here, innermost first ([] when none: the program jumped to the trampoline itself)."""
    frame = regs.rsp - 8
    while thread.returns and thread.returns[-1].stack < frame:
        thread.set_aside.append(thread.returns.pop())  # left by longjmp, or on another stack
    if not thread.returns or thread.returns[-1].stack != frame:
        aside = [r for r in thread.set_aside if r.stack == frame]
        if aside:  # back from another stack
            for instance in aside:
                thread.set_aside.remove(instance)
            thread.returns += aside
    ended = []
    while thread.returns:
        ended.append(thread.returns.pop())
        if not ended[-1].chained:
            break
    return ended


def caught(thread: Thread, regs: Regs) -> int:
    """An exception is caught in the frame calling ``__cxa_begin_catch``: the frames at or below its return
    address were unwound; the others return through the trampoline again. How many were unwound."""
    alive = [instance for instance in thread.returns if instance.stack > regs.rsp]
    unwound = len(thread.returns) - len(alive)
    thread.returns[:] = alive
    memory, trampoline = thread.process.memory, thread.process.area.trampoline
    for instance in alive:
        try:
            if int.from_bytes(memory.read(instance.stack, 8), "little") == instance.original:
                memory.write(instance.stack, trampoline.to_bytes(8, "little"), thread.tid)
        except OSError:
            pass  # left as the program wrote it; the return goes unreported
    return unwound


def put_back(memory: ProcessMemory, returns: list[Return], area: XolArea | None, via: int) -> None:
    """Every return address we replaced with the trampoline, as it was (at detach, in a fork child, when a
    C++ exception starts unwinding)."""
    if area is None:
        return
    for instance in returns:
        try:
            if int.from_bytes(memory.read(instance.stack, 8), "little") == area.trampoline:
                memory.write(instance.stack, instance.original.to_bytes(8, "little"), via)
        except OSError:
            pass  # that stack is gone

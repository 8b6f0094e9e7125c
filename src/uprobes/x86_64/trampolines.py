"""Trampolines of jump probes: what a replaced site jumps to, generated at insertion with iced-x86's encoder.

A counting trampoline, for a site in the middle of a function::

    lea   -128(%rsp),%rsp      # step over the red zone the interrupted code may be using
    pushfq                     # lock inc changes the flags
    lock incq counter(%rip)    # the site's counter, on its own cache line
    popfq
    lea   128(%rsp),%rsp
    <the displaced instructions, re-encoded here>
    jmp   site + length        # back to the program

Where the flags are dead (a function's entry, or code that writes them all before it reads any, or calls or
returns first: :attr:`~uprobes.x86_64.jumps.JumpSite.flags_live`), only the ``lock inc`` is there, and the
trampoline never touches the stack. A displaced ``call rel32`` (only ever the last one) runs as a push of the original return address
and a ``jmp``: a real call would leave a return address pointing into the trampoline.

Every instruction of a trampoline has a :class:`Resume`: how a thread stopped just before it gets back onto
the program's own path (the stack it is owed, the flags saved on it, the original address to go on at, and
whether the hit was counted already). Stopping every thread at detach, and a signal for a thread in the
trampoline, both use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from iced_x86 import Code, FlowControl, Instruction, MemoryOperand, Register

from .codegen import encode
from .jumps import JumpSite

__all__ = ["Resume", "Trampoline", "counting_trampoline", "RED_ZONE"]

RED_ZONE = 128
_MASK32 = (1 << 32) - 1
_FALLS_THROUGH = frozenset({FlowControl.NEXT, FlowControl.CONDITIONAL_BRANCH})


@dataclass(frozen=True)
class Resume:
    """A thread stopped at this point of a trampoline is, in the program's terms, at ``rip``, once ``stack`` bytes
    are added back to rsp and the flags saved at ``flags_at`` bytes above rsp (if any) are put back."""

    rip: int
    stack: int = 0
    flags_at: int | None = None
    counted: bool = False  # the hit was counted before this point


@dataclass(frozen=True)
class Trampoline:
    """``code`` to place at ``address``, and where each of its instructions stands in the program's terms."""

    address: int
    code: bytes
    resumes: dict[int, Resume]  # by the address of each instruction

    def resume(self, rip: int) -> Resume | None:
        return self.resumes.get(rip)

    def displaced(self, address: int) -> int | None:
        """Where the displaced instruction that was at ``address`` starts in the trampoline (past the count)."""
        start = Resume(address, counted=True)
        return min((at for at, resume in self.resumes.items() if resume == start), default=None)


def counting_trampoline(site: JumpSite, address: int, counter: int) -> Trampoline:
    """Count a hit at ``counter`` (8 bytes), run ``site``'s displaced instructions and go back."""
    at_site = site.address
    pieces: list[tuple[Instruction, Resume]] = []
    increment = Instruction.create_mem(Code.INC_RM64, MemoryOperand(Register.RIP, displ=counter))
    increment.has_lock_prefix = True
    if not site.flags_live:
        pieces.append((increment, Resume(at_site)))
    else:
        pieces += [(_lea_rsp(-RED_ZONE), Resume(at_site)),
                   (Instruction.create(Code.PUSHFQ), Resume(at_site, RED_ZONE)),
                   (increment, Resume(at_site, RED_ZONE + 8, flags_at=0)),
                   (Instruction.create(Code.POPFQ), Resume(at_site, RED_ZONE + 8, flags_at=0, counted=True)),
                   (_lea_rsp(RED_ZONE), Resume(at_site, RED_ZONE, counted=True))]
    pieces += _relocated(site)
    return _assemble(pieces, address)


def _relocated(site: JumpSite) -> list[tuple[Instruction, Resume]]:
    pieces = []
    for ins in site.displaced:
        if ins.flow_control == FlowControl.CALL:
            pieces += _call_as_push_and_jump(ins)
        else:
            pieces.append((ins, Resume(ins.ip, counted=True)))
    if site.displaced[-1].flow_control in _FALLS_THROUGH:
        back = site.address + site.length
        pieces.append((Instruction.create_branch(Code.JMP_REL32_64, back), Resume(back, counted=True)))
    return pieces


def _call_as_push_and_jump(call: Instruction) -> list[tuple[Instruction, Resume]]:
    """``call target`` as: make room, write the original return address in two halves (no register, no flags
    touched), jump. Until the jump, the thread resumes at the call itself; at the jump, at the target."""
    returns_to = call.next_ip
    return [(_lea_rsp(-8), Resume(call.ip, counted=True)),
            (Instruction.create_mem_u32(Code.MOV_RM32_IMM32, MemoryOperand(Register.RSP), returns_to & _MASK32),
             Resume(call.ip, 8, counted=True)),
            (Instruction.create_mem_u32(Code.MOV_RM32_IMM32, MemoryOperand(Register.RSP, displ=4), returns_to >> 32),
             Resume(call.ip, 8, counted=True)),
            (Instruction.create_branch(Code.JMP_REL32_64, call.near_branch_target),
             Resume(call.near_branch_target, counted=True))]


def _lea_rsp(delta: int) -> Instruction:
    return Instruction.create_reg_mem(Code.LEA_R64_M, Register.RSP, MemoryOperand(Register.RSP, displ=delta))


def _assemble(pieces: list[tuple[Instruction, Resume]], address: int) -> Trampoline:
    encoded = encode([ins for ins, _ in pieces], address)
    resumes, at = {}, address
    for code, (_, resume) in zip(encoded, pieces):
        resumes[at] = resume
        at += len(code)
    return Trampoline(address, b"".join(encoded), resumes)

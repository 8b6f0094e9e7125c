"""What the ptrace engine does with the instruction under a probe: refuse it, emulate it, or step a copy.

:func:`analyze` runs once per probe, when it is inserted. It decodes the instruction with iced-x86 and returns
a :class:`Plan`. At each hit the engine either calls :meth:`Plan.emulate` (one stop), or places
:attr:`Plan.slot_code` in a slot of its out-of-line (XOL) area and calls :meth:`Plan.prepare_step`,
single-steps, then :meth:`Plan.finish_step` (or :meth:`Plan.abort_step` if the step did not complete).

Decisions
---------

============================================  ========  ================================================================
Instruction class                             Decision  Why
============================================  ========  ================================================================
undecodable, or the code ends inside the      refuse    nothing defined to run
instruction
int3, int N, int1, into                       refuse    the trap would be taken in the slot; an int3 is someone else's
                                                        breakpoint
ud0, ud1, ud2                                 refuse    they exist to fault
syscall, sysenter                             refuse    fork/clone/vfork from the slot starts the child in the slot;
                                                        sigreturn moves rip (ptrace note hazards 16 and 20)
sysexit, sysret, iret, uiret                  refuse    returns from the kernel or an interrupt
hlt, cli, sti, in, out, ins, outs, other      refuse    fault in user space
CPL0 (iced ``is_privileged``)
mov to %ss                                    refuse    suppresses the single-step trap of the next instruction (pop %ss
                                                        is invalid in 64-bit mode: undecodable)
lcall, ljmp, lret                             refuse    far transfers reload %cs
0f 00 and 0f 01 groups, except rdtscp rdpru   refuse    system instructions; the exceptions are user-level and have no
xgetbv xtest rdpkru wrpkru serialize clzero             effect tied to where they run (an int3 aborts any enclosing TSX
                                                        transaction, so xtest truthfully reports none; PKRU does not
                                                        govern instruction fetch, so wrpkru cannot lock out the slot)
xbegin, xend, xabort, xsusldtrk, xresldtrk    refuse    xbegin's abort target is relative to where it runs; the int3 has
                                                        already aborted any transaction, so xend would fault
branch whose 66 prefix Intel and AMD read     refuse    the kernel's rule, narrowed to prefixes that matter: REX.W
differently                                             overrides 66 on both vendors, so the TLS ``data16 data16 rex.W
                                                        call`` is accepted
lock prefix                                   step      the whole atomic instruction runs in the slot; the kernel
                                                        refuses f0 only through its prefix table
es/cs/ss/ds prefixes, notrack                 step      no effect in 64-bit mode (notrack only matters under IBT, which
                                                        Linux does not enable for user space)
0f ae group (fences, fxsave/xsave, ldmxcsr,   step      user-level, position-independent
clflush, rd/wrfsbase)
nop (every encoding iced names NOP), pause,   emulate   rip = next instruction
endbr64/32
push r64                                      emulate   push %rsp pushes the old %rsp
jmp rel8/rel32, call rel32, jcc rel8/rel32    emulate   call pushes address + length
mov r64,r64, mov r32,r32, mov $imm,r64/r32    emulate   the 32-bit forms zero-extend
(movabs too)
lea into r64 or r32                           emulate   base + index*scale + disp (or rip-relative from address +
                                                        length), in the instruction's address size
add/sub $imm, r64                             emulate   with exact OF SF ZF AF PF CF: ``sub $N,%rsp`` follows the pushes
                                                        of most prologues
everything else                               step      with the fixups below
============================================  ========  ================================================================

A stepped instruction that needs no fixup afterwards (no rip-relative operand, no branch, call or rep
prefix) is *boosted*: :attr:`Plan.boost_code` is the instruction followed by an absolute jump to the next one,
placed once in a slot the probe keeps, and the thread runs through it by itself (one stop per hit, no step).

Every plan that is not refused carries valid :attr:`Plan.slot_code`, emulated ones included: when
:meth:`Plan.emulate` raises :class:`EmulationFault` (a push or call whose stack write fails, for instance because
the stack has to grow, which a ptrace write does not do), the engine steps instead, and the copy takes the real
fault or grows the stack. For that to hold, ``memory.write`` must honour page protections (process_vm_writev, not
a FOLL_FORCE write to /proc/pid/mem), or a push onto a guard page would succeed instead of faulting.

Slot code and fixups
--------------------

Slot code never depends on the slot's address. A rip-relative memory operand is re-encoded as
``[scratch + disp]`` with the original displacement; ``prepare_step`` loads the scratch register with
``address + length``, so ``scratch + disp`` is the original target. The scratch register is the first of
rsi, rdi, rbx, r8-r15, rax, rcx, rdx, rbp that the instruction uses in no width, explicitly or implicitly (iced's
used registers include implicit operands such as cmpxchg16b's rdx:rax and rcx:rbx, mulx's rdx and pcmpestri's
rax, rcx, rdx; string instructions cannot have a rip-relative operand).

=================================================  =============================================================
After the step                                     Fixup
=================================================  =============================================================
fall-through instructions                          rip == slot + slot length -> address + length; rip == slot ->
                                                   address (a rep string instruction with iterations left: the
                                                   engine may step again instead, or let it re-run at the probe,
                                                   which fires the probe again, as the kernel does)
jcc, loop/loope/loopne, jrcxz/jecxz (raw copy)     rip - slot + address, taken or not
jmp rel, call rel (copy with the displacement      rip = the branch target; the copy only falls through (and, for
zeroed, as the kernel does for call)               call, pushes), so a target that is out of reach of the slot
                                                   cannot fault
indirect jmp, ret                                  rip is absolute: unchanged
indirect call, call rel                            the return address pushed at [rsp] becomes address + length
pushf                                              TF in the pushed word becomes the program's own TF (ptrace
                                                   hides the TF it forces from regs.eflags; hazard 19)
=================================================  =============================================================

Neither path updates a CET shadow stack: the engine must not probe calls and returns in a process that has one.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from iced_x86 import (Code, ConditionCode, Decoder, DecoderError, DecoderOptions, EncodingKind, Encoder, FlowControl,
                      Formatter, FormatterSyntax, Instruction, InstructionInfoFactory, MemoryOperand, Mnemonic,
                      OpCodeTableKind, OpKind, Register, RegisterExt)

from ..errors import UnprobeableInstruction
from .registers import BY_FIELD, GENERAL_REGISTERS

__all__ = ["EmulationFault", "Plan", "analyze", "refusal", "format_instruction"]

_MAX_INSTRUCTION = 15
_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1

_CF, _PF, _AF, _ZF, _SF, _TF, _OF = 1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 8, 1 << 11
_ARITH_FLAGS = _CF | _PF | _AF | _ZF | _SF | _OF

_FORMATTER = Formatter(FormatterSyntax.GAS)
_INFO = InstructionInfoFactory()


def _iced(name: str) -> int:
    """iced's Register for an AT&T name iced spells the same way (``rsi``, ``r8d``; not ``r8b``)."""
    return getattr(Register, name.upper())


# (name in user_regs_struct, 64-bit register, 32-bit register), in the order scratch registers are tried.
_SCRATCH_ORDER = tuple((name, _iced(name), _iced(BY_FIELD[name].low(4).name))
                       for name in ("rsi", "rdi", "rbx", *(f"r{n}" for n in range(8, 16)), "rax", "rcx", "rdx", "rbp"))
_GPR_NAMES = {_iced(reg.field): reg.field for reg in GENERAL_REGISTERS}


class EmulationFault(Exception):
    """:meth:`Plan.emulate` could not write the tracee's memory; nothing was changed: step the plan instead."""


def format_instruction(ins: Instruction) -> str:
    """``ins`` in AT&T syntax, as errors and listings show it."""
    return _FORMATTER.format(ins)


# -- refusals -------------------------------------------------------------------------------------------------

_SYSTEM_CALLS = frozenset({Mnemonic.SYSCALL, Mnemonic.SYSENTER})
_KERNEL_RETURNS = frozenset({Mnemonic.SYSEXIT, Mnemonic.SYSEXITQ, Mnemonic.SYSRET, Mnemonic.SYSRETQ, Mnemonic.IRET,
                             Mnemonic.IRETD, Mnemonic.IRETQ, Mnemonic.UIRET})
_TSX = frozenset({Mnemonic.XBEGIN, Mnemonic.XEND, Mnemonic.XABORT, Mnemonic.XSUSLDTRK, Mnemonic.XRESLDTRK})
_USER_SYSTEM_GROUP = frozenset({Mnemonic.RDTSCP, Mnemonic.RDPRU, Mnemonic.XGETBV, Mnemonic.XTEST, Mnemonic.RDPKRU,
                                Mnemonic.WRPKRU, Mnemonic.SERIALIZE, Mnemonic.CLZERO})


def _in_system_group(ins: Instruction, code: bytes) -> bool:
    op = ins.op_code()
    first_byte = op.op_code >> 8 * (op.op_code_len - 1)
    return (op.encoding == EncodingKind.LEGACY and op.table == OpCodeTableKind.T0F and first_byte in (0x00, 0x01)
            and ins.mnemonic not in _USER_SYSTEM_GROUP)


def _vendors_disagree(ins: Instruction, code: bytes) -> bool:
    if ins.flow_control == FlowControl.NEXT:
        return False
    amd = Decoder(64, code[:_MAX_INSTRUCTION], DecoderOptions.AMD, ip=ins.ip).decode()
    return (amd.code, amd.len) != (ins.code, ins.len)


def _writes_ss(ins: Instruction, code: bytes) -> bool:
    return ins.op_count > 0 and ins.op0_kind == OpKind.REGISTER and ins.op0_register == Register.SS


def _is_far_transfer(ins: Instruction, code: bytes) -> bool:
    # Direct far call/jmp (9a, ea) do not decode in 64-bit mode.
    return ins.is_call_far_indirect or ins.is_jmp_far_indirect or ins.mnemonic == Mnemonic.RETF


# Checked in order; the first match names the class in the error.
_REFUSALS: tuple[tuple[Callable[[Instruction, bytes], bool], str], ...] = (
    (lambda ins, code: ins.flow_control == FlowControl.INTERRUPT,
     "software interrupt (int3, int, int1, into): its trap would be taken in the out-of-line slot"),
    (lambda ins, code: ins.flow_control == FlowControl.EXCEPTION,
     "undefined instruction (ud0, ud1, ud2): it exists to fault"),
    (lambda ins, code: ins.mnemonic in _SYSTEM_CALLS,
     "system call: a fork or clone run from the out-of-line slot would start the child in the slot"),
    (lambda ins, code: ins.mnemonic in _KERNEL_RETURNS,
     "return from the kernel or an interrupt (sysret, sysexit, iret)"),
    (lambda ins, code: ins.mnemonic in _TSX,
     "TSX transaction instruction (xbegin, xend, xabort): the probe's int3 aborts the transaction"),
    (_is_far_transfer, "far transfer (lcall, ljmp, lret): it reloads %cs"),
    (lambda ins, code: ins.is_privileged,
     "privileged or I/O instruction (hlt, cli, sti, in, out, ...): it faults in user space"),
    (_writes_ss, "mov to %ss: it suppresses the single-step trap after the next instruction"),
    (_in_system_group, "system instruction group 0f 00/0f 01"),
    (_vendors_disagree, "branch with an operand-size (66) prefix: Intel and AMD CPUs execute it differently"),
)


def refusal(ins: Instruction, code: bytes) -> str | None:
    """Why ``ins`` (whose bytes start ``code``) can run neither in place of a probe nor from a copy; None if it can."""
    return next((reason for refuses, reason in _REFUSALS if refuses(ins, code)), None)


# -- stepping -------------------------------------------------------------------------------------------------

class _Rip(enum.Enum):
    NEXT = "next"          # falls through: slot end -> address + length
    RELATIVE = "relative"  # raw copy of a relative branch: rip - slot + address
    TARGET = "target"      # copy with its displacement zeroed falls through: rip = branch target
    ABSOLUTE = "absolute"  # rip is already where the program goes


_RIP_RULES = {
    FlowControl.NEXT: _Rip.NEXT,
    FlowControl.CONDITIONAL_BRANCH: _Rip.RELATIVE,
    FlowControl.UNCONDITIONAL_BRANCH: _Rip.TARGET,
    FlowControl.CALL: _Rip.TARGET,
    FlowControl.INDIRECT_BRANCH: _Rip.ABSOLUTE,
    FlowControl.INDIRECT_CALL: _Rip.ABSOLUTE,
    FlowControl.RETURN: _Rip.ABSOLUTE,
}
_PUSHES_RETURN = frozenset({FlowControl.CALL, FlowControl.INDIRECT_CALL})
_PUSHES_FLAGS = frozenset({Mnemonic.PUSHF, Mnemonic.PUSHFQ})


def _used_registers(ins: Instruction) -> set[int]:
    return {RegisterExt.full_register(used.register) for used in _INFO.info(ins).used_registers()}


def _rip_relative_copy(ins: Instruction) -> tuple[bytes, str]:
    """``ins`` re-encoded with ``[scratch + disp]`` for its rip-relative operand, and the scratch register's name."""
    used = _used_registers(ins)
    name, reg64, reg32 = next(regs for regs in _SCRATCH_ORDER if regs[1] not in used)
    copy = ins.copy()
    if ins.memory_base == Register.EIP:  # 67-prefixed: 32-bit address arithmetic wraps the same way with %esi
        copy.memory_base = reg32
        copy.memory_displacement = (ins.ip_rel_memory_address - ins.next_ip) & _MASK32
    else:
        copy.memory_base = reg64
        copy.memory_displacement = (ins.ip_rel_memory_address - ins.next_ip) & _MASK64
    encoder = Encoder(64)
    encoder.encode(copy, 0)
    return bytes(encoder.take_buffer()), name


def _slot_code(ins: Instruction, decoder: Decoder, raw: bytes) -> tuple[bytes, str | None]:
    if ins.is_ip_rel_memory_operand:
        return _rip_relative_copy(ins)
    if _RIP_RULES[ins.flow_control] is _Rip.TARGET:
        offsets = decoder.get_constant_offsets(ins)  # iced reports a branch displacement as the immediate
        start = offsets.immediate_offset
        return raw[:start] + bytes(offsets.immediate_size) + raw[start + offsets.immediate_size:], None
    return raw, None


# -- emulation ------------------------------------------------------------------------------------------------

_Emulator = Callable[[Any, Any], None]

_CONDITIONS: dict[int, Callable[[int], bool]] = {
    ConditionCode.O: lambda f: bool(f & _OF),
    ConditionCode.NO: lambda f: not f & _OF,
    ConditionCode.B: lambda f: bool(f & _CF),
    ConditionCode.AE: lambda f: not f & _CF,
    ConditionCode.E: lambda f: bool(f & _ZF),
    ConditionCode.NE: lambda f: not f & _ZF,
    ConditionCode.BE: lambda f: bool(f & (_CF | _ZF)),
    ConditionCode.A: lambda f: not f & (_CF | _ZF),
    ConditionCode.S: lambda f: bool(f & _SF),
    ConditionCode.NS: lambda f: not f & _SF,
    ConditionCode.P: lambda f: bool(f & _PF),
    ConditionCode.NP: lambda f: not f & _PF,
    ConditionCode.L: lambda f: bool(f & _SF) != bool(f & _OF),
    ConditionCode.GE: lambda f: bool(f & _SF) == bool(f & _OF),
    ConditionCode.LE: lambda f: bool(f & _ZF) or bool(f & _SF) != bool(f & _OF),
    ConditionCode.G: lambda f: not f & _ZF and bool(f & _SF) == bool(f & _OF),
}


def _push(regs: Any, memory: Any, value: int) -> None:
    """Write ``value`` below ``regs.rsp`` and move rsp; regs stay untouched when the write fails."""
    sp = (regs.rsp - 8) & _MASK64
    try:
        memory.write(sp, value.to_bytes(8, "little"))
    except OSError as exc:
        raise EmulationFault(f"cannot write the stack at {sp:#x}: {exc}") from exc
    regs.rsp = sp


def _gpr_name(register: int) -> str:
    return _GPR_NAMES[RegisterExt.full_register(register)]


def _is_gpr64_or_32(register: int) -> bool:
    return RegisterExt.is_gpr64(register) or RegisterExt.is_gpr32(register)


def _register_mask(register: int) -> int:
    return _MASK64 if RegisterExt.is_gpr64(register) else _MASK32


def _emulate_nop(ins: Instruction) -> _Emulator:
    next_ip = ins.next_ip

    def run(regs: Any, memory: Any) -> None:
        regs.rip = next_ip
    return run


def _emulate_push(ins: Instruction) -> _Emulator | None:
    if ins.op0_kind != OpKind.REGISTER or not RegisterExt.is_gpr64(ins.op0_register):
        return None
    source, next_ip = _gpr_name(ins.op0_register), ins.next_ip

    def run(regs: Any, memory: Any) -> None:
        _push(regs, memory, getattr(regs, source))
        regs.rip = next_ip
    return run


def _emulate_jmp(ins: Instruction) -> _Emulator | None:
    if not ins.is_jmp_short_or_near:
        return None
    target = ins.near_branch_target

    def run(regs: Any, memory: Any) -> None:
        regs.rip = target
    return run


def _emulate_call(ins: Instruction) -> _Emulator | None:
    if not ins.is_call_near:
        return None
    target, next_ip = ins.near_branch_target, ins.next_ip

    def run(regs: Any, memory: Any) -> None:
        _push(regs, memory, next_ip)
        regs.rip = target
    return run


def _emulate_jcc(ins: Instruction) -> _Emulator:
    taken, target, next_ip = _CONDITIONS[ins.condition_code], ins.near_branch_target, ins.next_ip

    def run(regs: Any, memory: Any) -> None:
        regs.rip = target if taken(regs.eflags) else next_ip
    return run


_MOV_IMMEDIATES = frozenset({OpKind.IMMEDIATE32, OpKind.IMMEDIATE32TO64, OpKind.IMMEDIATE64})


def _emulate_mov(ins: Instruction) -> _Emulator | None:
    dst = ins.op0_register
    if ins.op0_kind != OpKind.REGISTER or not _is_gpr64_or_32(dst):
        return None
    dst_name, mask, next_ip = _gpr_name(dst), _register_mask(dst), ins.next_ip
    if ins.op1_kind in _MOV_IMMEDIATES:
        value = ins.immediate(1) & mask

        def run_immediate(regs: Any, memory: Any) -> None:
            setattr(regs, dst_name, value)
            regs.rip = next_ip
        return run_immediate
    src = ins.op1_register
    if ins.op1_kind != OpKind.REGISTER or RegisterExt.size(src) != RegisterExt.size(dst) or not _is_gpr64_or_32(src):
        return None
    src_name = _gpr_name(src)

    def run(regs: Any, memory: Any) -> None:
        setattr(regs, dst_name, getattr(regs, src_name) & mask)
        regs.rip = next_ip
    return run


def _emulate_lea(ins: Instruction) -> _Emulator | None:
    dst = ins.op0_register
    if not _is_gpr64_or_32(dst):
        return None
    dst_name, next_ip = _gpr_name(dst), ins.next_ip
    if ins.is_ip_rel_memory_operand:
        value = ins.ip_rel_memory_address & _register_mask(dst)

        def run_rip_relative(regs: Any, memory: Any) -> None:
            setattr(regs, dst_name, value)
            regs.rip = next_ip
        return run_rip_relative
    base, index = ins.memory_base, ins.memory_index
    # A 67 prefix shows as 32-bit base/index registers; a lone 32-bit displacement cannot wrap.
    address_32 = RegisterExt.is_gpr32(base) or RegisterExt.is_gpr32(index)
    mask = _register_mask(dst) & (_MASK32 if address_32 else _MASK64)
    base_name = _gpr_name(base) if base != Register.NONE else None
    index_name = _gpr_name(index) if index != Register.NONE else None
    scale, displacement = ins.memory_index_scale, ins.memory_displacement

    def run(regs: Any, memory: Any) -> None:
        address = displacement
        if base_name:
            address += getattr(regs, base_name)
        if index_name:
            address += getattr(regs, index_name) * scale
        setattr(regs, dst_name, address & mask)
        regs.rip = next_ip
    return run


def _add_sub_flags(a: int, b: int, subtract: bool) -> tuple[int, int]:
    """64-bit ``a + b`` or ``a - b`` and its OF SF ZF AF PF CF."""
    if subtract:
        result = (a - b) & _MASK64
        carry, overflow = a < b, (a ^ b) & (a ^ result)
    else:
        result = (a + b) & _MASK64
        carry, overflow = result < a, ~(a ^ b) & (a ^ result)
    flags = ((a ^ b ^ result) & _AF) | (_CF if carry else 0) | (_OF if overflow >> 63 & 1 else 0)
    flags |= (_ZF if result == 0 else 0) | (_SF if result >> 63 else 0)
    flags |= _PF if (result & 0xFF).bit_count() % 2 == 0 else 0
    return result, flags


def _emulate_add_sub(ins: Instruction) -> _Emulator | None:
    if (ins.op0_kind != OpKind.REGISTER or not RegisterExt.is_gpr64(ins.op0_register)
            or ins.op1_kind not in (OpKind.IMMEDIATE8TO64, OpKind.IMMEDIATE32TO64)):
        return None
    name, operand, next_ip = _gpr_name(ins.op0_register), ins.immediate(1), ins.next_ip
    subtract = ins.mnemonic == Mnemonic.SUB

    def run(regs: Any, memory: Any) -> None:
        result, flags = _add_sub_flags(getattr(regs, name), operand, subtract)
        setattr(regs, name, result)
        regs.eflags = regs.eflags & ~_ARITH_FLAGS | flags
        regs.rip = next_ip
    return run


_EMULATORS: dict[int, Callable[[Instruction], _Emulator | None]] = {
    Mnemonic.NOP: _emulate_nop,
    Mnemonic.PAUSE: _emulate_nop,
    Mnemonic.ENDBR64: _emulate_nop,
    Mnemonic.ENDBR32: _emulate_nop,
    Mnemonic.PUSH: _emulate_push,
    Mnemonic.JMP: _emulate_jmp,
    Mnemonic.CALL: _emulate_call,
    Mnemonic.MOV: _emulate_mov,
    Mnemonic.LEA: _emulate_lea,
    Mnemonic.ADD: _emulate_add_sub,
    Mnemonic.SUB: _emulate_add_sub,
}


def _emulator(ins: Instruction) -> _Emulator | None:
    if ins.is_jcc_short_or_near:
        return _emulate_jcc(ins)
    build = _EMULATORS.get(ins.mnemonic)
    return build(ins) if build else None


# -- the plan -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How to run the instruction displaced by a probe's int3: emulate it, or step ``slot_code`` out of line."""

    address: int
    length: int
    text: str
    kind: str
    slot_code: bytes
    scratch: str | None
    _rip: _Rip = field(repr=False, compare=False)
    _branch_target: int = field(repr=False, compare=False)
    _may_repeat: bool = field(repr=False, compare=False)
    _pushes_return: bool = field(repr=False, compare=False)
    _pushes_flags: bool = field(repr=False, compare=False)
    _emulator: _Emulator | None = field(repr=False, compare=False)

    @property
    def _next(self) -> int:
        return (self.address + self.length) & _MASK64

    @functools.cached_property
    def boost_code(self) -> bytes | None:
        """The instruction followed by an absolute jump to the next one, for a slot a thread runs through by
        itself (the kernel's kprobes call this boosting): one stop per hit instead of two. None when the
        instruction needs a fixup after it runs (rip-relative, branches, calls, rep strings)."""
        if self.kind != "step" or self.scratch or self._rip is not _Rip.NEXT or self._may_repeat:
            return None
        return self.slot_code + _absolute_jump(self._next)

    def emulate(self, regs: Any, memory: Any) -> None:
        """Apply the instruction's effect to ``regs`` (and ``memory``), rip included.

        Raises :class:`EmulationFault`, with ``regs`` unchanged, when a memory write fails.
        """
        if self._emulator is None:
            raise ValueError(f"'{self.text}' at {self.address:#x} is not emulated; step it")
        self._emulator(regs, memory)

    def prepare_step(self, regs: Any, slot: int) -> dict[str, int]:
        """Point ``regs`` at the slot holding ``slot_code`` and load the scratch register; return what to restore."""
        saved = {}
        if self.scratch:
            saved[self.scratch] = getattr(regs, self.scratch)
            setattr(regs, self.scratch, self._next)
        regs.rip = slot & _MASK64
        return saved

    def finish_step(self, regs: Any, slot: int, saved: dict[str, int], memory: Any) -> None:
        """After the single-step trap: make ``regs`` and the stack look as if the instruction ran in place.

        Raises ValueError when rip shows that something other than the step ran (a signal handler, for instance).
        """
        end = slot + len(self.slot_code)
        if self._may_repeat and regs.rip == slot:
            regs.rip = self.address  # a rep string instruction with iterations left
            self._restore(regs, saved)
            return
        if self._rip in (_Rip.NEXT, _Rip.TARGET) and regs.rip != end:
            raise ValueError(f"after stepping '{self.text}' rip {regs.rip:#x} is not the slot's end {end:#x}")
        regs.rip = {
            _Rip.NEXT: self._next,
            _Rip.RELATIVE: (regs.rip - slot + self.address) & _MASK64,
            _Rip.TARGET: self._branch_target,
            _Rip.ABSOLUTE: regs.rip,
        }[self._rip]
        if self._pushes_return:
            memory.write(regs.rsp, self._next.to_bytes(8, "little"))
        if self._pushes_flags:
            word = int.from_bytes(memory.read(regs.rsp, 2), "little")
            memory.write(regs.rsp, (word & ~_TF | regs.eflags & _TF).to_bytes(2, "little"))
        self._restore(regs, saved)

    def step_ran(self, rip: int, slot: int) -> bool | None:
        """Whether a thread stepping the copy in ``slot``, stopped at ``rip``, has run it: not while it stands
        at the slot's start, and anywhere else it has (the copy is one instruction). None for a rep string
        instruction back at its start: one iteration may have run, as only the trap's si_code can tell."""
        if rip != slot:
            return True
        return None if self._may_repeat else False

    def abort_step(self, regs: Any, saved: dict[str, int]) -> None:
        """The step did not complete (a fault, or a signal stop before it ran): back to the probed instruction."""
        regs.rip = self.address
        self._restore(regs, saved)

    @staticmethod
    def _restore(regs: Any, saved: dict[str, int]) -> None:
        for name, value in saved.items():
            setattr(regs, name, value)


def _absolute_jump(target: int) -> bytes:
    """``jmp *0(%rip)`` and the 8-byte ``target`` it reads: a jump that works from any address."""
    jump = Instruction.create_mem(Code.JMP_RM64, MemoryOperand(Register.RIP, displ=6))  # rip-relative to 0 + 6
    target_word = Instruction.create_declare_qword_1(target)
    encoder = Encoder(64)
    encoder.encode(jump, 0)
    encoder.encode(target_word, 6)
    return bytes(encoder.take_buffer())


def analyze(code: bytes, address: int) -> Plan:
    """Decide how to run the instruction whose first byte is ``code[0]``, located at ``address``.

    ``code`` should hold 15 bytes when that many are mapped. Raises :class:`UnprobeableInstruction` naming the
    instruction's class when it can be neither emulated nor stepped.
    """
    decoder = Decoder(64, code[:_MAX_INSTRUCTION], DecoderOptions.NONE, ip=address)
    ins = decoder.decode()
    if ins.is_invalid:
        reason = ("the code ends inside the instruction" if decoder.last_error == DecoderError.NO_MORE_BYTES
                  else "undecodable bytes")
        raise UnprobeableInstruction(f"cannot probe '(bad)' at {address:#x}: {reason}")
    text = format_instruction(ins)
    reason = refusal(ins, code)
    if reason is None:
        try:
            slot_code, scratch = _slot_code(ins, decoder, bytes(code[:ins.len]))
        except ValueError as exc:  # iced's encoder rejects the rewritten instruction
            reason = f"cannot re-encode its rip-relative operand ({exc})"
    if reason is not None:
        raise UnprobeableInstruction(f"cannot probe '{text}' at {address:#x}: {reason}")
    emulator = _emulator(ins)
    return Plan(address=address, length=ins.len, text=text, kind="emulate" if emulator else "step",
                slot_code=slot_code, scratch=scratch, _rip=_RIP_RULES[ins.flow_control],
                _branch_target=ins.near_branch_target,
                _may_repeat=ins.is_string_instruction and (ins.has_rep_prefix or ins.has_repne_prefix),
                _pushes_return=ins.flow_control in _PUSHES_RETURN, _pushes_flags=ins.mnemonic in _PUSHES_FLAGS,
                _emulator=emulator)

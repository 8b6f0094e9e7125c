"""Probe-site analysis on x86-64: which instructions are refused, emulated or stepped, and how a step is fixed up.

Instruction bytes come from GNU as or iced's encoder. Flags and branch conditions are checked against the CPU
running the tests, through a small C helper built with gcc; every other expected value is architectural
arithmetic written out in the test.
"""

from __future__ import annotations

import errno
import os
import random
import re
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from iced_x86 import Code, Decoder, Encoder, FlowControl, Instruction, InstructionInfoFactory, OpKind, Register, \
    RegisterExt

from oracles import assemble
from uprobes.elf.objfile import ElfObject
from uprobes.errors import UnprobeableInstruction
from uprobes.x86_64.analysis import EmulationFault, Plan, analyze

PYTHON = "/usr/bin/python3.11"
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1
ADDRESS = 0x5555_5555_4321
STACK, STACK_SIZE = 0x7FFD_0000_0000, 0x1000
STACK_TOP = STACK + 0x800
SLOTS = (0x7FFF_FFFF_E080, 0x1000, ADDRESS + 0x1000)  # top of user space, bottom, near the code
TF = 1 << 8
ARITH_FLAGS = 0x8D5  # OF SF ZF AF PF CF

USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
             "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
GPR_BY_REGISTER = {getattr(Register, name.upper()): name for name in GPRS}
SCRATCH_REGISTERS = {name: (register, RegisterExt.full_register32(register))
                     for register, name in GPR_BY_REGISTER.items()}


# -- helpers --------------------------------------------------------------------------------------------------

def encode(instruction: Instruction) -> bytes:
    encoder = Encoder(64)
    encoder.encode(instruction, ADDRESS)
    return bytes(encoder.take_buffer())


def plan_for(code: bytes | str, address: int = ADDRESS) -> Plan:
    raw = assemble(code) if isinstance(code, str) else code
    return analyze(raw + b"\xcc" * 15, address)


def make_regs(seed: int = 1, **values: int) -> SimpleNamespace:
    """A user_regs_struct with random general registers, a mapped stack and ordinary flags."""
    rng = random.Random(seed)
    regs = SimpleNamespace(**{name: rng.getrandbits(64) for name in USER_REGS})
    regs.rip, regs.rsp, regs.eflags, regs.cs, regs.ss = ADDRESS, STACK_TOP, 0x246, 0x33, 0x2B
    for name, value in values.items():
        setattr(regs, name, value)
    return regs


class FakeMemory:
    """Mapped regions of bytes; any access outside them raises OSError, as a read of /proc/pid/mem does."""

    def __init__(self, *regions: tuple[int, int]) -> None:
        self.regions = {start: bytearray(size) for start, size in regions}

    def _locate(self, address: int, size: int) -> tuple[bytearray, int]:
        for start, data in self.regions.items():
            if start <= address and address + size <= start + len(data):
                return data, address - start
        raise OSError(errno.EIO, f"no memory at {address:#x}")

    def read(self, address: int, size: int) -> bytes:
        data, offset = self._locate(address, size)
        return bytes(data[offset:offset + size])

    def write(self, address: int, data: bytes) -> None:
        buffer, offset = self._locate(address, len(data))
        buffer[offset:offset + len(data)] = data

    def u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def snapshot(self) -> dict[int, bytes]:
        return {start: bytes(data) for start, data in self.regions.items()}


def stack() -> FakeMemory:
    return FakeMemory((STACK, STACK_SIZE))


def decode(code: bytes, address: int) -> Instruction:
    return Decoder(64, code, ip=address).decode()


def used_gprs(instruction: Instruction) -> set[str]:
    used = InstructionInfoFactory().info(instruction).used_registers()
    return {GPR_BY_REGISTER[full] for full in (RegisterExt.full_register(u.register) for u in used)
            if full in GPR_BY_REGISTER}


# -- the CPU as oracle ----------------------------------------------------------------------------------------

CPU_HELPER = r"""
#include <stdio.h>

/* Reads "op a b flags" lines. op '+' or '-': prints the result and RFLAGS of a+b or a-b run with RFLAGS = flags.
   op 'j': prints setcc for the 16 conditions in encoding order (o no b ae e ne be a s ns p np l ge le g). */
int main(void) {
    char op;
    unsigned long a, b, flags, out;
    while (scanf(" %c %lx %lx %lx", &op, &a, &b, &flags) == 4) {
        if (op == 'j') {
            unsigned char cc[16];
            __asm__ volatile("push %[f]\n\tpopfq\n\t"
                             "seto 0(%[cc])\n\tsetno 1(%[cc])\n\tsetb 2(%[cc])\n\tsetae 3(%[cc])\n\t"
                             "sete 4(%[cc])\n\tsetne 5(%[cc])\n\tsetbe 6(%[cc])\n\tseta 7(%[cc])\n\t"
                             "sets 8(%[cc])\n\tsetns 9(%[cc])\n\tsetp 10(%[cc])\n\tsetnp 11(%[cc])\n\t"
                             "setl 12(%[cc])\n\tsetge 13(%[cc])\n\tsetle 14(%[cc])\n\tsetg 15(%[cc])"
                             : : [f] "r"(flags), [cc] "r"(cc) : "cc", "memory");
            for (int i = 0; i < 16; i++)
                putchar('0' + cc[i]);
            putchar('\n');
            continue;
        }
        if (op == '+')
            __asm__ volatile("push %[f]\n\tpopfq\n\tadd %[b], %[a]\n\tpushfq\n\tpop %[out]"
                             : [a] "+r"(a), [out] "=&r"(out) : [b] "r"(b), [f] "r"(flags) : "cc");
        else
            __asm__ volatile("push %[f]\n\tpopfq\n\tsub %[b], %[a]\n\tpushfq\n\tpop %[out]"
                             : [a] "+r"(a), [out] "=&r"(out) : [b] "r"(b), [f] "r"(flags) : "cc");
        printf("%lx %lx\n", a, out);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def cpu(tmp_path_factory) -> Callable[[list[str]], list[str]]:
    """Run lines through the C helper on this CPU and return its output lines."""
    directory = tmp_path_factory.mktemp("cpu")
    source, program = directory / "cpu.c", directory / "cpu"
    source.write_text(CPU_HELPER)
    # -mno-red-zone: the helper's push/pop would otherwise clobber locals below %rsp.
    subprocess.run(["gcc", "-O1", "-mno-red-zone", "-o", str(program), str(source)], check=True)

    def run(lines: list[str]) -> list[str]:
        result = subprocess.run([str(program)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                                check=True)
        return result.stdout.splitlines()
    return run


# -- refusals -------------------------------------------------------------------------------------------------

REFUSED = [
    ("syscall", "system call"),
    ("sysenter", "system call"),
    ("sysexit", "return from the kernel"),
    ("sysretq", "return from the kernel"),
    ("iretq", "return from the kernel"),
    ("int3", "software interrupt"),
    ("int $0x80", "software interrupt"),
    ("int1", "software interrupt"),
    (".byte 0xce", "undecodable"),  # into: invalid in 64-bit mode
    ("ud2", "undefined instruction"),
    ("ud1 %eax,%eax", "undefined instruction"),
    ("ud0 %eax,%eax", "undefined instruction"),
    ("hlt", "privileged or I/O"),
    ("cli", "privileged or I/O"),
    ("sti", "privileged or I/O"),
    ("in %dx,%al", "privileged or I/O"),
    ("out %al,$0x80", "privileged or I/O"),
    ("insb", "privileged or I/O"),
    ("rep outsb", "privileged or I/O"),
    ("wrmsr", "privileged or I/O"),
    ("lgdt (%rax)", "privileged or I/O"),
    ("mov %eax,%ss", "mov to %ss"),
    ("mov (%rax),%ss", "mov to %ss"),
    (".byte 0x17", "undecodable"),  # pop %ss: invalid in 64-bit mode
    ("lcall *(%rax)", "far transfer"),
    ("ljmp *(%rax)", "far transfer"),
    ("lretq", "far transfer"),
    ("lretq $8", "far transfer"),
    ("sgdt (%rax)", "system instruction group 0f 00/0f 01"),
    ("smsw %eax", "system instruction group 0f 00/0f 01"),
    ("sldt %eax", "system instruction group 0f 00/0f 01"),
    ("str %eax", "system instruction group 0f 00/0f 01"),
    ("verw (%rax)", "system instruction group 0f 00/0f 01"),
    ("vmfunc", "system instruction group 0f 00/0f 01"),
    ("enclu", "system instruction group 0f 00/0f 01"),
    ("monitorx", "system instruction group 0f 00/0f 01"),
    ("xbegin 1f\n1:", "TSX"),
    ("xend", "TSX"),
    ("xabort $1", "TSX"),
    (".byte 0x66, 0xe8, 0, 0, 0, 0", "operand-size (66) prefix"),  # call: rel16 on AMD
    (".byte 0x66, 0xe9, 0, 0, 0, 0", "operand-size (66) prefix"),
    (".byte 0x66, 0x74, 0x10", "operand-size (66) prefix"),
    (".byte 0x66, 0x0f, 0x84, 0, 0, 0, 0", "operand-size (66) prefix"),
    (".byte 0x66, 0xc3", "operand-size (66) prefix"),
    (".byte 0x66, 0xff, 0xe0", "operand-size (66) prefix"),
    (".byte 0x06", "undecodable"),  # push %es
    (".byte 0x9a, 0, 0, 0, 0, 0x33, 0", "undecodable"),  # direct lcall
    (".byte 0xea, 0, 0, 0, 0, 0x33, 0", "undecodable"),  # direct ljmp
]


@pytest.mark.parametrize("source, reason", REFUSED, ids=[source for source, _ in REFUSED])
def test_refused_class_is_named_in_the_error(source, reason):
    with pytest.raises(UnprobeableInstruction) as error:
        plan_for(source)
    assert reason in str(error.value)


def test_refusal_message_names_the_instruction_and_its_address():
    with pytest.raises(UnprobeableInstruction) as error:
        analyze(b"\x0f\x05" + b"\x90" * 13, 0x401000)
    assert str(error.value).startswith("cannot probe 'syscall' at 0x401000: system call: ")


def test_code_ending_inside_the_instruction_is_refused():
    with pytest.raises(UnprobeableInstruction, match=r"'\(bad\)' at 0x401000: the code ends inside"):
        analyze(bytes.fromhex("8b0510"), 0x401000)


ACCEPTED_BEYOND_KERNEL = [
    "lock addl $1,(%rax)",
    "lock cmpxchg %ecx,(%rdx)",
    "lock xadd %eax,(%rdi)",
    ".byte 0x26, 0x8b, 0x00",  # es mov (%rax),%eax: as refuses the es prefix in 64-bit code
    "mov %cs:(%rax),%eax",
    "mov %ss:(%rax),%eax",
    "ds mov (%rax),%eax",
    "notrack jmp *%rax",
    "notrack call *(%rax)",
    "lfence", "mfence", "sfence",
    "fxsave (%rax)", "fxrstor (%rax)", "xsave (%rax)", "xrstor (%rax)",
    "ldmxcsr (%rax)", "stmxcsr (%rax)",
    "clflush (%rax)", "clflushopt (%rax)",
    "rdfsbase %rax", "wrgsbase %rax",
    "rdtscp", "rdpru", "xgetbv", "rdpkru", "wrpkru", "xtest", "serialize", "clzero",
]


@pytest.mark.parametrize("source", ACCEPTED_BEYOND_KERNEL)
def test_class_the_kernel_refuses_is_stepped_from_a_verbatim_copy(source):
    plan = plan_for(source)
    assert plan.kind == "step"
    assert plan.slot_code == assemble(source)
    assert plan.scratch is None


def test_segment_and_lock_prefixes_survive_in_the_slot():
    for source, prefix in [(".byte 0x26, 0x8b, 0x00", 0x26), ("mov %cs:(%rax),%eax", 0x2E),
                           ("mov %ss:(%rax),%eax", 0x36), ("ds mov (%rax),%eax", 0x3E),
                           ("notrack jmp *%rax", 0x3E), ("lock addl $1,(%rax)", 0xF0)]:
        assert plan_for(source).slot_code[0] == prefix, source


def test_call_whose_66_prefix_rex_w_overrides_is_emulated():
    # The TLS general-dynamic sequence: data16 data16 rex.W call __tls_get_addr.
    plan = plan_for(".byte 0x66, 0x66, 0x48, 0xe8, 0x10, 0, 0, 0")
    assert plan.kind == "emulate"
    regs, memory = make_regs(), stack()
    plan.emulate(regs, memory)
    assert regs.rip == ADDRESS + 8 + 0x10
    assert memory.u64(regs.rsp) == ADDRESS + 8


# -- emulation ------------------------------------------------------------------------------------------------

NOPS = [
    "90", "6690", "4890", "f390", "0f1f00", "0f1f4000", "0f1f440000", "660f1f440000", "0f1f8000000000",
    "0f1f840000000000", "660f1f840000000000", "662e0f1f840000000000", "66662e0f1f840000000000",
    "6666666666662e0f1f840000000000",  # 15-byte padding: data16 x6 cs nopw
    "0f1fc0",  # nop %eax
    "f30f1efa", "f30f1efb",  # endbr64, endbr32
]


@pytest.mark.parametrize("hex_code", NOPS)
def test_nop_only_advances_rip(hex_code):
    code = bytes.fromhex(hex_code)
    plan = plan_for(code)
    assert (plan.kind, plan.length) == ("emulate", len(code))
    regs, memory = make_regs(), stack()
    expected, before = vars(make_regs()) | {"rip": ADDRESS + len(code)}, memory.snapshot()
    plan.emulate(regs, memory)
    assert vars(regs) == expected
    assert memory.snapshot() == before


@pytest.mark.parametrize("register", GPRS)
def test_push_register_stores_its_value_before_the_push(register):
    plan = plan_for(f"push %{register}")
    assert plan.kind == "emulate"
    regs, memory = make_regs(), stack()
    old = vars(make_regs())
    plan.emulate(regs, memory)
    assert memory.u64(STACK_TOP - 8) == old[register]  # push %rsp pushes the old %rsp
    assert vars(regs) == old | {"rsp": STACK_TOP - 8, "rip": ADDRESS + plan.length}


def test_push_onto_unmapped_stack_raises_emulation_fault_and_changes_nothing():
    plan = plan_for("push %rbp")
    regs = make_regs(rsp=0x1000)
    with pytest.raises(EmulationFault, match="0xff8"):
        plan.emulate(regs, stack())
    assert vars(regs) == vars(make_regs(rsp=0x1000))
    assert plan.slot_code == assemble("push %rbp")


@pytest.mark.parametrize("hex_code, displacement", [("eb10", 0x10), ("ebf0", -0x10), ("e900100000", 0x1000),
                                                    ("e900f0ffff", -0x1000)])
def test_relative_jmp_goes_to_its_target(hex_code, displacement):
    code = bytes.fromhex(hex_code)
    plan = plan_for(code)
    regs = make_regs()
    plan.emulate(regs, stack())
    assert plan.kind == "emulate"
    assert vars(regs) == vars(make_regs()) | {"rip": ADDRESS + len(code) + displacement}


@pytest.mark.parametrize("displacement", [0x1234, -0x1234])
def test_relative_call_pushes_address_plus_length(displacement):
    code = b"\xe8" + displacement.to_bytes(4, "little", signed=True)
    plan = plan_for(code)
    regs, memory = make_regs(), stack()
    plan.emulate(regs, memory)
    assert plan.kind == "emulate"
    assert memory.u64(STACK_TOP - 8) == ADDRESS + 5
    assert vars(regs) == vars(make_regs()) | {"rsp": STACK_TOP - 8, "rip": ADDRESS + 5 + displacement}


def test_relative_call_that_cannot_push_falls_back_to_a_copy_that_only_pushes():
    plan = plan_for(b"\xe8" + (0x1234).to_bytes(4, "little"))
    regs = make_regs(rsp=STACK)  # the push would go below the mapped stack
    with pytest.raises(EmulationFault):
        plan.emulate(regs, stack())
    assert vars(regs) == vars(make_regs(rsp=STACK))
    memory = FakeMemory((STACK - 0x1000, 0x2000))  # the stack has grown meanwhile
    for slot in SLOTS:
        assert decode(plan.slot_code, slot).near_branch_target == slot + len(plan.slot_code)  # out-of-reach targets cannot fault
        regs = make_regs(rsp=STACK)
        assert plan.prepare_step(regs, slot) == {}
        assert regs.rip == slot
        regs.rsp -= 8  # what the CPU does with the copy
        memory.write(regs.rsp, (slot + 5).to_bytes(8, "little"))
        regs.rip = slot + 5
        plan.finish_step(regs, slot, {}, memory)
        assert vars(regs) == vars(make_regs(rsp=STACK - 8)) | {"rip": ADDRESS + 5 + 0x1234}
        assert memory.u64(STACK - 8) == ADDRESS + 5


FLAG_COMBINATIONS = [sum(bit for i, bit in enumerate((0x1, 0x4, 0x40, 0x80, 0x800)) if n >> i & 1) for n in range(32)]


def test_every_jcc_condition_agrees_with_the_cpu_on_every_flag_combination(cpu):
    lines = cpu([f"j 0 0 {flags | 0x202:x}" for flags in FLAG_COMBINATIONS])
    assert len(lines) == len(FLAG_COMBINATIONS)
    for flags, taken in zip(FLAG_COMBINATIONS, lines):
        for condition in range(16):
            rel8, rel32 = bytes([0x70 + condition, 0x10]), bytes([0x0F, 0x80 + condition, 0x00, 0xFD, 0xFF, 0xFF])
            for code, displacement in ((rel8, 0x10), (rel32, -0x300)):
                plan = plan_for(code)
                regs = make_regs(eflags=flags | 0x202)
                plan.emulate(regs, stack())
                target = ADDRESS + len(code) + displacement
                expected = target if taken[condition] == "1" else ADDRESS + len(code)
                assert (plan.kind, regs.rip) == ("emulate", expected), (code.hex(), hex(flags))
                assert vars(regs) == vars(make_regs(eflags=flags | 0x202)) | {"rip": expected}


@pytest.mark.parametrize("source, destination, value", [
    ("mov %rbx,%r12", "r12", lambda r: r.rbx),
    (".byte 0x48, 0x8b, 0xc3", "rax", lambda r: r.rbx),  # mov %rbx,%rax through 8b /r
    ("mov %rsp,%rbp", "rbp", lambda r: r.rsp),
    ("mov %r9d,%eax", "rax", lambda r: r.r9 & MASK32),  # writing a 32-bit register zero-extends
    ("mov %esp,%r15d", "r15", lambda r: r.rsp & MASK32),
    ("mov $-1,%eax", "rax", lambda r: MASK32),
    ("mov $-1,%rax", "rax", lambda r: MASK64),  # c7 /0: sign-extended imm32
    ("mov $5,%r8d", "r8", lambda r: 5),
    ("movabs $0x1122334455667788,%r10", "r10", lambda r: 0x1122334455667788),
])
def test_mov_between_registers_or_from_an_immediate(source, destination, value):
    plan = plan_for(source)
    regs = make_regs()
    plan.emulate(regs, stack())
    assert plan.kind == "emulate"
    assert vars(regs) == vars(make_regs()) | {destination: value(make_regs()), "rip": ADDRESS + plan.length}


@pytest.mark.parametrize("source", ["mov %al,%bl", "mov %ax,%bx", "mov $1,%al", "mov $1,%ax", "mov %rax,(%rbx)",
                                    "mov (%rbx),%rax", "mov %ds,%eax", "movl $1,(%rax)"])
def test_narrow_or_memory_mov_is_stepped(source):
    assert plan_for(source).kind == "step"


LEA_REGS = {"rax": 0x1234_5678_FFFF_FF00, "rbx": 0x20, "r12": 0x30, "r13": 0x7FFF_0000_0000}
LEA = [
    ("lea -8(%rax,%rbx,4),%rcx", "rcx", lambda r: (r.rax + r.rbx * 4 - 8) & MASK64),
    ("lea 0x10(,%rbx,8),%rdx", "rdx", lambda r: r.rbx * 8 + 0x10),
    ("lea (%rsp),%rbp", "rbp", lambda r: r.rsp),
    ("lea 1(%rax),%rdx", "rdx", lambda r: r.rax + 1),
    ("lea 0x7fffffff(%r13,%r12,2),%r9d", "r9", lambda r: (r.r13 + r.r12 * 2 + 0x7FFFFFFF) & MASK32),
    ("lea -8(%eax,%ebx,4),%ecx", "rcx", lambda r: (r.rax + r.rbx * 4 - 8) & MASK32),  # 32-bit address size
    ("lea -8(%eax,%ebx,4),%rcx", "rcx", lambda r: (r.rax + r.rbx * 4 - 8) & MASK32),
    ("lea -0x10,%rcx", "rcx", lambda r: MASK64 - 0xF),
    ("addr32 lea -0x10,%rcx", "rcx", lambda r: MASK32 - 0xF),
    ("lea 0x1234(%rip),%rsi", "rsi", lambda r: ADDRESS + 7 + 0x1234),
    ("lea -0x1234(%rip),%esi", "rsi", lambda r: (ADDRESS + 6 - 0x1234) & MASK32),
    ("addr32 lea 0x10(%eip),%eax", "rax", lambda r: (ADDRESS + 7 + 0x10) & MASK32),
    ("lea %fs:0x10(%rax),%rdx", "rdx", lambda r: r.rax + 0x10),  # lea ignores segments
]


@pytest.mark.parametrize("source, destination, value", LEA, ids=[case[0] for case in LEA])
def test_lea_computes_the_address_in_the_right_width(source, destination, value):
    plan = plan_for(source)
    regs = make_regs(**LEA_REGS)
    plan.emulate(regs, stack())
    before = make_regs(**LEA_REGS)
    assert plan.kind == "emulate"
    assert vars(regs) == vars(before) | {destination: value(before), "rip": ADDRESS + plan.length}


def test_lea_wraps_at_64_bits():
    plan = plan_for("lea 1(%rax),%rdx")
    regs = make_regs(rax=MASK64)
    plan.emulate(regs, stack())
    assert regs.rdx == 0


def test_lea_into_a_16_bit_register_is_stepped():
    assert plan_for("lea 1(%rax),%ax").kind == "step"


ADD_SUB_VALUES = [0, 1, 7, 0xF, 0x10, 0x7F, 0x80, 0xFF, 0x100, STACK_TOP, 0x7FFF_FFFF_FFFF_FFFF,
                  0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_FFF8, 0x1234_5678_9ABC_DEF0]
IMM8 = [0, 1, -1, 8, -8, 0x10, 0x28, 0x7F, -0x80, 0x0F]
IMM32 = [0x80, -0x81, 0x1000, 0x7FFF_FFFF, -0x8000_0000, 0x1234_5678, -0x108]
ADD_SUB_CODES = [(Code.SUB_RM64_IMM8, IMM8), (Code.SUB_RM64_IMM32, IMM32), (Code.ADD_RM64_IMM8, IMM8),
                 (Code.ADD_RM64_IMM32, IMM32)]


def test_add_sub_immediate_to_rsp_agree_with_the_cpu(cpu):
    rng = random.Random(7)
    cases = []
    for code, immediates in ADD_SUB_CODES:
        for register, name in [(Register.RSP, "rsp"), (Register.RAX, "rax"), (Register.R12, "r12")]:
            for value in ADD_SUB_VALUES:
                for immediate in immediates:
                    # Stale arithmetic flags and DF must not leak into the result, nor DF be lost.
                    flags = 0x202 | rng.choice((0, ARITH_FLAGS, 0x0C4)) | rng.choice((0, 0x400))
                    cases.append((code, register, name, value, immediate, flags))
    cases.append((Code.ADD_RAX_IMM32, Register.RAX, "rax", 0xFFFF_FFFF, 1, 0x202))  # 48 05 id
    lines = cpu([f"{'-' if 'SUB' in _code_name(code) else '+'} {value:x} {immediate & MASK64:x} {flags:x}"
                 for code, _, _, value, immediate, flags in cases])
    assert len(lines) == len(cases)
    for (code, register, name, value, immediate, flags), line in zip(cases, lines):
        result, cpu_flags = (int(field, 16) for field in line.split())
        plan = plan_for(encode(Instruction.create_reg_i32(code, register, immediate)))
        regs = make_regs(eflags=flags, **{name: value})
        plan.emulate(regs, stack())
        context = (plan.text, hex(value), hex(flags))
        assert plan.kind == "emulate", context
        assert getattr(regs, name) == result, context
        assert regs.eflags & ARITH_FLAGS == cpu_flags & ARITH_FLAGS, context
        assert regs.eflags & ~ARITH_FLAGS == flags & ~ARITH_FLAGS, context
        assert regs.rip == ADDRESS + plan.length


def _code_name(code: int) -> str:
    return next(name for name, value in vars(Code).items() if value == code)


@pytest.mark.parametrize("source", ["sub $8,%esp", "addq $1,(%rsp)", "sub %rax,%rsp", "add $1,%ax",
                                    "lock addq $1,(%rax)"])
def test_add_sub_other_than_immediate_to_a_64_bit_register_is_stepped(source):
    assert plan_for(source).kind == "step"


def test_emulating_a_stepped_plan_is_an_error():
    with pytest.raises(ValueError, match="not emulated"):
        plan_for("xor %eax,%eax").emulate(make_regs(), stack())


def test_plan_text_is_att_syntax():
    assert plan_for("push %rbp").text == "push %rbp"
    assert plan_for("mov %rsp,%rbp").text == "mov %rsp,%rbp"


# -- rip-relative rewrite -------------------------------------------------------------------------------------

# (instruction, general registers it uses by the architecture manuals, explicitly or implicitly)
RIP_RELATIVE = [
    ("mov 0x1234(%rip),%rax", {"rax"}),
    ("mov %esi,-0x40(%rip)", {"rsi"}),
    ("mov 0x10(%rip),%rsi", {"rsi"}),
    ("add 0x10(%rip),%eax", {"rax"}),
    ("cmpl $1,0x10(%rip)", set()),
    ("cmpb $0,-0x7fffffff(%rip)", set()),
    ("movq $0x12345678,0x7ffffff0(%rip)", set()),
    ("movsd 0x10(%rip),%xmm0", set()),
    ("vmovdqu 0x10(%rip),%ymm1", set()),
    ("vmovdqu64 0x10(%rip),%zmm1", set()),
    ("vaddps 0x100(%rip){1to16},%zmm2,%zmm3{%k1}", set()),
    ("call *0x10(%rip)", {"rsp"}),
    ("jmp *0x10(%rip)", set()),
    ("notrack jmp *0x10(%rip)", set()),
    ("push 0x10(%rip)", {"rsp"}),
    ("lock cmpxchg16b 0x10(%rip)", {"rax", "rbx", "rcx", "rdx"}),
    ("cmpxchg8b 0x10(%rip)", {"rax", "rbx", "rcx", "rdx"}),
    ("lock cmpxchg %esi,0x10(%rip)", {"rax", "rsi"}),
    ("lock xadd %rdi,0x10(%rip)", {"rdi"}),
    ("divl 0x10(%rip)", {"rax", "rdx"}),
    ("mulq 0x10(%rip)", {"rax", "rdx"}),
    ("shll %cl,0x10(%rip)", {"rcx"}),
    ("mulx 0x10(%rip),%esi,%edi", {"rdx", "rsi", "rdi"}),
    ("andn 0x10(%rip),%esi,%ebx", {"rsi", "rbx"}),  # VEX.vvvv names %esi
    ("shlx %esi,0x10(%rip),%edi", {"rsi", "rdi"}),
    ("pcmpestri $1,0x10(%rip),%xmm1", {"rax", "rcx", "rdx"}),
    ("pcmpistrm $1,0x10(%rip),%xmm1", set()),
    ("lea 0x10(%rip),%rsi", {"rsi"}),  # emulated, but its fallback copy is rewritten too
    ("mov %fs:0x10(%rip),%rax", {"rax"}),
    ("prefetcht0 0x10(%rip)", set()),
    ("fldt 0x10(%rip)", set()),
    ("addr32 mov 0x10(%eip),%eax", {"rax"}),
]


def _operands(instruction: Instruction) -> list[tuple]:
    described = []
    for i in range(instruction.op_count):
        kind = instruction.op_kind(i)
        if kind == OpKind.REGISTER:
            described.append((kind, instruction.op_register(i)))
        elif kind == OpKind.MEMORY:
            described.append((kind, instruction.memory_size, instruction.memory_index, instruction.memory_segment))
        elif kind in (OpKind.NEAR_BRANCH64, OpKind.NEAR_BRANCH32, OpKind.NEAR_BRANCH16):
            described.append((kind,))
        else:
            described.append((kind, instruction.immediate(i)))
    return described


@pytest.mark.parametrize("source, architectural", RIP_RELATIVE, ids=[case[0] for case in RIP_RELATIVE])
def test_rip_relative_operand_is_rewritten_to_a_free_scratch_register(source, architectural):
    raw = assemble(source)
    original = decode(raw, ADDRESS)
    plan = plan_for(raw)
    eip = original.memory_base == Register.EIP
    mask = MASK32 if eip else MASK64
    assert plan.scratch not in architectural | used_gprs(original) | {"rsp"}
    scratch_64, scratch_32 = SCRATCH_REGISTERS[plan.scratch]
    for slot in SLOTS:
        rewritten = decode(plan.slot_code, slot)
        assert rewritten.len == len(plan.slot_code)
        assert not rewritten.is_ip_rel_memory_operand
        assert rewritten.memory_base == (scratch_32 if eip else scratch_64)
        assert (ADDRESS + plan.length + rewritten.memory_displacement) & mask == original.ip_rel_memory_address
        assert rewritten.code == original.code
        assert _operands(rewritten) == _operands(original)
        assert (rewritten.has_lock_prefix, rewritten.segment_prefix, rewritten.op_mask, rewritten.is_broadcast) == \
            (original.has_lock_prefix, original.segment_prefix, original.op_mask, original.is_broadcast)


@pytest.mark.parametrize("source", [case[0] for case in RIP_RELATIVE])
def test_rip_relative_step_restores_every_register_exactly(source):
    plan = plan_for(source)
    flow = decode(assemble(source), ADDRESS).flow_control
    for slot in SLOTS:
        memory = stack()
        regs, before = make_regs(), vars(make_regs())
        saved = plan.prepare_step(regs, slot)
        assert saved == {plan.scratch: before[plan.scratch]}
        assert vars(regs) == before | {"rip": slot, plan.scratch: ADDRESS + plan.length}
        expected = before | {"rip": ADDRESS + plan.length}
        if flow == FlowControl.NEXT:
            regs.rip = slot + len(plan.slot_code)
        else:  # an indirect jmp or call went to the address it read
            regs.rip = expected["rip"] = 0x4242
        if flow == FlowControl.INDIRECT_CALL:
            regs.rsp -= 8
            memory.write(regs.rsp, (slot + len(plan.slot_code)).to_bytes(8, "little"))
            expected["rsp"] = STACK_TOP - 8
        plan.finish_step(regs, slot, saved, memory)
        assert vars(regs) == expected
        if flow == FlowControl.INDIRECT_CALL:
            assert memory.u64(STACK_TOP - 8) == ADDRESS + plan.length

        regs = make_regs()
        saved = plan.prepare_step(regs, slot)
        plan.abort_step(regs, saved)
        assert vars(regs) == before | {"rip": ADDRESS}


def test_scratch_prefers_rsi_then_rdi_then_rbx():
    assert plan_for("mov 0x10(%rip),%eax").scratch == "rsi"
    assert plan_for("mov 0x10(%rip),%esi").scratch == "rdi"
    assert plan_for("mulx 0x10(%rip),%esi,%edi").scratch == "rbx"
    assert plan_for("lock cmpxchg16b 0x10(%rip)").scratch == "rsi"


# -- step fixups ----------------------------------------------------------------------------------------------

def _step(plan: Plan, slot: int, rip: int, memory: FakeMemory | None = None, **changes: int) -> SimpleNamespace:
    """Prepare a step at ``slot``, let the 'CPU' leave rip at ``rip`` (plus ``changes``), finish it."""
    regs = make_regs()
    saved = plan.prepare_step(regs, slot)
    regs.rip = rip
    for name, value in changes.items():
        setattr(regs, name, value)
    plan.finish_step(regs, slot, saved, memory or stack())
    return regs


def test_ordinary_instruction_resumes_after_the_original():
    plan = plan_for("add %eax,%ebx")
    for slot in SLOTS:
        assert vars(_step(plan, slot, slot + plan.length)) == vars(make_regs()) | {"rip": ADDRESS + plan.length}


def test_ordinary_instruction_that_did_not_reach_the_slot_end_is_an_error():
    plan = plan_for("add %eax,%ebx")
    with pytest.raises(ValueError, match="not the slot's end"):
        _step(plan, SLOTS[0], SLOTS[0])


def test_rep_string_instruction_with_iterations_left_goes_back_to_the_probe():
    plan = plan_for("rep movsb")
    slot = SLOTS[0]
    assert _step(plan, slot, slot).rip == ADDRESS
    assert _step(plan, slot, slot + plan.length).rip == ADDRESS + plan.length
    for not_repeating in ("movsb", ".byte 0xf3, 0x01, 0xc3"):  # the second: rep add %eax,%ebx
        with pytest.raises(ValueError):
            _step(plan_for(not_repeating), slot, slot)


@pytest.mark.parametrize("hex_code", ["e210", "e1f0", "e010", "e310", "67e310", "7410", "0f8c00f0ffff"])
def test_stepped_loop_jrcxz_and_jcc_relocate_taken_or_not(hex_code):
    code = bytes.fromhex(hex_code)
    plan = plan_for(code)
    displacement = decode(code, ADDRESS).near_branch_target - (ADDRESS + len(code))
    assert plan.slot_code == code
    for slot in SLOTS:
        assert _step(plan, slot, slot + len(code)).rip == ADDRESS + len(code)
        taken = (slot + len(code) + displacement) & MASK64
        assert _step(plan, slot, taken).rip == ADDRESS + len(code) + displacement


@pytest.mark.parametrize("hex_code", ["eb10", "e900f0ffff"])
def test_stepped_relative_jmp_copy_falls_through_and_rip_becomes_the_target(hex_code):
    code = bytes.fromhex(hex_code)
    plan = plan_for(code)
    for slot in SLOTS:
        assert decode(plan.slot_code, slot).near_branch_target == slot + len(code)
        assert _step(plan, slot, slot + len(code)).rip == decode(code, ADDRESS).near_branch_target


@pytest.mark.parametrize("source", ["call *%rax", "call *8(%rbx)", "notrack call *(%rax,%rcx,8)"])
def test_indirect_call_return_address_is_rewritten(source):
    plan = plan_for(source)
    assert plan.kind == "step"
    for slot in SLOTS:
        memory = stack()
        memory.write(STACK_TOP - 8, (slot + len(plan.slot_code)).to_bytes(8, "little"))
        regs = _step(plan, slot, 0x4242, memory, rsp=STACK_TOP - 8)
        assert vars(regs) == vars(make_regs()) | {"rip": 0x4242, "rsp": STACK_TOP - 8}
        assert memory.u64(STACK_TOP - 8) == ADDRESS + plan.length


@pytest.mark.parametrize("source", ["ret", "ret $8", "repz ret", "bnd ret", "jmp *%rax", "notrack jmp *(%rax,%rbx,8)"])
def test_ret_and_indirect_jmp_leave_rip_alone(source):
    plan = plan_for(source)
    for slot in SLOTS:
        memory = stack()
        before = memory.snapshot()
        assert _step(plan, slot, 0x4242, memory).rip == 0x4242
        assert memory.snapshot() == before


@pytest.mark.parametrize("source, width", [("pushf", 8), (".byte 0x66, 0x9c", 2)])
def test_pushf_word_loses_the_trap_flag_the_step_set(source, width):
    plan = plan_for(source)
    for own_tf in (0, TF):
        memory = stack()
        pushed = 0x246 | TF  # what the CPU pushed while single-stepping
        memory.write(STACK_TOP - width, pushed.to_bytes(width, "little"))
        regs = _step(plan, SLOTS[0], SLOTS[0] + plan.length, memory, rsp=STACK_TOP - width, eflags=0x246 | own_tf)
        assert regs.rip == ADDRESS + plan.length
        word = int.from_bytes(memory.read(STACK_TOP - width, width), "little")
        assert word == 0x246 | own_tf  # the program's own TF survives


def test_popf_needs_no_fixup():
    plan = plan_for("popf")
    memory = stack()
    before = memory.snapshot()
    assert _step(plan, SLOTS[0], SLOTS[0] + 1, memory).rip == ADDRESS + 1
    assert memory.snapshot() == before


# -- real code ------------------------------------------------------------------------------------------------

def _census(path: str) -> tuple[Counter, Counter, int]:
    """(kinds of every instruction, kinds of function-entry instructions, number of instructions)."""
    obj = ElfObject.open(path)
    text = obj.section(".text")
    everything, entries = Counter(), Counter()
    starts = {}
    for symbol in obj.symbols.functions:
        if text.addr <= symbol.value < text.addr + text.size and symbol.size:
            starts[symbol.value] = max(symbol.size, starts.get(symbol.value, 0))
    for start, size in starts.items():
        code = obj.read(start, size + 15)
        offset = 0
        while offset < size:
            try:
                plan = analyze(code[offset:offset + 15], start + offset)
                kind, length = plan.kind, plan.length
            except UnprobeableInstruction:
                kind, length = "refused", max(1, decode(code[offset:offset + 15], start + offset).len)
            everything[kind] += 1
            if offset == 0:  # a stepped entry whose copy jumps back by itself costs one stop, as an emulated one
                entries["boost" if kind != "emulate" and kind != "refused" and plan.boost_code else kind] += 1
            offset += length
    return everything, entries, len(starts)


def _readme_one_stop_shares() -> dict[str, float]:
    """The shares of function entries served with one stop that README.md gives for python3.11 and libc."""
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    match = re.search(r"counts (\d+)% of python3\.11's and (\d+)% of libc's function entries as one stop", readme)
    assert match, "README.md no longer gives the one-stop shares"
    return {PYTHON: int(match[1]) / 100, LIBC: int(match[2]) / 100}


# Debian builds start functions with pushes of callee-saved registers (emulated), not endbr64; most other entries
# are loads, compares and tests, whose copies jump back by themselves (boosted): one stop either way.
@pytest.mark.parametrize("path", [PYTHON, LIBC])
def test_every_instruction_of_every_function_is_planned_or_refused(path):
    """Every instruction is planned or refused, and the share of function entries served with one stop
    (emulated or boosted) is at least what README.md says it is (bench/onestop.py's figures)."""
    if not os.path.exists(path):
        pytest.skip(f"{path} is not installed")
    everything, entries, functions = _census(path)
    print(f"\n{path}: {functions} functions; entries {dict(entries)}; all instructions {dict(everything)}")
    assert sum(entries.values()) == functions
    assert (entries["emulate"] + entries["boost"]) / functions >= _readme_one_stop_shares()[path]


@pytest.mark.parametrize("code, boosted", [
    (b"\x83\xe6\x07", True),  # and $7,%esi: runs anywhere, falls through
    (b"\xf0\x48\x0f\xc1\x07", True),  # lock xadd %rax,(%rdi)
    (b"\x48\x8b\x05\x10\x00\x00\x00", False),  # mov 0x10(%rip),%rax: its scratch register must be put back
    (b"\xff\xd0", False),  # call *%rax: the pushed return address must be fixed
    (b"\xf3\xa4", False),  # rep movsb: may stop with iterations left
    (b"\x74\x05", False),  # je: emulated, no slot at all
])
def test_boosted_instructions_jump_back_to_the_next_one_by_themselves(code, boosted):
    address = 0x401000
    plan = analyze(code + b"\x90" * 15, address)
    if not boosted:
        assert plan.boost_code is None
        return
    back = (address + plan.length).to_bytes(8, "little")
    assert plan.boost_code == plan.slot_code + b"\xff\x25\x00\x00\x00\x00" + back  # jmp *0(%rip); .quad next
    assert plan.slot_code == code

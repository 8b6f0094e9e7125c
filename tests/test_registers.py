"""The register table and the ABI facts, checked against their sources: <sys/user.h> and <asm/ptrace.h> through
gcc, operand names through GNU as and iced, the restart rule through threads the kernel really interrupted."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from pathlib import Path

import pytest
from iced_x86 import Decoder, Register, RegisterExt

from oracles import assemble
from uprobes.engines.ptrace.syscalls import (EVENT_STOP, WALL, Regs, ptrace_getregs, ptrace_interrupt, ptrace_seize)
from uprobes.errors import ProbeSyntaxError
from uprobes.probes.fetchargs import parse_fetcharg
from uprobes.x86_64.abi import (ERESTART_RESTARTBLOCK, ERESTARTNOHAND, ERESTARTNOINTR, ERESTARTSYS,
                                NR_RESTART_SYSCALL, RETURN_ADDRESS, SYSCALL_INSTRUCTION,
                                restart_interrupted_syscall)
from uprobes.x86_64.registers import BY_FIELD, FETCHARG_NAMES, GENERAL_REGISTERS, USER_REGS

MASK64 = (1 << 64) - 1
SUFFIXES = {8: "q", 4: "l", 2: "w", 1: "b"}
HIGH_BYTES = {Register.AH, Register.BH, Register.CH, Register.DH}


def offsets_from_gcc(tmp_path: Path, header: str, struct: str, fields: list[str]) -> tuple[int, dict[str, int]]:
    """sizeof(struct) and the offsetof() of each of ``fields``, as gcc lays the struct out."""
    lines = [f'printf("sizeof %zu\\n", sizeof(struct {struct}));']
    lines += [f'printf("{field} %zu\\n", offsetof(struct {struct}, {field}));' for field in fields]
    source, program = tmp_path / "offsets.c", tmp_path / "offsets"
    source.write_text(f"#include <stddef.h>\n#include <stdio.h>\n#include <{header}>\n"
                      f"int main(void) {{\n{chr(10).join(lines)}\nreturn 0;\n}}\n")
    subprocess.run(["gcc", "-o", str(program), str(source)], check=True)
    output = dict(line.split() for line in subprocess.run([str(program)], capture_output=True, text=True,
                                                          check=True).stdout.splitlines())
    return int(output.pop("sizeof")), {name: int(offset) for name, offset in output.items()}


# -- the table ------------------------------------------------------------------------------------------------

def test_regs_has_the_layout_of_user_regs_struct(tmp_path: Path) -> None:
    size, offsets = offsets_from_gcc(tmp_path, "sys/user.h", "user_regs_struct", [reg.field for reg in USER_REGS])
    assert ctypes.sizeof(Regs) == size
    assert {name: getattr(Regs, name).offset for name, _ in Regs._fields_} == offsets


def test_registers_with_a_kernel_name_are_exactly_the_fields_of_pt_regs(tmp_path: Path) -> None:
    # The uapi pt_regs spells its fields like user_regs_struct; the kernel's own names (ax, ip) index the same slots.
    named = [reg for reg in USER_REGS if reg.kernel is not None]
    size, offsets = offsets_from_gcc(tmp_path, "asm/ptrace.h", "pt_regs", [reg.field for reg in named])
    assert size == 8 * len(named)
    assert offsets == {reg.field: getattr(Regs, reg.field).offset for reg in named}


def test_every_operand_name_is_the_register_gnu_as_encodes() -> None:
    parts = [(reg, part) for reg in GENERAL_REGISTERS for part in reg.parts]
    code = assemble("\n".join(f"mov{SUFFIXES[part.size]} %{part.name}, %{part.name}" for _, part in parts))
    decoder = Decoder(64, code)
    for (reg, part), ins in zip(parts, decoder, strict=True):
        operand = ins.op0_register
        assert RegisterExt.full_register(operand) == getattr(Register, reg.field.upper()), part.name
        assert RegisterExt.size(operand) == part.size, part.name
        assert (operand in HIGH_BYTES) == (part.shift == 8), part.name


def test_sixteen_general_registers_each_once() -> None:
    assert sorted(reg.field for reg in GENERAL_REGISTERS) == sorted(
        ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *(f"r{n}" for n in range(8, 16))])
    assert {reg.field for reg in GENERAL_REGISTERS if any(part.shift for part in reg.parts)} == {
        "rax", "rbx", "rcx", "rdx"}


def test_fields_the_kernel_lacks_are_no_fetch_argument() -> None:
    for field in ("fs_base", "gs_base", "ds", "es", "fs", "gs", "orig_rax"):
        assert field not in FETCHARG_NAMES
        with pytest.raises(ProbeSyntaxError, match=f"unknown register '%{field}'"):
            parse_fetcharg(f"%{field}", 1, is_return=False)
    assert BY_FIELD["orig_rax"].kernel == "orig_ax"


# -- the ABI --------------------------------------------------------------------------------------------------

def regs(**values: int) -> Regs:
    result = Regs()
    for name, value in values.items():
        setattr(result, name, value & MASK64)
    return result


@pytest.mark.parametrize("error", [ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND])
def test_interrupted_call_is_run_again(error: int) -> None:
    state = regs(rax=-error, orig_rax=0, rip=0x401002, rdi=3)
    restart_interrupted_syscall(state)
    assert (state.rax, state.rip, state.orig_rax, state.rdi) == (0, 0x401000, 0, 3)


def test_call_with_a_restart_block_is_resumed_by_restart_syscall() -> None:
    state = regs(rax=-ERESTART_RESTARTBLOCK, orig_rax=230, rip=0x401002)
    restart_interrupted_syscall(state)
    assert (state.rax, state.rip, state.orig_rax) == (NR_RESTART_SYSCALL, 0x401000, 230)


@pytest.mark.parametrize("rax, orig_rax", [
    (-ERESTARTSYS, -1),  # not in a system call: rax is the program's own
    (-4, 0),  # EINTR: the program sees it
    (0, 0),  # the call completed
    (-515, 0),  # ERESTART_RESTARTBLOCK - 1 is no restart code
])
def test_other_states_are_left_alone(rax: int, orig_rax: int) -> None:
    state = regs(rax=rax, orig_rax=orig_rax, rip=0x401002)
    before = bytes(state)
    restart_interrupted_syscall(state)
    assert bytes(state) == before


def test_return_address_is_the_word_at_rsp() -> None:
    assert RETURN_ADDRESS.address(regs(rsp=0x7FFD_0000_1000)) == 0x7FFD_0000_1000
    assert RETURN_ADDRESS.size == 8


def wait_until_blocked_in(pid: int, number: int) -> None:
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/syscall").read_text().split()[0] != str(number):
        assert time.monotonic() < deadline, f"process {pid} never blocked in system call {number}"
        time.sleep(0.01)


@pytest.mark.parametrize("command, number, error", [
    (["cat"], 0, ERESTARTSYS),  # read() from an empty pipe
    (["sleep", "60"], 230, ERESTART_RESTARTBLOCK),  # clock_nanosleep()
])
def test_restart_rule_matches_a_call_the_kernel_interrupted(command: list[str], number: int, error: int) -> None:
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        wait_until_blocked_in(child.pid, number)
        ptrace_seize(child.pid, 0)
        ptrace_interrupt(child.pid)
        _, status = os.waitpid(child.pid, WALL)
        assert os.WIFSTOPPED(status) and status >> 16 == EVENT_STOP
        state = ptrace_getregs(child.pid)
        assert (state.orig_rax, state.rax) == (number, -error & MASK64)
        restart_interrupted_syscall(state)
        assert state.rax == (number if error != ERESTART_RESTARTBLOCK else NR_RESTART_SYSCALL)
        with open(f"/proc/{child.pid}/mem", "rb") as memory:
            assert os.pread(memory.fileno(), len(SYSCALL_INSTRUCTION), state.rip) == SYSCALL_INSTRUCTION
    finally:
        child.kill()
        child.wait()

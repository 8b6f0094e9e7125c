"""The DWARF expression stack machine (dwarf/expression.py), on expressions written as GCC writes them for
optimised variables, checked against the same arithmetic done by Python on the same register values."""

from __future__ import annotations

import pytest
from elftools.dwarf.dwarf_expr import DWARFExprParser
from elftools.dwarf.structs import DWARFStructs

from uprobes.dwarf.expression import evaluate, reads_memory, registers_used, unsupported

PARSER = DWARFExprParser(DWARFStructs(little_endian=True, dwarf_format=32, address_size=8))
MASK = (1 << 64) - 1


def _ops(*raw: int):
    return PARSER.parse_expr(list(raw))


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


@pytest.mark.parametrize("rbx, rbp", [(10, 3), (-7, 5), (0x7FFFFFFF, 2), (0x1_0000_0005, -1)])
def test_a_product_of_two_sign_extended_ints(rbx, rbp):
    # result = (long)p->x * scale at -O2: breg3 0; lit 32 shl; lit 32 shra; breg6 0; ... mul; stack_value
    ops = _ops(0x73, 0, 0x08, 32, 0x24, 0x08, 32, 0x26, 0x76, 0, 0x08, 32, 0x24, 0x08, 32, 0x26, 0x1E, 0x9F)
    registers = {3: rbx & MASK, 6: rbp & MASK}
    assert evaluate(ops, registers.get, {}.get) == (_signed32(rbx) * _signed32(rbp)) & MASK
    assert registers_used(ops) == [3, 6] and not reads_memory(ops) and unsupported(ops) is None


def test_memory_frame_base_and_stack_operations():
    memory = {0x7000: 0x1122334455667788}
    # fbreg -16; deref_size 4; dup; plus; lit1; swap; minus  => 1 - 2 * low32
    ops = _ops(0x91, 0x70, 0x94, 4, 0x12, 0x22, 0x31, 0x16, 0x1C)
    assert evaluate(ops, {}.get, memory.get, frame_base=0x7010) == (1 - 2 * 0x55667788) & MASK
    assert reads_memory(ops)
    assert evaluate(ops, {}.get, memory.get) is None  # no frame base given
    assert evaluate(_ops(0x73, 8, 0x06), {3: 0x6FF8}.get, memory.get) == memory[0x7000]
    assert evaluate(_ops(0x73, 8, 0x06), {3: 0x5000}.get, memory.get) is None  # memory not known


def test_division_comparison_and_what_it_does_not_take():
    assert evaluate(_ops(0x08, 7, 0x11, 0x7E, 0x1B), {}.get, {}.get) == -3 & MASK  # signed, toward zero as C
    assert evaluate(_ops(0x08, 7, 0x30, 0x1B), {}.get, {}.get) is None  # division by zero
    assert evaluate(_ops(0x11, 0x7F, 0x30, 0x2D), {}.get, {}.get) == 1  # -1 < 0, signed
    assert unsupported(_ops(0x50, 0x93, 8)) == "DW_OP_reg0"  # a register location inside a composite
    assert unsupported(_ops(0x9F, 0x30)) == "DW_OP_stack_value"  # stack_value ends an expression
    assert evaluate(_ops(0x73, 0), {}.get, {}.get) is None  # a register the caller does not know

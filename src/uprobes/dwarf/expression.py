"""The DWARF expression stack machine, for what the CFI and variable locations compute from registers and memory.

    >>> ops = DWARFExprParser(structs).parse_expr([0x73, 0x08, 0x06, 0x9f])  # DW_OP_breg3 8; DW_OP_deref; ...
    >>> evaluate(ops, {3: 0x1000}.get, {0x1008: 42}.get)
    42
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["evaluate", "unsupported", "registers_used", "reads_memory"]

_MASK = (1 << 64) - 1
_SIGN = 1 << 63


def _signed(value: int) -> int:
    return value - (1 << 64) if value & _SIGN else value


def _divide(a: int, b: int) -> int:
    quotient = abs(_signed(a)) // abs(_signed(b))
    return -quotient if (_signed(a) < 0) != (_signed(b) < 0) else quotient


_BINARY: dict[str, Callable[[int, int], int]] = {
    "DW_OP_and": lambda a, b: a & b, "DW_OP_or": lambda a, b: a | b, "DW_OP_xor": lambda a, b: a ^ b,
    "DW_OP_plus": lambda a, b: a + b, "DW_OP_minus": lambda a, b: a - b, "DW_OP_mul": lambda a, b: a * b,
    "DW_OP_shl": lambda a, b: a << b if b < 64 else 0, "DW_OP_shr": lambda a, b: a >> b,
    "DW_OP_shra": lambda a, b: _signed(a) >> min(b, 63),
    "DW_OP_div": _divide, "DW_OP_mod": lambda a, b: a % b,
    "DW_OP_ge": lambda a, b: int(_signed(a) >= _signed(b)), "DW_OP_gt": lambda a, b: int(_signed(a) > _signed(b)),
    "DW_OP_le": lambda a, b: int(_signed(a) <= _signed(b)), "DW_OP_lt": lambda a, b: int(_signed(a) < _signed(b)),
    "DW_OP_eq": lambda a, b: int(a == b), "DW_OP_ne": lambda a, b: int(a != b),
}
_UNARY: dict[str, Callable[[int], int]] = {
    "DW_OP_neg": lambda a: -a, "DW_OP_not": lambda a: ~a, "DW_OP_abs": lambda a: abs(_signed(a)),
}
_STACK = {"DW_OP_dup", "DW_OP_drop", "DW_OP_swap", "DW_OP_over", "DW_OP_pick", "DW_OP_rot"}
_OTHER = {"DW_OP_plus_uconst", "DW_OP_deref", "DW_OP_deref_size", "DW_OP_fbreg", "DW_OP_call_frame_cfa",
          "DW_OP_stack_value", "DW_OP_bregx", "DW_OP_nop"}


def _name_of(op) -> str:
    name = op.op_name
    if name.startswith("DW_OP_lit") or name.startswith("DW_OP_const"):
        return "DW_OP_const"
    if name.startswith("DW_OP_breg") and name != "DW_OP_bregx":
        return "DW_OP_breg"
    return name


def unsupported(operations: Sequence) -> str | None:
    """The first operation :func:`evaluate` does not take (or a misplaced ``DW_OP_stack_value``), or None."""
    for i, op in enumerate(operations):
        name = _name_of(op)
        if name == "DW_OP_stack_value" and i != len(operations) - 1:
            return name
        if name not in ("DW_OP_const", "DW_OP_breg") and name not in _BINARY and name not in _UNARY \
                and name not in _STACK and name not in _OTHER:
            return op.op_name
    return None


def registers_used(operations: Sequence) -> list[int]:
    """The DWARF numbers of the registers the expression reads (its frame base's aside)."""
    used = []
    for op in operations:
        name = _name_of(op)
        number = op.args[0] if op.op_name == "DW_OP_bregx" else int(op.op_name[10:]) if name == "DW_OP_breg" else None
        if number is not None and number not in used:
            used.append(number)
    return used


def reads_memory(operations: Sequence) -> bool:
    return any(op.op_name in ("DW_OP_deref", "DW_OP_deref_size") for op in operations)


def evaluate(operations: Sequence, register: Callable[[int], int | None], word: Callable[[int], int | None],
             push: int | None = None, frame_base: int | None = None) -> int | None:
    """The value an expression leaves on top of its stack (an address, or with ``DW_OP_stack_value`` the value
    itself); None where a register or memory it needs is unknown, or it does what we do not evaluate.
    ``register(n)`` reads DWARF register n, ``word(address)`` 8 bytes of memory; ``push`` starts the stack
    (the CFA, for CFI expressions); ``frame_base`` is what ``DW_OP_fbreg`` and ``DW_OP_call_frame_cfa`` add to."""
    values = [] if push is None else [push]
    try:
        for op in operations:
            name = _name_of(op)
            if name == "DW_OP_const":
                values.append(int(op.op_name[9:]) if op.op_name.startswith("DW_OP_lit") else op.args[0])
            elif name in ("DW_OP_breg", "DW_OP_bregx"):
                number, offset = (op.args[0], op.args[1]) if name == "DW_OP_bregx" else \
                    (int(op.op_name[10:]), op.args[0])
                base = register(number)
                if base is None:
                    return None
                values.append(base + offset)
            elif name in ("DW_OP_fbreg", "DW_OP_call_frame_cfa"):
                if frame_base is None:
                    return None
                values.append(frame_base + (op.args[0] if name == "DW_OP_fbreg" else 0))
            elif name == "DW_OP_plus_uconst":
                values.append(values.pop() + op.args[0])
            elif name in _BINARY:
                right, left = values.pop() & _MASK, values.pop() & _MASK
                if name in ("DW_OP_div", "DW_OP_mod") and right == 0:
                    return None
                values.append(_BINARY[name](left, right))
            elif name in _UNARY:
                values.append(_UNARY[name](values.pop() & _MASK))
            elif name in ("DW_OP_deref", "DW_OP_deref_size"):
                value = word(values.pop() & _MASK)
                if value is None:
                    return None
                size = op.args[0] if name == "DW_OP_deref_size" else 8
                values.append(value & ((1 << 8 * size) - 1))
            elif name in _STACK:
                _shuffle(name, op, values)
            elif name not in ("DW_OP_stack_value", "DW_OP_nop"):
                return None
        return values[-1] & _MASK
    except (IndexError, TypeError, ValueError):  # a damaged expression
        return None


def _shuffle(name: str, op, values: list[int]) -> None:
    if name == "DW_OP_dup":
        values.append(values[-1])
    elif name == "DW_OP_drop":
        values.pop()
    elif name == "DW_OP_swap":
        values[-1], values[-2] = values[-2], values[-1]
    elif name == "DW_OP_over":
        values.append(values[-2])
    elif name == "DW_OP_pick":
        values.append(values[-1 - op.args[0]])
    else:  # DW_OP_rot
        values[-1], values[-2], values[-3] = values[-2], values[-3], values[-1]

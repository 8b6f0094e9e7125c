"""Variables by name as fetch arguments: ``p->x``, ``s.inner.y``, ``arr[3]``, typed from DWARF.

A variable expression is translated, at one probe address, into the kernel's fetch-argument language
(``x=+0(%cx):s32``), as perf probe does, so both engines fetch it the way they fetch any argument. Where the
variable is at that address comes from its location list: a register, a frame-base offset (the CFA from the
object's CFI), an absolute address, a constant, or its value at the function's entry (known at the entry
only). What tracefs cannot express (a value the compiler computes from several registers, a float in an
``xmm`` register) is a one-line error saying so.

    >>> fetch = variable_fetcharg(info, 0x1339, "x=p->inner.y", 1)
    >>> fetch.text
    'x=+24(%cx):s32'
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from elftools.dwarf.die import DIE
from elftools.dwarf.dwarf_expr import DWARFExprParser
from elftools.dwarf.enums import ENUM_DW_ATE
from elftools.dwarf.locationlists import LocationExpr

from ..elf.objfile import ElfObject
from ..errors import ResolveError
from ..probes.computed import DwarfValue
from ..probes.fetchargs import MAX_ARRAY_LEN
from ..x86_64.registers import DWARF_REGISTERS
from .expression import unsupported
from .info import DebugInfo, Scope, Unit, die_name, origin_of
from .lines import line_points

__all__ = ["VariableFetch", "VariableInfo", "is_variable_expression", "variable_fetcharg", "retval_fetcharg",
           "variables_at", "variables_described", "describe_type", "member_offset"]

_EXPRESSION = re.compile(r"[A-Za-z_]\w*(?:->[A-Za-z_]\w*|\.[A-Za-z_]\w*|\[\d+\])*")
_ACCESS = re.compile(r"->([A-Za-z_]\w*)|\.([A-Za-z_]\w*)|\[(\d+)\]")
_QUALIFIERS = {"DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type", "DW_TAG_restrict_type",
               "DW_TAG_atomic_type"}
_SIGNED = {"DW_ATE_signed", "DW_ATE_signed_char"}
_UNSIGNED = {"DW_ATE_unsigned", "DW_ATE_unsigned_char", "DW_ATE_boolean", "DW_ATE_UTF"}
_MAX_ARRAY = 64
_REFERENCES = ("DW_TAG_reference_type", "DW_TAG_rvalue_reference_type")
_ENTRY_VALUE_OPS = ("DW_OP_entry_value", "DW_OP_GNU_entry_value")
_ENTRY_VALUE_CODES = (0xA3, 0xF3)
_UNPARSABLE = (KeyError, IndexError, ValueError, TypeError, AttributeError)  # pyelftools on operations it lacks
_ENCODINGS = {value: name for name, value in ENUM_DW_ATE.items()}
_XMM = range(17, 33)
_DW_OP_REG0 = 0x50


@dataclass(frozen=True)
class VariableFetch:
    """A variable expression as the fetch-argument text both engines take, and how to show what it fetches:
    ``retype`` is ``"f32"``/``"f64"`` (float bits), ``"sN"`` (a signed bitfield of N bits) or the enumerators
    as ``((value, name), ...)``."""

    text: str
    name: str
    retype: str | tuple[tuple[int, str], ...] | None = None
    frame_relative: bool = False  # kept in the frame for the whole function (-O0): set up by the prologue
    computed: DwarfValue | None = None  # the value ``\\0`` stands for in ``text`` (innermost), if computed


def is_variable_expression(body: str) -> bool:
    """Whether a fetch argument's source names a variable (``p->x``) rather than a register, a stack slot..."""
    return bool(_EXPRESSION.fullmatch(body)) and not re.fullmatch(r"arg\d+", body)


@dataclass
class _Place:
    """Where a value is: ``source`` is fetch-argument text; ``memory`` means the value is the memory there
    (``+8(%sp)``), else it is the source's value itself (``%di``, ``\\3``)."""

    source: str
    memory: bool
    die_type: DIE | None
    bits: tuple[int, int] | None = None  # (bit offset, bit size) of a bitfield
    dims: tuple[int | None, ...] | None = None  # of an array type indexed already: the dimensions left
    frame_relative: bool = False
    computed: DwarfValue | None = None  # what _COMPUTED in ``source`` stands for

    def shifted(self, offset: int) -> str:
        """The memory ``offset`` bytes further on."""
        match = re.fullmatch(r"([+-]\d+)\((.*)\)", self.source)
        if match:
            return _deref(int(match[1]) + offset, match[2])
        if self.source.startswith("@+"):
            return f"@+{int(self.source[2:], 0) + offset:#x}"
        raise ResolveError(f"cannot take a member of {self.source}")

    def value(self) -> str:
        """Fetch-argument text whose value is this place's value (for dereferencing a pointer)."""
        return self.source


_COMPUTED = "\\0"  # stands for the place's computed value in the text, until the text is parsed


def _deref(offset: int, inner: str) -> str:
    return f"{'+' if offset >= 0 else '-'}{abs(offset)}({inner})"


class _Context:
    """One probe address in one object: the scopes there, for naming errors and finding variables."""

    def __init__(self, info: DebugInfo, address: int, file_offset: int, text: str) -> None:
        self.info = info
        self.obj: ElfObject = info.obj
        self.address = address
        self.file_offset = file_offset
        self.text = text
        self.scopes = info.scopes_at(address)
        self.unit: Unit | None = info.unit_at(address)

    def where(self) -> str:
        line = self.line()
        return f"{self.obj.describe_address(self.address)}{f' ({line})' if line else ''}"

    def line(self) -> str | None:
        """``file:line`` of the code here: the first statement row at the address, else the last row before."""
        if self.unit is None:
            return None
        best = None
        for row in self.unit.rows:
            if row.end_sequence or row.address > self.address:
                continue
            if best is None or row.address > best.address or (row.address == best.address and row.is_stmt
                                                                and not best.is_stmt):
                best = row
        return f"{os.path.basename(best.file)}:{best.line}" if best else None

    def error(self, message: str) -> ResolveError:
        return ResolveError(f"bad fetch argument '{self.text}': {message}" if self.text else message)


@dataclass(frozen=True)
class VariableInfo:
    """A variable visible at a place, for listing: its C type, and where it is there (fetch-argument text:
    ``%di``, ``-20(%bp)`` for the memory at rbp-20, ``\\3`` for a constant) or, when it cannot be read, why."""

    name: str
    type: str
    kind: str  # parameter, local or global
    location: str | None
    note: str = ""
    frame_relative: bool = False
    available: bool = True  # the DWARF gives its value here, whether or not a fetch argument can read it


def variables_described(info: DebugInfo, address: int, file_offset: int) -> list[VariableInfo]:
    """Every variable visible at ``address``, with where it is there."""
    context = _Context(info, address, file_offset, "")
    described = []
    for die, scope in variables_at(info, address):
        name = die_name(die)
        kind = "parameter" if die.tag == "DW_TAG_formal_parameter" else "global" if scope is None else "local"
        try:
            place = _locate(context, die, scope, name)
        except ResolveError as exc:
            die_type = _declared_type(die)
            expression = info.unit(die.cu).location_at(die, address)
            available = bool(expression) and expression[0] not in _ENTRY_VALUE_CODES
            described.append(VariableInfo(name, describe_type(die_type), kind, None, str(exc), available=available))
            continue
        location = place.source if place.computed is None else f"%xmm{place.computed.xmm} (ptrace engine only)" \
            if place.computed.xmm is not None else \
            f"computed ({' '.join(op.op_name for op in place.computed.operations)}; ptrace engine only)"
        described.append(VariableInfo(name, describe_type(place.die_type), kind, location, "",
                                      place.frame_relative))
    return described


def variables_at(info: DebugInfo, address: int) -> list[tuple[DIE, Scope | None]]:
    """Every parameter and variable visible at ``address``, innermost scope first, then the unit's globals."""
    found = []
    seen = set()
    for scope in info.scopes_at(address):
        for die in scope.die.iter_children():
            if die.tag in ("DW_TAG_formal_parameter", "DW_TAG_variable"):
                name = die_name(die)
                if name and name not in seen:
                    seen.add(name)
                    found.append((die, scope))
    unit = info.unit_at(address)
    if unit is not None:
        for die in unit.top.iter_children():
            if die.tag == "DW_TAG_variable" and "DW_AT_location" in die.attributes:
                name = die_name(die)
                if name and name not in seen:
                    seen.add(name)
                    found.append((die, None))
    return found


def variable_fetcharg(info: DebugInfo, address: int, file_offset: int, token: str, position: int) -> VariableFetch:
    """``[NAME=]EXPR[:TYPE]`` at ``address`` as a fetch argument; :class:`ResolveError` naming what is missing."""
    name, equals, body = token.partition("=")
    if not equals:
        name, body = "", token
    expression, colon, wanted = body.partition(":")
    context = _Context(info, address, file_offset, token)
    if context.unit is None or not context.scopes:
        raise context.error(f"no DWARF describes the code at {context.where()} in {info.path}")
    first = re.match(r"[A-Za-z_]\w*", expression)[0]
    visible = variables_at(info, address)
    die, scope = next(((d, s) for d, s in visible if die_name(d) == first), (None, None))
    if die is None:
        names = ", ".join(die_name(d) for d, _ in visible[:12])
        raise context.error(f"no variable '{first}' at {context.where()}; there: {names}")
    place = _locate(context, die, scope, first)
    frame_relative = place.frame_relative
    place = _access(context, place, expression[len(first):], expression)
    default = re.sub(r"\W+", "_", expression.rstrip("]"))  # p->inner.y is p_inner_y, arr[3] arr_3
    fetch = _finish(context, place, name or default, wanted if colon else None, expression)
    return VariableFetch(fetch.text, fetch.name, fetch.retype, frame_relative, fetch.computed)


def retval_fetcharg(info: DebugInfo, function_address: int, token: str, position: int) -> VariableFetch | None:
    """``$retval`` typed by the DWARF return type of the function at ``function_address`` (``$retval:string``
    reads the string a ``char *`` points to); None where the DWARF does not say."""
    name, equals, body = token.partition("=")
    if not equals:
        name, body = "", token
    source, colon, wanted = body.partition(":")
    if source != "$retval" or (colon and wanted != "string"):
        return None
    scopes = [s for s in info.scopes_at(function_address) if s.kind == "function"]
    if not scopes or "DW_AT_type" not in scopes[0].origin.attributes:
        return None
    context = _Context(info, function_address, 0, token)
    return_type = scopes[0].origin.get_DIE_from_attribute("DW_AT_type")
    if _encoding(_strip(return_type)) in ("DW_ATE_float", "DW_ATE_complex_float"):  # returned in %xmm0
        place = _Place(_COMPUTED, False, return_type, computed=DwarfValue(bytes([_DW_OP_REG0 + 17]), None, "$retval"))
    else:
        place = _Place("$retval", False, return_type)
    try:
        return _finish(context, place, name or f"arg{position}", wanted if colon else None, "$retval")
    except ResolveError:
        if colon:
            raise
        return None  # a struct returned by value: left as the register's bits, as without DWARF


def _locate(context: _Context, die: DIE, scope: Scope | None, name: str) -> _Place:
    die_type = _declared_type(die)
    if "DW_AT_const_value" in die.attributes:
        value = die.attributes["DW_AT_const_value"].value
        if isinstance(value, int):
            return _Place(f"\\{value}", False, die_type)
    unit = context.info.unit(die.cu)
    expression = unit.location_at(die, context.address)
    if not expression:
        raise context.error(f"'{name}' is optimised out at {context.where()}{_lives(context, unit, die)}")
    return _place(context, expression, die_type, scope, name, unit, die)


def _declared_type(die: DIE) -> DIE | None:
    """A variable's type, from the DIE or from the one it is a copy of (an inlined parameter); None: void."""
    typed = die if "DW_AT_type" in die.attributes else origin_of(die)
    return typed.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in typed.attributes else None


_MOST_LINES_TRIED = 64  # the lines a hint checks, each placed as a probe would be


def _lives(context: _Context, unit: Unit, die: DIE) -> str:
    """Where the variable can be read: ``; it lives at lines 47, 48 of sourcevars.c`` (lines of the function
    probed whose every probe point is in its lifetime)."""
    ranges = [r for r in unit.lifetime(die) if r[1] - r[0] < 1 << 63]
    rows = {(row.file, row.line) for row in unit.rows
            if row.is_stmt and not row.end_sequence and any(low <= row.address < high for low, high in ranges)}
    if not rows:
        return "; it has no location anywhere (write it out: use it, or build with -O0)"
    decl_file = origin_of(die).attributes.get("DW_AT_decl_file")
    own = unit.file_name(decl_file.value) if decl_file is not None else None
    file = min({file for file, _ in rows}, key=lambda file: (file != own, file))
    here = [scope for scope in context.scopes if scope.kind != "block"]

    def readable(line: int) -> bool:
        points = line_points(context.info, file, line, context.text, within=here, missing_ok=True)
        return bool(points) and all(any(low <= point.address < high for low, high in ranges) for point in points)

    lines = [line for line in sorted(line for f, line in rows if f == file)[:_MOST_LINES_TRIED] if readable(line)]
    if not lines:
        return "; no line of this function has it at each of its probe points (probe an address, or build with -O0)"
    return f"; it lives at lines {', '.join(map(str, lines))} of {os.path.basename(file)} (probe one of those)"


def _place(context: _Context, expression: list[int], die_type: DIE | None, scope: Scope | None, name: str,
           unit: Unit, die: DIE) -> _Place:
    try:
        operations = unit.expressions.parse_expr(expression)
    except _UNPARSABLE:
        raise context.error(f"'{name}' is located at {context.where()} by a DWARF operation uprobes cannot read "
                            f"({expression[:1]}){_lives(context, unit, die)}") from None
    names = [op.op_name for op in operations]
    if len(names) == 2 and names[1] == "DW_OP_piece":
        operations = operations[:1]
        names = names[:1]
    first, op = operations[0], names[0]
    if len(names) == 1:
        if op.startswith("DW_OP_reg") or op == "DW_OP_regx":
            number = first.args[0] if op == "DW_OP_regx" else int(op[len("DW_OP_reg"):])
            if number in _XMM and op != "DW_OP_regx":  # a float: the ptrace engine reads it
                return _Place(_COMPUTED, False, die_type,
                              computed=DwarfValue(bytes(expression), None, f"'{name}' at {context.where()}"))
            return _Place(_register(context, number, name), False, die_type)
        if op.startswith("DW_OP_breg") or op == "DW_OP_bregx":
            number, offset = (first.args if op == "DW_OP_bregx" else (int(op[len("DW_OP_breg"):]), first.args[0]))
            return _Place(_deref(offset, _register(context, number, name)), True, die_type)
        if op == "DW_OP_fbreg":
            # A parameter kept in the frame for the whole function (unoptimised code) is stored there by the
            # prologue; an optimised one has a location list saying where it is before that.
            stored = die.tag == "DW_TAG_formal_parameter" and \
                isinstance(unit.location(die.attributes["DW_AT_location"], die), LocationExpr)
            return _Place(_frame_base(context, scope, first.args[0], name), True, die_type, frame_relative=stored)
        if op in ("DW_OP_addr", "DW_OP_addrx", "DW_OP_GNU_addr_index"):
            address = first.args[0] if op == "DW_OP_addr" else context.info.dwarf.get_addr(die.cu, first.args[0])
            return _Place(f"@+{address - (context.address - context.file_offset):#x}", True, die_type)
    if len(names) == 2 and names[1] == "DW_OP_stack_value":
        if op.startswith("DW_OP_lit"):
            return _Place(f"\\{int(op[len('DW_OP_lit'):])}", False, die_type)
        if op.startswith("DW_OP_const"):
            return _Place(f"\\{first.args[0]}", False, die_type)
        if op.startswith("DW_OP_breg") and first.args[-1] == 0:
            number = first.args[0] if op == "DW_OP_bregx" else int(op[len("DW_OP_breg"):])
            return _Place(_register(context, number, name), False, die_type)
        if op in _ENTRY_VALUE_OPS:
            inner = first.args[0]
            entry = scope.function.low if scope is not None else None
            if context.address == entry and len(inner) == 1 and inner[0].op_name.startswith("DW_OP_reg"):
                return _Place(_register(context, int(inner[0].op_name[len("DW_OP_reg"):]), name), False, die_type)
            raise context.error(f"'{name}' is optimised out at {context.where()}: only its value at the function's "
                                f"entry is known there{_lives(context, unit, die)}")
    missing = unsupported(operations)
    if missing is not None:
        raise context.error(f"'{name}' is computed at {context.where()} with {missing}, which uprobes does not "
                            f"evaluate{_lives(context, unit, die)}")
    frame_base = None
    if any(op in ("DW_OP_fbreg", "DW_OP_call_frame_cfa") for op in names):
        frame_base = _frame_base_rule(context, scope, name)
    computed = DwarfValue(bytes(expression), frame_base, f"'{name}' at {context.where()}")
    if names[-1] == "DW_OP_stack_value":
        return _Place(_COMPUTED, False, die_type, computed=computed)
    return _Place(_deref(0, _COMPUTED), True, die_type, computed=computed)  # the expression gives its address


def _register(context: _Context, number: int, name: str) -> str:
    if number in _XMM:
        raise context.error(f"'{name}' is in %xmm{number - 17} at {context.where()}, which fetch arguments cannot "
                            f"read; probe a line where it is in memory")
    register = DWARF_REGISTERS.get(number)
    if register is None or register.kernel is None:
        raise context.error(f"'{name}' is in DWARF register {number} at {context.where()}, which fetch arguments "
                            f"cannot read")
    return f"%{register.kernel}"


def _frame_base(context: _Context, scope: Scope | None, offset: int, name: str) -> str:
    """``DW_OP_fbreg offset`` as fetch-argument text: the function's frame base, usually the CFA from CFI."""
    register, base = _frame_base_rule(context, scope, name)
    return _deref(base + offset, _register(context, register, name))


def _frame_base_rule(context: _Context, scope: Scope | None, name: str) -> tuple[int, int]:
    """The function's frame base at the probe as (DWARF register, offset): usually the CFA, from the CFI."""
    function = scope.function.die if scope is not None else None
    unit = context.info.unit(function.cu) if function is not None else None
    expression = unit.location_at(function, context.address, "DW_AT_frame_base") if unit is not None else None
    if not expression:
        raise context.error(f"'{name}' is relative to a frame base its function does not give at {context.where()}")
    try:
        base = unit.expressions.parse_expr(expression)
    except _UNPARSABLE:
        raise context.error(f"'{name}' is relative to a frame base uprobes cannot read") from None
    op = base[0].op_name if len(base) == 1 else None
    if op == "DW_OP_call_frame_cfa":
        row = context.obj.unwind_table.row(context.address)
        if row is None or row.cfa_register is None:
            raise context.error(f"'{name}' is relative to the frame, and no CFI gives the frame at {context.where()}")
        return row.cfa_register, row.cfa_offset
    if op is not None and op.startswith("DW_OP_breg"):
        return int(op[len("DW_OP_breg"):]), base[0].args[0]
    if op is not None and op.startswith("DW_OP_reg"):
        return int(op[len("DW_OP_reg"):]), 0
    raise context.error(f"'{name}' is relative to a frame base given as {[o.op_name for o in base]}, which a fetch "
                        f"argument cannot express")


def _access(context: _Context, place: _Place, accessors: str, expression: str) -> _Place:
    """Apply ``->m``, ``.m`` and ``[N]`` in turn."""
    done = expression[:len(expression) - len(accessors)]
    for match in _ACCESS.finditer(accessors):
        if place.bits is not None:
            raise context.error(f"'{done}' is a bitfield; it has no members")
        die_type = _strip(place.die_type)
        if die_type is not None and die_type.tag in _REFERENCES:  # a C++ reference reads as what it refers to
            place = _Place(_deref(0, place.value()), True, _pointee(die_type), computed=place.computed)
            die_type = _strip(place.die_type)
        if match[1] is not None:  # ->member
            if die_type is None or die_type.tag != "DW_TAG_pointer_type":
                raise context.error(f"'{done}' is {describe_type(place.die_type)}, not a pointer: write {done}.{match[1]}")
            target = _pointee(die_type)
            place = _member(context, _Place(_deref(0, place.value()), True, target, computed=place.computed), match[1], done)
        elif match[2] is not None:  # .member
            if die_type is not None and die_type.tag == "DW_TAG_pointer_type":
                raise context.error(f"'{done}' is a pointer: write {done}->{match[2]}")
            place = _member(context, place, match[2], done)
        else:  # [index]
            index = int(match[3])
            if die_type is not None and die_type.tag == "DW_TAG_array_type":
                dims = place.dims if place.dims is not None else _subranges(die_type)
                element = die_type.get_DIE_from_attribute("DW_AT_type")
                if dims[0] is not None and index >= dims[0]:
                    raise context.error(f"'{done}' has {dims[0]} elements; [{index}] is past its end")
                if not place.memory:
                    raise context.error(f"'{done}' is not in memory at {context.where()}")
                stride = _size(element) * math.prod(d or 0 for d in dims[1:])
                inner = (die_type, tuple(dims[1:])) if len(dims) > 1 else (element, None)
                place = _Place(place.shifted(index * stride), True, inner[0], dims=inner[1], computed=place.computed)
            elif die_type is not None and die_type.tag == "DW_TAG_pointer_type":
                element = _pointee(die_type)
                place = _Place(_deref(index * _size(element), place.value()), True, element, computed=place.computed)
            else:
                raise context.error(f"'{done}' is {describe_type(place.die_type)}: only arrays and pointers take [N]")
        done += match[0]
    return place


def _member(context: _Context, place: _Place, member: str, done: str) -> _Place:
    struct = _strip(place.die_type)
    if struct is None or struct.tag not in ("DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_class_type"):
        raise context.error(f"'{done}' is {describe_type(place.die_type)}, which has no member '{member}'")
    if not place.memory:
        raise context.error(f"'{done}' is held in a register at {context.where()}; its members cannot be read there")
    found = _find_member(struct, member)
    if found is None:
        names = ", ".join(die_name(c) or "?" for c in struct.iter_children() if c.tag == "DW_TAG_member")
        raise context.error(f"{describe_type(place.die_type)} has no member '{member}'; it has {names}")
    die, offset = found
    attrs = die.attributes
    member_type = die.get_DIE_from_attribute("DW_AT_type")
    if "DW_AT_bit_size" in attrs:
        size = attrs["DW_AT_bit_size"].value
        if "DW_AT_data_bit_offset" in attrs:
            bit = 8 * offset + attrs["DW_AT_data_bit_offset"].value
        else:  # DWARF 2-4: DW_AT_bit_offset counts from the most significant bit of the container
            container = attrs.get("DW_AT_byte_size")
            container_bits = 8 * (container.value if container else _size(member_type))
            bit = 8 * offset + container_bits - attrs["DW_AT_bit_offset"].value - size
        return _Place(place.shifted(bit // 8), True, member_type, (bit % 8, size), computed=place.computed)
    return _Place(place.shifted(offset), True, member_type, computed=place.computed)


def _find_member(struct: DIE, name: str) -> tuple[DIE, int] | None:
    """The member ``name`` of ``struct`` and its byte offset, looking through anonymous structs and unions and
    base classes; a static member (a declaration, stored elsewhere) is not one."""
    for child in struct.iter_children():
        if child.tag not in ("DW_TAG_member", "DW_TAG_inheritance") or "DW_AT_declaration" in child.attributes:
            continue
        offset = _member_offset(child)
        if offset is None:
            continue
        if child.tag == "DW_TAG_member" and die_name(child) == name:
            return child, offset
        if (child.tag == "DW_TAG_inheritance" or die_name(child) is None) and "DW_AT_type" in child.attributes:
            inner = _find_member(_strip(child.get_DIE_from_attribute("DW_AT_type")), name)
            if inner is not None:
                return inner[0], offset + inner[1]
    return None


def member_offset(info: DebugInfo, structure: str, member: str) -> int | None:
    """The offset of ``member`` in the structure type called ``structure`` (the first unit that defines it at
    its top level), or None where no unit does."""
    for unit in info.units():
        for die in unit.cu.get_top_DIE().iter_children():
            if die.tag == "DW_TAG_structure_type" and die_name(die) == structure:
                found = _find_member(die, member)
                return found[1] if found else None
    return None


def _member_offset(member: DIE) -> int | None:
    """``DW_AT_data_member_location``: a constant, or (DWARF 2 and 3) ``DW_OP_plus_uconst N``; None if neither."""
    location = member.attributes.get("DW_AT_data_member_location")
    if location is None:
        return 0  # a union's members, and DWARF 5 bitfields (DW_AT_data_bit_offset)
    if isinstance(location.value, int):
        return location.value
    try:
        operations = DWARFExprParser(member.cu.structs).parse_expr(location.value)
    except _UNPARSABLE:
        return None
    if len(operations) == 1 and operations[0].op_name == "DW_OP_plus_uconst":
        return operations[0].args[0]
    return None


def _finish(context: _Context, place: _Place, name: str, wanted: str | None, expression: str) -> VariableFetch:
    """The fetch-argument text for ``place``, typed as the user asked or by its DWARF type."""
    die_type = _strip(place.die_type)
    retype = None
    if wanted == "string":
        if die_type is not None and die_type.tag == "DW_TAG_pointer_type":
            source, fetch_type = _deref(0, place.value()), "string"
        elif die_type is not None and die_type.tag == "DW_TAG_array_type" and place.memory:
            source, fetch_type = place.source, _char_array(die_type, place)
        else:
            raise context.error(f"'{expression}' is {describe_type(place.die_type)}; ':string' reads what a char "
                                f"pointer or a char array holds")
    elif wanted is not None:
        source, fetch_type = place.source, wanted
    elif place.bits is not None:
        bit, size = place.bits
        container = next((c for c in (8, 16, 32, 64) if bit + size <= c), None)
        if container is None:
            raise context.error(f"'{expression}' is a {size}-bit bitfield at bit {bit} of its byte, which spans "
                                f"more than the 64 bits a fetch argument reads")
        source, fetch_type = place.source, f"b{size}@{bit}/{container}"
        if _encoding(die_type) in _SIGNED:
            retype = f"s{size}"
    else:
        source, fetch_type, retype = _natural(context, place, die_type, expression)
    text = f"{name}={source}:{fetch_type}" if fetch_type else f"{name}={source}"
    return VariableFetch(text, name, retype, computed=place.computed)


def _char_array(die_type: DIE, place: _Place) -> str:
    """A char array read as text: its N bytes up to the first NUL (``char[N]``); as a string, to its NUL, where
    its length is not known or past what a fetch argument's array holds."""
    dims = place.dims if place.dims is not None else _subranges(die_type)
    count = math.prod(dims) if dims and None not in dims else None
    return f"char[{count}]" if count and count <= MAX_ARRAY_LEN else "string"


def _natural(context: _Context, place: _Place, die_type: DIE | None, expression: str):
    if die_type is None:
        raise context.error(f"'{expression}' has no type in the DWARF (void); give one: {expression}:x64")
    tag = die_type.tag
    if tag in ("DW_TAG_pointer_type", "DW_TAG_reference_type", "DW_TAG_rvalue_reference_type",
               "DW_TAG_ptr_to_member_type"):
        return place.source, "x64", None
    if tag == "DW_TAG_base_type":
        size = _size(die_type)
        encoding = _encoding(die_type)
        if encoding == "DW_ATE_float":
            if size not in (4, 8):
                raise context.error(f"'{expression}' is a {size}-byte float, which fetch arguments cannot read")
            return place.source, f"x{size * 8}", f"f{size * 8}"
        if size not in (1, 2, 4, 8):
            raise context.error(f"'{expression}' is a {size}-byte number, which fetch arguments cannot read")
        return place.source, f"{'s' if encoding in _SIGNED else 'u'}{size * 8}", None
    if tag == "DW_TAG_enumeration_type":
        size = _size(die_type) or 4
        enumerators = tuple((child.attributes["DW_AT_const_value"].value, die_name(child))
                            for child in die_type.iter_children() if child.tag == "DW_TAG_enumerator")
        signed = any(value < 0 for value, _ in enumerators) or _encoding(_underlying(die_type)) in _SIGNED
        return place.source, f"{'s' if signed else 'u'}{size * 8}", enumerators
    if tag == "DW_TAG_array_type":
        element = _strip(die_type.get_DIE_from_attribute("DW_AT_type"))
        dims = place.dims if place.dims is not None else _subranges(die_type)
        count = math.prod(dims) if None not in dims else None
        if not place.memory:
            raise context.error(f"'{expression}' is an array not in memory at {context.where()}")
        if len(dims) == 1 and element is not None and element.tag == "DW_TAG_base_type" and _size(element) == 1 \
                and _encoding(element) in ("DW_ATE_signed_char", "DW_ATE_unsigned_char"):
            return place.source, _char_array(die_type, place), None
        if element is None or element.tag != "DW_TAG_base_type" or count is None:
            raise context.error(f"'{expression}' is {describe_type(die_type)}; name an element: {expression}[0]")
        if count > _MAX_ARRAY:
            raise context.error(f"'{expression}' has {count} elements, more than the {_MAX_ARRAY} a fetch argument "
                                f"reads; name an element: {expression}[0]")
        encoding = _encoding(element)
        prefix = "x" if encoding == "DW_ATE_float" else "s" if encoding in _SIGNED else "u"
        return place.source, f"{prefix}{_size(element) * 8}[{count}]", None
    raise context.error(f"'{expression}' is {describe_type(die_type)}; name a member ({expression}.x) or give a "
                        f"type ({expression}:x64)")


def _strip(die: DIE | None) -> DIE | None:
    """The type under typedefs and qualifiers."""
    seen = 0
    while die is not None and die.tag in _QUALIFIERS and seen < 32:
        die = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None
        seen += 1
    return die


def _pointee(pointer: DIE) -> DIE | None:
    return pointer.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in pointer.attributes else None


def _underlying(enum: DIE) -> DIE | None:
    return _strip(enum.get_DIE_from_attribute("DW_AT_type")) if "DW_AT_type" in enum.attributes else None


def _size(die: DIE | None) -> int:
    die = _strip(die)
    if die is None:
        return 0
    attr = die.attributes.get("DW_AT_byte_size")
    if attr is not None:
        return attr.value
    if die.tag == "DW_TAG_pointer_type":
        return 8
    if die.tag == "DW_TAG_array_type":
        return (_array_count(die) or 0) * _size(die.get_DIE_from_attribute("DW_AT_type"))
    return 0


def _encoding(die: DIE | None) -> str | None:
    attr = die.attributes.get("DW_AT_encoding") if die is not None else None
    if attr is None:
        return None
    return _ENCODINGS.get(attr.value)


def _subranges(array: DIE) -> list[int | None]:
    """An array type's dimensions, outermost first (None: not known, as ``int a[]``)."""
    dims: list[int | None] = []
    for child in array.iter_children():
        if child.tag == "DW_TAG_subrange_type":
            attrs = child.attributes
            if "DW_AT_count" in attrs and isinstance(attrs["DW_AT_count"].value, int):
                dims.append(attrs["DW_AT_count"].value)
            elif "DW_AT_upper_bound" in attrs and isinstance(attrs["DW_AT_upper_bound"].value, int):
                dims.append(attrs["DW_AT_upper_bound"].value + 1)
            else:
                dims.append(None)
    return dims or [None]


def _array_count(array: DIE) -> int | None:
    """How many elements an array type holds in all (every dimension multiplied); None if unknown."""
    dims = _subranges(array)
    return None if None in dims else math.prod(dims)


def describe_type(die: DIE | None) -> str:
    """A type as C writes it: ``struct point *``, ``const char *``, ``int[4]``, ``enum color``."""
    if die is None:
        return "void"
    tag = die.tag
    name = die_name(die)
    if tag == "DW_TAG_base_type" or tag == "DW_TAG_typedef":
        return name or "?"
    if tag in ("DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_enumeration_type", "DW_TAG_class_type"):
        keyword = {"DW_TAG_structure_type": "struct", "DW_TAG_union_type": "union",
                   "DW_TAG_enumeration_type": "enum", "DW_TAG_class_type": "class"}[tag]
        return f"{keyword} {name or '(anonymous)'}"
    inner = _pointee(die)
    if tag == "DW_TAG_pointer_type":
        return f"{describe_type(inner)} *"
    if tag == "DW_TAG_const_type":
        text = describe_type(inner)
        return text if text.startswith("const ") else f"const {text}"
    if tag == "DW_TAG_volatile_type":
        return f"volatile {describe_type(inner)}"
    if tag == "DW_TAG_array_type":
        return describe_type(inner) + "".join(f"[{'' if n is None else n}]" for n in _subranges(die))
    if tag == "DW_TAG_subroutine_type":
        return "function"
    return describe_type(inner) if inner is not None else tag.removeprefix("DW_TAG_")

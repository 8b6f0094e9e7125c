"""Evaluating fetch arguments at a hit, from a thread's registers and its process's memory.

An engine that sees the registers itself (the ptrace engine) calls :func:`evaluate` with them; the values
mean what the kernel's uprobe tracer would fetch for the same arguments. A bad pointer never raises: a string
read through it is ``None``, any other type reads as the kernel's does, zero (0, zeros, an empty ``char[N]``),
and either way the reason is given beside the value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from ..x86_64.registers import BY_KERNEL_NAME, DWARF_REGISTERS
from .computed import DwarfValue
from .fetchargs import (NULL_POINTER, STRING_LIMIT, Address, Comm, Deref, FetchArg, FileOffset, Immediate,
                        ImmediateString, Register, RetVal, StackPointer, StackSlot)
from .markerargs import MarkerOperand

__all__ = ["HitContext", "Memory", "evaluate"]

_MASK64 = (1 << 64) - 1
_INT_SIZES = {"8": 1, "16": 2, "32": 4, "64": 8}
_MEMORY_SOURCES = (Deref, Address, FileOffset)
_FXSAVE_XMM = 160  # where xmm0 starts in the FXSAVE area (struct user_fpregs_struct)


class Memory(Protocol):
    def read(self, address: int, size: int) -> bytes: ...
    def read_string(self, address: int, limit: int = STRING_LIMIT) -> bytes: ...


@dataclass
class HitContext:
    """What a fetch can see: registers (``struct user_regs_struct`` fields), memory, where the probe is."""

    regs: object
    memory: Memory
    probe_address: int  # runtime address of the probed instruction
    probe_offset: int  # its file offset (``@+FOFFS`` is relative to the same mapping)
    comm: str
    retval: int | None = None
    fpregs: Callable[[], bytes] | None = None  # the FXSAVE area (xmm0..15), read only when an argument needs it


class _Fault(Exception):
    pass


class _MemoryFault(_Fault):
    """A read of the process's memory failed (not a value that cannot be had at all, such as an xmm register
    out of reach)."""


class _Zeros:
    """Memory that reads as zeros everywhere: what the kernel's trace gives for a read that faults."""

    def read(self, address: int, size: int) -> bytes:
        return bytes(size)

    def read_string(self, address: int, limit: int = STRING_LIMIT) -> bytes:
        return b""


def evaluate(fetchargs: tuple[FetchArg, ...], hit: HitContext) -> tuple[dict, dict[str, str]]:
    """Values of ``fetchargs`` by name, and for each that could not be read, why. Where a memory read faults, a
    string is None and any other type its zero, as on the kernel engine (whose trace keeps no reason for it);
    a value that cannot be had at all is None."""
    values: dict = {}
    errors: dict[str, str] = {}
    for arg in fetchargs:
        try:
            values[arg.name] = _fetch(arg, hit)
        except _MemoryFault as fault:
            values[arg.name] = None if arg.type is not None and arg.type.is_string else \
                _fetch(arg, replace(hit, memory=_Zeros()))
            errors[arg.name] = str(fault)
        except _Fault as fault:
            values[arg.name] = None
            errors[arg.name] = str(fault)
    return values, errors


def _read(hit: HitContext, address: int, size: int) -> bytes:
    try:
        return hit.memory.read(address, size)
    except OSError:
        raise _MemoryFault(f"fault reading {size} bytes at {address:#x}") from None


def _address(source, hit: HitContext) -> int:
    """The address a memory source reads at."""
    if isinstance(source, Deref):
        return (_word(source.inner, hit) + source.offset) & _MASK64
    if isinstance(source, Address):
        return source.addr
    return (hit.probe_address - hit.probe_offset + source.offset) & _MASK64  # FileOffset


def _word(source, hit: HitContext) -> int:
    """The 64-bit value of a source, as the inside of a dereference uses it."""
    if isinstance(source, Register):
        return getattr(hit.regs, BY_KERNEL_NAME[source.name].field)  # fetch arguments name pt_regs fields
    if isinstance(source, Immediate):
        return source.value & _MASK64
    if isinstance(source, StackPointer):
        return hit.regs.rsp
    if isinstance(source, StackSlot):
        return int.from_bytes(_read(hit, hit.regs.rsp + 8 * source.n, 8), "little")
    if isinstance(source, RetVal):
        return (hit.retval or 0) & _MASK64
    if isinstance(source, _MEMORY_SOURCES):
        return int.from_bytes(_read(hit, _address(source, hit), 8), "little")
    if isinstance(source, MarkerOperand):
        return int.from_bytes(_operand_bytes(source, hit)[:8], "little")
    if isinstance(source, DwarfValue) and source.xmm is not None:
        return int.from_bytes(_xmm(hit, source.xmm)[:8], "little")
    if isinstance(source, DwarfValue):
        value = source.value(lambda number: _dwarf_register(hit, number),
                             lambda address: int.from_bytes(_read(hit, address, 8), "little"))
        if value is None:
            raise _Fault(f"{source.text}: its DWARF expression cannot be evaluated")
        return value
    raise _Fault(f"{source.format()} has no numeric value")


def _xmm(hit: HitContext, number: int) -> bytes:
    """The 16 bytes of %xmmN at the hit."""
    if hit.fpregs is None or number >= 16:
        raise _Fault(f"%xmm{number} cannot be read here")
    start = _FXSAVE_XMM + 16 * number
    return hit.fpregs()[start:start + 16]


def _dwarf_register(hit: HitContext, number: int) -> int | None:
    register = DWARF_REGISTERS.get(number)
    return getattr(hit.regs, register.field) if register is not None else None


def _operand_bytes(operand: MarkerOperand, hit: HitContext) -> bytes:
    """The value of a marker argument, ``arg.size`` bytes, decoded from its spec as the spec says."""
    arg = operand.arg
    if arg.kind == "reg":  # an xmm register: tracefs cannot read those
        return _xmm(hit, int(arg.reg[3:]))[:arg.size]
    address = arg.disp
    if operand.symbol_address is not None:
        address += operand.symbol_address + hit.probe_address - operand.site_address
    if arg.base not in (None, "rip"):
        address += getattr(hit.regs, arg.base)
    if arg.index is not None:
        address += getattr(hit.regs, arg.index) * arg.scale
    return _read(hit, address & _MASK64, arg.size)


def _fetch(arg: FetchArg, hit: HitContext):
    source, fetch_type = arg.source, arg.type
    name = fetch_type.name if fetch_type else ("string" if isinstance(source, (Comm, ImmediateString)) else "x64")
    if name in ("string", "ustring"):
        return _string(source, hit)
    if fetch_type is not None and fetch_type.array:
        size = _INT_SIZES.get(name.lstrip("usx"), 1)
        if isinstance(source, MarkerOperand):
            raw = _operand_bytes(source, hit)[:size * fetch_type.array]
        else:
            raw = _read(hit, _address(source, hit), size * fetch_type.array)
        if name == "char":  # text, as the kernel's trace gives it: up to the first NUL
            return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        return [_integer(raw[i:i + size], name) for i in range(0, len(raw), size)]
    size = 1 if name == "char" else _INT_SIZES[name.lstrip("usxb")] if name[0] in "usx" else 8
    if isinstance(source, _MEMORY_SOURCES):
        raw = _read(hit, _address(source, hit), size)
    elif isinstance(source, MarkerOperand):
        raw = _operand_bytes(source, hit)[:size].ljust(size, b"\0")
    else:
        raw = (_word(source, hit) & ((1 << 8 * size) - 1)).to_bytes(size, "little")
    if fetch_type is not None and fetch_type.bitfield:
        width, offset, _container = fetch_type.bitfield
        return (int.from_bytes(raw, "little") >> offset) & ((1 << width) - 1)
    return _integer(raw, name)


def _integer(raw: bytes, type_name: str):
    if type_name == "char":
        return raw.decode("latin-1")
    return int.from_bytes(raw, "little", signed=type_name.startswith("s"))


def _string(source, hit: HitContext) -> str:
    if isinstance(source, ImmediateString):
        return source.text
    if isinstance(source, Comm):
        return hit.comm
    address = source.value & _MASK64 if isinstance(source, Immediate) else _address(source, hit)
    if address == 0:
        raise _MemoryFault(NULL_POINTER)
    try:
        return hit.memory.read_string(address).decode("utf-8", "replace")
    except OSError:
        raise _MemoryFault(f"fault reading a string at {address:#x}") from None

"""What a record of a traced jump probe captures: the words its fetch arguments need, or why a trampoline
cannot take them (then the probe traps, and ``resolve`` says why).

Registers, the stack pointer, ``$stackN``, constants, ``$comm``, and the memory a USDT marker's own operands
name (the compiler put the values there, so it is mapped) are taken by the trampoline; a dereference, a
string or an array is read by it with ``process_vm_readv`` (a bad pointer is an error in the event, never a
fault), strings and arrays into the slots after the record's first; an ``%xmm`` register needs the thread
stopped.
"""

from __future__ import annotations

import collections
from dataclasses import replace

from ...probes.fetchargs import (Address, Comm, Deref, FetchArg, FileOffset, Immediate, ImmediateString, Register,
                                 RetVal, StackPointer, StackSlot, STRING_LIMIT)
from ...probes.computed import DwarfValue
from ...probes.markerargs import MarkerOperand
from ...probes.resolve import Probe
from ...proc.status import auxv
from ...x86_64.abi import RETURN_VALUE
from ...x86_64.registers import BY_KERNEL_NAME, DWARF_REGISTERS, GENERAL_REGISTERS
from ...x86_64.trampolines import (Capture, CaptureBytes, CaptureFaults, CaptureLoad, CaptureRead, CaptureRegister,
                                   area)

__all__ = ["HANDLER_WORDS", "REGISTERS", "WORDS", "arg_captures", "captures_for", "record_words", "records_possible",
           "register_arguments"]

WORDS = 12  # captured words a record holds
LINE_WORDS = 4  # ... where every probe of the run needs no more: a record is then one 64-byte cache line
HANDLER_WORDS = 28  # where a probe has a Python handler: every register, and what its arguments read
AREA_LIMIT = 64 << 10  # the bytes a record's strings and arrays may take (a string takes its longest)
_AT_HWCAP2, _HWCAP2_FSGSBASE = 26, 1 << 1
_CAPTURED = frozenset({reg.field for reg in GENERAL_REGISTERS} | {"rsp", "eflags"})
_NO_WORDS = (Immediate, ImmediateString, Comm)
# What a handler's Hit.regs holds from a record (with rip, the site's, and fs_base, the record's key)
REGISTERS = tuple(CaptureRegister(register.field) for register in GENERAL_REGISTERS) + (CaptureRegister("eflags"),)


def captures_for(probe: Probe, load_bias: int = 0, handled: bool = False) -> tuple[Capture, ...] | str:
    """The words a record of ``probe`` needs (``load_bias``: runtime minus link-time address of its object),
    or why its fetch arguments cannot be taken by a trampoline. A return probe's record holds its return value
    first; ``handled`` (a Python handler's), every register."""
    captures: list[Capture] = [CaptureRegister(RETURN_VALUE)] if probe.reports_retval else []
    for capture in REGISTERS if handled else ():
        _add(captures, capture)
    for arg in probe.fetchargs:
        why = arg_captures(arg, probe, load_bias, captures)
        if why:
            return f"{arg.name} {why}, which needs the thread stopped"
    words = HANDLER_WORDS if handled else WORDS
    if len(captures) > words:
        return f"its arguments need {len(captures)} words, more than the {words} a record holds"
    if area(tuple(captures)) > AREA_LIMIT:
        return f"its strings and arrays may take {area(tuple(captures)):,} bytes, more than the {AREA_LIMIT:,} " \
               f"a record holds"
    return tuple(captures)


def register_arguments(probe: Probe) -> dict[str, tuple[str, int, bool]]:
    """The integer arguments of ``probe`` read straight from a general register at the hit, as values events
    give them: name -> (register field, bits, signed)."""
    retyped = {name for name, _ in probe.retyped}
    found = {}
    for arg in probe.fetchargs:
        integer = arg.type.integer if arg.type is not None else None
        if not isinstance(arg.source, Register) or arg.name in retyped or integer is None:
            continue
        register = BY_KERNEL_NAME.get(arg.source.name)
        if register is not None and register.general:
            found[arg.name] = (register.field, *integer)
    return found


def record_words(probes: list[Probe], handled: frozenset[int]) -> int:
    """Words each record of a run of ``probes`` holds: every register where a probe has a Python handler (in
    ``handled``); otherwise one cache line's worth where every probe's arguments fit in it, with those of the
    probes at the same instruction. A record of one line costs a hit half the memory traffic of two."""
    if handled:
        return HANDLER_WORDS
    sites: dict[tuple, list[Capture]] = collections.defaultdict(list)
    for probe in probes:
        captures = captures_for(probe)
        if isinstance(captures, tuple):
            site = sites[probe.path, probe.offset, probe.replaces_return]
            site += [capture for capture in captures if capture not in site]
    return LINE_WORDS if all(len(site) <= LINE_WORDS for site in sites.values()) else WORDS


def arg_captures(arg: FetchArg, probe: Probe, load_bias: int, captures: list[Capture]) -> str | None:
    """Add what ``arg`` needs to ``captures`` (its value's word last), or say why a trampoline cannot."""
    source = arg.source
    if isinstance(source, _NO_WORDS) or (isinstance(source, Register) and source.name == "ip"):
        return None
    if arg.type is not None and arg.type.is_string:
        return _bytes(source, probe, load_bias, captures, STRING_LIMIT, string=True)
    if isinstance(source, StackPointer):
        return _add(captures, CaptureRegister("rsp"))
    if isinstance(source, RetVal):
        return _add(captures, CaptureRegister(RETURN_VALUE))
    if isinstance(source, Register):
        field_name = BY_KERNEL_NAME[source.name].field
        if field_name not in _CAPTURED:
            return f"reads %{source.name}"
        return _add(captures, CaptureRegister(field_name))
    if isinstance(source, StackSlot):
        _add(captures, CaptureRegister("rsp"))
        return _loads(captures, CaptureLoad("rsp", 8 * source.n, 8), 8)
    if isinstance(source, MarkerOperand):
        return _operand(source, load_bias, captures)
    if isinstance(source, DwarfValue):
        return _computed(source, captures)
    if isinstance(source, Deref) and source not in probe.marker_memory:
        if arg.type is not None and arg.type.array or arg.size > 8:
            return _bytes(source, probe, load_bias, captures, arg.size)
        read = _deref(source, arg.size, captures)
        return read if isinstance(read, str) else None
    if source not in probe.marker_memory:
        return "reads memory"
    if isinstance(source, Deref):  # the marker's disp(%reg): only a register inside
        base = BY_KERNEL_NAME[source.inner.name].field
        _add(captures, CaptureRegister(base))
        return _loads(captures, CaptureLoad(base, source.offset, 8), arg.size)
    return _loads(captures, CaptureLoad(None, _fixed_address(source, probe, load_bias), 8), arg.size)


def _fixed_address(source: Address | FileOffset, probe: Probe, load_bias: int) -> int:
    """Where ``@ADDR`` or ``@+FOFFS`` reads in the process (``load_bias``: of the probe's object)."""
    if isinstance(source, Address):
        return source.addr
    return probe.address - probe.offset + source.offset + load_bias


def _deref(source: Deref, size: int, captures: list[Capture]) -> CaptureRead | str:
    """``size`` bytes at a register or a dereference plus an offset, read by the trampoline with
    ``process_vm_readv`` (with a faults word), or why not."""
    if isinstance(source.inner, Register) and BY_KERNEL_NAME[source.inner.name].field in _CAPTURED:
        base = BY_KERNEL_NAME[source.inner.name].field
        _add(captures, CaptureRegister(base))
        read = CaptureRead(base, source.offset, size)
    elif isinstance(source.inner, Deref):
        inner = _deref(source.inner, 8, captures)
        if isinstance(inner, str):
            return inner
        read = CaptureRead(None, source.offset, size, inner)
    else:
        return "reads memory"
    _add(captures, CaptureFaults())
    _add(captures, read)
    return read


def _bytes(source, probe: Probe, load_bias: int, captures: list[Capture], size: int,
           string: bool = False) -> str | None:
    """``size`` bytes (``string``: up to a NUL) where ``source`` points, read into the record's slots after
    its first (:class:`CaptureBytes`), or why not."""
    if isinstance(source, Immediate):  # a string at a constant address
        capture = CaptureBytes(None, source.value, size, string=string)
    elif isinstance(source, (Address, FileOffset)):
        capture = CaptureBytes(None, _fixed_address(source, probe, load_bias), size, string=string)
    elif isinstance(source, Deref) and isinstance(source.inner, Register):
        base = BY_KERNEL_NAME[source.inner.name].field
        if base not in _CAPTURED:
            return f"reads memory at %{source.inner.name}"
        _add(captures, CaptureRegister(base))
        capture = CaptureBytes(base, source.offset, size, string=string)
    elif isinstance(source, Deref) and isinstance(source.inner, Deref):
        inner = _deref(source.inner, 8, captures)
        if isinstance(inner, str):
            return inner
        capture = CaptureBytes(None, source.offset, size, inner, string)
    else:
        return "reads a string" if string else "reads an array"
    _add(captures, capture)
    return None


def _operand(operand: MarkerOperand, load_bias: int, captures: list[Capture]) -> str | None:
    """A marker operand tracefs cannot express: ``arg.size`` bytes at base + index * scale + disp (+ the
    runtime address of its symbol), as :func:`uprobes.probes.evaluate.evaluate` reads them."""
    arg = operand.arg
    if arg.kind == "reg":
        return f"reads %{arg.reg}"
    disp = arg.disp
    if operand.symbol_address is not None:
        disp += operand.symbol_address + load_bias
    base = None if arg.base in (None, "rip") else arg.base
    for register in (base, arg.index):
        if register is not None:
            _add(captures, CaptureRegister(register))
    return _loads(captures, CaptureLoad(base, disp, 8, arg.index, arg.scale or 1), arg.size)


def _computed(value: DwarfValue, captures: list[Capture]) -> str | None:
    """A value a DWARF expression computes from registers: the registers, for the tracer to compute it from."""
    if value.xmm is not None:
        return f"reads %xmm{value.xmm}"
    if value.reads_memory:
        return f"{value.text} is computed from memory"
    for number in value.registers:
        register = DWARF_REGISTERS.get(number)
        if register is None or register.field not in _CAPTURED:
            return f"{value.text} is computed from DWARF register {number}"
        _add(captures, CaptureRegister(register.field))
    return None


def _loads(captures: list[Capture], first: CaptureLoad, size: int) -> None:
    """``size`` bytes from where ``first`` reads, in loads of 8, 4, 2 and 1 bytes."""
    at = 0
    while at < size:
        step = next(s for s in (8, 4, 2, 1) if s <= size - at)
        _add(captures, replace(first, disp=first.disp + at, size=step))
        at += step


def _add(captures: list[Capture], capture: Capture) -> None:
    if capture not in captures:
        captures.append(capture)


def records_possible(pid: int) -> str | None:
    """Why no thread of ``pid`` can record (a trampoline reads its key with ``rdfsbase``), or None."""
    hwcap2 = auxv(pid, _AT_HWCAP2)
    if hwcap2 is None or not hwcap2 & _HWCAP2_FSGSBASE:
        return "the kernel does not let programs read their fs base (FSGSBASE): traced probes trap"
    return None

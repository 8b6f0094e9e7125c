"""USDT marker arguments as fetch arguments: ``arg0..argN`` replaced by where each site keeps them.

A marker argument is a *value* (``8@%rbx`` is the value of rbx, ``-4@-20(%rbp)`` the int stored at
rbp-20). Typed ``string`` or as an array, the user means what that value points to, so the value is
dereferenced once more. What tracefs cannot express (an index register, an xmm register, a symbol in a
position-independent object addressed through a register) becomes a :class:`MarkerOperand`, which an
engine that reads the registers itself decodes exactly as the spec says; the kernel engine leaves those
arguments out and reports them, and the probe still attaches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..elf.objfile import ElfObject
from ..errors import ProbeSyntaxError
from ..sdt.arguments import SdtArgument
from ..sdt.notes import SdtSite
from ..x86_64.registers import BY_FIELD
from .computed import DwarfValue
from .fetchargs import (Address, Deref, FetchArg, FetchType, FileOffset, Immediate, ImmediateString, Register,
                        UsdtArg, parse_fetcharg, parse_fetchargs)

__all__ = ["MarkerFetch", "MarkerOperand", "marker_fetchargs", "kernel_limitation", "Unexpressible"]

_ARRAY_ELEMENT = {16: 2, 24: 3}  # struct-by-value arguments: read as u64[2] / u64[3]


class Unexpressible(Exception):
    """A marker argument that cannot be fetched at all, or not by tracefs; the message says why."""


@dataclass(frozen=True)
class MarkerOperand:
    """A marker argument's value where tracefs has no way to fetch it, decoded from the spec itself.

    ``symbol_address`` is the link-time address of the argument's symbol, ``site_address`` the marker's, so
    the load bias is the probe's runtime address minus ``site_address``.
    """

    arg: SdtArgument
    site_address: int
    symbol_address: int | None = None
    why_not_tracefs: str = ""

    def format(self) -> str:
        raise Unexpressible(self.why_not_tracefs)


@dataclass(frozen=True)
class MarkerFetch:
    """What one marker site fetches: the arguments, those left out (for every engine, and for the kernel's) with
    the reason, and those whose fetched bits mean another type than tracefs can give: ``(name, "f32")``."""

    fetchargs: tuple[FetchArg, ...]
    unavailable: tuple[str, ...]
    kernel_unavailable: tuple[str, ...]
    retyped: tuple[tuple[str, str], ...]
    memory: frozenset = frozenset()  # the memory sources the marker's own operands name: mapped at the site


def marker_fetchargs(site: SdtSite, tokens: tuple[str, ...], obj: ElfObject) -> MarkerFetch:
    """Fetch arguments for one site: the user's ``tokens`` with ``argN`` substituted, or every marker argument.

    An argument that cannot be fetched at all (an unparsable spec, an unknown symbol) is left out and reported.
    """
    values = [_value(arg, site, obj) for arg in site.args]
    if not tokens:
        tokens = tuple(f"arg{i}" for i in range(len(site.args)))
    parsed = parse_fetchargs(tokens, is_return=False, usdt_args=len(site.args))
    result, unavailable, kernel_unavailable, retyped = [], [], [], []
    for position, fetcharg in enumerate(parsed, 1):
        try:
            substituted = _substitute(fetcharg, values, site, position)
        except Unexpressible as exc:
            unavailable.append(f"{fetcharg.name}: {exc}")
            continue
        result.append(substituted)
        limitation = kernel_limitation(substituted)
        if limitation:
            kernel_unavailable.append(f"{fetcharg.name}: {limitation}")
        if isinstance(fetcharg.source, UsdtArg) and fetcharg.type is None:
            value_type = _value_type(site.args[fetcharg.source.index])
            if value_type:
                retyped.append((substituted.name, value_type))
    memory = frozenset(value[0] for value, arg in zip(values, site.args)
                       if arg.kind == "mem" and not isinstance(value, Unexpressible)
                       and not isinstance(value[0], MarkerOperand))
    return MarkerFetch(tuple(result), tuple(unavailable), tuple(kernel_unavailable), tuple(retyped), memory)


def _value_type(arg: SdtArgument) -> str | None:
    """The spec's type where tracefs has none: a float, or a signed high-byte register (bitfields are unsigned)."""
    if arg.is_float and arg.size in (4, 8):
        return f"f{arg.size * 8}"
    if arg.shift and arg.signed:
        return "s8"
    return None


def kernel_limitation(fetcharg: FetchArg) -> str | None:
    """Why tracefs cannot fetch ``fetcharg`` (a :class:`MarkerOperand` or a :class:`DwarfValue` inside it), or
    None when it can."""
    operand = _operand(fetcharg.source)
    return operand.why_not_tracefs if operand else None


def kernel_fetchable(fetchargs: tuple[FetchArg, ...]) -> tuple[FetchArg, ...]:
    """The fetch arguments tracefs is given: all but the marker operands only an engine can decode, and string
    constants, which a uprobe event reads as user memory at the kernel's address of the string (a fault, every
    hit): the kernel engine gives those itself."""
    return tuple(arg for arg in fetchargs if kernel_limitation(arg) is None and not isinstance(arg.source,
                                                                                              ImmediateString))


def _operand(source) -> MarkerOperand | DwarfValue | None:
    while isinstance(source, Deref):
        source = source.inner
    return source if isinstance(source, (MarkerOperand, DwarfValue)) else None


def _value(arg: SdtArgument, site: SdtSite, obj: ElfObject) -> tuple[object, FetchType] | Unexpressible:
    """Where the value of ``arg`` is, as a fetch source, and its natural type; or why it cannot be fetched."""
    try:
        return _source(arg, site, obj), _natural_type(arg)
    except Unexpressible as exc:
        return Unexpressible(f"{arg.text}: {exc}")


def _source(arg: SdtArgument, site: SdtSite, obj: ElfObject):
    if arg.kind == "invalid":
        raise Unexpressible(arg.error or "unparsable")
    if arg.kind == "const":
        return Immediate(arg.value)
    if arg.kind == "reg":
        if arg.reg.startswith("xmm"):
            return MarkerOperand(arg, site.address, why_not_tracefs=f"{arg.text}: tracefs cannot read %{arg.reg}")
        if arg.size > 8:
            raise Unexpressible(f"a {arg.size}-byte value cannot be held in a 64-bit register")
        return _register(arg.reg)
    symbol_address = None
    if arg.symbol is not None:
        symbols = obj.symbols.lookup(arg.symbol)
        if not symbols:
            raise Unexpressible(f"symbol '{arg.symbol}' is not in the symbol tables of {obj.path}")
        symbol_address = symbols[0].value
    if arg.base == "rip" and arg.symbol is None:
        raise Unexpressible("a %rip-relative operand without a symbol has no meaning at a marker")
    if arg.index is not None:
        return MarkerOperand(arg, site.address, symbol_address,
                             f"{arg.text}: tracefs cannot add an index register (base + index * scale)")
    if arg.symbol is not None:
        if arg.base not in (None, "rip"):  # sym(%reg): the symbol's address is a displacement
            if obj.kind != "exec":
                return MarkerOperand(arg, site.address, symbol_address,
                                     f"{arg.text}: tracefs cannot add the load address of a position-independent"
                                     f" object to a register")
            return Deref(symbols[0].value + arg.disp, _register(arg.base))
        # @+FOFFS is read at (probe address - probe file offset + FOFFS), i.e. mapped like the probe's code.
        return FileOffset(symbols[0].value + arg.disp - site.address + site.offset)
    if arg.base is None:
        return Address(arg.disp & (1 << 64) - 1)
    return Deref(arg.disp, _register(arg.base))


def _register(name: str) -> Register:
    reg = BY_FIELD.get(name)
    if reg is None or reg.kernel is None:
        raise Unexpressible(f"tracefs cannot read %{name}")
    return Register(reg.kernel)


def _natural_type(arg: SdtArgument) -> FetchType:
    if arg.shift:  # %ah and friends: bits 8..15 of the register
        return FetchType("u8", bitfield=(8, arg.shift, 64))
    if arg.size in _ARRAY_ELEMENT:
        return FetchType("u64", array=_ARRAY_ELEMENT[arg.size])
    prefix = "x" if arg.is_float else "s" if arg.signed else "u"
    return FetchType(f"{prefix}{arg.size * 8}")


def _substitute(fetcharg: FetchArg, values: list, site: SdtSite, position: int) -> FetchArg:
    source, fetch_type = fetcharg.source, fetcharg.type
    if isinstance(source, UsdtArg):
        value, natural = _lookup(values, source.index)
        if fetch_type is not None and natural.bitfield is not None:
            raise ProbeSyntaxError(f"bad fetch argument {fetcharg.name}: arg{source.index} of {site.qualified_name} "
                                   f"is a high-byte register ({site.args[source.index].text}), which tracefs reads "
                                   f"as a bitfield: give it no type")
        if fetch_type is None:
            source, fetch_type = value, natural
        elif fetch_type.is_string or fetch_type.array:
            source = _pointee(value)
        else:
            source = value
    else:
        source = _replace_usdt(source, values)
    if isinstance(source, Immediate) and fetch_type is not None and fetch_type.array:
        raise Unexpressible("an array of a constant cannot be fetched")
    if _operand(source) is not None:  # nothing for the kernel's grammar to check
        return replace(fetcharg, source=source, type=fetch_type)
    text = replace(fetcharg, source=source, type=fetch_type).format()
    try:
        return parse_fetcharg(text, position, is_return=False)
    except ProbeSyntaxError as exc:
        raise ProbeSyntaxError(f"at {site.qualified_name} ({site.address:#x}): {exc}") from None


def _lookup(values: list, index: int):
    value = values[index]
    if isinstance(value, Unexpressible):
        raise value
    return value


def _replace_usdt(source, values: list):
    if isinstance(source, UsdtArg):
        return _lookup(values, source.index)[0]
    if isinstance(source, Deref):
        return replace(source, inner=_replace_usdt(source.inner, values))
    return source


def _pointee(value):
    """The memory a value points to: ``+0(value)``, or ``@ADDR`` when the value is a constant."""
    if isinstance(value, Immediate):
        return Address(value.value & (1 << 64) - 1)
    return Deref(0, value)

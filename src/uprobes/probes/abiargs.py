"""Fetch arguments the probed function's ABI defines: ``$argN`` and ``$goid``, written as the kernel's own
fetch arguments before they are parsed (so both engines, and ``resolve``, see plain registers and memory).

- ``$argN`` (from 1): the Nth integer argument at a function's entry, in the register its ABI puts it: for C,
  ``%di %si %dx %cx %r8 %r9`` then the stack after the return address (``$stack1``...); for Go (ABIInternal,
  Go 1.17 on), the Nth integer word in ``%ax %bx %cx %di %si %r8 %r9 %r10 %r11`` (a string takes two words,
  a slice three; the tenth and later are on the stack, where their types say).
- ``$goid``: the running goroutine's id, read from the ``runtime.g`` that ``%r14`` holds in Go code, at the
  offset the program's DWARF gives its ``goid`` field.
"""

from __future__ import annotations

import re

from ..elf.objfile import ElfObject
from ..errors import ProbeSyntaxError, ResolveError
from ..x86_64.abi import GO_ARGUMENTS, GO_G_REGISTER, SYSV_ARGUMENTS
from ..x86_64.registers import BY_FIELD

__all__ = ["ABI_TOKEN", "abi_fetcharg"]

ABI_TOKEN = re.compile(r"\$(arg(\d+)|goid)\b")


def abi_fetcharg(token: str, obj: ElfObject, address: int, function_entry: bool, is_return: bool) -> str:
    """``token`` (``[NAME=]FETCHARG[:TYPE]``) with each ``$argN`` and ``$goid`` in it written as the registers
    and memory it stands for at link-time ``address`` of ``obj``, named after it unless named."""
    name, equals, body = token.partition("=")
    if not equals or not re.fullmatch(r"\w+", name):
        name, body = "", token
    source, colon, fetch_type = body.partition(":")
    whole = ABI_TOKEN.fullmatch(source)
    if whole and not name:
        name = whole[1]
    if whole and whole[1] == "goid" and not colon:
        colon, fetch_type = ":", "s64"
    written = ABI_TOKEN.sub(lambda found: _written(found, token, obj, address, function_entry, is_return), source)
    return f"{name}={written}{colon}{fetch_type}" if name else f"{written}{colon}{fetch_type}"


def _written(found: re.Match, token: str, obj: ElfObject, address: int, function_entry: bool,
             is_return: bool) -> str:
    function = obj.symbols.containing(address)
    if found[1] == "goid":
        if not obj.is_go or function is None or not _is_go_function(function.name):
            raise ProbeSyntaxError(f"bad fetch argument '{token}': $goid is the running goroutine's, read in Go "
                                   f"code, and {obj.describe_address(address)} is not in a Go function")
        return f"+{_goid_offset(obj)}(%{_kernel_name(GO_G_REGISTER)})"
    number = int(found[2])
    if is_return or not function_entry:
        raise ProbeSyntaxError(f"bad fetch argument '{token}': ${found[1]} is where the ABI puts it only at a "
                               f"function's entry (uprobe:PATH:FUNCTION), not "
                               f"{'at its return' if is_return else 'at ' + obj.describe_address(address)}")
    if number < 1:
        raise ProbeSyntaxError(f"bad fetch argument '{token}': arguments are numbered from $arg1")
    if obj.is_go and _is_go_function(function.name):
        if number > len(GO_ARGUMENTS):
            raise ProbeSyntaxError(f"bad fetch argument '{token}': Go passes the first {len(GO_ARGUMENTS)} integer "
                                   f"words in registers; where the others are depends on their types")
        return f"%{_kernel_name(GO_ARGUMENTS[number - 1])}"
    if obj.is_go and function.name.endswith(".abi0"):
        raise ProbeSyntaxError(f"bad fetch argument '{token}': {function.name} is Go assembly (ABI0), which "
                               f"takes its arguments on the stack; read them with $stackN")
    if number <= len(SYSV_ARGUMENTS):
        return f"%{_kernel_name(SYSV_ARGUMENTS[number - 1])}"
    return f"$stack{number - len(SYSV_ARGUMENTS)}"


def _is_go_function(name: str) -> bool:
    """Whether a function of a Go program is Go code (``pkg.Name``, ABIInternal), not C linked in by cgo (no
    package, or a name GCC gave a copy: ``work.constprop.0``, ``.isra.1``, ``.part.0``, ``.cold``) nor Go
    assembly (``.abi0``)."""
    return ("." in name and not name.endswith(".abi0") and not name.startswith(("_", "."))
            and not _C_COPY.search(name))


_C_COPY = re.compile(r"\.(constprop|isra|part|cold|lto_priv|localalias)(\.\d+)*$")


def _goid_offset(obj: ElfObject) -> int:
    from ..dwarf.info import DebugInfo
    from ..dwarf.variables import member_offset

    try:
        offset = member_offset(DebugInfo.of(obj), "runtime.g", "goid")
    except ResolveError as exc:
        raise ResolveError(f"$goid needs the program's DWARF, to find runtime.g's goid: {exc}") from None
    if offset is None:
        raise ResolveError(f"$goid: {obj.path}'s DWARF describes no runtime.g with a goid field")
    return offset


def _kernel_name(field: str) -> str:
    return BY_FIELD[field].kernel

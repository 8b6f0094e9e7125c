"""Fetch arguments of the kernel's uprobe tracer: ``[NAME=]FETCHARG[:TYPE]`` (x86-64).

These are the tokens after ``PATH:OFFSET`` in a ``uprobe_events`` line. Parsing applies the checks of the
kernel's ``traceprobe_parse_probe_arg()`` (kernel/trace/trace_probe.c), so a text that parses here is
accepted by the kernel, and :meth:`FetchArg.format` prints the form the kernel accepts.

Where the kernel silently truncates or ignores input, the parser refuses it instead: deref offsets outside
32 bits, ``$stackN`` past 32 bits, and text after a dereference's closing parenthesis.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from uprobes.errors import ProbeSyntaxError
from uprobes.x86_64.registers import FETCHARG_NAMES

__all__ = [
    "STRING_LIMIT",
    "NULL_POINTER",
    "MAX_TRACE_ARGS",
    "MAX_ARG_NAME_LEN",
    "MAX_ARGSTR_LEN",
    "MAX_ARRAY_LEN",
    "MAX_FETCH_OPS",
    "MAX_PROBE_EVENT_SIZE",
    "Register",
    "Address",
    "FileOffset",
    "StackSlot",
    "StackPointer",
    "RetVal",
    "Comm",
    "Immediate",
    "ImmediateString",
    "Deref",
    "UsdtArg",
    "FetchSource",
    "FetchType",
    "FetchArg",
    "parse_fetcharg",
    "parse_fetchargs",
]

# Limits from kernel/trace/trace_probe.h.
MAX_TRACE_ARGS = 128
MAX_ARG_NAME_LEN = 32
MAX_ARGSTR_LEN = 63  # length of FETCHARG[:TYPE], the text after "NAME="
MAX_ARRAY_LEN = 64
MAX_FETCH_OPS = 15  # FETCH_INSN_MAX (16) minus the END instruction
MAX_PROBE_EVENT_SIZE = 3072  # bytes of all arguments of one probe in a trace record

_U64_MAX = (1 << 64) - 1
_S64_MIN = -(1 << 63)
_S64_MAX = (1 << 63) - 1
_S32_MIN = -(1 << 31)
_S32_MAX = (1 << 31) - 1
_U32_MAX = (1 << 32) - 1

# probe_fetch_types[] in trace_probe.c: element size in bytes (strings are a u32 data_loc).
_TYPE_SIZES = {
    "u8": 1, "u16": 2, "u32": 4, "u64": 8,
    "s8": 1, "s16": 2, "s32": 4, "s64": 8,
    "x8": 1, "x16": 2, "x32": 4, "x64": 8,
    "char": 1, "string": 4, "ustring": 4,
}
_STRING_TYPES = frozenset({"string", "ustring"})
STRING_LIMIT = 4096  # the most bytes of a string a fetch reads (up to its NUL)
_KERNEL_ONLY_TYPES = {
    "symbol": "it prints kernel symbols",
    "symstr": "it prints kernel symbols",
    "%pd": "it prints kernel dentries",
    "%pD": "it prints kernel files",
}
NULL_POINTER = "NULL"  # why a string was not read: its pointer is NULL (text output prints it so)
_DEFAULT_TYPE = "x64"  # a fetch argument without a type, but for strings
_BITFIELD_CONTAINERS = {8: "u8", 16: "u16", 32: "u32", 64: "u64"}

# reserved_field_names[] in trace_probe.c: the record's own fields.
_RESERVED_NAMES = frozenset(
    {
        "common_type", "common_flags", "common_preempt_count", "common_pid", "common_tgid",
        "__probe_ip", "__probe_ret_ip", "__probe_func",
        "__comm", "__retval", "__probe", "__pad",  # what the kernel engine fetches with every hit
    }
)

_C_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Number syntax of the kernel's base-0 parsers: 0x hex, leading 0 octal, else decimal.
_C_UINT = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
_C_UINT_PART = r"(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)"
_BITFIELD = re.compile(rf"b({_C_UINT_PART})@({_C_UINT_PART})/(\+?{_C_UINT_PART})")
_DECIMAL = re.compile(r"[0-9]+")
_USDT_ARG = re.compile(r"arg(0|[1-9][0-9]*)")
# The line is split at blanks and cut at '#' (a comment) before the kernel parses arguments.
_FORBIDDEN_CHARS = frozenset(" \t\n\r\v\f#")


def _c_uint(text: str) -> int | None:
    """An unsigned number in C base-0 syntax, or None."""
    if not _C_UINT.fullmatch(text):
        return None
    if text[:2] in ("0x", "0X"):
        return int(text[2:], 16)
    return int(text, 8) if text.startswith("0") else int(text)


def _kstrtoul(text: str) -> int | None:
    """Like the kernel's kstrtoul(s, 0): optional '+', C syntax, 64 bits."""
    value = _c_uint(text[1:] if text.startswith("+") else text)
    return value if value is not None and value <= _U64_MAX else None


def _kstrtol(text: str) -> int | None:
    """Like the kernel's kstrtol(s, 0): optional '-' or '+', C syntax, signed 64 bits."""
    if text.startswith("-"):
        magnitude = _c_uint(text[1:])
        return -magnitude if magnitude is not None and magnitude <= -_S64_MIN else None
    value = _kstrtoul(text)
    return value if value is not None and value <= _S64_MAX else None


@dataclass(frozen=True)
class Register:
    """``%REG``: a pt_regs field, by its kernel name (``di``, ``r8``, ``flags`` ...)."""

    name: str

    def format(self) -> str:
        return f"%{self.name}"


@dataclass(frozen=True)
class Address:
    """``@ADDR``: the memory at an absolute user address."""

    addr: int

    def format(self) -> str:
        return f"@{self.addr:#x}"


@dataclass(frozen=True)
class FileOffset:
    """``@+FOFFS``: the memory at a file offset of the probed file, mapped like the probe's code."""

    offset: int

    def format(self) -> str:
        return f"@+{self.offset:#x}"


@dataclass(frozen=True)
class StackSlot:
    """``$stackN``: the N-th word above the stack pointer."""

    n: int

    def format(self) -> str:
        return f"$stack{self.n}"


@dataclass(frozen=True)
class StackPointer:
    """``$stack``: the stack pointer."""

    def format(self) -> str:
        return "$stack"


@dataclass(frozen=True)
class RetVal:
    """``$retval``: the return value (return probes only)."""

    def format(self) -> str:
        return "$retval"


@dataclass(frozen=True)
class Comm:
    """``$comm``: the current task's comm."""

    def format(self) -> str:
        return "$comm"


@dataclass(frozen=True)
class Immediate:
    """``\\IMM``: a constant (negative values are sign-extended by the kernel)."""

    value: int

    def format(self) -> str:
        return f"\\{self.value}"


@dataclass(frozen=True)
class ImmediateString:
    """``\\"STR"``: a constant string."""

    text: str

    def format(self) -> str:
        return f'\\"{self.text}"'


@dataclass(frozen=True)
class Deref:
    """``+|-[u]OFFS(FETCHARG)``: the memory at ``inner + offset``; ``user`` keeps the ``u`` marker."""

    offset: int
    inner: FetchSource
    user: bool = False

    def format(self) -> str:
        sign = "-" if self.offset < 0 else "+"
        return f"{sign}{'u' if self.user else ''}{abs(self.offset)}({self.inner.format()})"


@dataclass(frozen=True)
class UsdtArg:
    """``argN``: argument N (0-based) of a USDT marker, to be replaced by its location.

    The caller substitutes the marker's operand, then re-parses the formatted result so that the
    checks that depend on the operand (string on a register, nesting, length) apply.
    """

    index: int

    def format(self) -> str:
        raise ValueError(f"USDT argument arg{self.index} must be translated to its location before printing")


FetchSource = (
    Register | Address | FileOffset | StackSlot | StackPointer | RetVal | Comm | Immediate | ImmediateString
    | Deref | UsdtArg
)

_MEMORY_BASES = (Address, FileOffset)  # the kernel turns these into a load plus a dereference
_STRING_SOURCES = (Immediate, Comm, ImmediateString)  # string without a dereference: the value is the address


@dataclass(frozen=True)
class FetchType:
    """``:TYPE``: ``name`` is the kernel type (the storage type for a bitfield).

    ``bitfield`` is ``(width, offset, container_bits)``; ``array`` the element count of ``TYPE[N]``.
    """

    name: str
    bitfield: tuple[int, int, int] | None = None
    array: int | None = None

    @property
    def is_string(self) -> bool:
        return self.name in _STRING_TYPES

    @property
    def size(self) -> int:
        """Bytes this argument takes in a trace record."""
        return _TYPE_SIZES[self.name] * (self.array or 1)

    @property
    def integer(self) -> tuple[int, bool] | None:
        """The bits and sign of a plain integer type (``u``, ``s``, ``x``); None for the others (strings, chars,
        bitfields, arrays)."""
        if self.bitfield is not None or self.array is not None or self.name[0] not in "usx" \
                or not self.name[1:].isdigit():
            return None
        return _TYPE_SIZES[self.name] * 8, self.name[0] == "s"

    def format(self) -> str:
        base = self.name if self.bitfield is None else "b{}@{}/{}".format(*self.bitfield)
        return base if self.array is None else f"{base}[{self.array}]"


@dataclass(frozen=True)
class FetchArg:
    """One ``NAME=FETCHARG[:TYPE]``; ``type`` None means the kernel default (x64, or string for
    ``$comm`` and immediate strings)."""

    name: str
    # Printing always writes NAME=, so how the name came about is not part of the value.
    explicit_name: bool = field(compare=False)
    source: FetchSource
    type: FetchType | None

    @property
    def size(self) -> int:
        """Bytes this argument takes in a trace record."""
        return self.type.size if self.type is not None else _TYPE_SIZES[self.type_text]

    @property
    def type_text(self) -> str:
        """The type the kernel records it as: its own, or the default for its source."""
        if self.type is not None:
            return self.type.format()
        return "string" if isinstance(self.source, (Comm, ImmediateString)) else _DEFAULT_TYPE

    @property
    def reads_string_at_retval(self) -> bool:
        """``+0($retval):string``: the string a returned pointer points to."""
        return self.type is not None and self.type.is_string and self.source == Deref(0, RetVal())

    def body(self) -> str:
        """``FETCHARG[:TYPE]`` as the kernel accepts it."""
        text = self.source.format()
        return text if self.type is None else f"{text}:{self.type.format()}"

    def format(self) -> str:
        """``NAME=FETCHARG[:TYPE]`` as the kernel accepts it."""
        return f"{self.name}={self.body()}"


class _Parser:
    """Parses the body of one token; errors name the whole token."""

    def __init__(self, token: str, *, is_return: bool, usdt_args: int | None) -> None:
        self.token = token
        self.is_return = is_return
        self.usdt_args = usdt_args

    def error(self, reason: str) -> ProbeSyntaxError:
        return ProbeSyntaxError(f"bad fetch argument '{self.token}': {reason}")

    def parse_type(self, text: str) -> FetchType:
        array = None
        base = text
        if "[" in text:
            base, _, rest = text.partition("[")
            if "]" not in rest:
                raise self.error(f"array type '{text}' is not closed with ']'")
            count_text, _, suffix = rest.partition("]")
            if suffix:
                raise self.error(f"unexpected '{suffix}' after the array type '{base}[{count_text}]'")
            count = _kstrtoul(count_text)
            if count is None or count == 0 or count > _U32_MAX:
                raise self.error(f"bad array size '{count_text}' (use 1..{MAX_ARRAY_LEN})")
            if count > MAX_ARRAY_LEN:
                raise self.error(f"array size {count} is too big (the kernel allows at most {MAX_ARRAY_LEN})")
            array = count
        if base in _TYPE_SIZES:
            return FetchType(base, None, array)
        if base in _KERNEL_ONLY_TYPES:
            raise self.error(f"type '{base}' is for kernel probes only: {_KERNEL_ONLY_TYPES[base]}")
        match = _BITFIELD.fullmatch(base)
        if match is None:
            raise self.error(
                f"unknown type '{base}' (use u8..u64, s8..s64, x8..x64, char, string, ustring, "
                "b<width>@<offset>/<8|16|32|64> or TYPE[N])"
            )
        width, offset = _c_uint(match[1]), _c_uint(match[2])
        container = _kstrtoul(match[3])
        if container not in _BITFIELD_CONTAINERS:
            raise self.error(f"bitfield '{base}' needs a container of 8, 16, 32 or 64 bits")
        if width == 0 or width + offset > container:
            raise self.error(
                f"bitfield '{base}' does not fit: width must be at least 1 and width + offset "
                f"at most {container}"
            )
        return FetchType(_BITFIELD_CONTAINERS[container], (width, offset, container), array)

    def parse_source(self, text: str) -> FetchSource:
        parse = self._DISPATCH.get(text[:1], _Parser._parse_bare)
        return parse(self, text)

    def _parse_register(self, text: str) -> FetchSource:
        # Users also write architectural names (%rdi); the kernel only knows the pt_regs field names (%di).
        name = FETCHARG_NAMES.get(text[1:])
        if name is None:
            raise self.error(f"unknown register '{text}' (use %di, %si, ... or %rdi)")
        return Register(name)

    def _parse_at(self, text: str) -> FetchSource:
        rest = text[1:]
        if rest.startswith("+"):
            offset = _kstrtol(rest[1:])
            if offset is None:
                raise self.error(f"bad file offset '{text}' (use @+0x1234)")
            return FileOffset(offset)
        if rest[:1].isascii() and rest[:1].isdigit():
            addr = _c_uint(rest)
            if addr is None or addr > _U64_MAX:
                raise self.error(f"bad address '{text}' (use @0x7f0000001000)")
            return Address(addr)
        raise self.error(f"symbols are not available with uprobes ('{text}'); use @ADDR or @+FOFFS")

    def _parse_var(self, text: str) -> FetchSource:
        var = text[1:]
        if var == "retval":
            if not self.is_return:
                raise self.error("$retval is only available on return probes (r: or %return)")
            return RetVal()
        if var in ("comm", "COMM"):
            return Comm()
        if var == "stack":
            return StackPointer()
        if var.startswith("stack") and _DECIMAL.fullmatch(var[5:]):
            n = int(var[5:])
            if n > _U32_MAX:
                raise self.error(f"stack slot '{text}' is too big (at most {_U32_MAX})")
            return StackSlot(n)
        if var.startswith("arg"):
            raise self.error(
                f"'{text}' is for kernel probes only; a USDT marker argument is written argN, without '$'"
            )
        raise self.error(f"unknown variable '{text}' (use $stack, $stackN, $retval or $comm)")

    def _parse_deref(self, text: str) -> FetchSource:
        sign, rest = text[0], text[1:]
        user = rest.startswith("u")
        if user:
            rest = rest[1:]
        offset_text, brace, inner_text = rest.partition("(")
        if not brace:
            raise self.error(f"dereference '{text}' needs '(': write +OFFS(FETCHARG)")
        offset = _kstrtol(offset_text if sign == "+" else sign + offset_text)
        if offset is None:
            raise self.error(f"bad dereference offset '{sign}{offset_text}' in '{text}'")
        if not _S32_MIN <= offset <= _S32_MAX:
            raise self.error(f"dereference offset {offset} in '{text}' does not fit in 32 bits")
        close = inner_text.rfind(")")
        if close < 0:
            raise self.error(f"dereference '{text}' is not closed with ')'")
        if inner_text[close + 1 :]:
            raise self.error(f"unexpected '{inner_text[close + 1:]}' after the dereference '{text}'")
        inner_text = inner_text[:close]
        if not inner_text:
            raise self.error(f"dereference '{text}' has nothing to dereference")
        inner = self.parse_source(inner_text)
        if isinstance(inner, (Comm, ImmediateString)):
            raise self.error(f"'{inner_text}' can not be dereferenced")
        return Deref(offset, inner, user)

    def _parse_immediate(self, text: str) -> FetchSource:
        rest = text[1:]
        if rest.startswith('"'):
            content = rest[1:]
            if not content.endswith('"'):
                hint = " (':' starts the type, so a string can not contain it)" if ":" in self.token else ""
                raise self.error(f"immediate string '{text}' is not closed with '\"'{hint}")
            content = content[:-1]
            if not content.isprintable():
                raise self.error(f"immediate string '{text}' can not contain unprintable characters")
            return ImmediateString(content)
        value = None
        if rest[:1].isascii() and rest[:1].isdigit():
            value = _kstrtoul(rest)
        elif rest.startswith("-"):
            value = _kstrtol(rest)
        elif rest.startswith("+"):
            value = _kstrtol(rest[1:])
        if value is None:
            raise self.error(f"bad immediate value '{text}' (use \\123, \\-1 or \\0x7f)")
        return Immediate(value)

    def _parse_bare(self, text: str) -> FetchSource:
        match = _USDT_ARG.fullmatch(text)
        if match is None:
            raise self.error(
                f"unknown fetch argument '{text}' (use %REG, @ADDR, @+FOFFS, $stackN, $stack, $retval, "
                "$comm, \\IMM, \\\"STR\" or +OFFS(FETCHARG))"
            )
        if self.usdt_args is None:
            raise self.error(f"'{text}' names a USDT marker argument, but this is not a USDT probe")
        index = int(match[1])
        if index >= self.usdt_args:
            have = f"arguments arg0..arg{self.usdt_args - 1}" if self.usdt_args else "no arguments"
            raise self.error(f"'{text}' is out of range: the USDT marker has {have}")
        return UsdtArg(index)

    _DISPATCH: dict[str, Callable[[_Parser, str], FetchSource]] = {
        "%": _parse_register,
        "@": _parse_at,
        "$": _parse_var,
        "+": _parse_deref,
        "-": _parse_deref,
        "\\": _parse_immediate,
    }


def _base_and_depth(source: FetchSource) -> tuple[FetchSource, int]:
    depth = 0
    while isinstance(source, Deref):
        source, depth = source.inner, depth + 1
    return source, depth


def _has_usdt_arg(source: FetchSource) -> bool:
    return isinstance(_base_and_depth(source)[0], UsdtArg)


def _fetch_ops(source: FetchSource, ftype: FetchType | None) -> int:
    """Number of kernel fetch instructions, counted as traceprobe_parse_probe_arg_body() emits them."""
    base, depth = _base_and_depth(source)
    memory_base = isinstance(base, _MEMORY_BASES)
    ends_in_deref = depth > 0 or memory_base
    ops = (2 if memory_base else 1) + depth
    array = ftype is not None and ftype.array is not None
    is_string = isinstance(base, (Comm, ImmediateString)) or (ftype is not None and ftype.is_string)
    # A store reuses the last dereference, except a string array, which keeps the pointer.
    if not ends_in_deref or (is_string and array):
        ops += 1
    if ftype is not None and ftype.bitfield is not None:
        ops += 1
    if array:
        ops += 1
    return ops


def _check_name(parser: _Parser, name: str) -> None:
    if not name:
        raise parser.error("the argument name before '=' is empty")
    if len(name) > MAX_ARG_NAME_LEN:
        raise parser.error(f"argument name '{name}' is longer than {MAX_ARG_NAME_LEN} characters")
    if not _C_IDENT.fullmatch(name):
        raise parser.error(f"argument name '{name}' is not a C identifier")
    if name in _RESERVED_NAMES:
        raise parser.error(f"argument name '{name}' is reserved for the trace record's own fields")


def parse_fetcharg(token: str, position: int, *, is_return: bool, usdt_args: int | None = None) -> FetchArg:
    """Parse one ``[NAME=]FETCHARG[:TYPE]``; ``position`` is 1-based and names an unnamed argument
    ``arg<position>``, as the kernel does. ``usdt_args`` is the marker's argument count for a USDT probe.

    Names are checked for uniqueness, and sizes summed, by :func:`parse_fetchargs`.
    """
    if position < 1:
        raise ValueError(f"fetch argument positions start at 1, not {position}")
    parser = _Parser(token, is_return=is_return, usdt_args=usdt_args)
    bad = sorted(set(token) & _FORBIDDEN_CHARS)
    if bad:
        raise parser.error(f"blanks and '#' are not allowed in a fetch argument (found {', '.join(map(repr, bad))})")
    name, equals, body = token.partition("=")
    if equals:
        _check_name(parser, name)
    else:
        name, body = f"arg{position}", token
    if not body:
        raise parser.error("there is no fetch argument after '=' (if it was $retval, $comm or $stack, the shell "
                           "replaced it: quote the probe, 'uretprobe:libc:malloc ret=$retval')")

    source_text, colon, type_text = body.partition(":")
    if not source_text:
        raise parser.error("there is no fetch argument before ':'")
    source = parser.parse_source(source_text)
    ftype = parser.parse_type(type_text) if colon else None

    if isinstance(source, (Comm, ImmediateString)) and ftype is not None and (
        ftype.name != "string" or ftype.array is not None
    ):
        raise parser.error(f"'{source_text}' only takes the type 'string'")
    usdt = _has_usdt_arg(source)
    # Strings and arrays are read from memory: the kernel stores them from a dereference (or, for
    # strings, from an address given as a constant). A USDT operand is checked once translated.
    in_memory = isinstance(source, (Deref, *_MEMORY_BASES, UsdtArg))
    if ftype is not None and ftype.is_string and not (in_memory or isinstance(source, _STRING_SOURCES)):
        raise parser.error(
            f"type '{ftype.name}' needs a memory argument such as +0({source_text}), not '{source_text}'"
        )
    if ftype is not None and ftype.array is not None and not ftype.is_string:
        if isinstance(source, Deref) and source.user:
            # The kernel stores arrays only from a plain dereference; for uprobes 'u' changes nothing else.
            raise parser.error(
                f"an array can not be read through a 'u' dereference; drop the 'u' in '{source_text}'"
            )
        if not in_memory:
            raise parser.error(
                f"an array needs a memory argument such as +0({source_text}), not '{source_text}'"
            )
    ops = _fetch_ops(source, ftype)
    if ops > MAX_FETCH_OPS:
        raise parser.error(
            f"dereferences are nested too deeply: {ops} kernel fetch steps, at most {MAX_FETCH_OPS}"
        )

    if isinstance(source, UsdtArg) and not equals:  # a marker argument keeps its own name: arg0, arg1...
        name = f"arg{source.index}"
    arg = FetchArg(name=name, explicit_name=bool(equals), source=source, type=ftype)
    if not usdt and len(arg.body()) > MAX_ARGSTR_LEN:
        raise parser.error(
            f"'{arg.body()}' is longer than the kernel's {MAX_ARGSTR_LEN} characters for one argument"
        )
    return arg


def parse_fetchargs(
    tokens: Sequence[str], *, is_return: bool, usdt_args: int | None = None
) -> tuple[FetchArg, ...]:
    """Parse all fetch arguments of one probe, with the kernel's per-probe limits (count, unique names,
    record size)."""
    if len(tokens) > MAX_TRACE_ARGS:
        raise ProbeSyntaxError(
            f"too many fetch arguments: {len(tokens)} (the kernel allows at most {MAX_TRACE_ARGS} per probe)"
        )
    args = tuple(
        parse_fetcharg(token, position, is_return=is_return, usdt_args=usdt_args)
        for position, token in enumerate(tokens, start=1)
    )
    seen: dict[str, tuple[str, FetchArg]] = {}
    for token, arg in zip(tokens, args):
        if arg.name in seen:
            first_token, first = seen[arg.name]
            positional = any(not a.explicit_name and not isinstance(a.source, UsdtArg) for a in (first, arg))
            raise ProbeSyntaxError(
                f"bad fetch argument '{token}': the name '{arg.name}' is already used by '{first_token}'"
                + (" (unnamed arguments are called arg1, arg2, ... by position)" if positional else "")
                + "; name it: NAME=..."
            )
        seen[arg.name] = token, arg
    size = sum(arg.size for arg in args)
    if size > MAX_PROBE_EVENT_SIZE:
        raise ProbeSyntaxError(
            f"fetch arguments too big: they take {size} bytes per event, the kernel allows {MAX_PROBE_EVENT_SIZE}"
        )
    return args

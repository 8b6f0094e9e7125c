"""Parse the argument string of an x86-64 SystemTap SDT (USDT) marker.

The third string of a ``.note.stapsdt`` note describes where each marker argument lives, in AT&T
syntax with a ``[-]N[f]@`` size prefix::

    >>> [a.kind for a in parse_arguments("-4@%edi 8@-16(%rbp) 8@40+CheckpointStats(%rip)")]
    ['reg', 'mem', 'mem']

One unparseable argument becomes an ``"invalid"`` :class:`SdtArgument` with a reason; it never
hides its neighbours, and :func:`parse_arguments` never raises.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from uprobes.errors import ProbeSyntaxError
from uprobes.x86_64.registers import OPERAND_NAMES, XMM_REGISTERS

__all__ = ["SdtArgument", "parse_arguments"]


@dataclass(frozen=True)
class SdtArgument:
    """One marker argument, e.g. ``SdtArgument("-4@%edi", "reg", size=4, signed=True, reg="rdi")``.

    ``kind`` is ``"const"`` (``value``), ``"reg"`` (``reg`` >> ``shift``), ``"mem"`` (read ``size``
    bytes at ``base + index*scale + disp``, plus the address of ``symbol`` if set) or ``"invalid"``
    (``error``). The value read is truncated to ``size`` bytes, then sign-extended if ``signed``.
    """

    text: str
    kind: str
    size: int = 8
    signed: bool = False
    is_float: bool = False
    value: int | None = None
    reg: str | None = None
    shift: int = 0
    base: str | None = None
    index: str | None = None
    scale: int = 1
    disp: int = 0
    symbol: str | None = None
    error: str | None = None

    @property
    def type_name(self) -> str:
        """The value type for display: ``"s32"``, ``"u8"``, ``"f64"``, ``"u128"``..."""
        prefix = "f" if self.is_float else "s" if self.signed else "u"
        return f"{prefix}{self.size * 8}"


def parse_arguments(text: str) -> list[SdtArgument]:
    """Parse a whole argument string; ``parse_arguments("8@%rax -4@$0")`` gives a reg and a const."""
    return [argument for token in _split(text) for argument in _arguments(token)]


def _arguments(token: str) -> list[SdtArgument]:
    """One argument, or a sized one and the size-less ones after it (``8@$1 %rdi %rax``: assembly-written
    markers mix them). As GDB reads an argument as far as its expression goes, the whole is one argument
    where it parses as one; else it is split at whitespace where every word is an operand of its own."""
    whole = _parse_argument(token)
    words = token.split()
    if whole.kind != "invalid" or len(words) < 2 or "@" not in words[0] or \
            not all(word[0] in "%$" or "(" in word for word in words[1:]):
        return [whole]
    parts = [_parse_argument(word) for word in words]
    return parts if all(part.kind != "invalid" for part in parts) else [whole]


_SIZES = {str(n): n for n in (1, 2, 4, 8, 16, 24)}
# 16f is what gcc emits for a long double.
_FLOAT_SIZES = {str(n): n for n in (4, 8, 16)}
_SCALES = {str(n): n for n in (1, 2, 4, 8)}

# alias -> (canonical 64-bit register, right shift)
_REGISTERS: dict[str, tuple[str, int]] = {
    **{alias: (reg.field, part.shift) for alias, (reg, part) in OPERAND_NAMES.items()},
    **{name: (name, 0) for name in XMM_REGISTERS},
}

# systemtap's sdt_v3_tokenize: cut at the last whitespace before each "@", so spaces inside an
# expression stay put and a malformed size prefix still starts its own argument. The lookbehind
# and possessive "+" keep a long run of spaces linear instead of quadratic.
_SPLIT_RE = re.compile(r"(?<!\s)\s++(?=[^\s@]*@)")
_SIZE_RE = re.compile(r"(-?)([0-9]+)(f?)", re.ASCII)
_REGISTER_RE = re.compile(r"%([A-Za-z0-9]*)(.*)", re.ASCII | re.DOTALL)
_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>[0-9][A-Za-z0-9_]*)|(?P<sym>[A-Za-z_.][A-Za-z0-9_.$]*)|(?P<op><<|>>|[-+*/%&|^~!()$]))"
)
_NUMBER_RE = re.compile(r"0[xX]([0-9a-fA-F]+)|([0-9]+)", re.ASCII)
# gas and GDB precedence, not C's: "* / % << >>" bind tightest, then "& | ^", then "+ -".
_LEVELS = (("+", "-"), ("&", "|", "^"), ("*", "/", "%", "<<", ">>"))
_MAX_DEPTH = 32
_INT_OPS = {
    "*": operator.mul,
    "<<": operator.lshift,
    ">>": operator.rshift,
    "&": operator.and_,
    "|": operator.or_,
    "^": operator.xor,
}


def _q(text: str) -> str:
    """Quote a token for an error message, clipped so a huge fuzzed token stays readable."""
    return f"'{text}'" if len(text) <= 40 else f"'{text[:37]}...'"


def _split(text: str) -> list[str]:
    text = text.strip()
    if not text:
        return []
    # Assembly-written probes may omit every "N@"; then each word is one argument.
    return _SPLIT_RE.split(text) if "@" in text else text.split()


def _parse_argument(text: str) -> SdtArgument:
    size, signed, is_float, operand = 8, False, False, text
    try:
        if "@" in text:
            prefix, operand = text.split("@", 1)
            size, signed, is_float = _parse_size(prefix)
        fields = _parse_operand(operand.strip(), size, signed)
    except ProbeSyntaxError as exc:
        return SdtArgument(text, "invalid", size, signed, is_float, error=str(exc))
    return SdtArgument(text, size=size, signed=signed, is_float=is_float, **fields)


def _parse_size(prefix: str) -> tuple[int, bool, bool]:
    match = _SIZE_RE.fullmatch(prefix)
    if match is None:
        raise ProbeSyntaxError(f"bad size prefix {_q(prefix + '@')}")
    minus, digits, f = match.groups()
    sizes = _FLOAT_SIZES if f else _SIZES
    if digits not in sizes:
        raise ProbeSyntaxError(f"unsupported size {_q(prefix + '@')} (expected one of {', '.join(sizes)})")
    return sizes[digits], bool(minus), bool(f)


def _parse_operand(operand: str, size: int, signed: bool) -> dict[str, object]:
    if not operand:
        raise ProbeSyntaxError("missing operand")
    if operand.startswith("$"):
        symbol, value = _Evaluator(operand, allow_dollar=True).evaluate()
        if symbol is not None:
            raise ProbeSyntaxError(f"symbol {_q(symbol)} in constant {_q(operand)} is not supported")
        return {"kind": "const", "value": _fit(value, size, signed)}
    if operand.startswith("%"):
        reg, shift = _register(operand)
        return {"kind": "reg", "reg": reg, "shift": shift}
    return _parse_memory(operand)


def _fit(value: int, size: int, signed: bool) -> int:
    bits = size * 8
    value &= (1 << bits) - 1
    return value - (1 << bits) if signed and value >> (bits - 1) else value


def _register(text: str) -> tuple[str, int]:
    match = _REGISTER_RE.fullmatch(text.strip())
    if match is None:
        raise ProbeSyntaxError(f"expected a register, got {_q(text.strip())}")
    name, rest = match.groups()
    if rest:
        raise ProbeSyntaxError(f"unexpected {_q(rest)} after {_q('%' + name)}")
    if name.lower() not in _REGISTERS:
        raise ProbeSyntaxError(f"unknown register {_q('%' + name)}")
    return _REGISTERS[name.lower()]


def _address_register(text: str, role: str) -> str:
    reg, shift = _register(text)
    if shift or reg.startswith("xmm"):
        raise ProbeSyntaxError(f"{_q(text.strip())} cannot address memory")
    if role == "index" and reg in ("rsp", "rip"):
        raise ProbeSyntaxError(f"{_q(text.strip())} cannot be an index register")
    return reg


def _parse_memory(operand: str) -> dict[str, object]:
    disp_text, group = operand, None
    open_at = operand.rfind("(")
    # "(4+4)(%rbp)": only the last parenthesis holding registers is the address group.
    if operand.endswith(")") and open_at >= 0 and operand[open_at + 1 :].lstrip().startswith(("%", ",")):
        disp_text, group = operand[:open_at], operand[open_at + 1 : -1]
    symbol, disp = _Evaluator(disp_text, allow_dollar=False).evaluate() if disp_text.strip() else (None, 0)
    base = index = None
    scale = 1
    if group is not None:
        parts, where = group.split(","), _q("(" + group + ")")
        if len(parts) > 3:
            raise ProbeSyntaxError(f"too many ',' in {where}")
        if parts[0].strip() or len(parts) == 1:
            base = _address_register(parts[0], "base")
        if len(parts) > 1:
            index = _address_register(parts[1], "index")
        if len(parts) > 2:
            if parts[2].strip() not in _SCALES:
                raise ProbeSyntaxError(f"scale {_q(parts[2].strip())} in {where} is not 1, 2, 4 or 8")
            scale = _SCALES[parts[2].strip()]
        if base == "rip" and index is not None:
            raise ProbeSyntaxError(f"'%rip' cannot be combined with an index in {where}")
    return {"kind": "mem", "base": base, "index": index, "scale": scale, "disp": disp, "symbol": symbol}


def _s64(value: int) -> int:
    return (value + (1 << 63)) % (1 << 64) - (1 << 63)


class _Evaluator:
    """Recursive-descent evaluator of gas/GDB constant expressions such as ``$3+($10-$8)-$1``.

    Values are ``(symbol, offset)`` pairs so ``40+CheckpointStats`` can be kept symbolic; integer
    arithmetic wraps to signed 64 bits as GDB's does.
    """

    def __init__(self, text: str, allow_dollar: bool) -> None:
        self.text, self.allow_dollar = text, allow_dollar
        self.tokens: list[tuple[str, str]] = []
        self.pos = self.depth = 0
        at, end = 0, len(text.rstrip())
        while at < end:
            match = _TOKEN_RE.match(text, at)
            if match is None:
                raise self._error(f"unexpected character {_q(text[at:].lstrip()[0])}")
            kind = str(match.lastgroup)
            self.tokens.append((kind, match[kind]))
            at = match.end()

    def _error(self, message: str) -> ProbeSyntaxError:
        return ProbeSyntaxError(f"{message} in {_q(self.text.strip())}")

    def evaluate(self) -> tuple[str | None, int]:
        value = self._binary(0)
        if self.pos < len(self.tokens):
            raise self._error(f"unexpected {_q(self.tokens[self.pos][1])}")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.pos][1] if self.pos < len(self.tokens) else None

    def _binary(self, level: int) -> tuple[str | None, int]:
        if level == len(_LEVELS):
            return self._unary()
        left = self._binary(level + 1)
        while self._peek() in _LEVELS[level]:
            self.pos += 1
            op = self.tokens[self.pos - 1][1]
            left = self._apply(op, left, self._binary(level + 1))
        return left

    def _unary(self) -> tuple[str | None, int]:
        if self.pos == len(self.tokens):
            raise self._error("unexpected end")
        kind, tok = self.tokens[self.pos]
        self.pos += 1
        if kind == "num":
            return None, _s64(self._number(tok))
        if kind == "sym":
            return tok, 0
        if tok not in ("(", "-", "+", "~", "!") and not (tok == "$" and self.allow_dollar):
            raise self._error(f"unexpected {_q(tok)}")
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self._error("expression nested too deeply")
        if tok == "(":
            value = self._binary(0)
            if self._peek() != ")":
                raise self._error("missing ')'")
            self.pos += 1
        else:
            symbol, operand = self._unary()
            if symbol is not None and tok in ("-", "~", "!"):
                raise self._error(f"cannot apply {_q(tok)} to symbol {_q(symbol)}")
            value = symbol, _s64({"-": -operand, "~": ~operand, "!": int(not operand)}.get(tok, operand))
        self.depth -= 1
        return value

    def _number(self, tok: str) -> int:
        match = _NUMBER_RE.fullmatch(tok)
        if match is None:
            raise self._error(f"bad number {_q(tok)}")
        digits, base = (match[1], 16) if match[1] else (match[2], 10)
        digits = digits.lstrip("0") or "0"
        # The length check keeps int() away from huge digit strings (Python refuses > 4300 digits).
        if len(digits) > (16 if base == 16 else 20) or int(digits, base) >> 64:
            raise self._error(f"number {_q(tok)} does not fit in 64 bits")
        return int(digits, base)

    def _apply(self, op: str, left: tuple[str | None, int], right: tuple[str | None, int]) -> tuple[str | None, int]:
        (lsym, a), (rsym, b) = left, right
        if op == "+" and not (lsym and rsym):
            return lsym or rsym, _s64(a + b)
        if op == "-" and not rsym:
            return lsym, _s64(a - b)
        if lsym or rsym:
            raise self._error(f"cannot apply {_q(op)} to symbol {_q(rsym or lsym)}")
        if op in ("/", "%") and b == 0:
            raise self._error("division by zero")
        if op in ("<<", ">>") and not 0 <= b < 64:
            raise self._error(f"shift count {b} out of range")
        if op in ("/", "%"):
            # C semantics, as GDB evaluates: truncate toward zero, remainder has the dividend's sign.
            quotient = abs(a) // abs(b) * (-1 if (a < 0) != (b < 0) else 1)
            return None, _s64(quotient if op == "/" else a - b * quotient)
        return None, _s64(_INT_OPS[op](a, b))

"""Predicates: a probe's text may end in ``if EXPR``, and only the hits for which EXPR holds are reported.

    >>> p = parse_predicate("size >= 1048576 && $comm == \\"ls\\"", {"size": INTEGER})
    >>> p.holds({"size": 2 << 20}, pid=1, tid=1, comm="ls"), p.holds({"size": 10}, pid=1, tid=1, comm="ls")
    (True, False)
    >>> p.kernel_filter({"size": ("size", 64, False)})
    '(size >= 1048576) && (__comm == "ls")'

EXPR is made of fetch-argument names, ``$pid`` (the process), ``$tid`` (the thread), ``$comm`` (its name),
integers (decimal, ``0x`` hex, negative), strings in double quotes, ``== != < <= > >=``, ``&`` (a mask),
``&& || !`` and parentheses. An integer where a condition is wanted means "not zero". Each name is typed by its
argument: integers compare with integers, strings (``:string``, ``$comm``) only for equality with a string. A
value that could not be fetched (a bad pointer) makes the predicate false.

The kernel engine applies what tracefs's event filters can say in the kernel (:meth:`Predicate.kernel_filter`);
anything else, and the ptrace engine's hits, are judged here, with the same result.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from ..errors import ProbeSyntaxError
from ..x86_64.trampolines import Compare, Logic, Mask, Test

__all__ = ["ARRAY", "INTEGER", "STRING", "Predicate", "parse_predicate"]

INTEGER, STRING = "integer", "string"
_ARTICLES = {INTEGER: "an integer", STRING: "a string"}
_SPECIALS = {"$pid": INTEGER, "$tid": INTEGER, "$comm": STRING}
_COMPARISONS = ("==", "!=", "<=", ">=", "<", ">")
_TOKEN = re.compile(r"""\s*(?:(?P<number>-?(?:0[xX][0-9a-fA-F]+|\d+))\b|(?P<string>"(?:[^"\\]|\\.)*")
                        |(?P<name>\$?[A-Za-z_]\w*)|(?P<op>==|!=|<=|>=|&&|\|\||[<>!&()]))""", re.X)


@dataclass(frozen=True)
class _Node:
    kind: str  # "name", "int", "str", "cmp", "and", "or", "not", "mask"
    value: object = None  # a name, a number, a string, or a comparison's operator
    left: _Node | None = None
    right: _Node | None = None
    type: str = INTEGER


ARRAY = "an array"


class Predicate:
    """A parsed, typed ``if EXPR``."""

    def __init__(self, text: str, root: _Node) -> None:
        self.text = text
        self._root = root

    @property
    def names(self) -> frozenset[str]:
        """The fetch arguments and specials (``$pid``...) it reads."""
        return frozenset(_names(self._root))

    def holds(self, args: dict, pid: int, tid: int, comm: str) -> bool:
        """Whether a hit with these argument values, by this thread, is one to report."""
        def value(node: _Node):
            if node.kind == "name":
                if node.value == "$pid":
                    return pid
                if node.value == "$tid":
                    return tid
                if node.value == "$comm":
                    return comm
                found = args.get(node.value)
                if found is None:
                    raise _Unknown
                return found
            return node.value

        try:
            return bool(_evaluate(self._root, value))
        except _Unknown:
            return False

    def mask(self, count: int, columns: dict, fixed: dict, pid: int, tid: int, comm: str):
        """For ``count`` hits in columns (argument name -> list of values, one per hit; ``fixed``: those with
        one value for all), a numpy array saying which to report. The values are compared as Python's integers
        are (arrays of objects: a u64 past 2^63 stays exact)."""
        import numpy

        columns = {name: numpy.array(values, dtype=object) for name, values in columns.items()}

        def value(node: _Node):
            if node.kind != "name":
                return node.value
            special = {"$pid": pid, "$tid": tid, "$comm": comm}
            if node.value in special:
                return special[node.value]
            found = columns.get(node.value, fixed.get(node.value))
            if found is None:
                raise _Unknown
            return found

        try:
            result = _evaluate(self._root, value)
        except _Unknown:
            return numpy.zeros(count, bool)
        return numpy.broadcast_to(numpy.asarray(result, bool), (count,))

    def compiled(self, registers: dict[str, tuple[str, int, bool]]) -> Test | None:
        """The predicate as a test a jump probe's trampoline makes, where it only compares arguments read from
        registers (name -> register field, bits, signed) with constants; None otherwise."""
        try:
            return _compiled(self._root, registers)
        except _Unknown:
            return None

    def kernel_filter(self, fields: dict[str, tuple[str, int | None, bool]]) -> str | None:
        """The predicate as a tracefs event filter over the event's ``fields`` (argument name -> field, its bits
        and sign; bits None for a string), or None where it cannot be one (the process id, an argument the
        kernel does not fetch as the tool types it, a constant the field's type cannot hold: the kernel would
        cut it to the field's size)."""
        try:
            return _filter(self._root, fields)
        except _Unknown:
            return None


class _Unknown(Exception):
    pass


def parse_predicate(text: str, types: dict[str, str]) -> Predicate:
    """``text`` (EXPR) parsed and typed against the probe's fetch arguments ``types`` (name -> INTEGER or
    STRING); a one-line :class:`ProbeSyntaxError` naming the token otherwise."""
    tokens = _tokens(text)
    parser = _Parser(text, tokens, types)
    root = parser.expression()
    if parser.position < len(tokens):
        raise parser.error(f"unexpected '{tokens[parser.position][1]}'")
    if root.type == STRING:
        raise parser.error("a string is not a condition: compare it with == or !=")
    return Predicate(text, root)


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, at = [], 0
    while at < len(text.rstrip()):
        found = _TOKEN.match(text, at)
        if found is None or found.end() == at:
            raise ProbeSyntaxError(f"bad predicate 'if {text}': cannot read '{text[at:].strip()[:20]}'")
        kind = found.lastgroup
        tokens.append((kind, found.group(kind)))
        at = found.end()
    return tokens


class _Parser:
    def __init__(self, text: str, tokens: list[tuple[str, str]], types: dict[str, str]) -> None:
        self.text, self.tokens, self.types, self.position = text, tokens, types, 0

    def error(self, why: str) -> ProbeSyntaxError:
        return ProbeSyntaxError(f"bad predicate 'if {self.text}': {why}")

    def _peek(self) -> str | None:
        return self.tokens[self.position][1] if self.position < len(self.tokens) else None

    def _take(self) -> tuple[str, str]:
        if self.position >= len(self.tokens):
            raise self.error("it ends too soon")
        self.position += 1
        return self.tokens[self.position - 1]

    def expression(self) -> _Node:
        node = self._and()
        while self._peek() == "||":
            self._take()
            node = _Node("or", None, self._condition(node), self._condition(self._and()))
        return node

    def _and(self) -> _Node:
        node = self._not()
        while self._peek() == "&&":
            self._take()
            node = _Node("and", None, self._condition(node), self._condition(self._not()))
        return node

    def _not(self) -> _Node:
        if self._peek() == "!":
            self._take()
            return _Node("not", None, self._condition(self._not()))
        return self._comparison()

    def _comparison(self) -> _Node:
        left = self._mask()
        if self._peek() not in _COMPARISONS:
            return left
        operator = self._take()[1]
        right = self._mask()
        if left.type != right.type:
            raise self.error(f"'{_show(left)} {operator} {_show(right)}' compares {_ARTICLES[left.type]} with "
                             f"{_ARTICLES[right.type]}")
        if left.type == STRING and operator not in ("==", "!="):
            raise self.error(f"strings compare with == and != only, not '{operator}'")
        return _Node("cmp", operator, left, right)

    def _mask(self) -> _Node:
        node = self._atom()
        while self._peek() == "&":
            self._take()
            right = self._atom()
            for side in (node, right):
                if side.type != INTEGER:
                    raise self.error(f"'&' masks integers, not the string {_show(side)}")
            node = _Node("mask", None, node, right)
        return node

    def _atom(self) -> _Node:
        kind, token = self._take()
        if token == "(":
            node = self.expression()
            if self._peek() != ")":
                raise self.error("a '(' is not closed")
            self._take()
            return node
        if kind == "number":
            try:
                return _Node("int", int(token, 0))
            except ValueError:
                raise self.error(f"'{token}' is not a number (write 8, 0x8 or -8)") from None
        if kind == "string":
            try:
                return _Node("str", ast.literal_eval(token), type=STRING)
            except (SyntaxError, ValueError):
                raise self.error(f"cannot read the string {token}") from None
        if kind == "name":
            kind_of = _SPECIALS.get(token) if token.startswith("$") else self.types.get(token)
            if kind_of is None:
                known = ", ".join(sorted(self.types)) or "none"
                raise self.error(f"unknown name '{token}' (the probe's arguments: {known}; and $pid, $tid, "
                                 f"$comm)")
            if kind_of not in (INTEGER, STRING):
                raise self.error(f"'{token}' is {kind_of}: compare one of its elements, fetched as an "
                                 f"argument of its own")
            return _Node("name", token, type=kind_of)
        raise self.error(f"unexpected '{token}'")

    def _condition(self, node: _Node) -> _Node:
        if node.type == STRING:
            raise self.error(f"the string {_show(node)} is not a condition: compare it with == or !=")
        return node


def _show(node: _Node) -> str:
    if node.kind == "str":
        return f'"{node.value}"'
    if node.kind in ("name", "int"):
        return str(node.value)
    return "(...)"


def _names(node: _Node | None):
    if node is None:
        return
    if node.kind == "name":
        yield node.value
    yield from _names(node.left)
    yield from _names(node.right)


_OPERATORS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
              "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def _evaluate(node: _Node, value):
    """``node``'s value (``value`` gives each leaf's); ``&&``, ``||`` and ``!`` work on scalars and on numpy
    arrays alike (``&``, ``|`` and ``==`` 0 of booleans)."""
    if node.kind in ("name", "int", "str"):
        return value(node)
    if node.kind == "cmp":
        return _OPERATORS[node.value](_evaluate(node.left, value), _evaluate(node.right, value))
    if node.kind == "mask":
        return _evaluate(node.left, value) & _evaluate(node.right, value)
    if node.kind == "not":
        return _truth(_evaluate(node.left, value)) == False  # noqa: E712 (an array's elementwise not)
    left, right = _truth(_evaluate(node.left, value)), _truth(_evaluate(node.right, value))
    return (left & right) if node.kind == "and" else (left | right)


def _truth(value):
    return value != 0 if not isinstance(value, bool) else value


def _filter(node: _Node, fields: dict[str, str]) -> str:
    """tracefs's filter grammar: ``FIELD OP CONSTANT`` (``FIELD & MASK`` as a condition), joined by ``&&``,
    ``||``, ``!`` and parentheses."""
    if node.kind == "cmp":
        left, operator, right = node.left, node.value, node.right
        if left.kind in ("int", "str") and right.kind == "name":
            left, right, operator = right, left, _FLIPPED[operator]
        if left.kind != "name" or right.kind not in ("int", "str"):
            raise _Unknown  # two fields, or a mask, compared: not in the grammar
        return f"{_field(left, fields)} {operator} {_constant(right, left, fields)}"
    if node.kind == "mask" and node.left.kind == "name" and node.right.kind == "int":
        return f"{_field(node.left, fields)} & {_constant(node.right, node.left, fields)}"
    if node.kind == "name":
        return f"{_field(node, fields)} != 0"
    if node.kind == "not":
        return f"!({_filter(node.left, fields)})"
    if node.kind in ("and", "or"):
        joiner = " && " if node.kind == "and" else " || "
        return f"({_filter(node.left, fields)}){joiner}({_filter(node.right, fields)})"
    raise _Unknown


_FLIPPED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


def _compiled(node: _Node, registers: dict[str, tuple[str, int, bool]]) -> Test:
    if node.kind in ("and", "or"):
        return Logic(node.kind, _compiled(node.left, registers), _compiled(node.right, registers))
    if node.kind == "not":
        return Logic("not", _compiled(node.left, registers))
    if node.kind == "name":
        return Logic("not", Compare(*_register(node, registers), "==", 0))
    if node.kind == "mask" and node.left.kind == "name" and node.right.kind == "int" \
            and -(1 << 63) <= node.right.value < 1 << 64:  # past 64 bits, a signed value's sign bits would count
        return Mask(*_register(node.left, registers), node.right.value & ((1 << 64) - 1))
    if node.kind == "cmp":
        left, operator, right = node.left, node.value, node.right
        if left.kind == "int" and right.kind == "name":
            left, right, operator = right, left, _FLIPPED[operator]
        if left.kind == "name" and right.kind == "int":
            field, bits, signed = _register(left, registers)
            # the tool compares the value as the argument's type gives it: a constant outside what a
            # register of that signedness holds would compare otherwise in 64 bits
            if signed and -(1 << 63) <= right.value < 1 << 63 or not signed and 0 <= right.value < 1 << 64:
                return Compare(field, bits, signed, operator, right.value)
    raise _Unknown


def _register(node: _Node, registers: dict[str, tuple[str, int, bool]]) -> tuple[str, int, bool]:
    if node.value not in registers:
        raise _Unknown
    return registers[node.value]


def _field(node: _Node, fields: dict[str, str]) -> str:
    if node.value == "$comm":
        return "__comm"
    if node.value == "$tid":
        return "common_pid"  # the task's pid: the thread's
    if node.value not in fields:  # $pid (the kernel's events hold no tgid), or not fetched as typed here
        raise _Unknown
    return fields[node.value][0]


_SPECIAL_FIELDS = {"$tid": (32, True), "$comm": (None, False)}


def _constant(node: _Node, field: _Node, fields: dict[str, tuple[str, int | None, bool]]) -> str:
    """A constant compared with ``field``, as the filter writes it; one the field's type cannot hold (which
    the kernel would cut to the field's size) cannot be written."""
    if node.kind == "int":
        bits, signed = _SPECIAL_FIELDS.get(field.value) or fields[field.value][1:]
        low, high = (-(1 << bits - 1), 1 << bits - 1) if signed else (0, 1 << bits)
        if not low <= node.value < high:
            raise _Unknown
        return str(node.value)
    if '"' in node.value or "\\" in node.value:
        raise _Unknown
    return f'"{node.value}"'

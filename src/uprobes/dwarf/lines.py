"""Source lines as probe points: where a line's code is entered, once per copy of the function holding it.

A line's code is rarely one run of instructions: a loop's line has its start, its test and its step, and an
optimised line is spread among its neighbours'. Probing every ``is_stmt`` row of a line (as perf probe does)
counts a line twice where its code has two rows. Instead, within each function or inlined copy that holds
the line, a row is a probe point where control can come to it from code of *another* line, or from outside:
the line's statement rows whose predecessors (fall-through or direct branch) all belong to the same line
are skipped. Code inlined into the function counts as the line that called it. Where the compiler
interleaves the line's code with another line's, control comes to it more than once and so does the probe.

    >>> [(p.function, p.line) for p in line_points(DebugInfo.of(obj), "sourcevars.c", 85, "x")]
    [('main', 85)]
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

from ..errors import ResolveError
from ..x86_64.flow import predecessors
from .info import DebugInfo, LineRow, Scope, Unit

__all__ = ["LinePoint", "line_points", "function_line", "lines_with_code", "lines_with_code_in", "file_matches",
           "prologue_end"]


@dataclass(frozen=True)
class LinePoint:
    """Where a probe on ``file``:``line`` goes in one function or inlined copy (``scope``)."""

    address: int
    file: str
    line: int
    scope: Scope

    @property
    def function(self) -> str:
        return self.scope.name or "?"


def file_matches(path: str, wanted: str) -> bool:
    """Whether ``wanted`` names ``path``: equal, or a suffix of it that starts at a ``/``."""
    return path == wanted or path.endswith("/" + wanted.lstrip("./")) or os.path.basename(path) == wanted


def lines_with_code(info: DebugInfo, wanted: str) -> dict[str, set[int]]:
    """Every file matching ``wanted`` with the lines that have statement rows."""
    found: dict[str, set[int]] = {}
    for rows in _tables_naming(info, wanted):
        for row in rows:
            if row.is_stmt and not row.end_sequence and file_matches(row.file, wanted):
                found.setdefault(row.file, set()).add(row.line)
    return found


def function_line(info: DebugInfo, function: str, relative: int, text: str) -> tuple[str, int, list[Scope]]:
    """``FUNCTION:+N``: the file and line N lines below the function's first line, and its copies with code."""
    copies: list[Scope] = []
    # The function's symbol leads to its unit; only a function that is inlined everywhere needs them all read.
    symbols = info.obj.symbols.lookup(function)
    units = [unit for unit in (info.unit_at(sym.value) for sym in symbols) if unit is not None] or info.units()
    for unit in dict.fromkeys(units):
        copies.extend(_instances(unit.scopes, function))
    if not copies:  # an alias (malloc for __libc_malloc): the function the symbol's code is
        for sym in symbols:
            scope = next((s for s in info.scopes_at(sym.value) if s.kind == "function"), None)
            if scope is not None:
                copies.extend(_instances(info.unit(scope.die.cu).scopes, scope.name))
    if not copies:
        raise ResolveError(f"probe '{text}': no function '{function}' with code in the DWARF of {info.path}")
    origin = copies[0].origin
    decl_line = copies[0].decl_line
    decl_file = origin.attributes.get("DW_AT_decl_file")
    unit = info.unit(origin.cu)
    file_name = unit.file_name(decl_file.value) if decl_file is not None else None
    if decl_line is None or file_name is None:
        raise ResolveError(f"probe '{text}': the DWARF of {info.path} does not say where '{function}' is written")
    return file_name, decl_line + relative, [c for c in copies if c.origin.offset == origin.offset]


def lines_with_code_in(info: DebugInfo, copies: list[Scope]) -> set[int]:
    """The lines of a function (each of its ``copies``) that a line probe can go on: those of its own file
    with statement rows in its code, inlined code aside."""
    lines: set[int] = set()
    for copy in copies:
        unit = info.unit(copy.die.cu)
        decl_file = copy.origin.attributes.get("DW_AT_decl_file")
        file_name = info.unit(copy.origin.cu).file_name(decl_file.value) if decl_file is not None else None
        for row in unit.rows:
            if row.is_stmt and not row.end_sequence and row.file == file_name and copy.contains(row.address) \
                    and _owner(info, row) is copy:
                lines.add(row.line)
    return lines


def prologue_end(info: DebugInfo, entry: int) -> int | None:
    """Where the function starting at ``entry`` has built its frame: its second statement row (the first
    after the entry's, of its first line or of its opening line when it is written on one), as GDB and perf
    probe skip a prologue; None when its line table does not say."""
    unit = info.unit_at(entry)
    scope = next((s for s in info.scopes_at(entry) if s.kind == "function"), None)
    if unit is None or scope is None:
        return None
    rows = sorted((row for row in unit.rows if row.is_stmt and not row.end_sequence and scope.contains(row.address)),
                  key=lambda row: row.address)
    return next((row.address for row in rows if row.address > entry), None)


def _instances(scopes: list[Scope], name: str):
    for scope in scopes:
        if scope.kind != "block" and scope.name == name:
            yield scope
        yield from _instances(scope.children, name)


def line_points(info: DebugInfo, wanted: str, line: int, text: str, within: list[Scope] | None = None) -> list[LinePoint]:
    """The probe points of ``wanted``:``line``; ``within`` limits them to these function copies (and to their
    units' line tables)."""
    points: list[LinePoint] = []
    matched_file = False
    tables = _tables_naming(info, wanted) if within is None else \
        [unit.rows for unit in dict.fromkeys(info.unit(copy.die.cu) for copy in within)]
    for table_rows in tables:
        rows = [row for row in table_rows if row.is_stmt and not row.end_sequence and file_matches(row.file, wanted)]
        matched_file = matched_file or bool(rows)
        by_scope: dict[int, tuple[Scope, list[LineRow]]] = {}
        for row in rows:
            if row.line != line:
                continue
            scope = _owner(info, row)
            if scope is None or (within is not None and not any(scope is w for w in within)):
                continue
            by_scope.setdefault(id(scope), (scope, []))[1].append(row)
        for scope, scope_rows in by_scope.values():
            points.extend(_entries(info, scope, scope_rows))
    if not points:
        raise ResolveError(_no_code_message(info, wanted, line, text, matched_file))
    return sorted(points, key=lambda p: p.address)


def _tables_naming(info: DebugInfo, wanted: str):
    """The rows of each line table that names a file matching ``wanted`` (its names as its unit gives them)."""
    for table in info.line_tables():
        if not any(file_matches(name, wanted) for name in table.file_names.values()):
            continue
        first = next((row.address for row in table.rows if not row.end_sequence), None)
        unit = info.unit_at(first) if first is not None else None
        yield unit.rows if unit is not None else table.rows


def _owner(info: DebugInfo, row: LineRow) -> Scope | None:
    """The function or inlined copy whose source ``row``'s line is. Its address may lie in several (a copy
    inlined into a copy inlined into a function); C functions do not nest, so the line is in the one of them
    written in the row's file that starts closest above it (the innermost where they tie, as in recursion)."""
    chain = [scope for scope in info.scopes_at(row.address) if scope.kind != "block"]
    best, best_line = None, -1
    for scope in chain:
        decl_line = scope.decl_line
        if decl_line is not None and best_line < decl_line <= row.line and _decl_file(info, scope) == row.file:
            best, best_line = scope, decl_line
    if best is None and chain and not any(_decl_file(info, scope) == row.file for scope in chain):
        return chain[0]  # the DWARF does not say where these functions are written
    return best


def _decl_file(info: DebugInfo, scope: Scope) -> str | None:
    attr = scope.origin.attributes.get("DW_AT_decl_file")
    return info.unit(scope.origin.cu).file_name(attr.value) if attr is not None else None


def _call_file(unit: Unit, scope: Scope) -> str | None:
    attr = scope.die.attributes.get("DW_AT_call_file")
    return unit.file_name(attr.value) if attr is not None else None


def _entries(info: DebugInfo, scope: Scope, rows: list[LineRow]) -> list[LinePoint]:
    """The rows of one copy where its line is entered from elsewhere (at least the first one)."""
    unit = info.unit(scope.die.cu)
    flow: dict[int, list[int]] = {}
    for low, high in scope.function.ranges:
        flow.update(predecessors(info.obj.read(low, high - low), low))
    lines = _RowLines(unit)
    target = (rows[0].file, rows[0].line)

    def line_of(address: int) -> tuple[str | None, int | None] | None:
        if not scope.contains(address):
            return None
        inner = _inlined_child(scope, address)
        if inner is not None:
            return _call_file(unit, inner), inner.call_line
        return lines.at(address)

    entered = []
    for address in sorted({row.address for row in rows}):
        if address not in flow:
            continue
        before = flow[address]
        if address in (scope.entry, scope.function.low) or not before or any(line_of(p) != target for p in before):
            entered.append(address)
    if not entered:
        entered = [min(row.address for row in rows)]
    return [LinePoint(address, target[0], target[1], scope) for address in entered]


def _inlined_child(scope: Scope, address: int) -> Scope | None:
    """The copy inlined into ``scope`` (directly, or through its blocks) whose code holds ``address``."""
    for child in scope.children:
        if child.contains(address):
            return child if child.kind == "inlined" else _inlined_child(child, address)
    return None


class _RowLines:
    """The line each address belongs to: that of the last row at or before it (statement or not: a scheduled
    instruction of another line, between two of this one's, is code of that other line)."""

    def __init__(self, unit: Unit) -> None:
        marks = []
        for order, row in enumerate(unit.rows):
            marks.append((row.address, int(not row.end_sequence), order,
                          None if row.end_sequence else (row.file, row.line)))
        marks.sort()
        self.addresses = [mark[0] for mark in marks]
        self.lines = [mark[3] for mark in marks]

    def at(self, address: int) -> tuple[str, int] | None:
        i = bisect.bisect_right(self.addresses, address) - 1
        return self.lines[i] if i >= 0 else None


def _no_code_message(info: DebugInfo, wanted: str, line: int, text: str, matched_file: bool) -> str:
    if not matched_file:
        named = any(file_matches(name, wanted) for table in info.line_tables() for name in table.file_names.values())
        if named:
            return f"probe '{text}': no code in {info.path} comes from '{wanted}' (it declares, it does not define)"
        return (f"probe '{text}': no source file '{wanted}' in the line tables of {info.path}; "
                f"'uprobes list --lines {info.obj.path} FUNCTION' shows a function's file and lines")
    lines = sorted(set().union(*lines_with_code(info, wanted).values()))
    near = [n for n in lines if n < line][-1:] + [n for n in lines if n > line][:1]
    nearest = f"lines with code are {' and '.join(map(str, near))}" if len(near) > 1 else f"line with code is {near[0]}"
    return f"probe '{text}': {wanted}:{line} has no code; the nearest {nearest}"

"""Source lines as probe points: where a line's code is entered, once per copy of the function holding it.

A line's code is rarely one run of instructions: a loop's line has its start, its test and its step, and an
optimised line is spread among its neighbours'. Probing every ``is_stmt`` row of a line (as perf probe does)
counts a line twice where its code has two rows. Instead, within each function or inlined copy that holds
the line, a row is a probe point where control can come to it from code of *another* line, or from outside:
the line's statement rows whose predecessors (fall-through or direct branch) all belong to the same line
are skipped, and so is a row reached by falling through from another line's code when the line already ran
earlier in the same basic block (a statement written over several lines, whose code goes back and forth
between them). A row that is not a statement (the line's code after a branch into its middle, as a loop's
exit into the line after it) is a probe point where another line's code branches to it. Code inlined into
the function counts as the line that called it; copies inlined at one place each get their probe point.

    >>> [(p.function, p.line) for p in line_points(DebugInfo.of(obj), "sourcevars.c", 85, "x")]
    [('main', 85)]
"""

from __future__ import annotations

import bisect
import functools
import os
from dataclasses import dataclass

from ..elf.objfile import ElfObject
from ..errors import ResolveError
from ..x86_64.flow import Predecessors, predecessors
from .info import DebugInfo, LineRow, Scope, Unit

__all__ = ["LinePoint", "line_points", "function_line", "entry_line", "lines_with_code", "lines_with_code_in",
           "file_matches", "prologue_end"]


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


def function_line(info: DebugInfo, function: str, relative: int, text: str) -> list[tuple[str, int, list[Scope]]]:
    """``FUNCTION:+N``: for each function of that name (static functions of several files may share it), the file
    and line N lines below its first line, and its copies with code."""
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
    by_origin: dict[int, list[Scope]] = {}
    for copy in copies:
        by_origin.setdefault(copy.origin.offset, []).append(copy)
    found = []
    for same in by_origin.values():
        origin = same[0].origin
        decl_line = same[0].decl_line
        decl_file = origin.attributes.get("DW_AT_decl_file")
        file_name = info.unit(origin.cu).file_name(decl_file.value) if decl_file is not None else None
        if decl_line is None or file_name is None:
            raise ResolveError(f"probe '{text}': the DWARF of {info.path} does not say where '{function}' is written")
        found.append((file_name, decl_line + relative, same))
    return found


def entry_line(info: DebugInfo, copies: list[Scope], file_name: str, first: int) -> int:
    """The line of a function's entry: ``first``, its first line, or where a signature written over several lines
    has no code of its own, the line its entry's code is of (``FUNCTION:+0`` probes the entry, as perf probe's)."""
    unit = info.unit(copies[0].die.cu)
    lines = [row.line for row in unit.rows if row.address == copies[0].entry and row.is_stmt and not row.end_sequence
             and row.file == file_name and row.line >= first]
    return first if first in lines else min(lines, default=first)


def lines_with_code_in(info: DebugInfo, copies: list[Scope]) -> set[int]:
    """The lines of a function (each of its ``copies``) that a line probe can go on: those of its own file
    with statement rows in its code, inlined code aside."""
    lines: set[int] = set()
    for copy in copies:
        unit = info.unit(copy.die.cu)
        decl_file = copy.origin.attributes.get("DW_AT_decl_file")
        file_name = info.unit(copy.origin.cu).file_name(decl_file.value) if decl_file is not None else None
        for row in unit.rows:
            if row.is_stmt and not row.end_sequence and row.file == file_name \
                    and (copy.contains(row.address) or row.address == copy.entry) \
                    and any(owner is copy for owner in _owners(info, row)):
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


def line_points(info: DebugInfo, wanted: str, line: int, text: str, within: list[Scope] | None = None,
                missing_ok: bool = False) -> list[LinePoint]:
    """The probe points of ``wanted``:``line``; ``within`` limits them to these function copies (and to their
    units' line tables). None is an error naming the nearest lines with code, unless ``missing_ok``."""
    points: list[LinePoint] = []
    matched_file = False
    tables = _tables_naming(info, wanted) if within is None else \
        [unit.rows for unit in dict.fromkeys(info.unit(copy.die.cu) for copy in within)]
    for table_rows in tables:
        rows = [row for row in table_rows if not row.end_sequence and file_matches(row.file, wanted)]
        matched_file = matched_file or any(row.is_stmt for row in rows)
        by_scope: dict[int, tuple[Scope, list[LineRow]]] = {}
        for row in rows:
            if row.line != line:
                continue
            for scope in _owners(info, row):
                if within is None or any(scope is w for w in within):
                    by_scope.setdefault(id(scope), (scope, []))[1].append(row)
        for scope, scope_rows in by_scope.values():
            # A copy's rows at an entry its ranges leave out only say where it starts, when it has code of the
            # line of its own
            inside = [row for row in scope_rows if scope.contains(row.address)]
            if any(row.is_stmt for row in inside):
                scope_rows = inside
            if any(row.is_stmt for row in scope_rows):
                points.extend(_entries(info, scope, scope_rows))
    if not points and not missing_ok:
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


def _owners(info: DebugInfo, row: LineRow) -> list[Scope]:
    """The function or inlined copies whose source ``row``'s line is. Its address may lie in several (a copy
    inlined into a copy inlined into a function); C functions do not nest, so the line is in those of them
    written in the row's file that start closest above it: the innermost where one holds another (recursion),
    each where they are copies of one function inlined side by side (they may share code, or start at an
    address their ranges leave out, the row of their first line being at their entry)."""
    unit = info.unit_at(row.address)
    holding = list(_holding(unit.scopes, row.address)) if unit is not None else []
    written_here = [scope for scope in holding if scope.decl_line is not None and scope.decl_line <= row.line
                    and _decl_file(info, scope) == row.file]
    if not written_here:
        if holding and not any(_decl_file(info, scope) == row.file for scope in holding):
            return [max(holding, key=_depth)]  # the DWARF does not say where they are written: the innermost
        return []
    closest = max(scope.decl_line for scope in written_here)
    tied = [scope for scope in written_here if scope.decl_line == closest]
    return [scope for scope in tied if not any(other is not scope and _inside(other, scope) for other in tied)]


def _holding(scopes: list[Scope], address: int):
    """The functions and inlined copies among ``scopes``, and inside them, that hold ``address`` or are entered
    there."""
    for scope in scopes:
        entered = scope.kind == "inlined" and scope.entry == address
        if scope.kind != "block" and (scope.contains(address) or entered):
            yield scope
        if entered or scope.ranges and scope.low <= address < max(high for _, high in scope.ranges):
            yield from _holding(scope.children, address)


def _depth(scope: Scope) -> int:
    depth = 0
    while scope.parent is not None:
        scope, depth = scope.parent, depth + 1
    return depth


def _inside(inner: Scope, outer: Scope) -> bool:
    """Whether ``inner`` is nested in ``outer``."""
    while inner.parent is not None:
        inner = inner.parent
        if inner is outer:
            return True
    return False


def _decl_file(info: DebugInfo, scope: Scope) -> str | None:
    attr = scope.origin.attributes.get("DW_AT_decl_file")
    return info.unit(scope.origin.cu).file_name(attr.value) if attr is not None else None


def _call_file(unit: Unit, scope: Scope) -> str | None:
    attr = scope.die.attributes.get("DW_AT_call_file")
    return unit.file_name(attr.value) if attr is not None else None


def _entries(info: DebugInfo, scope: Scope, rows: list[LineRow]) -> list[LinePoint]:
    """The rows of one copy where its line is entered from elsewhere (at least its first statement row)."""
    unit = info.unit(scope.die.cu)
    flow = _flow(info.obj, scope.function.ranges)
    lines = _RowLines(unit)
    target = (rows[0].file, rows[0].line)

    def line_of(address: int) -> tuple[str | None, int | None] | None:
        if not (scope.contains(address) or address == scope.entry):
            return None
        inner = _inlined_child(scope, address)
        if inner is not None:
            return _call_file(unit, inner), inner.call_line
        return lines.at(address)

    def ran_earlier_in_block(address: int) -> bool:
        """Whether the line has code before ``address`` in its basic block (control that falls through from
        another line there comes back to a line it is already running)."""
        before = flow[address].fall_through
        while before is not None:
            if line_of(before) == target:
                return True
            if flow[before].branches or before in (scope.entry, scope.function.low):
                return False
            before = flow[before].fall_through
        return False

    statements = {row.address for row in rows if row.is_stmt}
    entered = []
    for address in sorted({row.address for row in rows}):
        if address not in flow:
            continue
        came = flow[address]
        if address in (scope.entry, scope.function.low) or not list(came):
            if address in statements:
                entered.append(address)
        elif any(line_of(p) != target for p in came.branches):
            entered.append(address)
        elif address in statements and came.fall_through is not None and line_of(came.fall_through) != target \
                and not ran_earlier_in_block(address):
            entered.append(address)
    if not entered:
        entered = [min(statements)]
    return [LinePoint(address, target[0], target[1], scope) for address in entered]


@functools.lru_cache(maxsize=64)
def _flow(obj: ElfObject, ranges: tuple[tuple[int, int], ...]) -> dict[int, Predecessors]:
    """Each instruction of a function's code (its ``ranges`` in ``obj``) with its predecessors; kept for the
    function's next lines."""
    flow: dict[int, Predecessors] = {}
    for low, high in ranges:
        flow.update(predecessors(obj.read(low, high - low), low))
    return flow


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

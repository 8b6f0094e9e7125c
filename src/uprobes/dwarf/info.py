"""An object's DWARF, read per compile unit: its scopes (functions, inlined copies, blocks) and line table.

The DWARF comes from the object itself or from its separate debug file (by build-id or ``.gnu_debuglink``,
as for symbols). A compile unit is parsed only when an address or a name leads to it: an address through
``.debug_aranges`` (or the units' own ranges), so a probe on one function of a big object reads one unit.

    >>> info = DebugInfo.of(ElfObject.open("tests/targets/build/sourcevars-O2"))
    >>> [scope.name for scope in info.scopes_at(0x1163)]
    ['twice', 'main', 'main']
"""

from __future__ import annotations

import bisect
import functools
import os
import weakref
from dataclasses import dataclass, field

from elftools.common.exceptions import DWARFError, ELFError as _PyelftoolsELFError
from elftools.dwarf.die import DIE
from elftools.dwarf.dwarf_expr import DWARFExprParser
from elftools.dwarf.locationlists import LocationEntry, LocationExpr, LocationParser
from elftools.dwarf.ranges import RangeEntry
from elftools.dwarf.structs import DWARFStructs

from ..elf.debuginfo import DEBUG_ROOTS, find_debug_file
from ..elf.objfile import ElfObject
from ..errors import ResolveError

__all__ = ["DebugInfo", "Scope", "LineRow", "LineTable", "Unit", "SCOPE_TAGS", "origin_of", "die_name"]

SCOPE_TAGS = {"DW_TAG_subprogram": "function", "DW_TAG_inlined_subroutine": "inlined",
              "DW_TAG_lexical_block": "block"}
_ENTRY_VALUE = (0xA3, 0xF3)  # DW_OP_entry_value, DW_OP_GNU_entry_value
# What a damaged or unusual unit makes pyelftools raise while it is parsed.
_UNREADABLE = (DWARFError, _PyelftoolsELFError, AssertionError, KeyError, ValueError, TypeError, IndexError,
               AttributeError)


@dataclass(eq=False)
class Scope:
    """A range of code with variables of its own: a function, an inlined copy of one, or a block.

    ``origin`` is the DIE that names it (the abstract function of an inlined copy or of an out-of-line
    instance); ``function`` the concrete function the code belongs to, whose frame base applies.
    """

    die: DIE
    kind: str
    ranges: tuple[tuple[int, int], ...]
    parent: Scope | None
    children: list[Scope] = field(default_factory=list)

    @functools.cached_property
    def origin(self) -> DIE:
        return origin_of(self.die)

    @property
    def name(self) -> str | None:
        if self.kind == "block":
            return self.parent.name if self.parent else None
        return die_name(self.origin)

    @property
    def function(self) -> Scope:
        scope = self
        while scope.kind != "function" and scope.parent is not None:
            scope = scope.parent
        return scope

    @property
    def low(self) -> int:
        return min(low for low, _ in self.ranges)

    @property
    def entry(self) -> int:
        """Where control enters: ``DW_AT_entry_pc``, else the lowest address."""
        attr = self.die.attributes.get("DW_AT_entry_pc")
        if attr is not None and attr.form == "DW_FORM_addr":
            return attr.value
        return self.low

    def contains(self, address: int) -> bool:
        return any(low <= address < high for low, high in self.ranges)

    def instance_of(self, function: DIE) -> bool:
        """Whether this is ``function`` itself, out of line or inlined."""
        return self.kind != "block" and self.origin.offset == function.offset

    @property
    def decl_line(self) -> int | None:
        attr = self.origin.attributes.get("DW_AT_decl_line")
        return attr.value if attr is not None else None

    @property
    def call_line(self) -> int | None:
        attr = self.die.attributes.get("DW_AT_call_line")
        return attr.value if attr is not None else None


@dataclass(frozen=True, slots=True)
class LineRow:
    """One row of a line table: ``address`` starts code of ``file``:``line``."""

    address: int
    file: str
    line: int
    is_stmt: bool
    end_sequence: bool


class LineTable:
    """One line program of ``.debug_line``: its files and, read on first use, its rows."""

    def __init__(self, program, directory: str = "") -> None:
        self.program = program
        self.directory = directory

    @functools.cached_property
    def file_names(self) -> dict[int, str]:
        """The files by the number rows, ``DW_AT_decl_file`` and ``DW_AT_call_file`` give them."""
        program = self.program
        if program is None:
            return {}
        directories = [_text(d) for d in program["include_directory"]]
        version = program.header.version
        names = {}
        for index, entry in enumerate(program["file_entry"]):
            name = _text(entry.name)
            dir_index = entry.dir_index
            # Directories other than the compilation directory may be relative to it. DWARF 5 lists it first;
            # DWARF 4 leaves it to the unit (DW_AT_comp_dir) and counts directories and files from 1.
            if version < 5:
                base = self.directory
                directory = directories[dir_index - 1] if 0 < dir_index <= len(directories) else ""
                index += 1
            else:
                base = directories[0] if directories else ""
                directory = directories[dir_index] if 0 < dir_index < len(directories) else ""
            directory = os.path.join(base, directory) if directory else base
            names[index] = os.path.normpath(name if name.startswith("/") or not directory
                                            else os.path.join(directory, name))
        return names

    @functools.cached_property
    def rows(self) -> list[LineRow]:
        """The rows, in the order the compiler wrote them (sequences one after another)."""
        if self.program is None:
            return []
        files = self.file_names
        rows = []
        for entry in self.program.get_entries():
            state = entry.state
            if state is not None:
                rows.append(LineRow(state.address, files.get(state.file, "?"), state.line, bool(state.is_stmt),
                                    bool(state.end_sequence)))
        return rows


class Unit:
    """One compile unit: its scope tree and its line table, each read on first use."""

    def __init__(self, info: DebugInfo, cu) -> None:
        self.info = info
        self.cu = cu
        self.top = cu.get_top_DIE()
        self.name = die_name(self.top) or "?"

    @functools.cached_property
    def expressions(self) -> DWARFExprParser:
        return DWARFExprParser(self.cu.structs)

    @functools.cached_property
    def scopes(self) -> list[Scope]:
        """The functions with code, each with its inlined copies and blocks as children."""
        found: list[Scope] = []
        self._collect(self.top, None, found)
        return found

    def _collect(self, die: DIE, parent: Scope | None, out: list[Scope]) -> None:
        for child in die.iter_children():
            kind = SCOPE_TAGS.get(child.tag)
            if kind is None:
                if child.tag in ("DW_TAG_namespace", "DW_TAG_class_type", "DW_TAG_structure_type"):
                    self._collect(child, parent, out)
                continue
            ranges = self.ranges(child)
            if not ranges:
                if kind == "block":  # a block without code of its own may still hold scopes that have some
                    self._collect(child, parent, out)
                continue
            scope = Scope(child, kind, ranges, parent)
            (parent.children if parent else out).append(scope)
            self._collect(child, scope, out)

    def ranges(self, die: DIE) -> tuple[tuple[int, int], ...]:
        """The address ranges ``die`` covers (``DW_AT_low_pc``/``high_pc`` or ``DW_AT_ranges``)."""
        attrs = die.attributes
        if "DW_AT_low_pc" in attrs and "DW_AT_high_pc" in attrs:
            low = attrs["DW_AT_low_pc"].value
            high = attrs["DW_AT_high_pc"]
            end = high.value if high.form == "DW_FORM_addr" else low + high.value
            return ((low, end),) if low and end > low else ()
        if "DW_AT_ranges" not in attrs:
            return ()
        lists = self.info.dwarf.range_lists()
        if lists is None:
            return ()
        base = self.base_address
        result = []
        for entry in lists.get_range_list_at_offset(attrs["DW_AT_ranges"].value, cu=self.cu):
            if isinstance(entry, RangeEntry):
                low, high = entry.begin_offset, entry.end_offset
                if not entry.is_absolute:
                    low, high = low + base, high + base
                if high > low and low:
                    result.append((low, high))
            else:  # a base address entry
                base = entry.base_address
        return tuple(result)

    @property
    def base_address(self) -> int:
        attr = self.top.attributes.get("DW_AT_low_pc")
        return attr.value if attr is not None else 0

    @functools.cached_property
    def line_table(self) -> LineTable:
        attr = self.top.attributes.get("DW_AT_stmt_list")
        return self.info.line_table(attr.value if attr is not None else None, self.directory)

    @property
    def file_names(self) -> dict[int, str]:
        return self.line_table.file_names

    @property
    def rows(self) -> list[LineRow]:
        return self.line_table.rows

    @property
    def directory(self) -> str:
        """The compilation directory."""
        attr = self.top.attributes.get("DW_AT_comp_dir")
        return _text(attr.value) if attr is not None else ""

    def file_name(self, index: int) -> str | None:
        """The path of file ``index`` as ``DW_AT_decl_file`` and ``DW_AT_call_file`` number them."""
        return self.file_names.get(index)

    def location(self, attr, die: DIE):
        """A location attribute parsed: a :class:`LocationExpr`, or a list of location-list entries."""
        return self.info.location_parser.parse_from_attribute(attr, self.cu.header.version, die=die)

    def _locations(self, die: DIE, attribute: str = "DW_AT_location"):
        """``(low, high, expression bytes)`` of each entry of ``die``'s location (``(0, 2**64, ...)`` for a
        single expression, valid wherever the DIE's scope is)."""
        attr = die.attributes.get(attribute)
        if attr is None:
            return
        parsed = self.location(attr, die)
        if isinstance(parsed, LocationExpr):
            yield 0, 1 << 64, list(parsed.loc_expr)
            return
        base = self.base_address
        for entry in parsed:
            if isinstance(entry, LocationEntry):
                low, high = entry.begin_offset, entry.end_offset
                if not entry.is_absolute:
                    low, high = low + base, high + base
                yield low, high, list(entry.loc_expr)
            elif hasattr(entry, "base_address"):
                base = entry.base_address

    def location_at(self, die: DIE, address: int, attribute: str = "DW_AT_location") -> list | None:
        """The DWARF expression (its bytes) locating ``die``'s value (or its ``attribute``: the frame base) at
        ``address``; None where it has none."""
        return next((expression for low, high, expression in self._locations(die, attribute)
                     if low <= address < high), None)

    def lifetime(self, die: DIE) -> list[tuple[int, int]]:
        """The address ranges where ``die`` has a location (everywhere in its scope for a single expression), but
        for those where only its value at the function's entry is known."""
        return [(low, high) for low, high, expression in self._locations(die)
                if not expression or expression[0] not in _ENTRY_VALUE]


class DebugInfo:
    """The DWARF of one object, whether it sits in the object or in its separate debug file."""

    def __init__(self, obj: ElfObject, path: str, dwarf) -> None:
        self.obj = obj
        self.path = path  # the file the DWARF was read from
        self.dwarf = dwarf
        self.location_parser = LocationParser(dwarf.location_lists())
        self._units: dict[int, Unit] = {}
        self._line_tables: dict[int | None, LineTable] = {}
        self._aranges = None

    @classmethod
    def of(cls, obj: ElfObject) -> DebugInfo:
        """The DWARF for ``obj``; :class:`ResolveError` saying how to get it when there is none."""
        info = _BY_OBJECT.get(obj)
        if info is None:
            info = _BY_OBJECT[obj] = cls._open(obj)
        return info

    @classmethod
    def _open(cls, obj: ElfObject) -> DebugInfo:
        candidates = [obj]
        debug_path = find_debug_file(obj)
        if debug_path:
            candidates.append(ElfObject.open(debug_path))
        for holder in candidates:
            if holder.section(".debug_info") is None:
                continue
            try:
                dwarf = holder.elf_file.get_dwarf_info(follow_links=False)
                dwarf.supplementary_dwarfinfo = _alternate(holder)
                return cls(obj, holder.path, dwarf)
            except _UNREADABLE as exc:
                raise ResolveError(f"{holder.path}: unreadable DWARF ({exc})") from None
        hint = f" (its debug file {debug_path} has none either)" if debug_path else ""
        raise ResolveError(f"{obj.path} has no DWARF debug information{hint}: rebuild it with -g, or install its "
                           f"debug symbols (Debian: the -dbgsym package, or debuginfod)")

    def line_table(self, offset: int | None, directory: str = "") -> LineTable:
        """The line program at ``offset`` of ``.debug_line`` (an empty table for None)."""
        table = self._line_tables.get(offset)
        if table is None or (directory and not table.directory):
            program = None
            if offset is not None:
                structs = DWARFStructs(little_endian=True, dwarf_format=self._line_format(offset), address_size=8)
                program = self.dwarf._parse_line_program_at_offset(offset, structs)
            table = self._line_tables[offset] = LineTable(program, directory)
        return table

    def _line_format(self, offset: int) -> int:
        section = self.dwarf.debug_line_sec
        data = section.stream.getbuffer()[offset:offset + 4] if hasattr(section.stream, "getbuffer") else b""
        return 64 if bytes(data) == b"\xff\xff\xff\xff" else 32

    def line_tables(self):
        """Every line program, read straight from ``.debug_line`` (no compile unit needs parsing to find which
        tables name a file)."""
        section = self.dwarf.debug_line_sec
        if section is None:
            return
        size = section.size
        offset = 0
        while offset < size:
            table = self.line_table(offset)
            yield table
            header = table.program.header
            offset += header["unit_length"] + (12 if self._line_format(offset) == 64 else 4)

    def unit(self, cu) -> Unit:
        unit = self._units.get(cu.cu_offset)
        if unit is None:
            unit = self._units[cu.cu_offset] = Unit(self, cu)
        return unit

    def units(self):
        """Every compile unit, parsed as it is reached."""
        for cu in self.dwarf.iter_CUs():
            yield self.unit(cu)

    def unit_at(self, address: int) -> Unit | None:
        """The compile unit whose code holds ``address``."""
        if self._aranges is None:
            self._aranges = self._read_aranges()
        i = bisect.bisect_right(self._aranges, (address, 1 << 64)) - 1
        while i >= 0:
            low, high, cu_offset = self._aranges[i]
            if low <= address < high:
                return self.unit(self.dwarf.get_CU_at(cu_offset))
            if high <= address and i >= 0 and low < address - (1 << 24):
                break
            i -= 1
        return None

    def _read_aranges(self) -> list[tuple[int, int, int]]:
        ranges = []
        aranges = self.dwarf.get_aranges()
        if aranges is not None:
            for entry in aranges.entries:
                if entry.length:
                    ranges.append((entry.begin_addr, entry.begin_addr + entry.length, entry.info_offset))
        if not ranges:  # no .debug_aranges: every unit's own ranges
            for unit in self.units():
                ranges.extend((low, high, unit.cu.cu_offset) for low, high in unit.ranges(unit.top))
        return sorted(ranges)

    def scopes_at(self, address: int) -> list[Scope]:
        """The scopes holding ``address``, innermost first (an inlined copy, then what it was inlined into)."""
        unit = self.unit_at(address)
        if unit is None:
            return []
        chain: list[Scope] = []
        level = unit.scopes
        while True:
            inner = next((scope for scope in level if scope.contains(address)), None)
            if inner is None:
                return chain[::-1]
            chain.append(inner)
            level = inner.children


def _alternate(holder: ElfObject):
    """The DWARF of the file ``.gnu_debugaltlink`` names (what dwz moved out of several debug files into one,
    as Debian's debug packages have it), found by its path or its build-id; None when there is no link."""
    raw = holder.section_bytes(".gnu_debugaltlink")
    if not raw or b"\0" not in raw:
        return None
    name = raw[:raw.index(b"\0")].decode("utf-8", "replace")
    build_id = raw[raw.index(b"\0") + 1:].hex()
    candidates = [os.path.join(os.path.dirname(holder.path), name)]
    if len(build_id) > 2:
        candidates += [os.path.join(root, ".build-id", build_id[:2], build_id[2:] + ".debug") for root in DEBUG_ROOTS]
    for path in candidates:
        if os.path.isfile(path):
            return ElfObject.open(path).elf_file.get_dwarf_info(follow_links=False)
    raise ResolveError(f"{holder.path}: its DWARF continues in the dwz file {name} (build-id {build_id}), which is "
                       f"not installed; install the package's debug symbols whole")


_BY_OBJECT: weakref.WeakKeyDictionary[ElfObject, DebugInfo] = weakref.WeakKeyDictionary()


def origin_of(die: DIE) -> DIE:
    """The DIE that names ``die``: followed through ``DW_AT_abstract_origin`` and ``DW_AT_specification``."""
    seen = 0
    while seen < 8:
        for attr in ("DW_AT_abstract_origin", "DW_AT_specification"):
            if attr in die.attributes:
                die = die.get_DIE_from_attribute(attr)
                break
        else:
            return die
        seen += 1
    return die


def die_name(die: DIE) -> str | None:
    """The name of ``die``, or of the DIE it is a copy or definition of."""
    attr = origin_of(die).attributes.get("DW_AT_name")
    return _text(attr.value) if attr is not None else None


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

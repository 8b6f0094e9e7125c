"""Decode the raw records of a tracefs event, as its ``events/GROUP/EVENT/format`` file describes them.

A record is what the kernel wrote for one hit: the ``struct trace_entry`` common fields, then for uprobe
events ``__probe_ip`` (entry) or ``__probe_func`` and ``__probe_ret_ip`` (return), then one field per fetch
argument, then the bytes of the dynamic (``__data_loc``) strings. ::

    >>> fmt = load_event_format(Path("/sys/kernel/tracing"), "uprobes_42", "hit")
    >>> record = fmt.decode(sample.raw)
    >>> record
    {'common_type': 2326, 'common_flags': 0, 'common_preempt_count': 0, 'common_pid': 4242,
     '__probe_ip': 94402513367369, 'i': 7, 's': 's7'}
    >>> record.errors
    {}

What a failed fetch leaves in the record (kernel/trace/trace_probe_tmpl.h, trace_uprobe.c):

- A string (``string``, ``ustring``, ``$comm``) whose read faults is stored as a ``__data_loc`` of length
  0: ``store_trace_args()`` rewrites it with ``make_data_loc(0, …)`` when ``process_fetch_insn()`` fails,
  and the text output prints ``(fault)`` for it. A readable empty string has length 1 (its NUL), so length
  0 always means a fault. :meth:`EventFormat.decode` gives ``""`` and reports it in ``errors``.
- A fixed-size value carries no mark. When the *last* dereference faults (``FETCH_OP_ST_MEM``),
  ``copy_from_user()`` zero-fills the destination, so the value reads 0. When an *earlier* dereference
  faults, ``process_fetch_insn_bottom()`` returns before storing and the field keeps whatever the per-CPU
  ``uprobe_cpu_buffer`` held from an earlier hit. Neither can be told apart from a real value.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ...errors import KernelEngineError

__all__ = ["Field", "FieldKind", "EventFormat", "Record", "FAULT", "parse_event_format", "load_event_format"]

FAULT = "fault"
"""The ``errors`` reason of a string the kernel could not read (a zero-length ``__data_loc``)."""

_FIELD = re.compile(r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
                    r"\s*signed:(?P<signed>\d+);", re.M)
_NAME = re.compile(r"(?P<name>\w+)(?:\[(?P<count>\d*)\])?\Z")
_NAME_LINE = re.compile(r"^name: (\S+)$", re.M)
_ID_LINE = re.compile(r"^ID: (\d+)$", re.M)
_PRINT_FMT = re.compile(r"^print fmt: (.*)$", re.M)
# Probe events print a char argument as name='%c' and a char array as name={'%c',...}
# (traceprobe_set_print_fmt); the field itself is declared u8, so the print format is the only witness.
_CHAR_ARG = re.compile(r"(\w+)=\{?'%c'")
_SIZED_TYPE = re.compile(r"[usx](8|16|32|64)\Z")
_INT_CODES = {(1, False): "B", (1, True): "b", (2, False): "H", (2, True): "h",
              (4, False): "I", (4, True): "i", (8, False): "Q", (8, True): "q"}
_DATA_LOC_SIZE = 4  # u32: length << 16 | offset from the start of the record (make_data_loc)


class FieldKind(Enum):
    INT = "int"          # one integer of 1, 2, 4 or 8 bytes
    INTS = "ints"        # an array of such integers -> list[int]
    CHAR = "char"        # one character -> str of length 1
    CHARS = "chars"      # a char array, read as a C string (up to its first NUL) -> str
    STRING = "string"    # __data_loc char[] -> str
    STRINGS = "strings"  # __data_loc char[][N] (a string array argument) -> list[str]
    BYTES = "bytes"      # anything else, left as it is -> bytes


@dataclass(frozen=True)
class Field:
    """One ``field:`` line. ``count`` is the array length (0 for a scalar); ``char`` marks characters."""

    name: str
    type: str
    offset: int
    size: int
    signed: bool
    data_loc: bool
    count: int = 0
    char: bool = False

    @property
    def kind(self) -> FieldKind:
        if self.data_loc:
            return FieldKind.STRINGS if self.count else FieldKind.STRING
        if self.char:
            return FieldKind.CHARS if self.count else FieldKind.CHAR
        if self.count:
            return FieldKind.INTS if (self.size // self.count, self.signed) in _INT_CODES else FieldKind.BYTES
        return FieldKind.INT if (self.size, self.signed) in _INT_CODES else FieldKind.BYTES

    def struct_code(self) -> str:
        """The :mod:`struct` code reading the field's bytes as one value (arrays as bytes, split later)."""
        if self.kind in (FieldKind.INT, FieldKind.STRING):
            return _INT_CODES[(self.size, self.signed and not self.data_loc)]
        return f"{self.size}s"


class Record(dict):
    """A decoded record: field name -> value, and ``errors``: field name -> why its value is not real."""

    __slots__ = ("errors",)

    errors: dict[str, str]


@dataclass
class EventFormat:
    """The layout of one event's records; :meth:`decode` turns a raw record into a :class:`Record`."""

    name: str
    id: int
    fields: list[Field]
    _struct: struct.Struct = field(init=False, repr=False)
    _names: tuple[str, ...] = field(init=False, repr=False)
    _fixups: tuple[tuple[int, str, FieldKind, struct.Struct | None], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.fields = sorted(self.fields, key=lambda f: f.offset)
        layout, cursor = ["<"], 0
        for f in self.fields:
            if f.offset < cursor:
                raise KernelEngineError(f"event {self.name}: field {f.name} overlaps the one before it")
            layout.append(f"{f.offset - cursor}x" if f.offset > cursor else "")
            layout.append(f.struct_code())
            cursor = f.offset + f.size
        self._struct = struct.Struct("".join(layout))
        self._names = tuple(f.name for f in self.fields)
        # Only these need work after the one unpack; integers (nearly every field) are a plain zip.
        self._fixups = tuple((index, f.name, f.kind, _item_struct(f)) for index, f in enumerate(self.fields)
                             if f.kind not in (FieldKind.INT, FieldKind.BYTES))

    def decode(self, raw: bytes) -> Record:
        """Decode one raw record (``PERF_SAMPLE_RAW`` data, which starts at ``common_type``)."""
        values, errors = self.unpack(raw)
        record = Record(zip(self._names, values))
        record.errors = errors
        return record

    def unpack(self, raw: bytes) -> tuple[list | tuple, dict[str, str]]:
        """The values of :meth:`decode`, in the order of :attr:`fields`, and its ``errors``; no dict built."""
        values = self._struct.unpack_from(raw)
        errors: dict[str, str] = {}
        if not self._fixups:
            return values, errors
        values = list(values)
        for index, name, kind, items in self._fixups:
            value = values[index]
            if kind is FieldKind.STRING:
                values[index] = _data_loc_string(raw, value, name, errors)
            elif kind is FieldKind.STRINGS:
                values[index] = [_data_loc_string(raw, loc, f"{name}[{i}]", errors)
                                 for i, loc in enumerate(items.unpack(value))]
            elif kind is FieldKind.INTS:
                values[index] = list(items.unpack(value))
            elif kind is FieldKind.CHARS:
                values[index] = value.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif kind is FieldKind.CHAR:
                values[index] = value.decode("latin-1")
        return values, errors


def _item_struct(f: Field) -> struct.Struct | None:
    """How to split an array field's bytes into its items."""
    if f.kind is FieldKind.STRINGS:
        return struct.Struct(f"<{f.count}I")
    if f.kind is FieldKind.INTS:
        return struct.Struct(f"<{f.count}{_INT_CODES[(f.size // f.count, f.signed)]}")
    return None


def _data_loc_string(raw: bytes, loc: int, name: str, errors: dict[str, str]) -> str:
    length, offset = loc >> 16, loc & 0xFFFF
    if not length:
        errors[name] = FAULT
        return ""
    end = offset + length
    if raw[end - 1] == 0:
        end -= 1
    return raw[offset:end].decode("utf-8", "replace")


def _parse_field(decl: str, offset: int, size: int, signed: bool, char_args: set[str]) -> Field:
    type_text, _, name_text = decl.strip().rpartition(" ")
    match = _NAME.match(name_text)
    if not type_text or not match:
        raise KernelEngineError(f"cannot read the event field '{decl.strip()}'")
    name = match["name"]
    if type_text.startswith("__data_loc "):
        if not type_text.startswith("__data_loc char["):
            raise KernelEngineError(f"event field '{decl.strip()}': only __data_loc strings are supported")
        # "__data_loc char[] s" is one string, "__data_loc char[][2] ss" an array of two.
        count = size // _DATA_LOC_SIZE if "][" in type_text else 0
        return Field(name, type_text, offset, size, signed, True, count)
    if match["count"] is None:
        count = 0
    elif match["count"]:
        count = int(match["count"])
    else:
        # Probe arrays are declared "s32 arr[]" with the whole size; the element size is in the type.
        sized = _SIZED_TYPE.fullmatch(type_text)
        if not sized:
            raise KernelEngineError(f"event field '{decl.strip()}': unknown element type")
        count = size // (int(sized[1]) // 8)
    return Field(name, type_text, offset, size, signed, False, count, name in char_args or type_text == "char")


def parse_event_format(text: str) -> EventFormat:
    """Parse the text of a tracefs ``format`` file."""
    name, event_id = _NAME_LINE.search(text), _ID_LINE.search(text)
    if not name or not event_id:
        raise KernelEngineError("not a tracefs event format: no 'name:' or 'ID:' line")
    print_fmt = _PRINT_FMT.search(text)
    char_args = set(_CHAR_ARG.findall(print_fmt[1])) if print_fmt else set()
    fields = [_parse_field(m["decl"], int(m["offset"]), int(m["size"]), m["signed"] == "1", char_args)
              for m in _FIELD.finditer(text)]
    return EventFormat(name[1], int(event_id[1]), fields)


def load_event_format(tracefs: Path, group: str, event: str) -> EventFormat:
    """Read and parse ``events/GROUP/EVENT/format`` under the tracefs mount ``tracefs``."""
    path = tracefs / "events" / group / event / "format"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise KernelEngineError(f"no event {group}/{event} in {tracefs} (was it deleted?)") from None
    except OSError as exc:
        raise KernelEngineError(f"cannot read {path}: {exc.strerror}") from None
    return parse_event_format(text)

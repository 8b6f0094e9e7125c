"""SDT markers read from an object's ``.note.stapsdt`` section (SystemTap SDT v3 notes).

Each note is one *site*: the link-time address of the marker's ``nop``, the address of ``_.stapsdt.base``
when the note was written, the semaphore address (0 for none) and three strings: provider, name and the
argument text. A marker (provider:name) may have many sites, inlined copies of the same macro, each with
its own argument text and possibly its own semaphore.

    >>> [m.qualified_name for m in read_markers(ElfObject.open("/usr/bin/python3.11"))][:2]
    ['python:audit', 'python:function__entry']
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..elf.objfile import ElfObject
from ..errors import ElfError
from .arguments import SdtArgument, parse_arguments

__all__ = ["SdtMarker", "SdtSite", "read_markers"]

_NOTE_OWNER = "stapsdt"
_NOTE_TYPE = 3
_ADDRESSES = struct.Struct("<QQQ")


@dataclass(frozen=True)
class SdtSite:
    """One call site of a marker, with addresses already corrected for prelink (``.stapsdt.base``)."""

    provider: str
    name: str
    address: int  # link-time virtual address of the probed nop
    offset: int | None  # file offset of the probed nop (None in a separate debug file, which holds no code)
    semaphore: int | None  # link-time address of the 2-byte counter
    semaphore_offset: int | None  # its file offset, through the segment that maps it (None: as for offset)
    args_text: str
    args: tuple[SdtArgument, ...] = field(compare=False)

    @property
    def qualified_name(self) -> str:
        return f"{self.provider}:{self.name}"


@dataclass(frozen=True)
class SdtMarker:
    """Every site of one provider:name, in address order."""

    provider: str
    name: str
    sites: tuple[SdtSite, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.provider}:{self.name}"

    @property
    def has_semaphore(self) -> bool:
        return any(site.semaphore is not None for site in self.sites)


def read_markers(obj: ElfObject) -> list[SdtMarker]:
    """Markers of ``obj`` sorted by provider:name; an object without ``.note.stapsdt`` has none."""
    base_section = obj.section(".stapsdt.base")
    sites: dict[tuple[str, str], list[SdtSite]] = {}
    try:
        for index, note in enumerate(obj.iter_notes(".note.stapsdt")):
            if note["n_name"] != _NOTE_OWNER or note["n_descsz"] < _ADDRESSES.size + 3:
                continue
            desc = note["n_desc"]
            if not isinstance(desc, bytes) or _note_type(note) != _NOTE_TYPE:
                continue
            site = _read_site(obj, desc, base_section.addr if base_section else 0, index)
            sites.setdefault((site.provider, site.name), []).append(site)
    except ElfError:
        raise
    except Exception as exc:  # pyelftools raises assorted errors on malformed notes
        raise ElfError(f"{obj.path}: malformed .note.stapsdt section ({exc})") from None
    return [SdtMarker(provider, name, tuple(sorted(group, key=lambda s: s.address)))
            for (provider, name), group in sorted(sites.items())]


def _note_type(note) -> int:
    # pyelftools names type 3 after the GNU namespace ("NT_GNU_BUILD_ID"); the raw number is what counts.
    n_type = note["n_type"]
    return n_type if isinstance(n_type, int) else _NOTE_TYPE if n_type == "NT_GNU_BUILD_ID" else -1


def _read_site(obj: ElfObject, desc: bytes, base_now: int, index: int) -> SdtSite:
    pc, base_then, semaphore = _ADDRESSES.unpack_from(desc)
    strings = desc[_ADDRESSES.size:].split(b"\0")
    if len(strings) < 4 or not strings[1]:
        raise ElfError(f"{obj.path}: SDT note {index} does not hold provider, name and argument strings")
    provider, name, args_text = (s.decode("utf-8", "replace") for s in strings[:3])
    if base_now and base_then:  # prelink moved the object: notes are not relocated, .stapsdt.base is
        pc += base_now - base_then
        if semaphore:
            semaphore += base_now - base_then
    segment = obj.segment_for_vaddr(pc)
    if segment is None or not segment.executable:
        raise ElfError(f"{obj.path}: SDT marker {provider}:{name} points at {pc:#x}, outside the object's code")
    in_file = obj.kind != "debug"  # a debug file keeps the program's headers but none of its bytes
    semaphore_offset = None
    if semaphore:
        holder = obj.segment_for_vaddr(semaphore)
        if holder is None:
            raise ElfError(f"{obj.path}: semaphore of SDT marker {provider}:{name} at {semaphore:#x} "
                           f"is outside every loadable segment")
        semaphore_offset = semaphore - holder.vaddr + holder.offset if in_file else None
    offset = pc - segment.vaddr + segment.offset if in_file else None
    return SdtSite(provider, name, pc, offset, semaphore or None, semaphore_offset,
                   args_text, tuple(parse_arguments(args_text)))

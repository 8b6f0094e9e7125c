"""An x86-64 ELF object on disk: its loadable segments, sections and symbols.

    >>> obj = ElfObject.open("/usr/bin/python3.11")
    >>> obj.kind, hex(obj.vaddr_to_offset(0x4f20d4))
    ('exec', '0xf20d4')
    >>> obj.describe_address(0x4f20d4)
    '_PyEval_EvalFrameDefault+0x1a24'

pyelftools reads the headers; the symbol tables themselves are decoded in bulk (see ``symbols.py``) because
big objects such as ``libjvm.so`` carry tens of thousands of symbols.
"""

from __future__ import annotations

import functools
import io
import lzma
import os
import struct
import zlib
from dataclasses import dataclass

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.construct import ConstructError as _ConstructError
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

from ..errors import ElfError, ResolveError
from .cfi import UnwindTable
from .locate import real_path
from .symbols import Symbol, SymbolTable, read_symbol_table

__all__ = ["ElfObject", "LoadSegment"]

_ELF_MAGIC = b"\x7fELF"
_DT_NEEDED, _DT_SONAME, _DT_FLAGS_1 = 1, 14, 0x6FFFFFFB
_R_X86_64_RELATIVE = 8
# What pyelftools (and the construct library under it) raise on malformed input, beyond its own ELFError.
_MALFORMED = (_PyElfError, _ConstructError, ValueError, KeyError, IndexError, UnicodeDecodeError, OverflowError)


@dataclass(frozen=True, slots=True)
class LoadSegment:
    """One PT_LOAD program header: ``[vaddr, vaddr+memsz)`` maps file bytes ``[offset, offset+filesz)``."""

    vaddr: int
    memsz: int
    offset: int
    filesz: int
    flags: int

    @property
    def executable(self) -> bool:
        return bool(self.flags & P_FLAGS.PF_X)

    @property
    def writable(self) -> bool:
        return bool(self.flags & P_FLAGS.PF_W)

    def contains_vaddr(self, vaddr: int) -> bool:
        return self.vaddr <= vaddr < self.vaddr + self.memsz

    def contains_offset(self, offset: int) -> bool:
        return self.offset <= offset < self.offset + self.filesz


_PLT_SECTIONS = (".plt", ".plt.sec", ".plt.got")
_SHF_COMPRESSED = 0x800


@dataclass(frozen=True, slots=True)
class _Section:
    name: str
    addr: int
    offset: int
    size: int
    type: str
    flags: int
    link: int


class ElfObject:
    """A 64-bit x86-64 ELF file opened for probing. Use :meth:`open`; instances are cached per file version."""

    def __init__(self, path: str, data: bytes) -> None:
        self.path = path
        self._data = data
        try:
            self._elf = ELFFile(io.BytesIO(data))
            header = self._elf.header
            self.elf_type = header["e_type"]
            self.entry = header["e_entry"]
            self.segments = tuple(
                LoadSegment(seg["p_vaddr"], seg["p_memsz"], seg["p_offset"], seg["p_filesz"], seg["p_flags"])
                for seg in self._elf.iter_segments(type="PT_LOAD")
            )
            self._sections = {
                sec.name: _Section(sec.name, sec["sh_addr"], sec["sh_offset"], sec["sh_size"], sec["sh_type"],
                                   sec["sh_flags"], sec["sh_link"])
                for sec in self._elf.iter_sections()
            }
            self.build_id = self._read_build_id()
            self.debuglink = self._read_debuglink()
        except _MALFORMED as exc:
            raise ElfError(f"{path}: malformed ELF file ({exc}); is it truncated?") from None
        for seg in self.segments:
            if seg.filesz and seg.offset + seg.filesz > len(data):
                raise ElfError(f"{path}: truncated ELF file: a segment ends at byte {seg.offset + seg.filesz:#x} "
                               f"but the file has {len(data):#x} bytes")

    @classmethod
    def open(cls, path: str) -> ElfObject:
        """Open ``path`` (following symlinks); raise :class:`ElfError` with a one-line reason if unusable."""
        real = real_path(path)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise ElfError(f"{path}: no such file") from None
        except PermissionError:
            raise ElfError(f"{path}: permission denied (run as a user who can read it)") from None
        except OSError as exc:
            raise ElfError(f"{path}: cannot open: {exc.strerror}") from None
        return _open_cached(real, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> ElfObject:
        """An object held in memory, such as the MiniDebugInfo ELF inside ``.gnu_debugdata``."""
        _check_ident(name, data)
        return cls(name, data)

    # -- layout -----------------------------------------------------------------------------------------

    @functools.cached_property
    def kind(self) -> str:
        """``exec`` (non-PIE executable), ``pie``, ``shared`` (library), ``debug`` (separate debug file)."""
        if self.elf_type == "ET_EXEC":
            return "debug" if self._is_debug_only() else "exec"
        if self.elf_type == "ET_DYN":
            if self._is_debug_only():
                return "debug"
            return "pie" if self._is_pie() else "shared"
        return self.elf_type

    @functools.cached_property
    def _dynamic(self) -> list[tuple[int, int]]:
        """The ``.dynamic`` entries (tag, value), up to DT_NULL."""
        # Elf64_Dyn records read directly: pyelftools' iter_tags() asserts or fails on a damaged .dynamic.
        raw = self.section_bytes(".dynamic") or b""
        entries = []
        for tag, value in struct.iter_unpack("<qQ", raw[:len(raw) - len(raw) % 16]):
            if tag == 0:  # DT_NULL
                break
            entries.append((tag, value))
        return entries

    @functools.cached_property
    def linked_names(self) -> tuple[str, ...]:
        """The libraries the object names (DT_NEEDED), then its own name (DT_SONAME), as written there."""
        strings = self.section_bytes(".dynstr") or b""
        names = [strings[value:strings.find(b"\0", value)].decode(errors="replace")
                 for tag, value in sorted(self._dynamic, key=lambda entry: entry[0] == _DT_SONAME)
                 if tag in (_DT_NEEDED, _DT_SONAME) and value < len(strings)]
        return tuple(names)

    @property
    def is_go(self) -> bool:
        """Whether the Go toolchain built the object (its build info, build id or function table is there)."""
        return any(name in self._sections for name in (".go.buildinfo", ".note.go.buildid", ".gopclntab"))

    @property
    def links_cxx_unwinder(self) -> bool:
        """Whether C++ exceptions may unwind through the object's frames: it links libstdc++ or libgcc_s (or is
        one), or holds the unwinder itself."""
        return (any(name.startswith(("libstdc++.so", "libgcc_s.so")) for name in self.linked_names)
                or bool(self.symbols.match("_Unwind_RaiseException")))

    def _is_pie(self) -> bool:
        tags = dict(reversed(self._dynamic))  # the first of each tag
        if _DT_FLAGS_1 in tags:
            return bool(tags[_DT_FLAGS_1] & 0x08000000)  # DF_1_PIE
        return ".interp" in self._sections and _DT_SONAME not in tags

    def _is_debug_only(self) -> bool:
        text = self._sections.get(".text")
        return text is not None and text.type == "SHT_NOBITS"

    @property
    def elf_file(self) -> ELFFile:
        """pyelftools' view of the file, for what it reads best (DWARF)."""
        return self._elf

    def section(self, name: str) -> _Section | None:
        return self._sections.get(name)

    def section_bytes(self, name: str) -> bytes | None:
        """The section's contents (decompressed, for a compressed one: Go compresses its debug sections)."""
        sec = self._sections.get(name)
        if sec is None or sec.type == "SHT_NOBITS":
            return None
        if sec.flags & _SHF_COMPRESSED:
            return self._decompressed(name)
        return self._data[sec.offset:sec.offset + sec.size]

    @functools.lru_cache(maxsize=8)
    def _decompressed(self, name: str) -> bytes | None:
        try:
            return self._elf.get_section_by_name(name).data()
        except _MALFORMED + (zlib.error,):
            return None

    def segment_for_vaddr(self, vaddr: int) -> LoadSegment | None:
        return next((seg for seg in self.segments if seg.contains_vaddr(vaddr)), None)

    def vaddr_to_offset(self, vaddr: int) -> int:
        """File offset of the byte at link-time address ``vaddr``; it must be backed by the file."""
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
                return vaddr - seg.vaddr + seg.offset
        raise ResolveError(f"{self.path}: address {vaddr:#x} is not in any loadable segment of the file")

    def offset_to_vaddr(self, offset: int) -> int:
        """Link-time address at which file offset ``offset`` is loaded."""
        for seg in self.segments:
            if seg.contains_offset(offset):
                return offset - seg.offset + seg.vaddr
        raise ResolveError(f"{self.path}: file offset {offset:#x} is not in any loadable segment of the file")

    def read(self, vaddr: int, size: int) -> bytes:
        """``size`` bytes of the file image at link-time address ``vaddr``."""
        offset = self.vaddr_to_offset(vaddr)
        return self._data[offset:offset + size]

    def pointer_at(self, vaddr: int) -> int | None:
        """The 8-byte word at link-time address ``vaddr`` as the loader leaves it, in link-time terms: the addend
        of an ``R_X86_64_RELATIVE`` relocation there, else the file's bytes (RELR and non-PIE objects keep the
        value in place); None where the file has no bytes."""
        if vaddr in self._relative_addends:
            return self._relative_addends[vaddr]
        try:
            word = self.read(vaddr, 8)
        except ResolveError:
            return None
        return int.from_bytes(word, "little") if len(word) == 8 else None

    @functools.cached_property
    def _relative_addends(self) -> dict[int, int]:
        section = self._elf.get_section_by_name(".rela.dyn")
        if not isinstance(section, RelocationSection):
            return {}
        return {rel["r_offset"]: rel["r_addend"] for rel in section.iter_relocations()
                if rel["r_info_type"] == _R_X86_64_RELATIVE}

    @property
    def exception_tables(self) -> bool:
        """Whether the object has C++ exception tables (landing pads the unwinder jumps to)."""
        return ".gcc_except_table" in self._sections

    def is_outlined_part(self, vaddr: int) -> bool:
        """Whether code that starts at ``vaddr`` is a part of another function moved out of line (``foo.cold``),
        not a function of its own; with no symbol there, it may be, unless it is a stub of the PLT."""
        if any(sec.addr <= vaddr < sec.addr + sec.size for name in _PLT_SECTIONS
               if (sec := self._sections.get(name)) is not None):
            return False
        sym = self.symbols.containing(vaddr)
        return sym is None or sym.value != vaddr or ".cold" in sym.name

    def outlined_parts(self, vaddr: int) -> tuple[tuple[int, int], ...]:
        """``(start, end)`` of each part of the function starting at ``vaddr`` moved out of line under a name of its
        own (``foo.cold``, ``foo.cold.1``): where a landing pad, reached by no branch, may lie."""
        sym = self.symbols.containing(vaddr)
        if sym is None or sym.value != vaddr or len({s.value for s in self.symbols.lookup(sym.name)}) > 1:
            return ()  # two functions of that name (static, in two files): whose part is whose cannot be told
        return self._cold_parts.get(sym.name, ())

    def neighbours(self, vaddr: int, count: int) -> list[tuple[int, int]]:
        """The code of up to ``count`` functions on each side of the one holding ``vaddr``, as its unwind entries
        delimit them."""
        return self.unwind_table.around(vaddr, count)

    def owns_part(self, function: int, part: int) -> bool:
        """Whether code starting at ``part`` is a part of the function starting at ``function``, moved out of
        line under its name (``foo.cold``, ``foo.cold.1``)."""
        owner, named = self.symbols.containing(function), self.symbols.containing(part)
        return (owner is not None and named is not None and named.value == part
                and named.name.startswith(f"{owner.name}.cold"))

    @functools.cached_property
    def _cold_parts(self) -> dict[str, tuple[tuple[int, int], ...]]:
        parts: dict[str, list[tuple[int, int]]] = {}
        for sym in self.symbols.functions:
            base, cold, _ = sym.name.partition(".cold")
            if cold and sym.size:
                parts.setdefault(base, []).append((sym.value, sym.value + sym.size))
        return {name: tuple(sorted(set(ranges))) for name, ranges in parts.items()}

    @property
    def text_bias(self) -> int:
        """``p_vaddr - p_offset`` of the first executable segment (0 for most PIEs and libraries)."""
        seg = next((s for s in self.segments if s.executable), None)
        return seg.vaddr - seg.offset if seg else 0

    # -- symbols ----------------------------------------------------------------------------------------

    @functools.cached_property
    def symbols(self) -> SymbolTable:
        """Every defined symbol: ``.symtab``, ``.dynsym``, MiniDebugInfo and a separate debug file if found."""
        from .debuginfo import find_debug_file  # local: debuginfo opens ElfObjects itself

        tables = [self._own_symbols("symtab"), self._own_symbols("dynsym")]
        if not tables[0]:
            tables.append(self._minidebuginfo_symbols())
            debug_path = find_debug_file(self)
            if debug_path:
                try:
                    tables.append(ElfObject.open(debug_path)._own_symbols("symtab"))
                except ElfError:
                    pass  # a damaged debug file must not make the object itself unusable
        return SymbolTable([sym for table in tables for sym in table])

    @property
    def has_symtab(self) -> bool:
        return ".symtab" in self._sections

    def _own_symbols(self, which: str) -> list[Symbol]:
        sections = {"symtab": ".symtab", "dynsym": ".dynsym"}
        try:
            sec = self._elf.get_section_by_name(sections[which])
            if sec is None or sec["sh_type"] == "SHT_NOBITS":
                return []
            strtab = self._elf.get_section(sec["sh_link"])
            versions = self._versions(sec) if which == "dynsym" else None
            return read_symbol_table(self._data, sec["sh_offset"], sec["sh_size"], strtab["sh_offset"],
                                     strtab["sh_size"], origin=which, versions=versions)
        except _MALFORMED as exc:
            raise ElfError(f"{self.path}: malformed {sections[which]}: {exc}") from None

    def _versions(self, dynsym) -> list[tuple[str, bool] | None] | None:
        """Per ``.dynsym`` entry: (version name, is default) or None, from ``.gnu.version`` and ``.gnu.version_d``."""
        versym = self._elf.get_section_by_name(".gnu.version")
        verdef = self._elf.get_section_by_name(".gnu.version_d")
        if versym is None or verdef is None:
            return None
        names = {}
        for version, auxiliaries in verdef.iter_versions():
            aux = next(iter(auxiliaries), None)
            if aux is not None and not version["vd_flags"] & 1:  # VER_FLG_BASE names the file, not a version
                names[version["vd_ndx"]] = aux.name
        raw = self.section_bytes(".gnu.version") or b""
        result: list[tuple[str, bool] | None] = []
        for i in range(0, len(raw) - 1, 2):
            index = int.from_bytes(raw[i:i + 2], "little")
            name = names.get(index & 0x7FFF)
            result.append((name, not index & 0x8000) if name else None)
        return result

    def _minidebuginfo_symbols(self) -> list[Symbol]:
        packed = self.section_bytes(".gnu_debugdata")
        if not packed:
            return []
        try:
            inner = ElfObject.from_bytes(f"{self.path}[.gnu_debugdata]", lzma.decompress(packed))
        except (lzma.LZMAError, ElfError):
            raise ElfError(f"{self.path}: .gnu_debugdata (MiniDebugInfo) is not an xz-compressed ELF file") from None
        return [sym.with_origin("minidebuginfo") for sym in inner._own_symbols("symtab")]

    @functools.cached_property
    def unwind_table(self) -> UnwindTable:
        """The object's call frame information, for unwinding stacks through its code."""
        return UnwindTable(self)

    def function_start(self, vaddr: int) -> int | None:
        """Where the function holding ``vaddr`` starts, from its symbol or its unwind entry; None if unknown."""
        sym = self.symbols.containing(vaddr)
        starts = [start for start in (sym.value if sym else None, self.unwind_table.start_of(vaddr))
                  if start is not None]
        return max(starts, default=None)

    def function_bounds(self, vaddr: int) -> tuple[int, int] | None:
        """``(start, end)`` of the function holding ``vaddr``: its symbol's extent, or else from its unwind entry
        to the next one (padding included); None when neither says."""
        sym = self.symbols.containing(vaddr)
        if sym is not None and sym.size and sym.value <= vaddr < sym.value + sym.size:
            return sym.value, sym.value + sym.size
        start, end = self.unwind_table.start_of(vaddr), self.unwind_table.next_after(vaddr)
        return (start, end) if start is not None and end is not None else None

    def describe_address(self, vaddr: int) -> str:
        """``symbol+0xoff`` for display, or the bare address when no symbol covers it."""
        sym = self.symbols.containing(vaddr)
        if sym is None:
            return f"{vaddr:#x}"
        return sym.name if vaddr == sym.value else f"{sym.name}+{vaddr - sym.value:#x}"

    # -- notes ------------------------------------------------------------------------------------------

    def iter_notes(self, section_name: str):
        """pyelftools note containers of one SHT_NOTE section (empty if absent)."""
        sec = self._elf.get_section_by_name(section_name)
        if sec is None or sec["sh_type"] != "SHT_NOTE":
            return iter(())
        return sec.iter_notes()

    def _read_build_id(self) -> str | None:
        for note in self.iter_notes(".note.gnu.build-id"):
            if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                return note["n_desc"] if isinstance(note["n_desc"], str) else note["n_desc"].hex()
        return None

    def _read_debuglink(self) -> str | None:
        raw = self.section_bytes(".gnu_debuglink")
        if not raw or b"\0" not in raw:
            return None
        return raw[:raw.index(b"\0")].decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<ElfObject {self.path} {self.kind}>"


def _check_ident(path: str, data: bytes) -> None:
    if len(data) < 64 and data[:4] == _ELF_MAGIC:
        raise ElfError(f"{path}: truncated ELF file ({len(data)} bytes, shorter than an ELF header)")
    if data[:4] != _ELF_MAGIC:
        raise ElfError(f"{path}: not an ELF file")
    if data[4] != 2:
        raise ElfError(f"{path}: 32-bit ELF file; uprobes probes x86-64 (64-bit) objects only")
    if data[5] != 1:
        raise ElfError(f"{path}: big-endian ELF file; uprobes probes x86-64 objects only")
    machine = int.from_bytes(data[18:20], "little")
    if machine != 62:  # EM_X86_64
        raise ElfError(f"{path}: ELF file for another machine (e_machine {machine}); uprobes probes x86-64 only")


@functools.lru_cache(maxsize=64)
def _open_cached(real: str, ino: int, dev: int, mtime_ns: int, size: int) -> ElfObject:
    # Keyed by inode and mtime as well as path so a rebuilt file is read again.
    if not os.path.isfile(real):
        raise ElfError(f"{real}: not a regular file")
    try:
        with open(real, "rb") as f:
            data = f.read()
    except PermissionError:
        raise ElfError(f"{real}: permission denied (run as a user who can read it)") from None
    except OSError as exc:
        raise ElfError(f"{real}: cannot read: {exc.strerror}") from None
    _check_ident(real, data)
    return ElfObject(real, data)

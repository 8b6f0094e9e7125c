"""Symbols of an ELF object: reading them in bulk, looking them up by name, glob and address.

pyelftools decodes one symbol at a time through ``construct`` (about 20 µs each); ``libjvm.so`` has 58,000
in ``.symtab``, so the fixed-size ``Elf64_Sym`` records are unpacked here with one ``struct.iter_unpack``.
"""

from __future__ import annotations

import bisect
import fnmatch
import functools
import re
import struct
from typing import NamedTuple

__all__ = ["Symbol", "SymbolTable", "read_symbol_table"]

_ELF64_SYM = struct.Struct("<IBBHQQ")  # st_name, st_info, st_other, st_shndx, st_value, st_size
_SHN_UNDEF, _SHN_ABS = 0, 0xFFF1
_TYPES = {0: "notype", 1: "object", 2: "func", 3: "section", 4: "file", 5: "common", 6: "tls", 10: "ifunc"}
_BINDINGS = {0: "local", 1: "global", 2: "weak", 10: "unique"}
_CODE_TYPES = frozenset({"func", "ifunc"})


class Symbol(NamedTuple):
    """A defined symbol. ``name`` carries no version; :attr:`display_name` does (``malloc@@GLIBC_2.2.5``).

    A named tuple, not a frozen dataclass: big objects have 100,000 symbols, made twice as fast this way.
    """

    name: str
    value: int
    size: int
    type: str
    binding: str
    origin: str  # "symtab", "dynsym" or "minidebuginfo"
    version: str | None = None
    default_version: bool = True

    @property
    def display_name(self) -> str:
        if self.version is None:
            return self.name
        return f"{self.name}{'@@' if self.default_version else '@'}{self.version}"

    @property
    def is_function(self) -> bool:
        return self.type in _CODE_TYPES

    def with_origin(self, origin: str) -> Symbol:
        return self._replace(origin=origin)


def read_symbol_table(data: bytes, offset: int, size: int, str_offset: int, str_size: int, *, origin: str,
                      versions: list[tuple[str, bool] | None] | None = None) -> list[Symbol]:
    """Decode the ``Elf64_Sym`` array at ``data[offset:offset+size]`` with names from the string table."""
    if offset + size > len(data) or str_offset + str_size > len(data):
        raise ValueError("symbol or string table extends past the end of the file")
    strings = data[str_offset:str_offset + str_size]
    table = data[offset:offset + size - size % _ELF64_SYM.size]
    symbols = []
    for index, (name_off, info, _other, shndx, value, sym_size) in enumerate(_ELF64_SYM.iter_unpack(table)):
        sym_type = _TYPES.get(info & 0xF, "other")
        if shndx == _SHN_UNDEF or name_off == 0 or sym_type in ("section", "file"):
            continue
        if shndx == _SHN_ABS and sym_type not in _CODE_TYPES:
            continue
        end = strings.find(b"\0", name_off)
        if end < 0:
            raise ValueError(f"symbol {index} has a name outside the string table")
        name = strings[name_off:end].decode("utf-8", "replace")
        version = versions[index] if versions and index < len(versions) else None
        if version is None and "@" in name:  # .symtab spells versions into the name
            name, at, ver = name.partition("@")
            default = ver.startswith("@")
            version = (ver.lstrip("@"), default)
        symbols.append(Symbol(name, value, sym_size, sym_type, _BINDINGS.get(info >> 4, "other"), origin,
                              version[0] if version else None, version[1] if version else True))
    return symbols


class SymbolTable:
    """Defined symbols merged from several tables, deduplicated by (name, value, version).

    One name at one address may carry several versions (libc's ``clock_gettime@GLIBC_2.2.5`` and
    ``clock_gettime@@GLIBC_2.17``): each version is kept, and an unversioned copy (from ``.symtab``) is dropped.
    """

    def __init__(self, symbols: list[Symbol]) -> None:
        seen: dict[tuple[str, int], Symbol] = {}
        other_versions: dict[tuple[str, int, str, bool], Symbol] = {}
        for sym in symbols:
            key = (sym.name, sym.value)
            known = seen.get(key)
            if known is None or (known.version is None and sym.version is not None):
                seen[key] = sym
            elif sym.version is not None and (sym.version, sym.default_version) != (known.version,
                                                                                     known.default_version):
                other_versions.setdefault((*key, sym.version, sym.default_version), sym)
        kept = [*seen.values(), *other_versions.values()]
        self._symbols = sorted(kept, key=lambda s: (s.value, -s.size, s.name, s.version or "", not s.default_version))
        self._functions = [s for s in self._symbols if s.is_function]
        self._function_starts = [s.value for s in self._functions]

    @functools.cached_property
    def _by_name(self) -> dict[str, list[Symbol]]:
        by_name: dict[str, list[Symbol]] = {}
        for sym in self._symbols:
            by_name.setdefault(sym.name, []).append(sym)
            if sym.version is not None:
                by_name.setdefault(sym.display_name, []).append(sym)
        return by_name

    def __iter__(self):
        return iter(self._symbols)

    def __len__(self) -> int:
        return len(self._symbols)

    def __bool__(self) -> bool:
        return bool(self._symbols)

    @property
    def functions(self) -> list[Symbol]:
        """Function symbols, one per (name, version, address), sorted by address."""
        return self._functions

    def lookup(self, name: str) -> list[Symbol]:
        """Symbols called ``name``; ``name`` may carry a version (``malloc@@GLIBC_2.2.5``)."""
        return list(self._by_name.get(name, ()))

    def match(self, pattern: str, *, functions_only: bool = True) -> list[Symbol]:
        """Symbols whose name (or versioned name) matches the glob ``pattern``, in address order."""
        pool = self._functions if functions_only else self._symbols
        exact = [s for s in self.lookup(pattern) if s.is_function or not functions_only]
        if exact or not any(c in pattern for c in "*?["):  # a name itself (Go's main.(*T).m) before a glob
            return exact
        return [s for s in pool
                if fnmatch.fnmatchcase(s.name, pattern) or fnmatch.fnmatchcase(s.display_name, pattern)]

    def aliases(self, value: int) -> list[Symbol]:
        """Every function symbol at address ``value``."""
        i = bisect.bisect_left(self._function_starts, value)
        result = []
        while i < len(self._functions) and self._functions[i].value == value:
            result.append(self._functions[i])
            i += 1
        return result

    def containing(self, vaddr: int) -> Symbol | None:
        """The function whose ``[value, value+size)`` holds ``vaddr`` (the nearest preceding one if sizeless)."""
        i = bisect.bisect_right(self._function_starts, vaddr) - 1
        best = None
        while i >= 0:
            sym = self._functions[i]
            if sym.value <= vaddr < sym.value + max(sym.size, 1):
                return sym
            if best is None and sym.size == 0:
                best = sym
            if vaddr - sym.value > 1 << 20:
                break
            i -= 1
        return best

    def closest_names(self, name: str, limit: int = 3) -> list[str]:
        """Names that look like ``name`` (a name, a versioned name or a glob), for "did you mean" hints."""
        import difflib

        versioned = "@" in name
        names = {s.display_name if versioned else s.name for s in self._functions}
        fixed = [part.lower() for part in re.split(r"[*?]|\[[^]]*\]|@.*", name) if part]
        contains = sorted(n for n in names if fixed and all(part in n.lower() for part in fixed))
        close = difflib.get_close_matches(name, names, n=limit, cutoff=0.6)
        return list(dict.fromkeys(close + sorted(contains, key=len)))[:limit]

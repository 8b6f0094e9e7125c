"""Turning what a user types (``libc``, ``libc.so.6``, ``python3``, ``./app``) into the path of a file."""

from __future__ import annotations

import os
import shutil
import struct

from ..errors import ElfError

__all__ = ["find_object", "read_ld_cache"]

LD_CACHE = "/etc/ld.so.cache"
_NEW_MAGIC = b"glibc-ld.so.cache1.1"
_FLAG_X86_64 = 0x0300 | 0x0003  # FLAG_X8664_LIB64 | FLAG_ELF_LIBC6
_ENTRY = struct.Struct("<iIIIQ")  # flags, key, value, osversion, hwcap


def read_ld_cache(path: str = LD_CACHE) -> dict[str, str]:
    """Library soname -> path for the x86-64 entries of the dynamic linker's cache (as ``ldconfig -p`` lists)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return {}
    start = data.find(_NEW_MAGIC)
    if start < 0 or start + 48 > len(data):
        return {}
    (count,) = struct.unpack_from("<I", data, start + 20)
    entries_at = start + 48  # magic(20) + nlibs(4) + len_strings(4) + flags(1) + pad(3) + extension(4) + unused(12)
    libraries: dict[str, str] = {}
    for i in range(min(count, (len(data) - entries_at) // _ENTRY.size)):
        flags, key, value, _os, _hwcap = _ENTRY.unpack_from(data, entries_at + i * _ENTRY.size)
        if flags & 0xFFFF != _FLAG_X86_64:
            continue
        # String offsets in the new format are relative to the start of the new-format header.
        name, target = _cstring(data, start + key), _cstring(data, start + value)
        if name and target:
            libraries.setdefault(name, target)
    return libraries


def _cstring(data: bytes, offset: int) -> str:
    end = data.find(b"\0", offset)
    return data[offset:end].decode("utf-8", "replace") if 0 <= offset < end else ""


def find_object(name: str) -> str:
    """Resolve ``name`` to a real path: a path as given, a library through the linker cache, a program through PATH."""
    if "/" in name:
        if not os.path.exists(name):
            raise ElfError(f"{name}: no such file")
        return os.path.realpath(name)
    for resolver in (_from_ld_cache, _from_path) if _looks_like_library(name) else (_from_path, _from_ld_cache):
        found = resolver(name)
        if found:
            return os.path.realpath(found)
    if os.path.isfile(name):
        return os.path.realpath(name)
    raise ElfError(f"{name}: no such file, program in PATH or library in the linker cache "
                   f"(give a path, or check `ldconfig -p`)")


def _looks_like_library(name: str) -> bool:
    return name.startswith("lib") or ".so" in name


def _from_path(name: str) -> str | None:
    """The first ELF program called ``name`` in PATH; wrapper scripts (pyenv shims, ...) are passed over."""
    found = []
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = shutil.which(name, path=directory or ".")
        if candidate:
            found.append(candidate)
            if _is_elf(candidate):
                return candidate
    return found[0] if found else None


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _from_ld_cache(name: str) -> str | None:
    cache = read_ld_cache()
    if name in cache:
        return cache[name]
    # "libc" -> "libc.so.6": the soname whose stem is the given name, shortest version first.
    stems = sorted((soname for soname in cache if soname.split(".so", 1)[0] in (name, name.split(".so", 1)[0])
                    and soname.startswith(name)), key=len)
    return cache[stems[0]] if stems else None

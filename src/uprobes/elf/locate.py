"""Turning what a user types (``libc``, ``libc.so.6``, ``python3``, ``./app``) into the path of a file."""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import shutil
import struct
import subprocess

from ..errors import ElfError, UprobesError

__all__ = ["find_object", "find_objects", "glob_matches", "is_elf", "is_glob", "linked_objects", "read_ld_cache",
           "real_path"]

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


def real_path(path: str) -> str:
    """``path`` with its symbolic links resolved, as :func:`os.path.realpath` does, but for a path through
    another process's root (``/proc/PID/root/...``, a container's files): its links are resolved inside that
    root, and the result still goes through it (realpath would give a path of our own file system), unless
    our file system has that very file at that path. An ``/proc/PID/exe`` is the program's path in that root."""
    path = os.path.abspath(path)
    exe = _PROC_EXE.fullmatch(path)
    if exe:
        try:
            path = f"/proc/{exe[1]}/root{os.readlink(path).removesuffix(' (deleted)')}"
        except OSError:
            return os.path.realpath(path)
    inside = _PROC_ROOT.fullmatch(path)
    if inside is None:
        return os.path.realpath(path)
    root = inside[1]
    resolved = _resolved_within(root, inside[2] or "/")
    try:
        if os.path.samestat(os.stat(root + resolved), os.stat(resolved)):
            return os.path.realpath(resolved)  # the same file is at the same path here: ours is plainer
    except OSError:
        pass
    return root + resolved


_PROC_ROOT = re.compile(r"(/proc/\d+/root)(/.*)?")
_PROC_EXE = re.compile(r"/proc/(\d+)/exe")
_MAX_LINKS = 40  # the kernel's limit on links followed in one lookup


def _resolved_within(root: str, path: str) -> str:
    """``path`` (absolute, in the file system whose root is ``root``) with every link resolved there."""
    pending = [part for part in path.split("/") if part]
    done: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = root + "/" + "/".join([*done, part])
        if os.path.islink(here) and links < _MAX_LINKS:
            links += 1
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            pending = [p for p in target.split("/") if p] + pending
            continue
        done.append(part)
    return "/" + "/".join(done)


def find_object(name: str, pid: int | None = None) -> str:
    """Resolve ``name`` to a real path: a path as given, a library through the linker cache, a program through PATH.
    With ``pid``, as that process sees it: an absolute path in its mount namespace (a container's), and a bare
    name (``libc``) first among the files it maps."""
    if pid is not None:
        found = _in_process(name, pid)
        if found:
            return found
    if "/" in name:
        if not os.path.exists(name):
            raise ElfError(f"{name}: no such file")
        return real_path(name)
    for resolver in (_from_ld_cache, _from_path) if _looks_like_library(name) else (_from_path, _from_ld_cache):
        found = resolver(name)
        if found:
            return real_path(found)
    if os.path.isfile(name):
        return real_path(name)
    raise ElfError(f"{name}: no such file, program in PATH or library in the linker cache "
                   f"(give a path, or check `ldconfig -p`)")


def find_objects(name: str, pid: int | None = None) -> list[str]:
    """:func:`find_object`, and where ``name`` holds a glob (``*``, ``?``, ``[...]``), every ELF file it matches
    (with ``pid``, those of the process's file system, and the objects it maps that match), each file once
    (by device and inode), in path order; a glob that matches none is an error."""
    if not is_glob(name):
        return [find_object(name, pid)]
    if name == "*" and pid is None:
        raise ElfError("PATH '*' (or none) is every object a process maps: give -p PID (or, to trace, a command "
                       "to run), or a path, or a glob of paths")
    from ..proc.maps import mapped_objects  # local, as in _in_process

    # with -p a bare name (libc*, *) is of the objects it maps; a path, of its files too (its root's, for an
    # absolute one)
    root = f"/proc/{pid}/root" if pid is not None and name.startswith("/") else ""
    candidates = glob.glob(root + name) if pid is None or "/" in name else []
    if pid is not None:
        candidates += [f"/proc/{pid}/root" + path for path in mapped_objects(pid) if glob_matches(path, name)]
    found: dict[tuple[int, int], str] = {}
    for candidate in sorted(candidates):
        if os.path.isfile(candidate) and is_elf(candidate):
            stat = os.stat(candidate)
            found.setdefault((stat.st_dev, stat.st_ino), real_path(candidate))
    if not found:
        where = f" (as process {pid} sees its files, and the objects it maps)" if pid is not None else ""
        raise ElfError(f"{name}: no ELF file matches{where}")
    return list(found.values())


def linked_objects(program: str) -> list[str]:
    """The libraries ``program`` links, as its dynamic linker finds them (``ld.so --list``, which is what ldd
    runs: the objects are mapped, none of their code runs), and the linker itself; none for a static program or
    a file that is not one."""
    from .objfile import ElfObject  # local: objfile uses this module's paths

    try:
        interpreter = (ElfObject.open(program).section_bytes(".interp") or b"").rstrip(b"\0").decode()
    except (UprobesError, UnicodeDecodeError):
        return []
    if not interpreter:
        return []
    try:
        listed = subprocess.run([interpreter, "--list", program], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    paths = [line.split("=>")[-1].split(" (0x")[0].strip() for line in listed.stdout.splitlines()]
    return list(dict.fromkeys(real_path(path) for path in paths if path.startswith("/") and os.path.isfile(path)))


def is_glob(name: str) -> bool:
    """Whether ``name`` is a glob (``*``, ``?``, ``[...]``), and not the name of a file that has those."""
    return glob.has_magic(name) and not os.path.exists(name)


def glob_matches(path: str, pattern: str) -> bool:
    """Whether a mapped object's ``path`` matches ``pattern`` as a file-system glob would (``*`` within one
    component); a pattern without ``/`` is matched against the file name."""
    if "/" not in pattern:
        return fnmatch.fnmatchcase(os.path.basename(path), pattern)
    parts, patterns = path.split("/"), pattern.split("/")
    return len(parts) == len(patterns) and all(map(fnmatch.fnmatchcase, parts, patterns))


def _in_process(name: str, pid: int) -> str | None:
    """``name`` as process ``pid`` sees it: a path in its root, or the first object it maps with that name
    (``libc``, ``libc.so.6``, ``server``); None when it names nothing there."""
    from ..proc.maps import mapped_objects  # local: proc imports nothing of elf, elf little of proc

    root = f"/proc/{pid}/root"
    if name.startswith("/") and not name.startswith("/proc/"):
        return real_path(root + name) if os.path.exists(root + name) else None
    if "/" in name:
        return None
    try:
        mapped = mapped_objects(pid)
    except UprobesError:
        return None
    for path in mapped:
        base = os.path.basename(path)
        if base == name or base.split(".so", 1)[0] == name or (".so" in name and base.startswith(name)):
            return real_path(root + path) if os.path.exists(root + path) else None
    return None


def _looks_like_library(name: str) -> bool:
    return name.startswith("lib") or ".so" in name


def _from_path(name: str) -> str | None:
    """The first ELF program called ``name`` in PATH; wrapper scripts (pyenv shims, ...) are passed over."""
    found = []
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = shutil.which(name, path=directory or ".")
        if candidate:
            found.append(candidate)
            if is_elf(candidate):
                return candidate
    return found[0] if found else None


def is_elf(path: str) -> bool:
    """Whether the file at ``path`` starts as an ELF file does."""
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

"""What a live process has mapped, from ``/proc/PID/maps``."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..elf.locate import real_path
from ..errors import ProcessError

__all__ = ["Mapping", "read_maps", "free_range_near", "mapped_objects", "path_in_process", "runtime_addresses", "unreadable_reason"]


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    device: int = 0  # as os.stat's st_dev

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def file_backed(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")


def read_maps(pid: int) -> list[Mapping]:
    """Mappings of process ``pid``; :class:`ProcessError` if it is gone or not ours to read."""
    try:
        # File names are bytes: surrogateescape keeps any that are not UTF-8 usable with os functions.
        with open(f"/proc/{pid}/maps", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it ended while we read
        raise ProcessError(f"process {pid} does not exist") from None
    except PermissionError:
        raise ProcessError(unreadable_reason(pid, "maps")) from None
    if not lines and not os.path.exists(f"/proc/{pid}"):
        raise ProcessError(f"process {pid} does not exist")
    mappings = []
    for line in lines:
        fields = line.split(maxsplit=5)
        start, _, end = fields[0].partition("-")
        # The kernel writes a newline in a file name as \012 (show_map_vma -> seq_file_path).
        path = fields[5].replace("\\012", "\n") if len(fields) > 5 else ""
        major, _, minor = fields[3].partition(":")
        mappings.append(Mapping(int(start, 16), int(end, 16), fields[1], int(fields[2], 16), int(fields[4]), path,
                                os.makedev(int(major, 16), int(minor, 16))))
    return mappings


def unreadable_reason(pid: int, name: str) -> str:
    """Why /proc/PID/NAME was refused to us: the process is another user's, or ours but not dumpable."""
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        owner = None
    if owner == os.geteuid():
        return (f"cannot read /proc/{pid}/{name}: process {pid} is yours but not dumpable (it changed its "
                f"credentials or called prctl(PR_SET_DUMPABLE, 0)); only root may read or trace it")
    return (f"cannot read /proc/{pid}/{name}: permission denied (the process belongs to another user; run as "
            f"root or as its owner)")


def mapped_objects(pid: int) -> list[str]:
    """Paths of the files mapped executable in ``pid``, the main program first, each once."""
    paths = dict.fromkeys(m.path for m in read_maps(pid) if m.executable and m.file_backed)
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None
    if exe in paths:
        paths = {exe: None, **paths}
    return list(paths)


def path_in_process(pid: int, path: str) -> str:
    """A path to open ``path`` as process ``pid`` sees it, across mount namespaces (containers)."""
    if path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    through_root = f"/proc/{pid}/root{path}"
    return real_path(through_root) if os.path.exists(through_root) else path


def runtime_addresses(mappings: list[Mapping], path: str, file_offset: int, permission: str) -> list[int]:
    """Where the byte at ``file_offset`` of ``path`` is, in every mapping of that file with ``permission``
    ("x" for code, "w" for data such as SDT semaphores). The file is its device and inode, as for the kernel:
    a hard link is the same file; the path counts where an overlay shows another device than the maps do."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    return [m.start + file_offset - m.offset for m in mappings
            if m.inode == st.st_ino and (m.device == st.st_dev or m.path == path) and permission in m.perms
            and m.offset <= file_offset < m.offset + (m.end - m.start)]


_LOWEST_ADDRESS = 1 << 16  # vm.mmap_min_addr's default
_HIGHEST_ADDRESS = 1 << 47  # the end of user space with 4-level page tables
_GUARD = 1 << 16  # left free on each side of a range we take


def free_range_near(mappings: list[Mapping], low: int, high: int, size: int, reach: int) -> int | None:
    """A page-aligned start for ``size`` free bytes whose every byte lies within ``reach`` of all of
    ``[low, high)``, or None. Taken at the top of a free gap (below the code first): never just above a
    mapping that grows up (the heap), never in the gap below the stack."""
    window_low, window_high = max(_LOWEST_ADDRESS, high - reach), min(_HIGHEST_ADDRESS, low + reach)
    ordered = sorted(mappings, key=lambda m: m.start)
    edges = [_LOWEST_ADDRESS, *(e for m in ordered for e in (m.start, m.end)), _HIGHEST_ADDRESS]
    below_stack = {m.start for m in ordered if m.path == "[stack]"}
    candidates = []
    for gap_start, gap_end in zip(edges[::2], edges[1::2]):
        if gap_end in below_stack:
            continue
        top = min(gap_end - _GUARD, window_high) - size
        top -= top % 4096
        if top >= max(gap_start + _GUARD, window_low):
            candidates.append((gap_end > low, abs(top - low), top))
    return min(candidates)[2] if candidates else None

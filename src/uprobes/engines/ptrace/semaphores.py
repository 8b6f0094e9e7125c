"""SDT semaphores raised by the ptrace engine: once per armed site and mapping while we are attached.

A marker guarded by ``PROVIDER_NAME_ENABLED()`` fires only while its 2-byte counter is above zero. As the
kernel does for each uprobe it installs, we add one to the counter for every armed site when its writable
mapping exists (a library mapped later is raised when the engine places its probes), and take that one back
at detach, in a fork child we let go, and never below zero. A count goes with its mapping: once the library
is unmapped (dlclose) it is forgotten, so the library raised again when it comes back, wherever it lands,
and nothing at the old address is touched. A kernel-engine consumer of the same marker keeps its own count.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from ...probes.resolve import Probe
from ...proc.maps import Mapping, runtime_addresses
from .memory import ProcessMemory

__all__ = ["Semaphores", "Count"]


class Count(NamedTuple):
    """One count we added: the counter's runtime address, the file mapped there, and the site's probe."""

    address: int
    inode: int
    path: str
    offset: int


class Semaphores:
    """The counts this engine added in one address space."""

    def __init__(self, raised: set[Count] | None = None) -> None:
        self.raised: set[Count] = set(raised or ())

    def raise_armed(self, memory: ProcessMemory, mappings: list[Mapping], probes: list[Probe], via: int) -> None:
        """Forget the counts whose mapping went, then add one to the semaphore of each probe (a marker site)
        whose counter is mapped now, once per mapping."""
        self._forget_unmapped(mappings)
        for probe in probes:
            if probe.ref_ctr_offset is None:
                continue
            try:
                inode = os.stat(probe.path).st_ino
            except OSError:
                continue
            for address in runtime_addresses(mappings, probe.path, probe.ref_ctr_offset, "w"):
                count = Count(address, inode, probe.path, probe.offset)
                if count in self.raised:
                    continue
                try:
                    _add(memory, address, 1, via)
                except OSError:
                    continue
                self.raised.add(count)

    def lower(self, memory: ProcessMemory, path: str, offset: int, via: int) -> None:
        """Take back the counts we added for the site at ``path``:``offset`` (its probe went)."""
        for count in [c for c in self.raised if (c.path, c.offset) == (path, offset)]:
            self._take_back(memory, count, via)

    def lower_all(self, memory: ProcessMemory, mappings: list[Mapping], via: int) -> None:
        """Take back every count we added whose mapping is still there."""
        self._forget_unmapped(mappings)
        for count in list(self.raised):
            self._take_back(memory, count, via)

    def _forget_unmapped(self, mappings: list[Mapping]) -> None:
        self.raised = {c for c in self.raised if any(m.start <= c.address < m.end and m.inode == c.inode
                                                     and "w" in m.perms for m in mappings)}

    def _take_back(self, memory: ProcessMemory, count: Count, via: int) -> None:
        self.raised.discard(count)
        try:
            _add(memory, count.address, -1, via)
        except OSError:
            pass


def _add(memory: ProcessMemory, address: int, delta: int, via: int) -> None:
    value = int.from_bytes(memory.read(address, 2), "little")
    memory.write(address, max(0, min(0xFFFF, value + delta)).to_bytes(2, "little"), via)

"""SDT semaphores raised by the ptrace engine: once per armed site and process while we are attached.

A marker guarded by ``PROVIDER_NAME_ENABLED()`` fires only while its 2-byte counter is above zero. As the
kernel does for each uprobe it installs, we add one to the counter for every armed site when its writable
mapping exists (a library mapped later is raised
when the engine places its probes), and take that one back at detach, in a fork child we let go, and
never below zero. A kernel-engine consumer of the same marker adds and removes its own count.
"""

from __future__ import annotations

from ...probes.resolve import Probe
from ...proc.maps import Mapping, runtime_addresses
from .memory import ProcessMemory

__all__ = ["Semaphores"]


class Semaphores:
    """The counts this engine added in one address space: (counter's runtime address, site's path, site's offset)."""

    def __init__(self, raised: set[tuple[int, str, int]] | None = None) -> None:
        self.raised: set[tuple[int, str, int]] = set(raised or ())

    def raise_armed(self, memory: ProcessMemory, mappings: list[Mapping], probes: list[Probe], tid: int) -> None:
        """Add one to the semaphore of each probe (a marker site) whose counter is mapped now, once."""
        for probe in probes:
            if probe.ref_ctr_offset is None:
                continue
            for address in runtime_addresses(mappings, probe.path, probe.ref_ctr_offset, "w"):
                count = (address, probe.path, probe.offset)
                if count in self.raised:
                    continue
                try:
                    _add(memory, address, 1, tid)
                except OSError:
                    continue
                self.raised.add(count)

    def lower(self, memory: ProcessMemory, path: str, offset: int, tid: int) -> None:
        """Take back the counts we added for the site at ``path``:``offset`` (its probe went)."""
        for count in [c for c in self.raised if c[1:] == (path, offset)]:
            self._take_back(memory, count, tid)

    def lower_all(self, memory: ProcessMemory, tid: int) -> None:
        """Take back every count we added (the mapping may be gone with its library: nothing to do then)."""
        for count in list(self.raised):
            self._take_back(memory, count, tid)

    def _take_back(self, memory: ProcessMemory, count: tuple[int, str, int], tid: int) -> None:
        self.raised.discard(count)
        try:
            _add(memory, count[0], -1, tid)
        except OSError:
            pass


def _add(memory: ProcessMemory, address: int, delta: int, tid: int) -> None:
    value = int.from_bytes(memory.read(address, 2), "little")
    memory.write(address, max(0, min(0xFFFF, value + delta)).to_bytes(2, "little"), tid)

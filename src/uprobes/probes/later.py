"""Probes whose PATH is ``*`` or a glob, in the objects traced processes map after a run has started.

``uprobe:*:malloc`` with ``-p`` or a launched command is every object the process maps: those it maps when the
run starts are resolved then, and each it maps later (a library it links, loads with ``dlopen``, a program it
execs) is resolved when an engine sees it mapped (:data:`uprobes.engines.base.LaterProbes`). A probe point is
given once, whichever process maps its file, by device and inode.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import replace

from ..elf.locate import glob_matches
from ..elf.objfile import ElfObject
from ..errors import ElfError, NotInObject, UprobesError
from ..proc.maps import path_in_process
from .resolve import Probe, ReturnMode, resolve_probe
from .spec import ProbeSpec

__all__ = ["ObjectsLater", "probe_point"]


def probe_point(probe: Probe) -> tuple:
    """What makes two probes one point: the file (device and inode), the offset, entry or return, the event."""
    file = os.stat(probe.path)
    return file.st_dev, file.st_ino, probe.offset, probe.is_return, probe.event


def _file(path: str) -> tuple[int, int] | None:
    try:
        file = os.stat(path)
    except OSError:
        return None
    return file.st_dev, file.st_ino


class ObjectsLater:
    """The probe points of ``specs`` (PATH ``*`` or a glob) in each object a process maps, those not given
    before; ``searched``: the files the specs were resolved in already (at the start), which are not searched
    again; ``shape`` makes a run's probes of what a text resolves to (``latency``: an entry and its returns)."""

    def __init__(self, specs: list[ProbeSpec], known: Iterable[Probe], returns: ReturnMode,
                 searched: Iterable[str] = (), shape: Callable[[list[Probe]], list[Probe]] | None = None) -> None:
        self.specs = specs
        self._returns = returns
        self._shape = shape
        self._searched = {_file(path) for path in searched} - {None}
        self._points = {probe_point(probe) for probe in known}
        self._found = {spec.text for spec in specs if any(p.spec == spec.text for p in known)}
        #: Probes found in an object but not placed there, and why (each to be said once).
        self.left_out: list[str] = []

    def __call__(self, pid: int, path: str) -> list[Probe]:
        """The new probe points in the object process ``pid`` maps at ``path`` (as it sees it)."""
        opened = path_in_process(pid, path)
        file = _file(opened)
        if file is None or file in self._searched:
            return []
        self._searched.add(file)
        found = []
        opened_once: dict[str, ElfObject] = {}  # for the specs of this object only: a run may map thousands
        for spec in self.specs:
            if not glob_matches(path, spec.target):
                continue
            try:
                probes = resolve_probe(replace(spec, target=opened), opened_once, returns=self._returns)
            except (NotInObject, ElfError):  # not in this object, or no object to probe (a file that is gone)
                continue
            except UprobesError as exc:  # there, but not as asked
                self._found.add(spec.text)
                self.left_out.append(f"{exc} (in {path}): left out")
                continue
            self._found.add(spec.text)
            for probe in self._shape(probes) if self._shape else probes:
                point = probe_point(probe)
                if point not in self._points:
                    self._points.add(point)
                    found.append(probe)
        return found

    def unfound(self) -> list[str]:
        """The texts that named nothing in any object seen so far."""
        return [spec.text for spec in self.specs if spec.text not in self._found]

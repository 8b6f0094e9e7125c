"""The functions a JIT compiler says it wrote: ``/tmp/perf-PID.map``, one ``START SIZE NAME`` line each (hex),
as the JVM's perf-map-agent, Node's ``--perf-basic-prof`` and Python 3.12's perf trampoline write it.

The file is the process's own: in its mount namespace (read through ``/proc/PID/root``), named by the pid it
has in its pid namespace. It only grows while the program runs, so it is read again when it has changed.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

from .status import namespace_pid

__all__ = ["JitFunction", "PerfMap"]


@dataclass(frozen=True)
class JitFunction:
    start: int
    size: int
    name: str


class PerfMap:
    """The perf map of process ``pid``, read when first asked and again when the file has changed."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.path = f"/tmp/perf-{namespace_pid(pid) or pid}.map"  # as the process names it
        self._stamp: tuple[int, int] | None = None
        self._functions: list[JitFunction] = []
        self._starts: list[int] = []

    @property
    def functions(self) -> list[JitFunction]:
        """Every function the file lists, by address (the last line for an address wins: code written again)."""
        self._read()
        return self._functions

    def containing(self, address: int) -> JitFunction | None:
        """The function whose code holds ``address``, or None."""
        self._read()
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._functions[i].start + max(self._functions[i].size, 1):
            return self._functions[i]
        return None

    def _read(self) -> None:
        through_root = f"/proc/{self.pid}/root{self.path}"
        try:
            st = os.stat(through_root)
            if (st.st_size, st.st_mtime_ns) == self._stamp:
                return
            with open(through_root, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return  # none (yet), or the process is gone: what was read is kept
        self._stamp = (st.st_size, st.st_mtime_ns)
        by_start: dict[int, JitFunction] = {}
        for line in lines:
            start, size, name = (line.split(None, 2) + ["", ""])[:3]
            try:
                function = JitFunction(int(start, 16), int(size, 16), name)
            except ValueError:
                continue  # not a map line
            by_start[function.start] = function
        self._functions = sorted(by_start.values(), key=lambda f: f.start)
        self._starts = [f.start for f in self._functions]

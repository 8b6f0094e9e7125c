"""Processes by command: every running process whose name or command line matches a glob, as ``pgrep`` (and
``pgrep -f``) would find it."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence

from .status import status_field

__all__ = ["matching_processes"]


def matching_processes(globs: Sequence[str]) -> dict[int, str]:
    """Each process (not a kernel thread, not a zombie, not this one nor one it runs under) whose name (``comm``, as ``ps -e`` shows
    it) or command line (its arguments joined by spaces) matches one of ``globs`` (``*``, ``?``, ``[...]``,
    case-sensitive): pid -> the first glob it matches."""
    patterns = [(glob, re.compile(fnmatch.translate(glob))) for glob in globs]
    ours = _ancestors(os.getpid())
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                arguments = f.read()
            with open(f"/proc/{entry.name}/comm", "rb") as f:
                name = f.read().rstrip(b"\n")
        except OSError:
            continue  # gone meanwhile
        if not arguments:  # a kernel thread or a zombie: no user code to probe
            continue
        line = arguments.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "surrogateescape")
        command = name.decode("utf-8", "surrogateescape")
        glob = next((glob for glob, pattern in patterns if pattern.fullmatch(command) or pattern.fullmatch(line)),
                    None)
        if glob is not None:
            found[int(entry.name)] = glob
    return found


def _ancestors(pid: int) -> set[int]:
    """``pid`` and the processes it runs under (the front of ``uprobes``, a sudo, a shell), up to init."""
    found = set()
    while pid > 0 and pid not in found:
        found.add(pid)
        pid = int(status_field(f"/proc/{pid}/status", "PPid") or 0)
    return found

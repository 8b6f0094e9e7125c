"""The tracefs side of the kernel engine: defining, and deleting, uprobe events under one group per run.

Definitions are appended to ``uprobe_events`` one line at a time; after a refused write the last entry of
``error_log`` is turned into one line that names the probe and the token the kernel pointed at. Groups are
called ``uprobes_<pid>_<start>_<n>`` after the process that owns them, its start time and its count of runs,
so ``cleanup`` can tell exactly which runs are gone (a pid is reused, the pair with its start time is not)
and a new run never meets a group a dead one left.
"""

from __future__ import annotations

import ctypes
import errno
import io
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ...errors import KernelEngineError
from ...proc.status import start_time

__all__ = ["Tracefs", "GROUP_PREFIX", "new_group", "stale_groups"]

TRACEFS = Path("/sys/kernel/tracing")
GROUP_PREFIX = "uprobes_"
_GROUP = re.compile(rf"{GROUP_PREFIX}(\d+)(?:_(\d+)_\d+)?\Z")  # uprobes_<pid> before the start time was kept
_runs = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)
_ERROR_ENTRY = re.compile(r"error: (?P<message>.*)\n(?P<prefix>\s+Command: )(?P<command>.*)\n(?P<caret> *)\^")


@dataclass(frozen=True)
class DefinedEvent:
    group: str
    event: str

    @property
    def name(self) -> str:
        return f"{self.group}/{self.event}"


class Tracefs:
    """The tracing file system, mounted if it is not yet."""

    def __init__(self, root: Path = TRACEFS) -> None:
        self.root = root
        self._writers: dict[str, io.FileIO] = {}
        if os.geteuid() != 0:
            raise KernelEngineError("the kernel engine needs root (it writes /sys/kernel/tracing/uprobe_events); "
                                    "run as root or use --engine ptrace")
        if not (root / "uprobe_events").exists():
            self._mount()

    def _mount(self) -> None:
        """mount(2) itself: the mount program may not be on PATH."""
        if _libc.mount(b"nodev", bytes(self.root), b"tracefs", 0, None) != 0:
            reason = f"cannot mount it: {os.strerror(ctypes.get_errno())}"
        elif not (self.root / "uprobe_events").exists():
            reason = "no uprobe_events after mounting (kernel without CONFIG_UPROBE_EVENTS?)"
        else:
            return
        raise KernelEngineError(f"tracefs is not usable at {self.root}: {reason}; use --engine ptrace")

    def _append(self, name: str, line: str) -> None:
        """Write one command to ``name``, kept open from one command to the next (each open and close of
        uprobe_events costs more than a short command; a run defines thousands)."""
        writer = self._writers.get(name)
        if writer is None:
            # Python's "a" mode seeks, and tracefs refuses that
            writer = self._writers[name] = io.FileIO(os.open(self.root / name, os.O_WRONLY | os.O_APPEND), "w")
        writer.write((line + "\n").encode())

    def close(self) -> None:
        """Close the files kept open for writing (a later write opens them again)."""
        while self._writers:
            self._writers.popitem()[1].close()

    def define(self, line: str, probe_text: str) -> DefinedEvent:
        """Append one ``p:``/``r:`` definition; a refusal raises with the kernel's reason and token."""
        try:
            self._append("uprobe_events", line)
        except OSError as exc:
            raise KernelEngineError(f"probe '{probe_text}': the kernel refused it: {self._last_error(exc)}") from None
        group, event = line.split(" ", 1)[0][2:].split("/")
        return DefinedEvent(group, event)

    def _last_error(self, exc: OSError) -> str:
        try:
            log = (self.root / "error_log").read_text()
        except OSError:
            log = ""
        entries = list(_ERROR_ENTRY.finditer(log))
        if not entries:
            return os.strerror(exc.errno) if exc.errno else str(exc)
        last = entries[-1]
        command, column = last["command"], len(last["caret"]) - len(last["prefix"])
        if not 0 <= column < len(command):
            return last["message"]
        # The caret points into one word of the command; name that whole word (a fetch argument, say).
        start = command.rfind(" ", 0, column) + 1
        return f"{last['message']} (at '{command[start:].split(' ', 1)[0]}')"

    def delete(self, event: DefinedEvent) -> None:
        """Remove one event; a missing one is not an error (a previous cleanup may have taken it)."""
        try:
            self._append("uprobe_events", f"-:{event.name}")
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise KernelEngineError(f"cannot delete uprobe event {event.name}: it is in use (perf or BPF "
                                        f"still holds it)") from None
            if exc.errno != errno.ENOENT:
                raise KernelEngineError(f"cannot delete uprobe event {event.name}: {os.strerror(exc.errno)}") from None

    def event_dir(self, event: DefinedEvent) -> Path:
        return self.root / "events" / event.group / event.event

    def event_id(self, event: DefinedEvent) -> int:
        return int((self.event_dir(event) / "id").read_text())

    def defined_events(self) -> list[DefinedEvent]:
        """Every uprobe event now defined, as ``uprobe_events`` lists them."""
        events = []
        for line in (self.root / "uprobe_events").read_text().splitlines():
            head = line.split(" ", 1)[0]
            if ":" in head and "/" in head:
                group, event = head.split(":", 1)[1].split("/", 1)
                events.append(DefinedEvent(group, event))
        return events

    def profile(self) -> list[tuple[str, int]]:
        """Each uprobe now defined, as its ``uprobe_events`` line, with its hits as ``uprobe_profile`` counts
        them (system-wide). The two files list the probes in the same order, a line each, the probes appended
        to one event too (which ``uprobe_profile`` names alike)."""
        definitions = (self.root / "uprobe_events").read_text().splitlines()
        hits = [int(line.split()[-1]) for line in (self.root / "uprobe_profile").read_text().splitlines()
                if line.strip()]
        if len(definitions) != len(hits):
            raise KernelEngineError(f"uprobe_events lists {len(definitions)} probes, uprobe_profile {len(hits)}: "
                                    f"a probe was defined or deleted meanwhile; try again")
        return list(zip(definitions, hits))


def new_group() -> str:
    """A group name for a new run of this process, which no other run, live or dead, can have."""
    pid = os.getpid()
    return f"{GROUP_PREFIX}{pid}_{start_time(pid)}_{next(_runs)}"


def stale_groups(events: list[DefinedEvent]) -> list[str]:
    """Our groups whose process has ended: no process has the pid in the name with that start time (or, in
    the older names without one, no process has that pid)."""
    stale = []
    for group in sorted({e.group for e in events}):
        match = _GROUP.match(group)
        if not match:
            continue
        started = start_time(int(match[1]))
        if started is None or match[2] is not None and started != int(match[2]):
            stale.append(group)
    return stale



"""The consumer model both engines report to: a Python handler per probe, the hit it receives, and how it
leaves (:data:`REMOVE`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .probes.resolve import Probe

__all__ = ["Hit", "Consumer", "REMOVE"]

REMOVE = object()  # a handler returns this to be removed from its probe


@dataclass
class Hit:
    """What a Python handler receives: the probe, the thread, its registers and a safe memory reader."""

    probe: Probe
    pid: int
    tid: int
    regs: Any  # ``struct user_regs_struct`` fields: rdi, rip...
    memory: Any  # read() and read_string() raise OSError on a bad address; the target is never harmed
    args: dict
    errors: dict


@dataclass
class Consumer:
    """A Python handler of one probe's hits; ``pid``: only that process's. A handler that returns
    :data:`REMOVE` goes; when a probe's last consumer goes, so does the probe, and its byte is restored."""

    handler: Callable[[Hit], object]
    pid: int | None = None
    stop: bool = False  # the thread stays stopped while the handler runs (a trap), not run later from a record

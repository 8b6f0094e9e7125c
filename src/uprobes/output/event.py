"""One probe hit, as every engine reports it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

__all__ = ["Event", "ArgValue"]

ArgValue = int | float | str | list | None


@dataclass(slots=True)
class Event:
    """A hit of one probe point in one thread.

    ``args`` maps fetch-argument names to values; a fetch that failed is None with the reason in ``errors``.
    ``retval`` is set for return probes only.
    """

    probe: str
    pid: int
    tid: int
    comm: str
    ts_ns: int  # CLOCK_MONOTONIC
    cpu: int
    ip: int
    args: dict[str, ArgValue] = field(default_factory=dict)
    retval: int | None = None
    errors: dict[str, str] | None = None
    is_return: bool = False
    probe_index: int = 0  # which of the attached probes, in the order given to the engine

    def to_json(self) -> str:
        record = {"probe": self.probe, "pid": self.pid, "tid": self.tid, "comm": self.comm, "ts_ns": self.ts_ns,
                  "cpu": self.cpu, "ip": self.ip, "args": self.args}
        if self.is_return:
            record["retval"] = self.retval
        if self.errors:
            record["errors"] = self.errors
        return json.dumps(record, ensure_ascii=False)

"""One probe hit, as every engine reports it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

__all__ = ["Event", "ArgValue", "encode_json", "json_string"]

ArgValue = int | float | str | list | None
json_string = json.encoder.encode_basestring  # a str as JSON, non-ASCII characters kept as they are
# One encoder for every event: json.dumps with an option builds a new JSONEncoder per call.
encode_json = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode


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
    stack: list[str] | None = None  # the user stack's frames, innermost first (``trace --stack``)

    def to_json(self, realtime_offset_ns: int | None = None) -> str:
        """The event as one JSON object (the fields in the order the README shows); with
        ``realtime_offset_ns`` (CLOCK_REALTIME - CLOCK_MONOTONIC), its wall-clock time too, ``realtime_ns``."""
        # Formatted here rather than by json.dumps: that builds a dict and walks it, 5 times slower.
        realtime = "" if realtime_offset_ns is None else f'"realtime_ns": {self.ts_ns + realtime_offset_ns}, '
        line = (f'{{"probe": {json_string(self.probe)}, "pid": {self.pid}, "tid": {self.tid}, '
                f'"comm": {json_string(self.comm)}, "ts_ns": {self.ts_ns}, {realtime}"cpu": {self.cpu}, '
                f'"ip": {self.ip}, "args": {encode_json(self.args) if self.args else "{}"}')
        if self.is_return:
            line += f', "retval": {"null" if self.retval is None else self.retval}'
        if self.errors:
            line += f', "errors": {encode_json(self.errors)}'
        if self.stack is not None:
            line += f', "stack": {encode_json(self.stack)}'
        return line + "}"

"""Writing events and hit counts as text for people or JSON lines for programs."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TextIO

from .columns import EventColumns
from .event import ArgValue, Event
from ..probes.fetchargs import NULL_POINTER
from ..probes.resolve import Probe

__all__ = ["EventWriter", "format_count_table", "count_records"]


def _value(value: ArgValue, in_hex: bool = False, error: str | None = None) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return NULL_POINTER if error == NULL_POINTER else "?"
    if in_hex and isinstance(value, int):
        return hex(value)
    if in_hex and isinstance(value, list):
        return f"[{', '.join(_value(item, True) for item in value)}]"
    return str(value)


class EventWriter:
    """Writes one line per event, and the lost-event report at the end."""

    def __init__(self, out: TextIO, as_json: bool, probes: Sequence[Probe] = (), wall_clock: bool = False) -> None:
        """``probes``: the run's, by index (text writes their ``x``-typed arguments in hex, and leaves out the
        raw ``retval`` of those that fetch ``$retval`` typed), a list that may grow as the run goes (probes in
        objects mapped later); ``wall_clock``: JSON events give their wall-clock time too."""
        self.out = out
        self.as_json = as_json
        self._probes = probes
        self._hex_names: list[frozenset[str]] = []
        self._raw_retval: list[bool] = []
        # CLOCK_MONOTONIC timestamps are shown as wall-clock time of day.
        self._wall_offset_ns = time.time_ns() - time.monotonic_ns()
        self._json_offset = self._wall_offset_ns if wall_clock else None

    def event(self, event: Event) -> None:
        if self.as_json:
            self.out.write(event.to_json(self._json_offset) + "\n")
            return
        wall = (event.ts_ns + self._wall_offset_ns) / 1e9
        clock = time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1e6):06d}"
        if event.probe_index >= len(self._hex_names):
            for probe in self._probes[len(self._hex_names):]:
                self._hex_names.append(probe.hex_names)
                self._raw_retval.append(not probe.fetches_retval)
        in_hex = self._hex_names[event.probe_index] if event.probe_index < len(self._hex_names) else ()
        errors = event.errors or {}
        args = " ".join(f"{name}={_value(value, name in in_hex, errors.get(name))}"
                        for name, value in event.args.items())
        raw = self._raw_retval[event.probe_index] if event.probe_index < len(self._raw_retval) else True
        ret = f" retval={_value(event.retval)}" if event.is_return and raw else ""
        errors = "".join(f" ({name}: {reason})" for name, reason in errors.items() if reason != NULL_POINTER)
        stack = "".join(f"        {frame}\n" for frame in event.stack or ())
        self.out.write(f"{clock} {event.comm:<16} {event.pid}/{event.tid} {event.probe}"
                       f"{' ' + args if args else ''}{ret}{errors}\n{stack}")

    def columns(self, events: EventColumns) -> None:
        """Many events at once: JSON lines formatted in bulk, text one event at a time."""
        if self.as_json:
            if len(events):
                self.out.flush()  # what was written as text goes first
                self.out.buffer.write(events.json_lines(self._json_offset))
            return
        for event in events.events():
            self.event(event)

    def lost(self, count: int) -> None:
        if self.as_json:
            self.out.write(json.dumps({"lost": count}) + "\n")


def count_records(counts: list[tuple[str, str, int, int]]) -> list[dict]:
    """(probe, path, offset, hits) tuples as JSON-ready records, most hits first."""
    ordered = sorted(counts, key=lambda c: (-c[3], c[0], c[2]))
    return [{"probe": probe, "path": path, "offset": offset, "hits": hits} for probe, path, offset, hits in ordered]


def format_count_table(counts: list[tuple[str, str, int, int]]) -> str:
    """Hits per probe point, most first, as an aligned table."""
    records = count_records(counts)
    width = max([len(r["probe"]) for r in records] + [5])
    lines = [f"{'PROBE':<{width}}  {'HITS':>10}  WHERE"]
    lines += [f"{r['probe']:<{width}}  {r['hits']:>10}  {r['path']}:{r['offset']:#x}" for r in records]
    return "\n".join(lines) + "\n"


def format_keyed_counts(keys: tuple[str, ...], rows: list[tuple[str, tuple, int]]) -> str:
    """Hits per probe and key ((probe, key values, hits), in order), as an aligned table: a column per key."""
    table = [("PROBE", *keys, "HITS")] + [(probe, *(_value(v) for v in key), str(hits)) for probe, key, hits in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(width) if i == 0 or i < len(row) - 1 and not _numeric(cell) else
                                cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
                      for row in table) + "\n"


def _numeric(cell: str) -> bool:
    return cell.lstrip("-").isdigit()

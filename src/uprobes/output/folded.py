"""Hits counted per distinct user stack, written as folded lines (``root;...;leaf COUNT``), the input of
flamegraph.pl, inferno and speedscope, or as JSON records."""

from __future__ import annotations

import json
from collections import Counter

from .event import Event

__all__ = ["StackCounts"]


class StackCounts:
    """Hits per probe and stack (frames innermost first, as events carry them)."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, tuple[str, ...]]] = Counter()

    def add(self, events: list[Event]) -> None:
        """Count ``events`` (each with its stack)."""
        self._counts.update((event.probe, tuple(event.stack or ())) for event in events)

    def folded(self) -> str:
        """A line per distinct stack, root first, hits of every probe summed; most hits first."""
        stacks: Counter[tuple[str, ...]] = Counter()
        for (_, frames), hits in self._counts.items():
            stacks[frames] += hits
        ordered = sorted(stacks.items(), key=lambda item: (-item[1], item[0]))
        return "".join(f"{';'.join(reversed(frames))} {hits}\n" for frames, hits in ordered)

    def json_lines(self) -> str:
        """A record per probe and distinct stack, ``{"probe", "stack" (innermost first), "hits"}``."""
        ordered = sorted(self._counts.items(), key=lambda item: (-item[1], item[0]))
        return "".join(json.dumps({"probe": probe, "stack": list(frames), "hits": hits}) + "\n"
                       for (probe, frames), hits in ordered)

"""``uprobes cleanup``: delete the kernel uprobe events of runs that are gone."""

from __future__ import annotations

import argparse

from ..engines.kernel.tracefs import Tracefs, stale_groups

__all__ = ["run_cleanup"]


def run_cleanup(args: argparse.Namespace) -> int:
    tracefs = Tracefs()
    events = tracefs.defined_events()
    groups = set(stale_groups(events))
    removed = [event for event in events if event.group in groups]
    for event in removed:
        tracefs.delete(event)
    print(f"removed {len(removed)} events of {len(groups)} finished runs" if removed else "nothing to clean up")
    return 0

"""``uprobes cleanup``: delete the kernel uprobe events of runs that are gone."""

from __future__ import annotations

import argparse
import sys

from ..engines.kernel.tracefs import Tracefs, stale_groups
from ..errors import KernelEngineError

__all__ = ["run_cleanup"]


def run_cleanup(args: argparse.Namespace) -> int:
    """Delete every event of the groups whose process has ended. An event something still holds (EBUSY) is left
    and named, once per group, and the other groups are cleaned all the same; the status is then 1."""
    tracefs = Tracefs()
    events = tracefs.defined_events()
    groups = set(stale_groups(events))
    removed, left = 0, {}
    for event in events:
        if event.group in groups:
            try:
                tracefs.delete(event)
                removed += 1
            except KernelEngineError as exc:
                left.setdefault(event.group, str(exc))
    print(f"removed {removed} events of {len(groups)} finished runs" if groups else "nothing to clean up")
    for group, reason in left.items():
        print(f"uprobes: left group {group} in place: {reason}", file=sys.stderr)
    return 1 if left else 0

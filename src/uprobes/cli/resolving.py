"""``uprobes resolve``: what each probe stands for, as the lines the kernel's ``uprobe_events`` accepts."""

from __future__ import annotations

import argparse
import json
import sys

from ..probes.resolve import resolve_text
from ..probes.spec import group_probe_words

__all__ = ["run_resolve"]


def run_resolve(args: argparse.Namespace) -> int:
    probes = [probe for text in group_probe_words(args.probes) for probe in resolve_text(text)]
    for probe in probes:
        if args.json:
            record = {"probe": f"{probe.group}/{probe.event}", "path": probe.path, "offset": probe.offset,
                      "address": probe.address, "location": probe.location, "return": probe.is_return,
                      "ref_ctr_offset": probe.ref_ctr_offset, "line": probe.uprobe_events_line(),
                      "unavailable": list(probe.unavailable), "kernel_unavailable": list(probe.kernel_unavailable)}
            print(json.dumps(record))
            continue
        print(probe.uprobe_events_line())
        for reason in probe.unavailable:
            print(f"# {probe.location} at {probe.address:#x}: left out {reason}", file=sys.stderr)
        for reason in probe.kernel_unavailable:
            print(f"# {probe.location} at {probe.address:#x}: the kernel leaves out {reason} (the ptrace engine "
                  f"fetches it)", file=sys.stderr)
    return 0

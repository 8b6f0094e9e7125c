"""``uprobes list --vars`` and ``--lines``: what a probe can read at a place, and which lines it can go on."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..dwarf.info import DebugInfo
from ..dwarf.lines import function_line, lines_with_code_in, prologue_end
from ..dwarf.variables import VariableInfo, variables_described
from ..elf.locate import find_object
from ..elf.objfile import ElfObject
from ..errors import UprobesError
from ..probes.resolve import resolve_probe
from ..probes.spec import parse_probe

__all__ = ["run_source_listing"]


def run_source_listing(args: argparse.Namespace) -> int:
    """``list --vars PATH WHERE`` or ``list --lines PATH FUNCTION``."""
    if args.target is None or args.pattern == "*":
        option = "--vars" if args.vars else "--lines"
        what = "FUNCTION, FUNCTION:+N or FILE:LINE" if args.vars else "FUNCTION"
        raise UprobesError(f"list {option} needs a file and a place: uprobes list {option} PATH {what}")
    obj = ElfObject.open(find_object(args.target))
    info = DebugInfo.of(obj)
    document = _variables(obj, info, args.pattern) if args.vars else _lines(info, args.pattern)
    if args.json:
        sys.stdout.write(json.dumps(document) + "\n")
    elif args.vars:
        _print_variables(document)
    else:
        _print_lines(document)
    return 0


def _variables(obj: ElfObject, info: DebugInfo, where: str) -> list[dict]:
    places = []
    for probe in resolve_probe(parse_probe(f"uprobe:{obj.path}:{where}")):
        address = probe.address
        described = variables_described(info, address, probe.offset)
        if obj.symbols.containing(address) is not None and obj.symbols.containing(address).value == address \
                and any(v.frame_relative for v in described):
            address = prologue_end(info, address) or address  # where a probe with variables goes (as perf)
            described = variables_described(info, address, obj.vaddr_to_offset(address))
        places.append({"address": address, "location": obj.describe_address(address), "line": probe.location
                       if ":" in probe.location else None,
                       "variables": [_variable_record(v) for v in described]})
    return places


def _variable_record(variable: VariableInfo) -> dict:
    return {"name": variable.name, "type": variable.type, "kind": variable.kind, "location": variable.location,
            "available": variable.available, "note": variable.note}


def _print_variables(places: list[dict]) -> None:
    out = sys.stdout
    for place in places:
        line = f" ({place['line']})" if place["line"] else ""
        out.write(f"{place['location']}{line} at {place['address']:#x}:\n")
        shown = [v for v in place["variables"] if v["kind"] != "global"]
        width = max((len(v["type"]) for v in shown), default=0)
        for v in shown:
            where = v["location"] if v["location"] is not None else v["note"]
            out.write(f"  {v['kind']:<9} {v['type']:<{width}}  {v['name']:<16} {where}\n")
        if not shown:
            out.write("  (no parameters or local variables)\n")
        globals_ = len(place["variables"]) - len(shown)
        if globals_:
            out.write(f"  and {globals_} global variable{'s' if globals_ > 1 else ''} of its file (--json lists them)\n")


def _lines(info: DebugInfo, function: str) -> dict:
    file_name, first, copies = function_line(info, function, 0, f"list --lines {function}")[0]
    with_code = lines_with_code_in(info, copies)
    try:
        with open(file_name, encoding="utf-8", errors="replace") as f:
            source = f.read().splitlines()
    except OSError:
        source = []
    last = max(with_code, default=first)
    lines = [{"line": n, "relative": n - first, "code": n in with_code,
              "text": source[n - 1] if n - 1 < len(source) else None} for n in range(first, last + 1)]
    return {"function": function, "file": file_name, "first_line": first, "source_found": bool(source),
            "lines": lines}


def _print_lines(listing: dict) -> None:
    out = sys.stdout
    found = "" if listing["source_found"] else " (source not found: lines with code only)"
    out.write(f"<{listing['function']}@{listing['file']}:{listing['first_line']}>{found}\n")
    for line in listing["lines"]:
        if not listing["source_found"] and not line["code"]:
            continue
        number = f"{line['relative']:>6}" if line["code"] else " " * 6
        out.write(f"{number}  {line['line']:>5}  {line['text'] or ''}\n")
    out.write(f"probe a line as uprobe:PATH:{listing['function']}:+N or uprobe:PATH:"
              f"{os.path.basename(listing['file'])}:LINE\n")

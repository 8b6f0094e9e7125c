"""``uprobes list``: the functions and SDT markers of a file, or of every object a process maps (and the
functions a JIT compiler in it lists in its perf map file)."""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
from dataclasses import asdict

from ..elf.locate import find_objects, is_glob
from ..elf.objfile import ElfObject
from ..errors import UprobesError
from ..proc.maps import mapped_objects, path_in_process, read_maps, runtime_addresses
from ..proc.perfmap import PerfMap
from ..sdt.arguments import SdtArgument
from ..sdt.notes import SdtMarker, read_markers

__all__ = ["run_list", "describe_argument"]


def run_list(args: argparse.Namespace) -> int:
    pattern = args.pattern
    if args.pid is not None and args.pattern != "*":  # -p PID OBJECT PATTERN: one object it maps
        pattern = args.pattern
        paths = find_objects(args.target, args.pid)
    elif args.pid is not None:
        pattern = args.target or "*"  # with -p, the one positional word is the pattern
        paths = [path_in_process(args.pid, p) for p in mapped_objects(args.pid)]
        if args.target is None and not args.functions:
            return _list_objects(args, paths)
    elif args.target is None:
        raise UprobesError("list needs a TARGET file or -p PID")
    else:
        paths = find_objects(args.target)
        if len(paths) == 1:
            _check_matches(ElfObject.open(paths[0]), pattern)
    listings = []
    mappings = read_maps(args.pid) if args.pid is not None else None
    for path in paths:
        try:
            listings.append(_listing(ElfObject.open(path), pattern))
            if mappings is not None:
                _read_semaphores(listings[-1], args.pid, mappings)
        except UprobesError as exc:
            if args.pid is None and len(paths) == 1:
                raise
            print(f"uprobes: warning: skipping {exc}", file=sys.stderr)
    if args.pid is None and len(paths) > 1 and not any(l["functions"] or l["markers"] for l in listings):
        raise UprobesError(f"nothing matches '{pattern}' in the {len(paths)} files '{args.target}' matches")
    if args.pid is not None and args.pattern == "*":  # every object it maps, not one named
        listings += _jit_listing(args.pid, pattern)
    out = sys.stdout
    if args.json:
        several = args.pid is not None or is_glob(args.target)  # a glob: {"objects": [...]}, however many
        document = (({"pid": args.pid} if args.pid is not None else {}) | {"objects": listings} if several
                    else listings[0])
        out.write(json.dumps(document) + "\n")  # no indent: the C encoder is ten times faster on big objects
    else:
        shown = [listing for listing in listings
                 if args.pid is None or pattern == "*" or listing["functions"] or listing["markers"]]
        for listing in shown:
            _print_text(listing, out)
        if not shown:
            out.write(f"process {args.pid}: nothing matches '{pattern}' in the {len(listings)} objects it maps\n")
    return 0


def _list_objects(args: argparse.Namespace, paths: list[str]) -> int:
    """``list -p PID``: the objects the process maps, one line each, with how many functions and markers each has."""
    objects = []
    for path in paths:
        try:
            obj = ElfObject.open(path)
        except UprobesError as exc:
            print(f"uprobes: warning: skipping {exc}", file=sys.stderr)
            continue
        objects.append({"path": obj.path, "kind": obj.kind, "build_id": obj.build_id,
                        "function_count": len(obj.symbols.functions), "marker_count": len(read_markers(obj))})
    perf_map = PerfMap(args.pid)
    if perf_map.functions:
        objects.append({"path": perf_map.path, "kind": "jit", "build_id": None,
                        "function_count": len(perf_map.functions), "marker_count": 0})
    if args.json:
        sys.stdout.write(json.dumps({"pid": args.pid, "objects": objects}) + "\n")
        return 0
    width = max(len(o["path"]) for o in objects) if objects else 0
    for o in objects:
        sys.stdout.write(f"{o['path']:<{width}}  {o['kind']:<6}  {o['function_count']:>6} functions  "
                         f"{o['marker_count']:>3} markers\n")
    sys.stdout.write(f"({len(objects)} objects; 'uprobes list -p {args.pid} PATTERN' or --functions lists their "
                     f"functions and markers)\n")
    return 0


def _check_matches(obj: ElfObject, pattern: str) -> None:
    """A file's list that would show nothing is an error saying why: a stripped file, or the closest names."""
    listing = _listing(obj, pattern)
    if listing["functions"] or listing["markers"]:
        return
    if not obj.symbols.functions and not read_markers(obj):
        raise UprobesError(f"{obj.path} is stripped: it has no function symbols (no .symtab, and no debug file "
                           f"found by build-id or .gnu_debuglink); install its debug symbols (Debian: the -dbgsym "
                           f"package) or probe it by offset, 'p {obj.path}:0xOFFSET'")
    close = obj.symbols.closest_names(pattern)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise UprobesError(f"no function or marker matches '{pattern}' in {obj.path}{hint}")


def _listing(obj: ElfObject, pattern: str) -> dict:
    matches = re.compile(fnmatch.translate(pattern)).match
    functions = [sym for sym in obj.symbols.functions if matches(sym.name) or matches(sym.display_name)]
    markers = [m for m in read_markers(obj) if matches(m.qualified_name) or matches(m.name)]
    return {
        "path": obj.path,
        "kind": obj.kind,
        "build_id": obj.build_id,
        "functions": [{"name": sym.display_name, "address": sym.value, "offset": _offset(obj, sym.value),
                       "size": sym.size, "type": sym.type, "binding": sym.binding, "origin": sym.origin}
                      for sym in functions],
        "markers": [_marker_record(m) for m in markers],
    }


def _jit_listing(pid: int, pattern: str) -> list[dict]:
    """The functions a JIT compiler says it wrote, in ``/tmp/perf-PID.map`` as the process sees it
    (:mod:`uprobes.proc.perfmap`)."""
    perf_map = PerfMap(pid)
    matches = re.compile(fnmatch.translate(pattern)).match
    functions = [{"name": f.name, "address": f.start, "offset": None, "size": f.size, "type": "FUNC",
                  "binding": "jit", "origin": "perf-map"} for f in perf_map.functions if f.name and matches(f.name)]
    if not perf_map.functions:
        return []
    return [{"path": perf_map.path, "kind": "jit", "build_id": None, "functions": functions, "markers": []}]


def _read_semaphores(listing: dict, pid: int, mappings) -> None:
    """Each site's semaphore as it is in process ``pid`` now: above zero, the marker is enabled."""
    try:
        memory = open(f"/proc/{pid}/mem", "rb", buffering=0)
    except OSError:
        return  # not ours to read: leave the values out
    with memory:
        for marker in listing["markers"]:
            for site in marker["sites"]:
                if site["semaphore_offset"] is None:
                    continue
                for address in runtime_addresses(mappings, listing["path"], site["semaphore_offset"], "w"):
                    try:
                        memory.seek(address)
                        site["semaphore_value"] = int.from_bytes(memory.read(2), "little")
                    except OSError:
                        pass


def _offset(obj: ElfObject, vaddr: int) -> int | None:
    try:
        return obj.vaddr_to_offset(vaddr)
    except UprobesError:
        return None


def _marker_record(marker: SdtMarker) -> dict:
    return {
        "provider": marker.provider,
        "name": marker.name,
        "sites": [{"address": site.address, "offset": site.offset, "semaphore": site.semaphore,
                   "semaphore_offset": site.semaphore_offset, "args": site.args_text,
                   "arguments": [asdict(arg) for arg in site.args]}
                  for site in marker.sites],
    }


def describe_argument(arg: SdtArgument) -> str:
    """A parsed marker argument for people: ``s32 %eax``, ``u64 -16(%rbp)``, ``invalid: unknown register``."""
    if arg.kind == "invalid":
        return f"invalid ({arg.error})"
    kind = f"{'f' if arg.is_float else 's' if arg.signed else 'u'}{arg.size * 8}"
    if arg.kind == "const":
        return f"{kind} {arg.value}"
    if arg.kind == "reg":
        return f"{kind} %{arg.reg}" + (f">>{arg.shift}" if arg.shift else "")
    base = f"%{arg.base}" if arg.base else ""
    registers = f"{base},%{arg.index},{arg.scale}" if arg.index else base
    disp = f"{arg.disp:#x}" if arg.disp or not (arg.symbol or registers) else ""
    symbol = f"{arg.symbol}{'+' if disp and arg.disp > 0 else ''}" if arg.symbol else ""
    return f"{kind} {symbol}{disp}({registers})" if registers else f"{kind} {symbol}{disp}"


def _print_text(listing: dict, out) -> None:
    build_id = f", build-id {listing['build_id']}" if listing["build_id"] else ""
    out.write(f"{listing['path']} ({listing['kind']}{build_id})\n")
    functions, markers = listing["functions"], listing["markers"]
    if functions:
        out.write(f"  {'ADDRESS':>18}  {'OFFSET':>10}  {'SIZE':>7}  FUNCTION\n")
        out.writelines(f"  {f['address']:#18x}  {_hex(f['offset']):>10}  {f['size']:>7}  {f['name']}\n"
                       for f in functions)
    for marker in markers:
        sites = marker["sites"]
        out.write(f"  marker {marker['provider']}:{marker['name']}  ({len(sites)} site{'s' if len(sites) > 1 else ''})\n")
        for site in sites:
            semaphore = f"semaphore offset {_hex(site['semaphore_offset'])}" if site["semaphore"] else "no semaphore"
            if "semaphore_value" in site:
                value = site["semaphore_value"]
                semaphore += f" = {value} ({'enabled' if value else 'disabled'})"
            out.write(f"    offset {_hex(site['offset'])}  address {site['address']:#x}  {semaphore}  "
                      f"args: {site['args'] or '(none)'}\n")
            parsed = [SdtArgument(**a) for a in site["arguments"]]
            if parsed:
                out.write("      " + "  ".join(f"arg{i}={describe_argument(a)}" for i, a in enumerate(parsed)) + "\n")
    if not functions and not markers:
        out.write("  (nothing matches)\n")


def _hex(value: int | None) -> str:
    return "-" if value is None else f"{value:#x}"

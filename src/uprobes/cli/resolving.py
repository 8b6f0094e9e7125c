"""``uprobes resolve``: what each probe stands for, as the lines the kernel's ``uprobe_events`` accepts."""

from __future__ import annotations

import argparse
import json
import sys

from ..elf.locate import is_elf
from ..elf.objfile import ElfObject
from ..probes.resolve import Probe, ReturnMode, resolve_texts
from ..probes.spec import group_probe_words

__all__ = ["run_resolve"]


def run_resolve(args: argparse.Namespace) -> int:
    returns = ReturnMode(args.return_mode, unwinder_meets_stack=args.engine != "ptrace")
    probes = resolve_texts(group_probe_words(args.probes), args.pid, returns)
    for probe in probes:
        placement = _ptrace_placement(probe) if args.engine == "ptrace" and is_elf(probe.path) else None
        if args.json:
            record = {"probe": f"{probe.group}/{probe.event}", "path": probe.path, "offset": probe.offset,
                      "address": probe.address, "location": probe.location, "return": probe.is_return,
                      "ref_ctr_offset": probe.ref_ctr_offset, "line": probe.uprobe_events_line(),
                      "unavailable": list(probe.unavailable), "kernel_unavailable": list(probe.kernel_unavailable)}
            if probe.is_return:
                record["return_mode"] = _return_mode(probe, returns)
            if probe.notes:
                record["notes"] = list(probe.notes)
            if probe.predicate is not None:
                record["predicate"] = {"text": probe.predicate.text, "kernel_filter": probe.kernel_filter}
            if placement is not None:
                record["ptrace"] = placement
            print(json.dumps(record))
            continue
        print(probe.uprobe_events_line())
        if probe.is_return:
            print(f"# {probe.name}: return mode {_return_mode(probe, returns)}", file=sys.stderr)
        for note in probe.notes:
            print(f"# {probe.name}: {note}", file=sys.stderr)
        if probe.predicate is not None:
            print(f"# {probe.name}: if {probe.predicate.text}: {_predicate_text(probe)}", file=sys.stderr)
        if placement is not None:
            print(f"# ptrace engine: {probe.location}: " + _placement_text(placement), file=sys.stderr)
        for reason in probe.unavailable:
            print(f"# {probe.location} at {probe.address:#x}: left out {reason}", file=sys.stderr)
        for reason in probe.kernel_unavailable:
            print(f"# {probe.location} at {probe.address:#x}: the kernel leaves out {reason} (the ptrace engine "
                  f"fetches it)", file=sys.stderr)
    return 0


def _predicate_text(probe: Probe) -> str:
    """Where a probe's predicate is judged: by the kernel engine in the kernel (its filter), or in the tool."""
    applied = probe.kernel_filter
    if applied is not None:
        return f"the kernel engine applies it in the kernel ({applied})"
    return "the kernel engine judges each hit's event (its event filters cannot say it)"


def _return_mode(probe: Probe, returns: ReturnMode) -> str:
    """How a return probe is placed, and why: ``insn (a Go object): ret at work+0x2f``, ``stack``."""
    if probe.exit is None:
        return "stack"
    obj = ElfObject.open(probe.path)
    why = returns.why_insn(obj)
    kind = "tail call" if probe.exit.tail_call else "ret"
    text = f"insn ({why}): the {kind} '{probe.exit.instruction}' at {obj.describe_address(probe.exit.address)}"
    if probe.address != probe.exit.address:  # the last instructions before it change nothing the probe reads
        text += f", probed from {obj.describe_address(probe.address)}"
    return text


def _ptrace_placement(probe: Probe) -> dict:
    """How the ptrace engine places ``probe``: a jump (and the instructions it replaces), or an int3 and why."""
    from ..engines.ptrace.jumps import site_for
    from ..engines.ptrace.captures import captures_for, register_arguments
    from ..x86_64.analysis import format_instruction

    site = site_for(probe)
    if isinstance(site, str):
        return {"jump": False, "why": site}
    placement = {"jump": True, "replaces": "; ".join(format_instruction(ins) for ins in site.displaced)}
    captures = captures_for(probe)
    placement.update({"traced": True} if not isinstance(captures, str) else {"traced": False, "why": captures})
    if probe.predicate is not None and not isinstance(captures, str):
        placement["tests_predicate"] = probe.predicate.compiled(register_arguments(probe)) is not None
    return placement


def _placement_text(placement: dict) -> str:
    if not placement["jump"]:
        return f"an int3, not a jump: {placement['why']}"
    if placement["traced"]:
        tested = (", its predicate tested there (where no other probe shares the site)"
                  if placement.get("tests_predicate") else "")
        return f"a jump, counted or traced ({placement['replaces']}){tested}"
    return f"a jump when counted ({placement['replaces']}); traced, an int3: {placement['why']}"

"""From a parsed probe to probe points: a file, a file offset, a name and fetch arguments.

A :class:`Probe` is the plain value both engines consume. It prints back as the ``uprobe_events`` line the
kernel accepts for it:

    >>> [p.uprobe_events_line() for p in resolve_probe(parse_probe("uprobe:/usr/bin/python3.11:Py_Initialize"))]
    ['p:uprobes/Py_Initialize /usr/bin/python3.11:0x1e4d90']
"""

from __future__ import annotations

import fnmatch
import os
import re
import struct
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, replace

from ..dwarf.info import DebugInfo
from ..dwarf.lines import entry_line, function_line, line_points, lines_with_code_in, prologue_end
from ..dwarf.variables import is_variable_expression, retval_fetcharg, variable_fetcharg
from ..elf.locate import find_object, find_objects, is_elf, is_glob
from ..elf.objfile import ElfObject
from ..elf.symbols import Symbol
from ..errors import ElfError, NotInObject, ProbeSyntaxError, ResolveError, UprobesError
from ..sdt.notes import SdtSite, read_markers
from ..x86_64.decode import instruction_containing, instruction_starts
from ..x86_64.exits import FunctionExit, function_exits
from ..x86_64.registers import BY_KERNEL_NAME
from .abiargs import ABI_TOKEN, abi_fetcharg
from .computed import DwarfValue
from .fetchargs import (Comm, Deref, FetchArg, FetchType, Immediate, ImmediateString, Register, RetVal,
                        parse_fetchargs)
from .markerargs import kernel_fetchable, kernel_limitation, marker_fetchargs
from .predicate import ARRAY, INTEGER, STRING, Predicate, parse_predicate
from .spec import MAX_NAME_LEN, ProbeSpec, parse_probe

_NOT_IN_A_COMMAND = re.compile(r"[\s#]")

__all__ = ["Probe", "ReturnMode", "argument_kinds", "resolve_probe", "resolve_text", "return_probes", "DEFAULT_GROUP",
           "RETURN_MODES"]

DEFAULT_GROUP = "uprobes"
RETURN_MODES = ("auto", "insn", "stack")
_MAX_INSTRUCTION = 15


@dataclass(frozen=True)
class Probe:
    """One probe point: what to trap (``path`` at file ``offset``), what to call it and what to fetch."""

    spec: str
    is_return: bool
    group: str
    event: str
    path: str
    offset: int
    address: int  # link-time virtual address of the probed instruction
    location: str  # for display: "process_order+0x4", "demo:order__start"
    ref_ctr_offset: int | None = None
    fetchargs: tuple[FetchArg, ...] = ()
    site: SdtSite | None = None
    unavailable: tuple[str, ...] = ()  # marker arguments no engine can fetch, with the reason
    explicit_event: bool = False
    kernel_unavailable: tuple[str, ...] = ()  # marker arguments only the kernel engine leaves out, and why
    # (argument, "f32" | "f64" | "sN" | ((value, enumerator), ...)): bits tracefs cannot type as they are meant
    retyped: tuple[tuple[str, str | tuple[tuple[int, str], ...]], ...] = ()
    marker_memory: frozenset = frozenset()  # memory the marker's operands name (the compiler put them there)
    # A return probe on one of its function's exits (return mode insn), a plain breakpoint there; and the
    # function's link-time address. None: a return probe replaces the return address (mode stack).
    exit: FunctionExit | None = None
    function: int | None = None
    notes: tuple[str, ...] = ()  # what the user should know about how the probe is placed
    predicate: Predicate | None = None  # only the hits for which it holds are reported

    @property
    def kernel_filter(self) -> str | None:
        """The predicate as the event filter the kernel applies, over the arguments tracefs fetches as events
        report them; None where there is none or the kernel cannot say it (each event is judged here anyway)."""
        if self.predicate is None:
            return None
        retyped = {name for name, _ in self.retyped}
        fields = {arg.name: (arg.name, *_field_type(arg)) for arg in self.kernel_fetchargs
                  if arg.name not in retyped and not (arg.type is not None and (
                      arg.type.array or arg.type.bitfield or arg.type.name == "char"))}
        return self.predicate.kernel_filter(fields)

    @property
    def replaces_return(self) -> bool:
        """A return probe that replaces its function's return address (return mode stack)."""
        return self.is_return and self.exit is None

    @property
    def returns_value_here(self) -> bool:
        """A return probe on a ``ret`` of its function: the return value is in ``%rax`` at the probe."""
        return self.exit is not None and not self.exit.tail_call

    @property
    def reports_retval(self) -> bool:
        """Whether the probe's events carry the function's return value (a return probe not on a tail call)."""
        return self.replaces_return or self.returns_value_here

    @property
    def entry_offset(self) -> int:
        """The file offset of the function a return probe on an exit returns from; the probe's own otherwise."""
        return self.offset if self.function is None else self.offset - (self.address - self.function)

    def reported_address(self, runtime: int) -> int:
        """The address events give for a hit at run-time address ``runtime``: a return probe's events give its
        function's, whichever way it is placed."""
        return runtime if self.function is None else runtime - (self.address - self.function)

    @property
    def kernel_fetchargs(self) -> tuple[FetchArg, ...]:
        """The fetch arguments tracefs can express (all but the marker operands only an engine can decode)."""
        return kernel_fetchable(self.fetchargs)

    @property
    def fetches_retval(self) -> bool:
        """Whether an argument reads ``$retval`` (typed by the DWARF where the object has it)."""
        def reads_retval(source) -> bool:
            return isinstance(source, RetVal) or isinstance(source, Deref) and reads_retval(source.inner) or \
                isinstance(source, DwarfValue) and source.text == "$retval"  # a float returned in %xmm0

        return any(reads_retval(arg.source) for arg in self.fetchargs)

    @property
    def hex_names(self) -> frozenset[str]:
        """The arguments whose type is hexadecimal (``x64``, a pointer): text output writes them so."""
        retyped = {name for name, _ in self.retyped}
        return frozenset(arg.name for arg in self.fetchargs
                         if arg.type_text.startswith("x") and arg.name not in retyped)

    def typed(self, values: dict) -> dict:
        """``values`` as fetched, retyped as the marker's spec or the DWARF says: float bits as numbers, signed
        high bytes and bitfields, enumerators by name."""
        for name, value_type in self.retyped:
            bits = values.get(name)
            if not isinstance(bits, int):
                continue
            if isinstance(value_type, tuple):
                values[name] = dict(value_type).get(bits, bits)
            elif value_type[0] == "s":
                sign = 1 << (int(value_type[1:]) - 1)
                values[name] = (bits & (2 * sign - 1)) - ((bits & sign) << 1)
            else:
                size = int(value_type[1:]) // 8
                values[name] = struct.unpack("<f" if size == 4 else "<d", bits.to_bytes(size, "little"))[0]
        return values

    @property
    def name(self) -> str:
        """What events of this probe are called: the user's event name, else where it is (``malloc%return``)."""
        if self.explicit_event:
            return self.event
        return f"{self.location}%return" if self.is_return else self.location

    def uprobe_events_line(self) -> str:
        """The exact line to append to ``/sys/kernel/tracing/uprobe_events`` for this probe."""
        ref = f"({self.ref_ctr_offset:#x})" if self.ref_ctr_offset is not None else ""
        args = "".join(" " + arg.format() for arg in self.kernel_fetchargs)
        if _NOT_IN_A_COMMAND.search(self.path) or not self.path.isprintable():
            # Names and fetch arguments are checked by their parsers; the path is the file's real name, which
            # may hold blanks, '#' or a newline: the kernel would read a second command or a comment.
            raise ResolveError(f"{self.path}: the kernel's uprobe_events cannot take a path with blanks, '#' or "
                               f"control characters; make a hard link without them (ln), or use --engine ptrace")
        return f"{'r' if self.replaces_return else 'p'}:{self.group}/{self.event} {self.path}:{self.offset:#x}{ref}{args}"


@dataclass(frozen=True)
class ReturnMode:
    """How return probes are placed: ``insn``, a probe on each exit of the function (nothing on the stack
    changes); ``stack``, the return address replaced by the engine's trampoline; ``auto``, insn for Go objects
    (the Go runtime aborts on a return address it does not know) and, where ``unwinder_meets_stack`` (the
    engine's trampoline is on the stack a C++ exception unwinds: the kernel's), for objects that link the C++
    unwinder; stack otherwise."""

    mode: str = "auto"
    unwinder_meets_stack: bool = False

    def why_insn(self, obj: ElfObject) -> str | None:
        """Why the return probes of ``obj`` go on the functions' exits, or None: they replace return addresses."""
        if self.mode != "auto":
            return "asked for" if self.mode == "insn" else None
        if obj.is_go:
            return "a Go object"
        if self.unwinder_meets_stack and obj.links_cxx_unwinder:
            return "C++ exceptions may unwind its frames"
        return None


def _field_type(arg: FetchArg) -> tuple[int | None, bool]:
    """The bits and sign of the record field tracefs makes of ``arg`` (bits None: a string)."""
    return (arg.type or FetchType(arg.type_text)).integer or (None, False)


def resolve_text(text: str, returns: ReturnMode = ReturnMode()) -> list[Probe]:
    """Parse and resolve one probe text."""
    return resolve_probe(parse_probe(text), returns=returns)


def resolve_texts(texts: Iterable[str], pid: int | None = None, returns: ReturnMode = ReturnMode()) -> list[Probe]:
    """Parse and resolve many probe texts, in order; each file they name is looked up and opened once for all
    of them (a list of thousands of probes names a few files). With ``pid``, paths are as that process sees
    them (its mount namespace: a container's files)."""
    objects: dict[str, ElfObject] = {}
    return [probe for text in texts for probe in resolve_probe(parse_probe(text), objects, pid, returns)]


def resolve_probe(spec: ProbeSpec, objects: dict[str, ElfObject] | None = None, pid: int | None = None,
                  returns: ReturnMode = ReturnMode()) -> list[Probe]:
    """Every probe point ``spec`` names; raise :class:`ResolveError` when it names nothing. ``objects``: the
    files opened so far, by the name a probe gave them (kept for the next); ``pid``: the process whose view of
    the file system names them; ``returns``: how return probes are placed. A glob in PATH: the probe in every
    file it matches (an error if it names nothing in any of them)."""
    if is_glob(spec.target):
        paths = find_objects(spec.target, pid)
        if len(paths) > 1 and (spec.address is not None or spec.offset is not None):
            raise ResolveError(f"probe '{spec.text}': an address is a place in one file, and '{spec.target}' "
                               f"matches {len(paths)} ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})")
        probes, errors = [], []
        for path in paths:
            try:
                probes += resolve_probe(replace(spec, target=path), objects, pid, returns)
            except UprobesError as exc:  # that file has none, or is no object to probe (a truncated one)
                errors.append(exc)
        if not probes:
            real = [error for error in errors if not isinstance(error, (NotInObject, ElfError))]
            if real or len(paths) == 1:
                raise (real or errors)[0]
            raise NotInObject(f"probe '{spec.text}': none of the {len(paths)} files '{spec.target}' matches has "
                              f"it ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})")
        return probes
    obj = objects.get(spec.target) if objects is not None else None
    path = find_object(spec.target, pid) if obj is None else obj.path
    if obj is None and os.path.isfile(path) and os.access(path, os.R_OK) and not is_elf(path):
        probes = _resolve_raw(spec, path)
    else:
        obj = obj or ElfObject.open(path)
        if objects is not None:
            objects[spec.target] = obj
        probes = _resolve_in(spec, obj, returns)
    if spec.predicate is None:
        return probes
    return [replace(probe, predicate=parse_predicate(spec.predicate, argument_kinds(probe))) for probe in probes]


def _resolve_in(spec: ProbeSpec, obj: ElfObject, returns: ReturnMode) -> list[Probe]:
    if obj.kind == "debug":
        raise ResolveError(f"probe '{spec.text}': {obj.path} is a separate debug file, which holds no code; "
                           f"probe the program or library it belongs to")
    if spec.is_usdt:
        return _resolve_marker(spec, obj)
    if spec.is_line:
        return _resolve_line(spec, obj)
    return _resolve_code(spec, obj, returns)


def _resolve_raw(spec: ProbeSpec, path: str) -> list[Probe]:
    """A probe by file offset in a file that is not ELF (a JIT's code cache, flat code a program maps), as the
    kernel takes any file: no symbols to name it, no instruction boundary to check it against."""
    offset = spec.offset if spec.offset is not None else spec.address
    if offset is None or spec.is_return or spec.is_usdt or spec.is_line:
        raise NotInObject(f"probe '{spec.text}': {path} is not an ELF file: probe its code by file offset, as "
                           f"uprobe:{path}:0xOFFSET or p {path}:0xOFFSET (no symbols, markers or returns)")
    if offset >= os.path.getsize(path):
        raise ResolveError(f"probe '{spec.text}': offset {offset:#x} is past the end of {path} "
                           f"({os.path.getsize(path)} bytes)")
    probe = Probe(spec.text, False, spec.group or DEFAULT_GROUP, spec.event or _kernel_default_event(path, offset),
                  path, offset, offset, f"{offset:#x}", spec.ref_ctr_offset,
                  parse_fetchargs(list(spec.fetchargs), is_return=False), explicit_event=spec.event is not None,
                  notes=(f"{path} is not an ELF file: {offset:#x} is taken as the start of an instruction, "
                         f"unchecked",))
    return [probe]


def argument_kinds(probe: Probe) -> dict[str, str]:
    """Each fetch argument's value as events give it: INTEGER (a number), STRING or ARRAY (what a predicate
    may compare it as, what a histogram may draw)."""
    retyped = dict(probe.retyped)
    kinds = {}
    for arg in probe.fetchargs:
        if arg.type is not None and arg.type.array:
            kinds[arg.name] = ARRAY
        elif isinstance(retyped.get(arg.name), tuple):  # an enum, by its enumerators' names
            kinds[arg.name] = STRING
        elif arg.type is not None and (arg.type.is_string or arg.type.name == "char") or arg.type is None and \
                isinstance(arg.source, (Comm, ImmediateString)):
            kinds[arg.name] = STRING
        else:
            kinds[arg.name] = INTEGER
    return kinds


def _resolve_code(spec: ProbeSpec, obj: ElfObject, returns: ReturnMode) -> list[Probe]:
    """The probe points of a function, an instruction or an address, and of their returns."""
    if spec.symbol is not None:
        points = [(address, obj.describe_address(address), sym) for address, sym in _symbol_addresses(spec, obj)]
    else:
        address = spec.address if spec.address is not None else _offset_to_address(obj, spec.offset, spec)
        points = [(address, obj.describe_address(address), None)]
    probes, unplaced = [], []
    for address, location, sym in points:
        _check_code_address(obj, address, spec)
        if spec.is_return:
            _check_function_entry(obj, address, spec)
        event = _event_name(spec, obj, address, sym, len(points) > 1)
        fetch = _source_fetchargs(spec, obj, address, function_entry=sym is not None and address == sym.value)
        if fetch.address != address:
            location = obj.describe_address(fetch.address)
        probe = Probe(spec.text, spec.is_return, spec.group or DEFAULT_GROUP, event, obj.path,
                      obj.vaddr_to_offset(fetch.address), fetch.address, location, spec.ref_ctr_offset,
                      fetch.fetchargs, explicit_event=spec.event is not None, retyped=fetch.retyped,
                      kernel_unavailable=fetch.kernel_unavailable)
        if not spec.is_return:
            probes.append(probe)
            continue
        try:
            probes += _placed_returns(probe, obj, returns)
        except _Unplaced as why:
            unplaced.append(str(why))
    if unplaced and not probes:
        raise ResolveError(f"probe '{spec.text}': {unplaced[0]}")
    if unplaced:
        probes[0] = replace(probes[0], notes=probes[0].notes + tuple(f"no return probe: {why}" for why in unplaced))
    return probes


class _Unplaced(Exception):
    """Why a function named by a probe gets no return probe."""


def return_probes(entry: Probe, returns: ReturnMode) -> list[Probe]:
    """The return probes of the function ``entry`` probes at its first instruction, without fetch arguments."""
    probe = replace(entry, is_return=True, fetchargs=(), event=_identifier(entry.event, "__return"),
                    explicit_event=False)
    try:
        return _placed_returns(probe, ElfObject.open(entry.path), returns)
    except _Unplaced as why:
        raise ResolveError(f"probe '{entry.spec}': {why}") from None


def _placed_returns(probe: Probe, obj: ElfObject, returns: ReturnMode) -> list[Probe]:
    """``probe``, a return probe, as ``returns`` places it: itself (its return address replaced), or a probe on
    each exit of its function."""
    why = returns.why_insn(obj)
    if why is None:
        return [probe]
    exits = function_exits(obj, probe.address)
    if isinstance(exits, str):
        if obj.is_go:
            raise _Unplaced(f"the exits of {probe.location} cannot all be found ({exits}), and replacing a return "
                            f"address makes the Go runtime abort; probe its ret instructions by offset instead")
        return [replace(probe, notes=probe.notes + (f"return mode stack, not insn ({why}): the exits of "
                                                    f"{probe.location} cannot all be found: {exits}",))]
    if not exits:
        raise _Unplaced(f"{probe.location} never returns (it has no ret and no tail call)")
    return [_at_exit(probe, obj, leave) for leave in exits]


def _at_exit(probe: Probe, obj: ElfObject, leave: FunctionExit) -> Probe:
    """``probe`` (a return probe at its function's entry) placed on ``leave``: ``$retval`` is ``%ax`` at a
    ``ret``; at a tail call, what the function returns is the callee's, not seen there, so what reads it is
    left out."""
    fetchargs, unavailable = [], list(probe.unavailable)
    for arg in probe.fetchargs:
        if not _reads_retval(arg.source):
            fetchargs.append(arg)
        elif not leave.tail_call:  # $retval is %ax at a ret; a float's %xmm0 is read there as it is
            fetchargs.append(arg if isinstance(_innermost(arg.source), DwarfValue) else
                             replace(arg, source=_with_base(arg.source, Register("ax"))))
        else:
            callee = obj.describe_address(leave.target) if leave.target is not None else "a function pointer"
            unavailable.append(f"{arg.name}: {probe.location} leaves by a tail call at "
                               f"{obj.describe_address(leave.address)} ('{leave.instruction}'); what it returns "
                               f"is what {callee} returns, not seen there")
    # Where the arguments read no register the last instructions change, the probe may go where the ret is as
    # good as reached, a jump's length before it.
    at = leave.seen_from if all(_unchanged_by(arg.source, leave.written) for arg in fetchargs) else leave.address
    return replace(probe, offset=obj.vaddr_to_offset(at), address=at, fetchargs=tuple(fetchargs),
                   unavailable=tuple(unavailable), exit=leave, function=probe.address)


def _reads_retval(source) -> bool:
    """Whether a return probe's argument reads the return value: $retval, or what DWARF made of it (a float's
    %xmm0; a return probe has no other computed value)."""
    return isinstance(_innermost(source), (RetVal, DwarfValue))


def _innermost(source):
    """What ``source``'s dereferences start from."""
    return _innermost(source.inner) if isinstance(source, Deref) else source


def _unchanged_by(source, written: frozenset[str]) -> bool:
    """Whether ``source`` reads the same before instructions that write the registers ``written`` (and no
    memory) as after them."""
    base = _innermost(source)
    if isinstance(base, Register):
        register = BY_KERNEL_NAME.get(base.name)
        return register is not None and register.general and register.field not in written
    return isinstance(base, (Comm, Immediate, ImmediateString))


@dataclass(frozen=True)
class _SourceFetch:
    """Fetch arguments with the variables by name translated at ``address`` (past the prologue, when they are
    kept in a frame the prologue builds)."""

    address: int
    fetchargs: tuple[FetchArg, ...]
    retyped: tuple = ()

    @property
    def kernel_unavailable(self) -> tuple[str, ...]:
        """The arguments tracefs cannot fetch (computed by a DWARF expression), and why."""
        return tuple(f"{arg.name}: {kernel_limitation(arg)}" for arg in self.fetchargs if kernel_limitation(arg))


def _source_fetchargs(spec: ProbeSpec, obj: ElfObject, address: int, function_entry: bool) -> _SourceFetch:
    """The probe's fetch arguments at ``address``: ``$argN`` and ``$goid`` as the function's ABI places them,
    variables by name and ``$retval`` typed through DWARF."""
    tokens = [abi_fetcharg(token, obj, address, function_entry, spec.is_return) if ABI_TOKEN.search(token)
              else token for token in spec.fetchargs]
    named = [i for i, token in enumerate(tokens) if is_variable_expression(_fetch_source(token))]
    retvals = [i for i, token in enumerate(tokens) if spec.is_return and _fetch_source(token) == "$retval"]
    if not named and not retvals:
        return _SourceFetch(address, parse_fetchargs(tokens, is_return=spec.is_return))
    if named and spec.is_return:
        raise ProbeSyntaxError(f"bad fetch argument '{tokens[named[0]]}': a return probe has only $retval; "
                               f"variables are read at an entry or a line (uprobe:PATH:FUNCTION or FILE:LINE)")
    try:
        info = DebugInfo.of(obj)
    except ResolveError as exc:
        if not named:
            return _SourceFetch(address, parse_fetchargs(tokens, is_return=spec.is_return))
        raise ResolveError(f"probe '{spec.text}': variables by name need DWARF: {exc}") from None
    retyped, computed = [], {}

    def variables_at(at: int) -> dict:
        return {i: variable_fetcharg(info, at, obj.vaddr_to_offset(at), tokens[i], i + 1) for i in named}

    fetches = variables_at(address)
    if function_entry and any(fetch.frame_relative for fetch in fetches.values()):
        moved = prologue_end(info, address)
        if moved is not None and any(ABI_TOKEN.search(token) for token in spec.fetchargs):
            names = ", ".join(tokens[i] for i in named)
            raise ProbeSyntaxError(f"probe '{spec.text}': $argN is where the ABI puts it at the function's entry, "
                                   f"and {names} only past its prologue: give them in two probes")
        if moved is not None:
            address, fetches = moved, variables_at(moved)
    fetches.update({i: retval_fetcharg(info, address, tokens[i], i + 1) for i in retvals})
    for i, fetch in fetches.items():
        if fetch is None:
            continue
        tokens[i] = fetch.text
        if fetch.retype is not None:
            retyped.append((fetch.name, fetch.retype))
        if fetch.computed is not None:
            computed[i] = fetch.computed
    fetchargs = list(parse_fetchargs(tokens, is_return=spec.is_return))
    for i, value in computed.items():
        fetchargs[i] = replace(fetchargs[i], source=_with_base(fetchargs[i].source, value))
    return _SourceFetch(address, tuple(fetchargs), tuple(retyped))


def _with_base(source, base):
    """``source`` with its innermost part (what its dereferences start from) replaced by ``base``."""
    if isinstance(source, Deref):
        return replace(source, inner=_with_base(source.inner, base))
    return base


def _fetch_source(token: str) -> str:
    """The FETCHARG of ``[NAME=]FETCHARG[:TYPE]``."""
    name, equals, body = token.partition("=")
    return (body if equals else token).partition(":")[0]


def _offset_to_address(obj: ElfObject, offset: int, spec: ProbeSpec) -> int:
    try:
        return obj.offset_to_vaddr(offset)
    except ResolveError:
        raise ResolveError(f"probe '{spec.text}': file offset {offset:#x} is not inside any loadable segment "
                           f"of {obj.path}") from None


def _symbol_addresses(spec: ProbeSpec, obj: ElfObject) -> list[tuple[int, Symbol]]:
    matches = obj.symbols.match(spec.symbol)
    if not matches:
        raise NotInObject(_no_symbol_message(spec, obj))
    by_address: dict[int, Symbol] = {}
    for sym in matches:  # aliases at one address are one probe point, named after the plainest alias
        known = by_address.get(sym.value)
        if known is None or _alias_rank(sym) < _alias_rank(known):
            by_address[sym.value] = sym
    points = []
    for value, sym in sorted(by_address.items()):
        if sym.size and spec.symbol_offset >= sym.size:
            raise ResolveError(f"probe '{spec.text}': offset {spec.symbol_offset:#x} is past the end of "
                               f"{sym.name} ({sym.size:#x} bytes)")
        points.append((value + spec.symbol_offset, sym))
    return points


def _alias_rank(sym: Symbol) -> tuple:
    return (sym.binding != "global", sym.name.startswith("_"), len(sym.name), sym.name)


def _no_symbol_message(spec: ProbeSpec, obj: ElfObject) -> str:
    message = f"probe '{spec.text}': no function matches '{spec.symbol}' in {obj.path}"
    close = obj.symbols.closest_names(spec.symbol)
    if close:
        return f"{message}; closest: {', '.join(close)}"
    if not obj.has_symtab and not obj.symbols.functions:
        return f"{message}: the file is stripped (no .symtab); install its debug symbols or probe PATH:OFFSET"
    return f"{message}; 'uprobes list {obj.path}' shows its {len(obj.symbols.functions)} functions"


def _check_code_address(obj: ElfObject, address: int, spec: ProbeSpec) -> None:
    segment = obj.segment_for_vaddr(address)
    if segment is None or not segment.executable or address >= segment.vaddr + segment.filesz:
        raise ResolveError(f"probe '{spec.text}': {address:#x} is not in the code of {obj.path} "
                           f"(no executable segment holds it)")
    start = obj.function_start(address)
    if start is None or start == address:
        return
    bounds = obj.function_bounds(address)
    if bounds is not None and bounds[1] > address and address in _instruction_starts(obj, start, bounds[1]):
        return
    code = obj.read(start, address - start + _MAX_INSTRUCTION)
    instr = instruction_containing(code, start, address)
    if instr is not None and instr.address != address:
        where = obj.describe_address(instr.address)
        raise ResolveError(
            f"probe '{spec.text}': {obj.describe_address(address)} (file offset {obj.vaddr_to_offset(address):#x}) "
            f"is inside the instruction '{instr.text}' at {where} (file offset {obj.vaddr_to_offset(instr.address):#x},"
            f" {instr.length} bytes); probe its first byte or the next instruction")


def _instruction_starts(obj: ElfObject, start: int, end: int) -> frozenset[int]:
    """Every instruction start of a function, decoded once for all the probes placed inside it (kept as long
    as the object is)."""
    functions = _INSTRUCTION_STARTS.setdefault(obj, {})
    starts = functions.get((start, end))
    if starts is None:
        starts = functions[start, end] = frozenset(instruction_starts(obj.read(start, end - start), start))
    return starts


_INSTRUCTION_STARTS: weakref.WeakKeyDictionary[ElfObject, dict[tuple[int, int], frozenset[int]]] = \
    weakref.WeakKeyDictionary()


def _check_function_entry(obj: ElfObject, address: int, spec: ProbeSpec) -> None:
    sym = obj.symbols.containing(address)
    if sym is not None and sym.value != address:
        raise ResolveError(f"probe '{spec.text}': a return probe must be on a function's first instruction, "
                           f"not {obj.describe_address(address)}")


def _event_name(spec: ProbeSpec, obj: ElfObject, address: int, sym: Symbol | None, many: bool) -> str:
    if spec.event:
        return _identifier(spec.event, f"_{sym.name}") if many and sym else spec.event
    if sym is not None:
        where = "" if address == sym.value else f"_{address - sym.value:#x}"
        return _identifier(sym.name, where + ("__return" if spec.is_return else ""))
    return _kernel_default_event(obj.path, obj.vaddr_to_offset(address))


def _kernel_default_event(path: str, offset: int) -> str:
    """The kernel's own default name of a probe at ``offset`` of ``path``: p_<file name up to the first '.',
    '-' or '_'>_0x<offset>."""
    stem = re.split(r"[.\-_]", path.rsplit("/", 1)[-1], maxsplit=1)[0]
    return _identifier(f"p_{stem}_{offset:#x}")


def _identifier(stem: str, suffix: str = "") -> str:
    """``stem + suffix`` as a C identifier of at most the kernel's length; a long stem is cut, never the suffix
    that tells an entry from a return or one site's event from another's."""
    name = re.sub(r"\W", "_", stem)
    if not name or name[0].isdigit():
        name = "_" + name
    suffix = re.sub(r"\W", "_", suffix)
    return name[:MAX_NAME_LEN - len(suffix)] + suffix


def _resolve_marker(spec: ProbeSpec, obj: ElfObject) -> list[Probe]:
    markers = read_markers(obj)
    chosen = [m for m in markers
              if fnmatch.fnmatchcase(m.name, spec.marker)
              and (spec.provider is None or fnmatch.fnmatchcase(m.provider, spec.provider))]
    if not chosen:
        raise NotInObject(_no_marker_message(spec, obj, [m.qualified_name for m in markers]))
    probes = []
    for marker in chosen:
        base = spec.event or _identifier(f"{marker.provider}_{marker.name}")
        # Sites of one event must agree on argument names and types (the kernel refuses siblings that
        # differ), so sites whose arguments differ get events of their own: base, base_2, base_3...
        signatures: dict[tuple, str] = {}
        for site in marker.sites:
            fetch = marker_fetchargs(site, spec.fetchargs, obj)
            signature = tuple((arg.name, arg.type, kernel_limitation(arg)) for arg in fetch.fetchargs)
            event = signatures.setdefault(signature, _identifier(base, f"_{len(signatures) + 1}")
                                          if signatures else base)
            probes.append(Probe(spec.text, False, spec.group or DEFAULT_GROUP, event, obj.path, site.offset,
                                site.address, site.qualified_name, site.semaphore_offset, fetch.fetchargs, site,
                                fetch.unavailable, spec.event is not None, fetch.kernel_unavailable,
                                fetch.retyped, fetch.memory))
    return probes


def _resolve_line(spec: ProbeSpec, obj: ElfObject) -> list[Probe]:
    try:
        info = DebugInfo.of(obj)
    except ResolveError as exc:
        raise NotInObject(f"probe '{spec.text}': {exc}") from None
    if spec.source_function is not None:
        points, missing = [], None
        for file_name, line, copies in function_line(info, spec.source_function, spec.line, spec.text):
            first = line - spec.line
            if spec.line == 0:
                line = entry_line(info, copies, file_name, line)
            found = line_points(info, file_name, line, spec.text, within=copies, missing_ok=True)
            points += found
            if not found and missing is None:
                with_code = ", ".join(f"+{n - first}" for n in sorted(lines_with_code_in(info, copies)))
                missing = (f"probe '{spec.text}': {spec.source_function}:+{spec.line} ({os.path.basename(file_name)}:"
                           f"{line}) has no code; the lines of {spec.source_function} with code are "
                           f"{with_code or 'none'}")
        if not points:
            raise ResolveError(missing)
    else:
        points = line_points(info, spec.source_file, spec.line, spec.text)
    probes = []
    signatures: dict[tuple, str] = {}
    for point in points:
        _check_code_address(obj, point.address, spec)
        fetch = _source_fetchargs(spec, obj, point.address, function_entry=False)
        base = spec.event or _identifier(f"{point.function}_L{point.line}")
        # Points of one event must agree on argument names and types (the kernel refuses siblings that differ),
        # and be at different addresses (copies inlined at one place share theirs: each gets an event).
        shared = sum(p.address == point.address for p in probes)
        signature = (base, *((arg.name, arg.type) for arg in fetch.fetchargs), fetch.retyped, shared)
        event = signatures.setdefault(signature, _identifier(base, f"_{len(signatures) + 1}") if any(
            known[0] == base for known in signatures) else base)
        location = f"{os.path.basename(point.file)}:{point.line}"
        probes.append(Probe(spec.text, False, spec.group or DEFAULT_GROUP, event, obj.path,
                            obj.vaddr_to_offset(point.address), point.address, location, None, fetch.fetchargs,
                            explicit_event=spec.event is not None, retyped=fetch.retyped,
                            kernel_unavailable=fetch.kernel_unavailable))
    return probes


def _no_marker_message(spec: ProbeSpec, obj: ElfObject, names: list[str]) -> str:
    import difflib

    wanted = f"{spec.provider}:{spec.marker}" if spec.provider else spec.marker
    if not names:
        return f"probe '{spec.text}': {obj.path} has no SDT markers (no .note.stapsdt section)"
    pool = names if spec.provider else [n.split(":", 1)[1] for n in names]
    close = difflib.get_close_matches(wanted, pool, n=3, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else f"; it has {', '.join(names[:5])}"
    return f"probe '{spec.text}': no SDT marker matches '{wanted}' in {obj.path}{hint}"

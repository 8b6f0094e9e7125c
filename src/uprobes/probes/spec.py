"""The probe syntax, one parser for every engine.

Two families are accepted, each followed by optional fetch arguments separated by spaces:

- the kernel's ``uprobe_events`` form::

      p[:[GRP/]EVENT] PATH:OFFSET[%return][(REF_CTR_OFFSET)] [FETCHARGS]
      r[:[GRP/]EVENT] PATH:OFFSET[(REF_CTR_OFFSET)] [FETCHARGS]

  (``GRP.EVENT`` is read as ``GRP/EVENT``, as the kernel reads it)

  where OFFSET is a file offset read as the kernel reads it (``0x`` hex, leading ``0`` octal, else decimal),
  or ``SYMBOL[+OFFSET]``;
- bpftrace-style names: ``uprobe:PATH:SYMBOL[+OFFSET]``, ``uprobe:PATH:0xADDR`` (a link-time address),
  ``uretprobe:PATH:SYMBOL``, ``usdt:PATH:[PROVIDER:]NAME``, and source lines from DWARF:
  ``uprobe:PATH:FILE:LINE`` (FILE holds a ``.``: ``app.c``, ``src/app.c``) and ``uprobe:PATH:FUNCTION:+N``
  (N lines below the line the function is written on).

PATH may be a bare name (``libc``, ``python3``). ``*`` and ``?`` in SYMBOL, PROVIDER and NAME are globs.
Parsing only reads text; :mod:`uprobes.probes.resolve` turns a :class:`ProbeSpec` into probe points.

    >>> parse_probe("uretprobe:libc:malloc ret=$retval")
    ProbeSpec(text='uretprobe:libc:malloc ret=$retval', is_return=True, target='libc', symbol='malloc', ...)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import ProbeSyntaxError

__all__ = ["ProbeSpec", "parse_probe", "parse_kernel_number", "group_probe_words", "MAX_NAME_LEN"]

MAX_NAME_LEN = 63  # the kernel's MAX_EVENT_NAME_LEN is 64, including the NUL
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SYMBOL = re.compile(r"[A-Za-z_.$?*\[\]][\w.$@?*\[\]:<>~,()/-]*\Z")  # Go's: net/http.(*conn).serve
_KERNEL_HEAD = re.compile(r"(?P<kind>[pr])(?::(?P<name>\S*))?\Z")
_REF_SUFFIX = re.compile(r"\((?P<ref>[^()]*)\)\Z")
_BPFTRACE_KINDS = {"uprobe": False, "uretprobe": True}
_IF = re.compile(r"\sif(?:\s|$)")


@dataclass(frozen=True)
class ProbeSpec:
    """A probe as the user wrote it, parsed but not yet looked up in any file."""

    text: str
    is_return: bool
    target: str
    group: str | None = None
    event: str | None = None
    offset: int | None = None  # file offset (kernel form)
    address: int | None = None  # link-time virtual address (uprobe:PATH:0xADDR)
    symbol: str | None = None  # name or glob
    symbol_offset: int = 0
    provider: str | None = None  # USDT provider glob; None matches any provider
    marker: str | None = None  # USDT name glob
    ref_ctr_offset: int | None = None
    fetchargs: tuple[str, ...] = ()
    source_file: str | None = None  # FILE of uprobe:PATH:FILE:LINE
    source_function: str | None = None  # FUNCTION of uprobe:PATH:FUNCTION:+N
    line: int | None = None  # LINE, or N lines below FUNCTION's first
    predicate: str | None = None  # EXPR of a trailing "if EXPR"

    @property
    def is_line(self) -> bool:
        return self.line is not None

    @property
    def is_usdt(self) -> bool:
        return self.marker is not None


def parse_kernel_number(text: str, what: str, probe: str) -> int:
    """An unsigned number as the kernel's ``kstrtoul(s, 0)`` reads it: ``0x`` hex, leading ``0`` octal."""
    try:
        if text[:2].lower() == "0x":
            value = int(text[2:], 16) if text[2:] else None
        elif len(text) > 1 and text.startswith("0"):
            value = int(text[1:], 8)
        else:
            value = int(text, 10) if text.isdigit() else None
    except ValueError:
        value = None
    if value is None:
        raise ProbeSyntaxError(f"probe '{probe}': {what} '{text}' is not a number (write 0x1234, 0755 or 4660)")
    if value >= 1 << 64:
        raise ProbeSyntaxError(f"probe '{probe}': {what} '{text}' is out of range (more than 64 bits)")
    return value


def parse_probe(text: str) -> ProbeSpec:
    """Parse one probe with its fetch arguments and predicate (``if EXPR``, checked when the probe is resolved,
    against its arguments); raise :class:`ProbeSyntaxError` naming the bad token."""
    keyword = _IF.search(text)
    spec = _parse_probe(text[:keyword.start()] if keyword else text)
    if keyword is None:
        return spec
    predicate = text[keyword.end():]
    if not predicate.strip():
        raise ProbeSyntaxError(f"probe '{text}': 'if' must be followed by a condition, e.g. 'if size > 4096'")
    return replace(spec, text=text, predicate=predicate.strip())


def _parse_probe(text: str) -> ProbeSpec:
    tokens = text.split()
    if not tokens:
        raise ProbeSyntaxError("empty probe: write e.g. 'uprobe:/bin/bash:readline' or 'p /bin/bash:0x1234'")
    head, rest = tokens[0], tuple(tokens[1:])
    prefix = head.split(":", 1)[0]
    if prefix in _BPFTRACE_KINDS or prefix == "usdt":
        return _parse_bpftrace(text, head, rest)
    head_match = _KERNEL_HEAD.match(head)
    if head_match and rest:
        return _parse_kernel(text, head_match, rest[0], rest[1:])
    if head_match:
        name = head_match["name"] or ""
        if name.startswith("/") or ":" in name or name.count("/") > 1:  # a path, not GRP/EVENT
            raise ProbeSyntaxError(f"probe '{text}': '{head}' must be followed by PATH:OFFSET; did you mean "
                                   f"'{head_match['kind']} {name}'?")
        raise ProbeSyntaxError(f"probe '{text}': '{head}' must be followed by PATH:OFFSET")
    raise ProbeSyntaxError(f"probe '{text}': unknown probe type '{prefix}' "
                           f"(use uprobe:, uretprobe:, usdt:, or the kernel's p: and r: forms)")


def _starts_probe(word: str) -> bool:
    return word.split(":", 1)[0] in ("uprobe", "uretprobe", "usdt") or bool(_KERNEL_HEAD.match(word))


def group_probe_words(words: list[str]) -> list[str]:
    """Probe texts from command-line words: a word that does not start a probe belongs to the one before.

    ``['uretprobe:libc:malloc', 'ret=$retval', 'p', '/bin/x:0x10']`` gives
    ``['uretprobe:libc:malloc ret=$retval', 'p /bin/x:0x10']``.
    """
    probes: list[str] = []
    for word in words:
        tokens = word.split()
        first = tokens[0] if tokens else word
        # in a predicate, "p" may be an argument's name ("if p == 1"): a probe starts with a colon in it
        # (uprobe:..., p:ev) or, given as one word, with its PATH:OFFSET ("p /bin/x:0x10")
        new_probe = _starts_probe(first) and (not probes or not _IF.search(probes[-1]) or ":" in first
                                              or len(tokens) > 1 and ":" in tokens[1])
        if probes and not new_probe:
            probes[-1] += " " + word
        elif probes and _KERNEL_HEAD.match(probes[-1]):  # "p:grp/ev" waits for its PATH:OFFSET
            probes[-1] += " " + word
        else:
            probes.append(word)
    return probes


def _parse_kernel(text: str, head: re.Match, location: str, fetchargs: tuple[str, ...]) -> ProbeSpec:
    is_return = head["kind"] == "r"
    group, event = _group_and_event(head["name"], text)
    ref_ctr = None
    ref_match = _REF_SUFFIX.search(location)
    if ref_match:
        ref_ctr = parse_kernel_number(ref_match["ref"], "reference counter offset", text)
        location = location[:ref_match.start()]
    elif "(" in location:
        raise ProbeSyntaxError(f"probe '{text}': reference counter brace is not closed in '{location}'")
    if location.endswith("%return"):
        if is_return:
            raise ProbeSyntaxError(f"probe '{text}': '%return' is for p: probes; r: is already a return probe")
        is_return, location = True, location[:-len("%return")]
    elif "%" in location:
        raise ProbeSyntaxError(f"probe '{text}': invalid suffix '{location[location.index('%'):]}' "
                               f"(only %return is allowed)")
    path, colon, where = location.rpartition(":")
    if not colon or not path or not where:
        raise ProbeSyntaxError(f"probe '{text}': '{location}' is not PATH:OFFSET or PATH:SYMBOL[+OFFSET]")
    if where[0].isdigit():
        offset = parse_kernel_number(where, "offset", text)
        return ProbeSpec(text, is_return, path, group, event, offset=offset, ref_ctr_offset=ref_ctr,
                         fetchargs=fetchargs)
    symbol, symbol_offset = _split_symbol(where, text)
    return ProbeSpec(text, is_return, path, group, event, symbol=symbol, symbol_offset=symbol_offset,
                     ref_ctr_offset=ref_ctr, fetchargs=fetchargs)


def _parse_bpftrace(text: str, head: str, fetchargs: tuple[str, ...]) -> ProbeSpec:
    kind, _, rest = head.partition(":")
    if kind == "usdt":
        return _parse_usdt(text, rest, fetchargs)
    is_return = _BPFTRACE_KINDS[kind]
    path, colon, where = rest.rpartition(":")
    path = path or ("*" if colon else "")  # uprobe::SYMBOL: every object of the process
    if not colon or not path or not where:
        raise ProbeSyntaxError(f"probe '{text}': write {kind}:PATH:SYMBOL[+OFFSET]"
                               f"{'' if is_return else ' or uprobe:PATH:0xADDRESS'}")
    line_spec = _source_line(text, path, where, fetchargs)
    if line_spec is not None:
        if is_return:
            raise ProbeSyntaxError(f"probe '{text}': a return probe goes on a function's entry, not a source line "
                                   f"(write uretprobe:PATH:FUNCTION)")
        return line_spec
    if where[0].isdigit():
        address = parse_kernel_number(where, "address", text)
        return ProbeSpec(text, is_return, path, address=address, fetchargs=fetchargs)
    symbol, symbol_offset = _split_symbol(where, text)
    if is_return and symbol_offset:
        raise ProbeSyntaxError(f"probe '{text}': a return probe goes on a function's entry, not '{where}'")
    return ProbeSpec(text, is_return, path, symbol=symbol, symbol_offset=symbol_offset, fetchargs=fetchargs)


def _source_line(text: str, path: str, where: str, fetchargs: tuple[str, ...]) -> ProbeSpec | None:
    """``PATH:FILE:LINE`` or ``PATH:FUNCTION:+N`` (split as ``path`` = PATH:FILE, ``where`` = LINE); None when
    ``where`` is no line."""
    target, colon, name = path.rpartition(":")
    relative = where.startswith("+") and where[1:].isdigit()
    if not colon or not target or not name or not (relative or (where.isdigit() and "." in name)):
        return None
    if relative:
        symbol, offset = _split_symbol(name, text)
        if offset:
            raise ProbeSyntaxError(f"probe '{text}': write FUNCTION:+LINES or FUNCTION+OFFSET, not both")
        return ProbeSpec(text, False, target, source_function=symbol, line=int(where[1:]), fetchargs=fetchargs)
    if int(where) == 0:
        raise ProbeSyntaxError(f"probe '{text}': lines count from 1, not 0")
    return ProbeSpec(text, False, target, source_file=name, line=int(where), fetchargs=fetchargs)


def _parse_usdt(text: str, rest: str, fetchargs: tuple[str, ...]) -> ProbeSpec:
    parts = rest.split(":")
    if len(parts) < 2 or not parts[-1]:
        raise ProbeSyntaxError(f"probe '{text}': write usdt:PATH:[PROVIDER:]NAME")
    provider = None
    if len(parts) >= 3 and parts[-2]:
        path, provider = ":".join(parts[:-2]), parts[-2]
    else:
        path = ":".join(parts[:-1]).rstrip(":")
    path = path or "*"  # usdt::PROVIDER:NAME, as bpftrace writes every object of the process
    for label, value in (("provider", provider), ("marker name", parts[-1])):
        if value is not None and not re.fullmatch(r"[\w?*\[\]\"-]+", value):  # quotes: as some headers write names
            raise ProbeSyntaxError(f"probe '{text}': invalid {label} '{value}'")
    return ProbeSpec(text, False, path, provider=provider, marker=parts[-1], fetchargs=fetchargs)


def _split_symbol(where: str, text: str) -> tuple[str, int]:
    symbol, plus, offset_text = where.partition("+")
    if not _SYMBOL.match(symbol):
        raise ProbeSyntaxError(f"probe '{text}': invalid symbol '{symbol}'")
    offset = parse_kernel_number(offset_text, "symbol offset", text) if plus else 0
    return symbol, offset


def _group_and_event(name: str | None, text: str) -> tuple[str | None, str | None]:
    """``[GRP/]EVENT`` or ``GRP.EVENT`` after ``p:``, as the kernel's traceprobe_parse_event_name splits it."""
    if name is None:
        return None, None
    separator = "/" if "/" in name else "." if "." in name else None
    if separator is None:
        return None, _check_name(name, "event", text)
    group, _, event = name.partition(separator)
    if not group:
        raise ProbeSyntaxError(f"probe '{text}': no group name before '{separator}' (write p:GROUP/EVENT or p:EVENT)")
    if not event:
        raise ProbeSyntaxError(f"probe '{text}': no event name after '{group}{separator}'")
    return _check_name(group, "group", text), _check_name(event, "event", text)


def _check_name(name: str, what: str, text: str) -> str:
    if not _NAME.match(name):
        raise ProbeSyntaxError(f"probe '{text}': {what} name '{name}' must be a C identifier "
                               f"(letters, digits, '_', not starting with a digit)")
    if len(name) > MAX_NAME_LEN:
        raise ProbeSyntaxError(f"probe '{text}': {what} name '{name[:20]}...' is longer than {MAX_NAME_LEN} characters")
    return name

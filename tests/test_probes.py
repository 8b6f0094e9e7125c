"""One probe syntax: every form parses, resolves to the offset binutils gives, and prints a line the kernel takes."""

from __future__ import annotations

import os
import re
from dataclasses import replace

import pytest

from oracles import (SdtOperand, file_offset, function_symbols, objdump_instruction_starts, pt_regs_slot,
                     readelf_marker_arguments, readelf_sdt_notes, tool_output, tracefs_register_fetcharg)
from uprobes.errors import ProbeSyntaxError, ResolveError, UprobesError
from uprobes.probes.resolve import resolve_text
from uprobes.probes.spec import group_probe_words, parse_probe

PYTHON = "/usr/bin/python3.11"
POSTGRES = "/usr/lib/postgresql/15/bin/postgres"
LIBC = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")


def _one(text: str):
    probes = resolve_text(text)
    assert len(probes) == 1, probes
    return probes[0]


# -- parsing --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, fields", [
    ("p /bin/true:0x10", dict(is_return=False, target="/bin/true", offset=0x10)),
    ("p:grp/ev /bin/true:0x10 a=%di", dict(group="grp", event="ev", offset=0x10, fetchargs=("a=%di",))),
    ("p:ev /bin/true:16", dict(group=None, event="ev", offset=16)),
    ("p:grp.ev /bin/true:16", dict(group="grp", event="ev")),  # the kernel reads GRP.EVENT as GRP/EVENT
    ("p /bin/true:010", dict(offset=8)),  # a leading 0 is octal, as kstrtoul(s, 0) reads it
    ("r:g/e /bin/true:0x10(0x20) $retval", dict(is_return=True, ref_ctr_offset=0x20, fetchargs=("$retval",))),
    ("p /bin/true:0x10%return(0x20)", dict(is_return=True, ref_ctr_offset=0x20)),
    ("p /bin/true:main+0x4", dict(symbol="main", symbol_offset=4)),
    ("p libc:malloc", dict(target="libc", symbol="malloc")),
    ("uprobe:/bin/bash:readline", dict(target="/bin/bash", symbol="readline", is_return=False)),
    ("uprobe:/bin/bash:readline+4", dict(symbol="readline", symbol_offset=4)),
    ("uprobe:/bin/bash:0x401000", dict(address=0x401000)),
    ("uretprobe:libc:malloc ret=$retval", dict(is_return=True, symbol="malloc", fetchargs=("ret=$retval",))),
    ("uprobe:libc:mem*", dict(symbol="mem*")),
    ("usdt:/usr/bin/python3.11:python:audit arg0:string", dict(provider="python", marker="audit",
                                                                fetchargs=("arg0:string",))),
    ("usdt:/usr/bin/python3.11:audit", dict(provider=None, marker="audit")),
    ("usdt:/usr/bin/python3.11:py*:gc__?????", dict(provider="py*", marker="gc__?????")),
])
def test_every_syntax_form_parses(text, fields):
    spec = parse_probe(text)
    for name, value in fields.items():
        assert getattr(spec, name) == value, name


@pytest.mark.parametrize("text, token", [
    ("", "empty probe"),
    ("kprobe:foo", "'kprobe'"),
    ("p", "PATH:OFFSET"),
    ("p:/ev /bin/true:0x10", "no group name"),
    ("p:grp/ /bin/true:0x10", "no event name after 'grp/'"),
    ("p /bin/true", "/bin/true"),
    ("p /bin/true:0xzz", "'0xzz'"),
    ("p /bin/true:09", "'09'"),
    ("p /bin/true:0x10(0x20", "brace"),
    ("p /bin/true:0x10%entry", "'%entry'"),
    ("r /bin/true:0x10%return", "%return"),
    ("p:1grp/ev /bin/true:0x10", "'1grp'"),
    ("p:g/e-v /bin/true:0x10", "'e-v'"),
    ("p:g/" + "e" * 70 + " /bin/true:0x10", "longer than 63"),
    ("uprobe:/bin/true", "uprobe:PATH:SYMBOL"),
    ("uretprobe:libc:malloc+4", "'malloc+4'"),
    ("usdt:/usr/bin/python3.11", "usdt:PATH:[PROVIDER:]NAME"),
    ("uprobe:/bin/true:ma!n", "'ma!n'"),
])
def test_syntax_errors_name_the_bad_token(text, token):
    with pytest.raises(ProbeSyntaxError) as info:
        parse_probe(text)
    message = str(info.value)
    assert token in message and "\n" not in message


def test_command_line_words_group_into_probes():
    words = ["uretprobe:libc:malloc", "ret=$retval", "p:g/e", "/bin/true:0x10", "x=%di", "usdt:/x:a:b", "arg0"]
    assert group_probe_words(words) == ["uretprobe:libc:malloc ret=$retval", "p:g/e /bin/true:0x10 x=%di",
                                        "usdt:/x:a:b arg0"]


# -- resolution ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["demo", "demo-nopie", "libprobed.so"])
def test_symbol_probes_land_on_the_file_offset_nm_and_readelf_give(targets, name):
    path = str(targets / name)
    for function, (address, _size) in function_symbols(path).items():
        if function.startswith(("_", "deregister", "register", "frame_dummy")):
            continue
        probe = _one(f"uprobe:{path}:{function}")
        assert probe.offset == file_offset(path, address)
        assert probe.address == address and probe.location == function


def test_the_same_point_written_five_ways_gives_one_line(targets):
    path = str(targets / "demo-nopie")
    address, _ = function_symbols(path)["process_order"]
    offset = file_offset(path, address)
    forms = [f"uprobe:{path}:process_order", f"p {path}:process_order", f"p {path}:{offset:#x}",
             f"p {path}:{offset}", f"uprobe:{path}:{address:#x}", f"p {path}:0{offset:o}"]
    lines = {_one(text).uprobe_events_line().split(" ", 1)[1] for text in forms}
    assert lines == {f"{path}:{offset:#x}"}


@pytest.mark.parametrize("name", ["demo", "demo-stripped"])
def test_offsets_inside_an_instruction_are_refused_naming_it(targets, name):
    """Decoded from the function's symbol, or in a stripped copy from its .eh_frame_hdr entry."""
    oracle, path = str(targets / "demo"), str(targets / name)
    starts = objdump_instruction_starts(oracle, "process_order")
    start, size = function_symbols(oracle)["process_order"]
    for delta in range(size):
        address = start + delta
        if address in starts:
            assert _one(f"p {path}:{file_offset(path, address):#x}").address == address
            continue
        with pytest.raises(ResolveError) as info:
            resolve_text(f"p {path}:{file_offset(path, address):#x}")
        holder = max(s for s in starts if s < address)
        assert "inside the instruction" in str(info.value)
        assert f"file offset {file_offset(path, holder):#x}" in str(info.value)


def test_return_probe_must_be_at_a_function_entry(targets):
    path = str(targets / "demo")
    start, _ = function_symbols(path)["process_order"]
    second = objdump_instruction_starts(path, "process_order")[1]
    assert _one(f"uretprobe:{path}:process_order").is_return
    with pytest.raises(ResolveError, match="first instruction"):
        resolve_text(f"r {path}:{file_offset(path, second):#x}")


def _libc_functions() -> dict[str, tuple[int, int]]:
    """libc's functions per readelf: its .dynsym, plus the full .symtab of libc6-dbg's file found by build-id."""
    build_id = re.search(r"Build ID: ([0-9a-f]+)", tool_output("readelf", "-n", LIBC))[1]
    debug = f"/usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
    return {**(function_symbols(debug) if os.path.exists(debug) else {}), **function_symbols(LIBC, dynamic=True)}


def test_wildcards_expand_to_every_match_and_aliases_collapse():
    probes = resolve_text("uprobe:libc:malloc*")
    names = {p.location for p in probes}
    nm = _libc_functions()
    expected = {n.split("@")[0] for n in nm if n.startswith("malloc")}
    assert names <= expected and len({p.address for p in probes}) == len(probes)
    assert {nm[n][0] for n in nm if n.startswith("malloc")} == {p.address for p in probes}


def test_unknown_symbol_names_the_closest_candidates(targets):
    with pytest.raises(ResolveError) as info:
        resolve_text(f"uprobe:{targets / 'demo'}:process_ordr")
    assert "closest: process_order" in str(info.value)


def test_a_glob_or_version_that_matches_nothing_says_where_to_look(targets):
    with pytest.raises(ResolveError) as info:
        resolve_text(f"uprobe:{targets / 'demo'}:zz*")
    assert f"'uprobes list {targets / 'demo'}' shows its" in str(info.value)
    with pytest.raises(ResolveError, match="closest: malloc@@GLIBC_2.2.5"):
        resolve_text("uprobe:libc:malloc@GLIBC_2.2.5")


def test_long_names_keep_what_tells_an_entry_from_a_return():
    symbol = "_ZNKSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE7compareEmmRKS4_mm"
    entry, = resolve_text(f"uprobe:libstdc++:{symbol}")
    returned, = resolve_text(f"uretprobe:libstdc++:{symbol}")
    inside, = resolve_text(f"uprobe:libstdc++:{symbol}+4")
    assert len({entry.event, returned.event, inside.event}) == 3
    assert all(len(p.event) <= 63 for p in (entry, returned, inside))
    assert returned.event.endswith("__return") and inside.event.endswith("_0x4")


def test_marker_arguments_cannot_be_named_twice(targets):
    demo = targets / "demo"
    for args in ("arg0 arg0", "%di %si arg1", "arg1=arg0 arg1"):
        with pytest.raises(ProbeSyntaxError, match="is already used"):
            resolve_text(f"usdt:{demo}:demo:order__done {args}")
    assert [a.name for a in _one(f"usdt:{demo}:demo:order__done arg1 x=arg0").fetchargs] == ["arg1", "x"]


def test_a_separate_debug_file_is_listed_but_not_probed(targets):
    with pytest.raises(ResolveError, match="separate debug file"):
        resolve_text(f"uprobe:{targets / 'demo.debug'}:price_of")
    with pytest.raises(ResolveError, match="separate debug file"):
        resolve_text(f"usdt:{targets / 'demo.debug'}:demo:order__done")


def test_stripped_file_says_so(targets):
    with pytest.raises(ResolveError, match="stripped"):
        resolve_text(f"uprobe:{targets / 'demo-stripped'}:process_order")


def test_minidebuginfo_and_debuglink_give_symbols_to_stripped_files(targets):
    expected = _one(f"uprobe:{targets / 'demo'}:process_order").offset
    for name in ("demo-minidebug", "demo-debuglink"):
        assert _one(f"uprobe:{targets / name}:process_order").offset == expected


def test_usdt_probes_cover_every_site_with_its_semaphore(targets):
    path = str(targets / "forms")
    probes = resolve_text(f"usdt:{path}:forms:inlined")
    notes = [n for n in readelf_sdt_notes(path) if n.name == "inlined"]
    assert sorted(p.offset for p in probes) == sorted(file_offset(path, n.location) for n in notes)
    assert len({p.event for p in probes}) == 2  # different argument types: separate events
    demo = str(targets / "demo")
    (start,) = resolve_text(f"usdt:{demo}:demo:order__start")
    (note,) = [n for n in readelf_sdt_notes(demo) if n.name == "order__start"]
    assert start.ref_ctr_offset == file_offset(demo, note.semaphore)


def test_usdt_provider_is_optional_and_globs_match():
    assert {p.event for p in resolve_text(f"usdt:{PYTHON}:audit")} == {"python_audit"}
    assert {p.event for p in resolve_text(f"usdt:{PYTHON}:python:gc__*")} == {"python_gc__start", "python_gc__done"}


def test_unknown_marker_names_the_closest(targets):
    with pytest.raises(ResolveError, match="closest: python:audit"):
        resolve_text(f"usdt:{PYTHON}:python:audi")
    with pytest.raises(ResolveError, match="no SDT markers"):
        resolve_text(f"usdt:{targets / 'uselib'}:x")


def test_marker_arguments_become_fetch_arguments():
    """Their registers and types are readelf's: python:audit's first argument a pointer in a register, every
    argument of postgresql:checkpoint__done a value at a %rip-relative address (tracefs: @+FILE_OFFSET)."""
    (probe,) = resolve_text(f"usdt:{PYTHON}:python:audit arg0:string")
    (audit,) = readelf_marker_arguments(PYTHON, "python", "audit")
    slot, _ = pt_regs_slot(SdtOperand.parse(audit[0]).operand)
    assert probe.uprobe_events_line().endswith(f" arg0=+0(%{slot}):string")
    (probe,) = resolve_text(f"usdt:{POSTGRES}:postgresql:checkpoint__done")
    (done,) = [[SdtOperand.parse(word) for word in site]
               for site in readelf_marker_arguments(POSTGRES, "postgresql", "checkpoint__done")]
    assert all(argument.operand.endswith("(%rip)") for argument in done)
    assert [a.format().split(":")[1] for a in probe.fetchargs] == [argument.tracefs_type for argument in done]
    assert all(a.format().split("=")[1].startswith("@+") for a in probe.fetchargs)


def test_marker_arguments_tracefs_cannot_express_are_left_to_the_ptrace_engine(targets):
    (probe,) = resolve_text(f"usdt:{targets / 'forms'}:forms:sib")
    assert [a.name for a in probe.fetchargs] == ["arg0", "arg1", "arg2"] and probe.kernel_fetchargs == ()
    assert probe.uprobe_events_line().endswith(f":{probe.offset:#x}")
    assert probe.unavailable == () and len(probe.kernel_unavailable) == 3
    assert all("index register" in u for u in probe.kernel_unavailable)
    (wide,) = resolve_text(f"usdt:{targets / 'forms'}:forms:wide")
    assert [a.name for a in wide.fetchargs] == ["arg1"]  # 16@%rax means nothing: left out for every engine
    assert "16-byte value" in wide.unavailable[0]


def test_marker_argument_out_of_range_is_an_error():
    with pytest.raises(ProbeSyntaxError, match="arg5"):
        resolve_text(f"usdt:{PYTHON}:python:audit arg5")


def test_missing_and_non_elf_targets_are_errors(tmp_path):
    with pytest.raises(UprobesError, match="no such file"):
        resolve_text("uprobe:/nonexistent/x:main")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(UprobesError, match="not an ELF file"):
        resolve_text(f"uprobe:{text}:main")


# -- the kernel as the oracle of the printed line ---------------------------------------------------------

def _kernel_round_trip(tracefs, texts) -> tuple[list, list[str]]:
    """Write the lines of each probe text to uprobe_events (a group per text), read back what the kernel
    kept, and delete them again."""
    groups = {text: f"uprobes_test_{os.getpid()}_{i}" for i, text in enumerate(texts)}
    probes = [replace(p, group=groups[text]) for text in texts for p in resolve_text(text)]
    events = tracefs / "uprobe_events"
    written = []
    try:
        for probe in probes:
            line = probe.uprobe_events_line()
            fd = os.open(events, os.O_WRONLY | os.O_APPEND)  # Python's "a" mode seeks, which tracefs refuses
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
            written.append(f"{probe.group}/{probe.event}")
        kept = [line for line in events.read_text().splitlines() if line.split(" ")[0].split(":")[1] in written]
        return probes, kept
    finally:
        for event in dict.fromkeys(written):
            fd = os.open(events, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, f"-:{event}\n".encode())
            finally:
                os.close(fd)


def test_every_form_prints_a_line_the_kernel_accepts(tracefs, targets):
    demo = str(targets / "demo")
    texts = [
        f"p {demo}:0x{_one(f'uprobe:{demo}:main').offset:x} a=%di b=+8(%si):u32 c=$stack2 d=$comm",
        f"r {demo}:process_order r=$retval:s64",
        f"p {demo}:process_order%return r=$retval",
        f"uprobe:{demo}:price_of item=+0(%di):string qty=%si:s64",
        f"uprobe:{demo}:{_one(f'uprobe:{demo}:main').address:#x}",
        f"uretprobe:{demo}:price_of",
        f"usdt:{demo}:demo:*",
        f"usdt:{targets / 'forms'}:forms:*",
        f"usdt:{PYTHON}:python:* ",
        f"usdt:{PYTHON}:python:audit name=arg0:string arg1",
        f"usdt:{POSTGRES}:postgresql:checkpoint__done",
        f"usdt:{POSTGRES}:postgresql:query__start q=arg0:string",
        "uprobe:libc:malloc size=%di:u64",
        "uretprobe:libc:malloc ptr=$retval:x64",
    ]
    probes, kept = _kernel_round_trip(tracefs, texts)
    assert len(kept) == len(probes)
    for probe, line in zip(probes, kept):
        kind, rest = line.split(" ", 1)
        ours_kind, ours_rest = probe.uprobe_events_line().split(" ", 1)
        assert kind.split("/")[1] == ours_kind.split("/")[1]
        # the kernel prints the offset with 16 hex digits; everything else comes back as we wrote it
        where, _, args = rest.partition(" ")
        ours_where, _, ours_args = ours_rest.partition(" ")
        path, offset = where.split("(")[0].rsplit(":", 1)
        assert (path, int(offset, 16)) == (probe.path, probe.offset)
        assert ("(" in where) == (probe.ref_ctr_offset is not None)
        assert args == ours_args


def test_local_functions_come_from_the_debug_file_found_by_build_id():
    functions = _libc_functions()
    if "malloc_consolidate" not in functions:
        pytest.skip("libc6-dbg is not installed (scripts/install-deps installs it)")
    probe = _one("uprobe:libc:malloc_consolidate")
    assert probe.address == functions["malloc_consolidate"][0]
    assert probe.offset == file_offset(LIBC, probe.address)


def test_a_high_byte_marker_argument_takes_no_type(targets):
    forms = targets / "forms"
    (high_byte,) = readelf_marker_arguments(str(forms), "forms", "high_byte")
    assert pt_regs_slot(high_byte[0].split("@")[1])[1] == 8  # its first argument is one (%ah)
    assert _one(f"usdt:{forms}:forms:high_byte arg0").uprobe_events_line().endswith(
        f" arg0={tracefs_register_fetcharg(high_byte[0])}")
    for typed in ("arg0:u16", "arg0:string"):
        with pytest.raises(ProbeSyntaxError, match=f"high-byte register .{re.escape(high_byte[0])}.*give it no type"):
            resolve_text(f"usdt:{forms}:forms:high_byte {typed}")

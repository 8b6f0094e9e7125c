"""ELF objects as uprobes reads them: kinds, symbols, address/offset mapping, decoding, locating, bad input.

Every expected value comes from binutils (nm, readelf, objdump), ``ldconfig -p`` or ``shutil.which`` while the
test runs; nothing is a number remembered from an earlier run of uprobes.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_cli
from oracles import tool_output
from uprobes.elf import objfile
from uprobes.elf.debuginfo import find_debug_file
from uprobes.elf.locate import find_object
from uprobes.elf.objfile import ElfObject
from uprobes.errors import ElfError, ResolveError
from uprobes.sdt.notes import read_markers
from uprobes.x86_64.decode import instruction_containing

LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
PYTHON = "/usr/bin/python3.11"
LIBPYTHON = "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"
LIBJVM = "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so"


# -- oracles: parsing nm, readelf, objdump and ldconfig output ------------------------------------------------


@dataclass(frozen=True)
class NmSymbol:
    name: str  # as nm spells it, with a version for dynamic symbols: malloc@@GLIBC_2.2.5
    address: int
    size: int
    letter: str  # nm's class letter: T, t, W, i, ...
    elf_type: str  # FUNC, OBJECT, NOTYPE, "<OS specific>: 10" (IFUNC), ...


def nm_symbols(path: str, *, dynamic: bool = False) -> list[NmSymbol]:
    """Defined symbols as ``nm -S --defined-only [-D]`` lists them, in nm's SysV layout so the ELF type shows."""
    out = tool_output("nm", "-S", "--defined-only", "--format=sysv", *(["-D"] if dynamic else []), path)
    symbols = []
    for line in out.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) != 7 or not re.fullmatch(r"[0-9a-f]+", fields[1]):
            continue  # headings and blank lines
        name, value, letter, elf_type, size = fields[:5]
        symbols.append(NmSymbol(name, int(value, 16), int(size, 16) if size else 0, letter, elf_type))
    return symbols


def nm_functions(path: str, *, dynamic: bool = False) -> list[NmSymbol]:
    """Function symbols: nm letters T/t/W/w/i. W alone is not enough (it also marks weak NOTYPE symbols such as
    ``data_start`` and ``_.stapsdt.base``), so the symbol must also be typed FUNC, or be an IFUNC (letter i)."""
    return [s for s in nm_symbols(path, dynamic=dynamic)
            if s.letter in "TtWwi" and (s.elf_type == "FUNC" or s.letter == "i")]


@dataclass(frozen=True)
class LoadRow:
    offset: int
    vaddr: int
    filesz: int
    memsz: int


def readelf_load_rows(path: str) -> list[LoadRow]:
    """PT_LOAD rows of ``readelf -lW``: Offset VirtAddr PhysAddr FileSiz MemSiz Flg Align."""
    rows = []
    for line in tool_output("readelf", "-lW", path).splitlines():
        fields = line.split()
        if fields and fields[0] == "LOAD":
            rows.append(LoadRow(int(fields[1], 16), int(fields[2], 16), int(fields[4], 16), int(fields[5], 16)))
    assert rows, f"readelf shows no PT_LOAD in {path}"
    return rows


def expected_offset(rows: list[LoadRow], vaddr: int) -> int | None:
    """``vaddr - p_vaddr + p_offset`` for the segment whose file-backed part holds ``vaddr``."""
    for row in rows:
        if row.vaddr <= vaddr < row.vaddr + row.filesz:
            return vaddr - row.vaddr + row.offset
    return None


def readelf_header_field(path: str, label: str) -> str:
    """One value of ``readelf -hW``, e.g. ``Start of section headers`` -> ``20224 (bytes into file)``."""
    match = re.search(rf"^\s*{re.escape(label)}:\s*(.*)$", tool_output("readelf", "-hW", path), re.M)
    assert match, f"readelf -h of {path} has no {label!r}"
    return match[1].strip()


@dataclass(frozen=True)
class SectionRow:
    index: int
    type: str
    offset: int
    size: int


def readelf_sections(path: str) -> dict[str, SectionRow]:
    """Section name -> row of ``readelf -SW``: [Nr] Name Type Address Off Size ..."""
    pattern = r"^\s*\[\s*(\d+)\]\s+(\S+)\s+(\S+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+([0-9a-f]+)\s"
    return {m[2]: SectionRow(int(m[1]), m[3], int(m[4], 16), int(m[5], 16))
            for m in re.finditer(pattern, tool_output("readelf", "-SW", path), re.M)}


def readelf_section_types(path: str) -> dict[str, str]:
    """Section name -> type (PROGBITS, NOBITS, ...) from ``readelf -SW``."""
    return {name: row.type for name, row in readelf_sections(path).items()}


def readelf_kind(path: str) -> str:
    """exec / pie / shared / debug as readelf tells: ELF type (binutils >= 2.38 names PIEs) and a NOBITS .text."""
    if readelf_section_types(path).get(".text") == "NOBITS":
        return "debug"
    elf_type = readelf_header_field(path, "Type")
    if elf_type.startswith("EXEC"):
        return "exec"
    if "Position-Independent" in elf_type:
        return "pie"
    assert "Shared object" in elf_type, elf_type
    return "shared"


def objdump_first_instructions(path: str) -> dict[int, bytes]:
    """Address of every symbol objdump starts a block at -> bytes of the first instruction in that block."""
    first = {}
    block_at = None
    for line in tool_output("objdump", "-d", "-w", path).splitlines():
        header = re.match(r"^([0-9a-f]+) <.*>:$", line)
        if header:
            block_at = int(header[1], 16)
            continue
        insn = re.match(r"^\s+([0-9a-f]+):\t([0-9a-f ]+)\t", line)
        if insn and block_at is not None:
            assert int(insn[1], 16) == block_at, line
            first[block_at] = bytes.fromhex(insn[2].replace(" ", ""))
            block_at = None
    return first


def objdump_instruction_starts(path: str, symbol: str) -> list[int]:
    """Addresses of the instructions ``objdump -d --no-show-raw-insn`` lists for one function."""
    out = tool_output("objdump", "-d", "--no-show-raw-insn", f"--disassemble={symbol}", path)
    return [int(m[1], 16) for m in re.finditer(r"^\s+([0-9a-f]+):\t", out, re.M)]


def ldconfig_x86_64(soname: str) -> str:
    """The path ``ldconfig -p`` gives for the x86-64 build of ``soname``."""
    for line in tool_output("ldconfig", "-p").splitlines():
        match = re.match(rf"^\s+{re.escape(soname)} \(([^)]*)\) => (\S+)$", line)
        if match and "x86-64" in match[1]:
            return match[2]
    raise AssertionError(f"ldconfig -p lists no x86-64 {soname}")


def first_elf_in_path(name: str) -> str | None:
    """What ``shutil.which`` finds, passing over wrapper scripts (pyenv shims) to the first ELF program."""
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        found = shutil.which(name, path=directory or ".")
        if found:
            with open(found, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    return found
    return None


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message, repr(message)
    return message


# -- kinds ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), [
    ("demo", "pie"), ("demo-nopie", "exec"), ("libprobed.so", "shared"), (LIBC, "shared"),
    ("demo.debug", "debug"), (PYTHON, "exec"),
])
def test_kind_of_each_object_agrees_with_readelf(targets, name, kind):
    path = name if name.startswith("/") else str(targets / name)
    if not os.path.exists(path):
        pytest.skip(f"{path} is not installed")
    assert readelf_kind(path) == kind  # the expectation itself is what binutils says
    assert ElfObject.open(path).kind == kind


# -- symbols --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, dynamic", [("demo", False), ("demo-nopie", False), ("libprobed.so", False),
                                           ("libprobed.so", True), ("libctor.so", True), ("libscale3.so", True)],
                         ids=["symtab-demo", "symtab-demo-nopie", "symtab-libprobed", "dynsym-libprobed",
                              "dynsym-libctor", "dynsym-libscale3"])
def test_symbols_match_nm_on_every_target(targets, name, dynamic):
    """Against nm (-D: the exported ones, of libraries that export functions: the programs export none)."""
    path = str(targets / name)
    expected = nm_functions(path, dynamic=dynamic)
    assert expected, f"nm{' -D' if dynamic else ''} lists no functions in {path}"
    ours = ElfObject.open(path).symbols.functions
    spelled = {(s.display_name, s.value, s.size) for s in ours} | {(s.name, s.value, s.size) for s in ours}
    missing = [s for s in expected if (s.name, s.address, s.size) not in spelled]
    assert not missing


def test_weak_data_symbols_are_not_offered_as_functions(targets):
    # nm's W symbols that are not typed FUNC (data_start, _.stapsdt.base) are not offered as functions.
    path = str(targets / "demo")
    not_code = {s.name for s in nm_symbols(path) if s.letter in "Ww" and s.elf_type != "FUNC"}
    assert not_code
    assert not not_code & {s.name for s in ElfObject.open(path).symbols.functions}


def test_libc_versioned_names_are_found_as_nm_spells_them():
    versioned = [s for s in nm_functions(LIBC, dynamic=True) if "@" in s.name]
    assert len(versioned) > 1000, "nm -D should list thousands of versioned libc functions"
    symbols = ElfObject.open(LIBC).symbols
    for expected in versioned:
        found = [s for s in symbols.lookup(expected.name) if s.value == expected.address]
        assert found, expected
        assert found[0].display_name == expected.name
        assert found[0].size == expected.size


def test_libc_old_and_default_versions_of_one_name_are_told_apart():
    # nm -D shows names with both a hidden (@) and a default (@@) version, e.g. memcpy or realpath.
    by_bare = defaultdict(list)
    for sym in nm_functions(LIBC, dynamic=True):
        by_bare[sym.name.split("@")[0]].append(sym)
    doubles = {bare: syms for bare, syms in by_bare.items()
               if any("@@" in s.name for s in syms) and any("@@" not in s.name and "@" in s.name for s in syms)}
    assert doubles
    symbols = ElfObject.open(LIBC).symbols
    for bare, syms in doubles.items():
        assert {(s.display_name, s.value) for s in symbols.lookup(bare)} >= {(s.name, s.address) for s in syms}


def test_aliases_return_every_name_nm_gives_one_libc_address():
    names_at = defaultdict(set)
    for sym in nm_functions(LIBC, dynamic=True):
        names_at[sym.address].add(sym.name)
    shared = {address: names for address, names in names_at.items() if len(names) >= 2}
    assert shared, "nm -D shows no libc address with two function names"
    symbols = ElfObject.open(LIBC).symbols
    for address, names in shared.items():
        aliases = symbols.aliases(address)
        assert all(s.value == address for s in aliases)
        assert {s.display_name for s in aliases} >= names, hex(address)


# -- MiniDebugInfo and separate debug files -------------------------------------------------------------------


def test_minidebuginfo_supplies_symbols_of_a_stripped_object(targets):
    path = str(targets / "demo-minidebug")
    sections = readelf_section_types(path)
    assert ".symtab" not in sections and ".gnu_debugdata" in sections
    (expected,) = [s for s in nm_functions(str(targets / "demo")) if s.name == "process_order"]
    (found,) = ElfObject.open(path).symbols.lookup("process_order")
    assert found.origin == "minidebuginfo"
    assert (found.value, found.size) == (expected.address, expected.size)


def test_minidebuginfo_symbols_match_nm_of_the_unstripped_build(targets):
    # The Makefile keeps the T/t symbols that are not also dynamic; every one of those must come back.
    dynamic = {s.name for s in nm_symbols(str(targets / "demo"), dynamic=True)}
    kept = [s for s in nm_functions(str(targets / "demo")) if s.letter in "Tt" and s.name not in dynamic]
    ours = {(s.name, s.value, s.size) for s in ElfObject.open(str(targets / "demo-minidebug")).symbols.functions}
    assert kept and {(s.name, s.address, s.size) for s in kept} <= ours


def test_debuglink_finds_the_separate_debug_file(targets):
    path = str(targets / "demo-debuglink")
    dump = tool_output("readelf", "--string-dump=.gnu_debuglink", path)
    link = re.search(r"\[\s*0\]\s+(\S+)", dump)[1]
    obj = ElfObject.open(path)
    assert obj.debuglink == link
    assert find_debug_file(obj) == os.path.realpath(targets / link)


def test_debuglink_symbols_match_nm_of_the_unstripped_build(targets):
    path = str(targets / "demo-debuglink")
    assert ".symtab" not in readelf_section_types(path)
    ours = {(s.name, s.value, s.size) for s in ElfObject.open(path).symbols.functions}
    expected = {(s.name, s.address, s.size) for s in nm_functions(str(targets / "demo"))}
    assert expected and expected <= ours


def test_fully_stripped_object_has_no_static_functions(targets):
    path = str(targets / "demo-stripped")
    assert "process_order" not in {s.name for s in nm_symbols(path, dynamic=True)}
    obj = ElfObject.open(path)
    assert obj.symbols.lookup("process_order") == []
    assert obj.describe_address(0x10) == "0x10"


# -- addresses and file offsets -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo", "demo-nopie", "libprobed.so"])
def test_vaddr_and_offset_convert_both_ways_like_readelf_segments(targets, name):
    path = str(targets / name)
    rows = readelf_load_rows(path)
    first_insn = objdump_first_instructions(path)
    data = Path(path).read_bytes()
    obj = ElfObject.open(path)
    functions = nm_functions(path) + nm_functions(path, dynamic=True)
    assert functions
    for sym in functions:
        offset = expected_offset(rows, sym.address)
        assert offset is not None, sym
        assert obj.vaddr_to_offset(sym.address) == offset, sym
        assert obj.offset_to_vaddr(offset) == sym.address, sym
        insn = first_insn[sym.address]
        assert data[offset:offset + len(insn)] == insn, sym
        assert obj.read(sym.address, len(insn)) == insn, sym


@pytest.mark.parametrize("name", ["demo", "demo-nopie", "libprobed.so"])
def test_addresses_and_offsets_outside_every_segment_raise(targets, name):
    path = str(targets / name)
    rows = readelf_load_rows(path)
    obj = ElfObject.open(path)
    past_memory = max(r.vaddr + r.memsz for r in rows) + 0x1000
    with pytest.raises(ResolveError) as exc:
        obj.vaddr_to_offset(past_memory)
    one_line(exc.value)
    size = os.path.getsize(path)
    with pytest.raises(ResolveError):
        obj.offset_to_vaddr(size + 1)
    # The section header table sits at the end of the file, outside every PT_LOAD (readelf says where).
    shoff = int(readelf_header_field(path, "Start of section headers").split()[0])
    assert not any(r.offset <= shoff < r.offset + r.filesz for r in rows)
    with pytest.raises(ResolveError):
        obj.offset_to_vaddr(shoff)


def test_bss_address_has_no_file_offset(targets):
    path = str(targets / "demo")
    rows = readelf_load_rows(path)
    (grand_total,) = [s for s in nm_symbols(path) if s.name == "grand_total"]
    assert grand_total.letter == "B"
    assert any(r.vaddr + r.filesz <= grand_total.address < r.vaddr + r.memsz for r in rows)
    with pytest.raises(ResolveError):
        ElfObject.open(path).vaddr_to_offset(grand_total.address)


def test_describe_address_names_function_and_offset(targets):
    path = str(targets / "demo")
    (start,) = [s.address for s in nm_functions(path) if s.name == "process_order"]
    obj = ElfObject.open(path)
    assert obj.describe_address(start) == "process_order"
    assert obj.describe_address(start + 4) == "process_order+0x4"


# -- instruction boundaries -----------------------------------------------------------------------------------


@pytest.mark.parametrize("function", ["process_order", "main"])
def test_instruction_boundaries_match_objdump(targets, function):
    path = str(targets / "demo")
    (sym,) = ElfObject.open(path).symbols.lookup(function)
    (expected,) = [s for s in nm_functions(path) if s.name == function]
    assert (sym.value, sym.size) == (expected.address, expected.size)
    end = sym.value + sym.size
    starts = [a for a in objdump_instruction_starts(path, function) if sym.value <= a < end]
    assert starts and starts[0] == sym.value
    code = ElfObject.open(path).read(sym.value, sym.size)
    ends = starts[1:] + [end]
    for start, next_start in zip(starts, ends):
        for target in range(start, next_start):
            instr = instruction_containing(code, sym.value, target)
            assert instr is not None, hex(target)
            assert instr.address == start, f"{target:#x} is in the instruction at {start:#x}, not {instr.address:#x}"
            assert instr.end == next_start
    assert instruction_containing(code, sym.value, end) is None


# -- finding objects by name ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["libc", "libc.so.6"])
def test_find_object_resolves_libc_through_the_linker_cache(name):
    assert find_object(name) == os.path.realpath(ldconfig_x86_64("libc.so.6"))


def test_find_object_resolves_a_program_through_path():
    expected = first_elf_in_path("python3.11")
    if expected is None:
        pytest.skip("no python3.11 ELF program in PATH")
    assert find_object("python3.11") == os.path.realpath(expected)


def test_find_object_passes_over_a_wrapper_script_in_path(tmp_path, monkeypatch):
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "python3.11").write_text("#!/bin/sh\nexec /usr/bin/python3.11 \"$@\"\n")
    (shims / "python3.11").chmod(0o755)
    real = shutil.which("python3.11", path="/usr/bin")
    if real is None:
        pytest.skip("no /usr/bin/python3.11")
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}/usr/bin")
    assert shutil.which("python3.11") == str(shims / "python3.11")  # what a naive lookup would pick
    assert find_object("python3.11") == os.path.realpath(real)


def test_find_object_follows_a_symlink(targets, tmp_path):
    link = tmp_path / "my-demo"
    link.symlink_to(targets / "demo")
    assert find_object(str(link)) == os.path.realpath(targets / "demo")
    assert ElfObject.open(str(link)).path == os.path.realpath(targets / "demo")


@pytest.mark.parametrize("name", ["uprobes-no-such-program-xyzzy", "libxyzzy-no-such-library.so.9",
                                  "./no/such/dir/demo"])
def test_find_object_unknown_name_is_one_line_error(name):
    assert shutil.which(name) is None
    with pytest.raises(ElfError) as exc:
        find_object(name)
    assert name in one_line(exc.value)


# -- unusable files -------------------------------------------------------------------------------------------


def _patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


def _shoff(data: bytes) -> int:
    return struct.unpack_from("<Q", data, 0x28)[0]


# name -> (build the file's bytes from demo's, words the one-line message must contain)
BAD_FILES = {
    "text-file": (lambda d: b"#!/bin/sh\necho not an ELF file\n", "not an ELF file"),
    "empty-file": (lambda d: b"", "not an ELF file"),
    "32-bit": (lambda d: _patched(d, 4, b"\x01"), "32-bit"),  # EI_CLASS = ELFCLASS32
    "big-endian": (lambda d: _patched(d, 5, b"\x02"), "big-endian"),  # EI_DATA = ELFDATA2MSB
    "aarch64": (lambda d: _patched(d, 18, struct.pack("<H", 183)), "another machine"),  # e_machine = EM_AARCH64
    "first-16-bytes": (lambda d: d[:16], "truncated"),
    "first-63-bytes": (lambda d: d[:63], "truncated"),
    "first-4096-bytes": (lambda d: d[:4096], "truncated"),
    "first-half": (lambda d: d[:len(d) // 2], "truncated"),
    "up-to-section-headers": (lambda d: d[:_shoff(d) + 10], "truncated"),
    "e_shoff-past-eof": (lambda d: _patched(d, 0x28, struct.pack("<Q", len(d) + 0x100000)), "malformed"),
    "e_shoff-huge": (lambda d: _patched(d, 0x28, struct.pack("<Q", 1 << 63)), "malformed"),
    "e_shnum-absurd": (lambda d: _patched(d, 0x3C, struct.pack("<H", 0xFFFF)), "malformed"),
    "e_shnum-past-eof": (lambda d: _patched(d, 0x3C, struct.pack("<H", 1000)), "malformed"),
    "e_shstrndx-absurd": (lambda d: _patched(d, 0x3E, struct.pack("<H", 0xFFF0)), "malformed"),
    "e_phoff-past-eof": (lambda d: _patched(d, 0x20, struct.pack("<Q", len(d) + 0x100000)), "malformed"),
    "e_shentsize-zero": (lambda d: _patched(d, 0x3A, struct.pack("<H", 0)), "malformed"),
}


@pytest.fixture
def bad_file(request, targets, tmp_path) -> tuple[str, str]:
    """(path, expected words) of one unusable file, made from demo."""
    kind = request.param
    if kind == "missing":
        return str(tmp_path / "no-such-file"), "no such file"
    if kind == "directory":
        return str(tmp_path), "not a regular file"
    build, words = BAD_FILES[kind]
    path = tmp_path / kind
    path.write_bytes(build((targets / "demo").read_bytes()))
    return str(path), words


BAD_KINDS = ["missing", "directory", *BAD_FILES]


def test_corrupted_headers_are_what_readelf_also_rejects(targets, tmp_path):
    # Sanity check of the fixtures: readelf, too, complains about the header fields patched above.
    for kind in ["e_shoff-past-eof", "e_shnum-past-eof", "first-4096-bytes"]:
        path = tmp_path / kind
        path.write_bytes(BAD_FILES[kind][0]((targets / "demo").read_bytes()))
        proc = subprocess.run(["readelf", "-SW", str(path)], capture_output=True, text=True)
        assert "Error" in proc.stderr or "Warning" in proc.stderr or proc.returncode != 0, kind


@pytest.mark.parametrize("bad_file", BAD_KINDS, indirect=True)
def test_unusable_file_raises_one_line_elf_error(bad_file):
    path, words = bad_file
    with pytest.raises(ElfError) as exc:
        obj = ElfObject.open(path)
        obj.kind, obj.symbols, read_markers(obj)  # anything lazily parsed must fail the same way
    message = one_line(exc.value)
    assert words in message and os.path.basename(path) in message


@pytest.mark.parametrize("bad_file", BAD_KINDS, indirect=True)
def test_unusable_file_makes_cli_exit_2_with_one_line(bad_file):
    path, words = bad_file
    result = run_cli("list", path)  # run_cli fails the test on any traceback
    assert result.status == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("uprobes: error: ")
    assert words in result.stderr
    assert result.stdout == ""


def _patch_section(path: Path, section: str, *, header_field: int | None = None, body_at: int | None = None,
                   fmt: str, value) -> None:
    """Overwrite one field of a section's header (``header_field``: offset in the Elf64_Shdr) or of its contents
    (``body_at``: offset in the section), finding the section where ``readelf -SW`` says it is."""
    row = readelf_sections(str(path))[section]
    data = bytearray(path.read_bytes())
    if header_field is not None:
        shoff = int(readelf_header_field(str(path), "Start of section headers").split()[0])
        struct.pack_into(fmt, data, shoff + row.index * 64 + header_field, value)
    else:
        struct.pack_into(fmt, data, row.offset + body_at, value)
    path.write_bytes(bytes(data))


def _assert_one_line_failure(path: Path, words: str) -> None:
    with pytest.raises(ElfError) as exc:
        obj = ElfObject.open(str(path))
        obj.kind, obj.symbols, read_markers(obj)
    assert words in one_line(exc.value)
    result = run_cli("list", str(path))
    assert result.status == 2 and result.stderr.count("\n") == 1 and words in result.stderr


def test_build_id_note_without_name_terminator_is_one_line_error(targets, tmp_path):
    path = tmp_path / "demo-bad-note"
    shutil.copyfile(targets / "demo", path)
    # Elf64_Nhdr is namesz, descsz, type (4 bytes each), then the name "GNU\0": replace its terminator.
    _patch_section(path, ".note.gnu.build-id", body_at=12 + 3, fmt="B", value=ord("X"))
    assert "GNUX" in tool_output("readelf", "-n", str(path))
    _assert_one_line_failure(path, "malformed")


def test_dynamic_section_with_wrong_type_still_gets_readelfs_kind(targets, tmp_path):
    for name in ["demo", "libprobed.so"]:
        path = tmp_path / name
        shutil.copyfile(targets / name, path)
        _patch_section(path, ".dynamic", header_field=4, fmt="<I", value=1)  # sh_type = SHT_PROGBITS
        assert readelf_section_types(str(path))[".dynamic"] == "PROGBITS"
        assert ElfObject.open(str(path)).kind == readelf_kind(str(path))


def test_damaged_version_definitions_are_one_line_error(tmp_path):
    path = tmp_path / "libc.so.6"
    shutil.copyfile(LIBC, path)
    # Elf64_Verdef: version, flags, ndx, cnt (2 bytes each), hash, aux, next (4 bytes each): aim vd_aux far away.
    _patch_section(path, ".gnu.version_d", body_at=12, fmt="<I", value=0x7FFFFFFF)
    _assert_one_line_failure(path, "malformed")


# -- big real objects: a timing report ------------------------------------------------------------------------


@pytest.mark.parametrize("path", [LIBPYTHON, LIBJVM])
def test_big_objects_symbols_and_markers_timing(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} is not installed")
    objfile._open_cached.cache_clear()  # time a cold open, not one an earlier test left in the cache
    started = time.perf_counter()
    obj = ElfObject.open(path)
    symbols = obj.symbols
    after_symbols = time.perf_counter()
    markers = read_markers(obj)
    finished = time.perf_counter()
    print(f"\n{path}: {len(symbols)} symbols ({len(symbols.functions)} functions) in "
          f"{after_symbols - started:.3f}s; {len(markers)} SDT markers in {finished - after_symbols:.3f}s")
    assert len(symbols.functions) > 0
    assert markers

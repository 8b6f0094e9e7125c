"""Independent answers from binutils, to check ours against: never numbers from an earlier run of uprobes."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@functools.cache
def assemble(source: str) -> bytes:
    """The .text bytes GNU as produces for ``source``."""
    with tempfile.TemporaryDirectory() as tmp:
        obj, binary = os.path.join(tmp, "x.o"), os.path.join(tmp, "x.bin")
        subprocess.run(["as", "--64", "-o", obj], input=source + "\n", text=True, check=True, capture_output=True)
        subprocess.run(["objcopy", "-O", "binary", "--only-section=.text", obj, binary], check=True)
        return Path(binary).read_bytes()


def tool_output(*command: str) -> str:
    """stdout of an oracle tool (readelf, nm, objdump); raw bytes it prints (a debuglink's CRC) are replaced."""
    return subprocess.run(command, check=True, capture_output=True).stdout.decode("utf-8", "replace")


@dataclass(frozen=True)
class ReadelfNote:
    provider: str
    name: str
    location: int
    base: int
    semaphore: int
    arguments: str


def readelf_sdt_notes(path: str) -> list[ReadelfNote]:
    """Every stapsdt note as ``readelf -n`` prints it."""
    notes = []
    pattern = re.compile(r"Provider: (\S+)\n\s+Name: (\S+)\n\s+Location: (0x[0-9a-f]+), Base: (0x[0-9a-f]+), "
                         r"Semaphore: (0x[0-9a-f]+)\n\s+Arguments: ?(.*)")
    for m in pattern.finditer(tool_output("readelf", "-n", "--wide", path)):
        notes.append(ReadelfNote(m[1], m[2], int(m[3], 16), int(m[4], 16), int(m[5], 16), m[6].strip()))
    return notes


def readelf_marker_arguments(path: str, provider: str, name: str) -> list[list[str]]:
    """The arguments of each site of marker ``provider:name``, in address order, as ``readelf -n`` prints them
    (one ``SIZE@OPERAND`` word each)."""
    sites = sorted((n for n in readelf_sdt_notes(path) if (n.provider, n.name) == (provider, name)),
                   key=lambda n: n.location)
    assert sites, f"readelf shows no marker {provider}:{name} in {path}"
    return [n.arguments.split() for n in sites]


@dataclass(frozen=True)
class SdtOperand:
    """One marker argument as sys/sdt.h writes it: ``[-]N[f]@OPERAND`` (signed when negative, a float with f)."""
    size: int
    signed: bool
    is_float: bool
    operand: str

    @classmethod
    def parse(cls, word: str) -> SdtOperand:
        size, operand = word.split("@", 1)
        return cls(abs(int(size.rstrip("f"))), size.startswith("-"), size.endswith("f"), operand)

    @property
    def tracefs_type(self) -> str:
        """The fetch type tracefs reads it as: s/u BITS, and a float's bits as x BITS (tracefs has no floats)."""
        return f"{'x' if self.is_float else 's' if self.signed else 'u'}{self.size * 8}"


# x86-64's general registers by the name of their pt_regs slot (what tracefs calls them, %ax for all of rax),
# each with every name of its parts (Intel's manual, vol. 1, 3.4.1.1). The high bytes (ah...) are bits 8-15.
_REGISTER_PARTS = {"ax": "rax eax ax al ah", "bx": "rbx ebx bx bl bh", "cx": "rcx ecx cx cl ch",
                   "dx": "rdx edx dx dl dh", "si": "rsi esi si sil", "di": "rdi edi di dil",
                   "bp": "rbp ebp bp bpl", "sp": "rsp esp sp spl",
                   **{f"r{n}": f"r{n} r{n}d r{n}w r{n}b" for n in range(8, 16)}}


def pt_regs_slot(register: str) -> tuple[str, int]:
    """The pt_regs slot that holds x86-64 register ``register`` (``%r8d``, ``%ah``) and the bit its value
    starts at."""
    name = register.removeprefix("%")
    (slot,) = [slot for slot, parts in _REGISTER_PARTS.items() if name in parts.split()]
    return slot, 8 if name in ("ah", "bh", "ch", "dh") else 0


def tracefs_register_fetcharg(word: str) -> str:
    """How tracefs fetches marker argument ``word``, a register (``-4@%r8d``): its pt_regs slot with the
    argument's type, a high byte as the bitfield of bits 8-15 of its slot."""
    argument = SdtOperand.parse(word)
    slot, bit = pt_regs_slot(argument.operand)
    return f"%{slot}:b{argument.size * 8}@{bit}/64" if bit else f"%{slot}:{argument.tracefs_type}"


@dataclass(frozen=True)
class ReadelfSegment:
    offset: int
    vaddr: int
    filesz: int
    memsz: int
    flags: str


def readelf_load_segments(path: str) -> list[ReadelfSegment]:
    """PT_LOAD rows of ``readelf -lW``."""
    rows = []
    for line in tool_output("readelf", "-lW", path).splitlines():
        fields = line.split()
        if fields and fields[0] == "LOAD":
            rows.append(ReadelfSegment(int(fields[1], 16), int(fields[2], 16), int(fields[4], 16),
                                       int(fields[5], 16), " ".join(fields[6:-1])))
    return rows


def file_offset(path: str, vaddr: int) -> int | None:
    """File offset of ``vaddr`` through the PT_LOAD segment ``readelf`` says holds it; None when that segment
    has no bytes of the file there (``.bss``, or every segment of a separate debug file)."""
    for seg in readelf_load_segments(path):
        if seg.vaddr <= vaddr < seg.vaddr + seg.memsz:
            return vaddr - seg.vaddr + seg.offset if vaddr < seg.vaddr + seg.filesz else None
    raise AssertionError(f"{vaddr:#x} is in no PT_LOAD segment of {path}")


def function_symbols(path: str, dynamic: bool = False) -> dict[str, tuple[int, int]]:
    """Defined FUNC/IFUNC symbols, name -> (address, size), from ``readelf -sW`` (``--dyn-syms`` for .dynsym).

    Versioned dynamic names keep readelf's spelling (``malloc@@GLIBC_2.2.5``) and are also listed bare.
    """
    out = tool_output("readelf", "-sW", *(["--dyn-syms"] if dynamic else []), path)
    functions = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 8 or not fields[0].endswith(":") or fields[3] not in ("FUNC", "IFUNC") or fields[6] == "UND":
            continue
        size = int(fields[2], 16) if fields[2].startswith("0x") else int(fields[2])
        entry = (int(fields[1], 16), size)
        functions[fields[7]] = entry
        functions.setdefault(fields[7].split("@")[0], entry)
    return functions


def objdump_instruction_starts(path: str, symbol: str) -> list[int]:
    """Addresses of the instructions ``objdump -d`` lists for one function."""
    out = tool_output("objdump", "-d", "--no-show-raw-insn", f"--disassemble={symbol}", path)
    return [int(m[1], 16) for m in re.finditer(r"^\s+([0-9a-f]+):\t", out, re.M)]


def text_differs_from_files(pid: int) -> list[str]:
    """Executable file mappings of process ``pid`` whose bytes in memory differ from the file's (after a
    tracer has left, there should be none)."""
    differing = []
    with open(f"/proc/{pid}/mem", "rb") as mem:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            if len(fields) < 6 or "x" not in fields[1] or not fields[5].startswith("/") \
                    or fields[5].startswith("/memfd:"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            with open(fields[5], "rb") as f:
                f.seek(int(fields[2], 16))
                expected = f.read(end - start)
            mem.seek(start)
            if mem.read(len(expected)) != expected:
                differing.append(line)
    return differing


def shared_mappings_left(pid: int) -> list[str]:
    """Mappings of the memory a tracer shares with process ``pid`` (jump areas, rings, shadow stacks): none
    may stay after it detached."""
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/memfd:uprobes-" in line]


def anonymous_executable_mappings(pid: int) -> list[str]:
    """Executable mappings of no file, or of a memfd, in process ``pid``: an out-of-line area or a jump area a
    tracer left behind."""
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if line.split()[1][2] == "x" and (len(line.split()) < 6 or line.split()[5].startswith("/memfd:"))]


def build_id_debug_file(path: str) -> str | None:
    """The separate debug file of ``path`` under /usr/lib/debug/.build-id (from ``readelf -n``), if installed."""
    match = re.search(r"Build ID: ([0-9a-f]+)", tool_output("readelf", "-n", path))
    if not match:
        return None
    debug = f"/usr/lib/debug/.build-id/{match[1][:2]}/{match[1][2:]}.debug"
    return debug if os.path.exists(debug) else None


@functools.cache
def function_addresses(path: str) -> dict[str, int]:
    """Every function name ``readelf`` finds for ``path`` (.symtab, .dynsym, a separate debug file's .symtab),
    and ``c++filt``'s demangling of each C++ name -> its address."""
    tables = [function_symbols(path), function_symbols(path, dynamic=True)]
    debug = build_id_debug_file(path)
    if debug:
        tables.append(function_symbols(debug))
    addresses = {name: address for table in tables for name, (address, _) in table.items()}
    mangled = [name for name in addresses if name.startswith("_Z")]
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True,
                               check=True).stdout.splitlines()
    return addresses | {plain: addresses[name] for name, plain in zip(mangled, demangled)}


def shared_libraries(path: str) -> dict[str, str]:
    """The libraries ``ldd`` says ``path`` loads: file name -> path."""
    libraries = {}
    for line in tool_output("ldd", path).splitlines():
        match = re.match(r"\s*(\S+) => (\S+)", line)
        if match:
            libraries[match[1]] = os.path.realpath(match[2])
    return libraries


@functools.cache
def statement_lines(path: str) -> dict[tuple[str, int], list[int]]:
    """(file name, line) -> the addresses of its statement rows, as ``objdump --dwarf=decodedline`` lists them."""
    lines: dict[tuple[str, int], list[int]] = {}
    for text in tool_output("objdump", "--dwarf=decodedline", path).splitlines():
        match = re.match(r"(\S+)\s+(\d+)\s+(0x[0-9a-f]+)(?:\s+\d+)?\s+x\s*$", text)
        if match:
            lines.setdefault((os.path.basename(match[1]), int(match[2])), []).append(int(match[3], 16))
    return lines


def takes_calls(stdout: str, n: int | None = None) -> list[tuple[int, str, int, int]]:
    """(size, name, flags, result) of every call the takes target printed it made (and checked it printed all:
    ``n`` of them, if given)."""
    calls = [(int(size), name, int(flags), int(result))
             for size, name, flags, result in re.findall(r"^take (\d+) (\w+) (\d+) (-?\d+)$", stdout, re.M)]
    assert stdout.endswith(f"takes {len(calls)}\n") and (n is None or len(calls) == n), stdout[-200:]
    return calls

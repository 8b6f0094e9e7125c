"""What the fuzzers feed: one function per parser that takes raw bytes and runs the parser on them.

Each target may raise :class:`~uprobes.errors.UprobesError` (our own one-line error: the input was refused,
which is the right answer for most inputs) and nothing else; any other exception, or a hang, is a bug.
``fuzz/run.py`` drives them with atheris (coverage-guided, millions of inputs), ``tests/test_fuzz.py`` with
hypothesis (a short run in ``make test``). ``SEEDS`` are valid inputs the mutations start from.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable
from pathlib import Path

from uprobes.elf.objfile import ElfObject
from uprobes.errors import UprobesError
from uprobes.probes.fetchargs import parse_fetchargs
from uprobes.probes.spec import group_probe_words, parse_probe
from uprobes.sdt.arguments import parse_arguments
from uprobes.sdt.notes import read_markers

__all__ = ["TARGETS", "SEEDS", "run_target", "sdt_host"]

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "tests" / "targets" / "build"
_SDT_HOST_SECTIONS = (".text", ".data", ".probes", ".note.stapsdt", ".stapsdt.base")


def fuzz_elf(data: bytes) -> None:
    """Everything `uprobes list` reads from an object: header, segments, sections, symbols (with
    MiniDebugInfo and versions), markers, and address <-> offset for each function."""
    obj = ElfObject.from_bytes("fuzz.elf", data)
    _ = obj.kind, obj.build_id
    for sym in obj.symbols.functions:
        try:
            obj.vaddr_to_offset(sym.value)
        except UprobesError:
            pass
        obj.describe_address(sym.value)
    read_markers(obj)


@functools.cache
def sdt_host() -> tuple[bytes, int, int]:
    """A real program with markers and semaphores (tests/targets/build/demo) cut down by ``objcopy`` to the
    sections markers need (code, data, notes: 2.5 times faster to parse per input), and where its
    ``.note.stapsdt`` section lies: (file bytes, offset, size)."""
    host = ROOT / "build" / "fuzz" / "sdt-host"
    if not host.exists():
        host.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["objcopy", "--strip-all", *(f"-j{name}" for name in _SDT_HOST_SECTIONS),
                        str(BUILD / "demo"), str(host)], check=True, capture_output=True)
    data = host.read_bytes()
    section = ElfObject.from_bytes("sdt-host", data).section(".note.stapsdt")
    return data, section.offset, section.size


def fuzz_sdt_notes(data: bytes) -> None:
    """The demo program with its ``.note.stapsdt`` section's bytes replaced by ``data``."""
    host, offset, size = sdt_host()
    notes = data[:size].ljust(size, b"\0")
    read_markers(ElfObject.from_bytes("fuzz-notes.elf", host[:offset] + notes + host[offset + size:]))


def fuzz_usdt_arguments(data: bytes) -> None:
    """A marker's argument string, as `.note.stapsdt` carries it."""
    parse_arguments(data.decode("utf-8", "replace"))


def fuzz_probe(data: bytes) -> None:
    """What a user types: probe words grouped as the command line groups them, then each parsed."""
    for text in group_probe_words(data.decode("utf-8", "replace").split(" ")):
        parse_probe(text)


def fuzz_fetchargs(data: bytes) -> None:
    """Fetch arguments, as for an entry probe, a return probe and a 3-argument marker."""
    tokens = data.decode("utf-8", "replace").split(" ")
    for is_return, usdt_args in ((False, None), (True, None), (False, 3)):
        parse_fetchargs(tokens, is_return=is_return, usdt_args=usdt_args)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "elf": fuzz_elf,
    "sdt-notes": fuzz_sdt_notes,
    "usdt-arguments": fuzz_usdt_arguments,
    "probe": fuzz_probe,
    "fetchargs": fuzz_fetchargs,
}


def _files(*names: str) -> Callable[[], list[bytes]]:
    return lambda: [(BUILD / name).read_bytes() for name in names if (BUILD / name).exists()]


def _texts(*texts: str) -> Callable[[], list[bytes]]:
    return lambda: [text.encode() for text in texts]


SEEDS: dict[str, Callable[[], list[bytes]]] = {
    "elf": _files("mini.elf", "demo-minidebug", "demo.debug", "libprobed.so", "demo-nopie"),
    "sdt-notes": lambda: [sdt_host()[0][sdt_host()[1]:sdt_host()[1] + sdt_host()[2]]],
    "usdt-arguments": _texts("-4@%eax 8@-16(%rbp) 8@%rdi", "4f@%xmm0 -1@%ah 8@bench_global(%rip)",
                             "8@(%rax,%rbx,8) -2@-12+3+1(%rbp) 8@$-1 8@sym+16(%rip) %r8d 16@%rax 8f@8(%rsp)"),
    "probe": _texts("uprobe:/bin/ls:main+4 x=%di", "uretprobe:libc:malloc ret=$retval:x64",
                    "usdt:/usr/bin/python3.11:python:audit arg0:string", "p:grp/ev /bin/ls:0x1234(0x2000) a=%ax",
                    "r:/bin/ls:0x10", "uprobe:libc:'malloc@@GLIBC_2.2.5'"),
    "fetchargs": _texts("x=%di:u32 s=+0(%si):string $retval y=+8(+0(%sp)):s16 c=$comm",
                        "arr=+0(%di):u8[4] b=%ax:b3@4/16 f=@+0x1000:x64 arg1 $arg2 s=+0(arg3):ustring",
                        "$stack3 $stack +4($stack):x32 v=\\123 t=\\\"txt\\\" +0(@0x601040):symstr"),
}


def run_target(name: str, data: bytes) -> None:
    """Feed ``data`` to target ``name``; our own refusal (UprobesError) is a pass, anything else escapes."""
    try:
        TARGETS[name](data)
    except UprobesError as exc:
        message = str(exc)
        if not message or "\n" in message:
            raise AssertionError(f"our error must be one non-empty line, got {message!r}") from exc

"""Tests for uprobes.probes.fetchargs: grammar, kernel limits, round trip, and the running kernel as oracle."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from uprobes.errors import ProbeSyntaxError
from uprobes.probes.fetchargs import (
    MAX_ARG_NAME_LEN,
    MAX_ARGSTR_LEN,
    MAX_ARRAY_LEN,
    MAX_TRACE_ARGS,
    Address,
    Comm,
    Deref,
    FetchArg,
    FetchType,
    FileOffset,
    Immediate,
    ImmediateString,
    Register,
    RetVal,
    StackPointer,
    StackSlot,
    UsdtArg,
    parse_fetcharg,
    parse_fetchargs,
)


def parse(token: str, *, is_return: bool = False, usdt_args: int | None = None, position: int = 1) -> FetchArg:
    return parse_fetcharg(token, position, is_return=is_return, usdt_args=usdt_args)


def nest(depth: int, base: str) -> str:
    """``+0(+0(...base...))`` with ``depth`` dereferences."""
    return "+0(" * depth + base + ")" * depth


# --- valid forms -------------------------------------------------------------------------------------------

VALID = [
    # token, kwargs, name, source, type
    ("fd=%di:s32", {}, "fd", Register("di"), FetchType("s32")),
    ("%di", {}, "arg1", Register("di"), None),
    ("%r15", {}, "arg1", Register("r15"), None),
    ("%orig_ax", {}, "arg1", Register("orig_ax"), None),
    ("%flags:x32", {}, "arg1", Register("flags"), FetchType("x32")),
    ("%rax", {}, "arg1", Register("ax"), None),
    ("%rip:x64", {}, "arg1", Register("ip"), FetchType("x64")),
    ("%eflags", {}, "arg1", Register("flags"), None),
    ("@0x7f0000001000", {}, "arg1", Address(0x7F0000001000), None),
    ("@4096:u32", {}, "arg1", Address(4096), FetchType("u32")),
    ("@0777", {}, "arg1", Address(0o777), None),
    ("@+0x2010:s64", {}, "arg1", FileOffset(0x2010), FetchType("s64")),
    ("@+-16", {}, "arg1", FileOffset(-16), None),
    ("$stack", {}, "arg1", StackPointer(), None),
    ("$stack3", {}, "arg1", StackSlot(3), None),
    ("$stack0:u8", {}, "arg1", StackSlot(0), FetchType("u8")),
    ("ret=$retval:s64", {"is_return": True}, "ret", RetVal(), FetchType("s64")),
    ("$comm", {}, "arg1", Comm(), None),
    ("c=$COMM:string", {}, "c", Comm(), FetchType("string")),
    ("\\42", {}, "arg1", Immediate(42), None),
    ("\\0x7f:u8", {}, "arg1", Immediate(0x7F), FetchType("u8")),
    ("\\-1:s32", {}, "arg1", Immediate(-1), FetchType("s32")),
    ("\\+5", {}, "arg1", Immediate(5), None),
    ("\\18446744073709551615", {}, "arg1", Immediate(2**64 - 1), None),
    ('s=\\"hello"', {}, "s", ImmediateString("hello"), None),
    ('\\"":string', {}, "arg1", ImmediateString(""), FetchType("string")),
    ('s=\\"a=b"', {}, "s", ImmediateString("a=b"), None),
    ("\\0x1000:string", {}, "arg1", Immediate(0x1000), FetchType("string")),
    ("buf=+0(%si):string", {}, "buf", Deref(0, Register("si")), FetchType("string")),
    ("+0(%si):ustring", {}, "arg1", Deref(0, Register("si")), FetchType("ustring")),
    ("+8(+0(%di))", {}, "arg1", Deref(8, Deref(0, Register("di"))), None),
    ("-8(%bp):s32", {}, "arg1", Deref(-8, Register("bp")), FetchType("s32")),
    ("+u8(%di)", {}, "arg1", Deref(8, Register("di"), user=True), None),
    ("-u0x10(%rsp)", {}, "arg1", Deref(-16, Register("sp"), user=True), None),
    ("+0x10(@0x1000)", {}, "arg1", Deref(16, Address(0x1000)), None),
    ("+0($stack)", {}, "arg1", Deref(0, StackPointer()), None),
    ("+0(\\4096)", {}, "arg1", Deref(0, Immediate(4096)), None),
    ("+0($retval):string", {"is_return": True}, "arg1", Deref(0, RetVal()), FetchType("string")),
    ("v=%di:char", {}, "v", Register("di"), FetchType("char")),
    ("f=%di:b4@4/8", {}, "f", Register("di"), FetchType("u8", (4, 4, 8))),
    ("f=+0(%di):b1@0x1f/0x20", {}, "f", Deref(0, Register("di")), FetchType("u32", (1, 31, 32))),
    ("f=%di:b64@0/64", {}, "f", Register("di"), FetchType("u64", (64, 0, 64))),
    ("a=+0(%di):u16[8]", {}, "a", Deref(0, Register("di")), FetchType("u16", array=8)),
    ("a=@+0x10:x8[64]", {}, "a", FileOffset(0x10), FetchType("x8", array=64)),
    ("a=+0(%di):string[2]", {}, "a", Deref(0, Register("di")), FetchType("string", array=2)),
    ("a=+0(%di):b2@2/8[3]", {}, "a", Deref(0, Register("di")), FetchType("u8", (2, 2, 8), 3)),
    ("a=\\0x1000:string[2]", {}, "a", Immediate(0x1000), FetchType("string", array=2)),
    ("arg0", {"usdt_args": 1}, "arg0", UsdtArg(0), None),
    ("arg1:string", {"usdt_args": 2}, "arg1", UsdtArg(1), FetchType("string")),
    ("+8(arg0)", {"usdt_args": 1}, "arg1", Deref(8, UsdtArg(0)), None),
    ("name=arg2:u16", {"usdt_args": 3}, "name", UsdtArg(2), FetchType("u16")),
    ("arg0:u8[4]", {"usdt_args": 1}, "arg0", UsdtArg(0), FetchType("u8", array=4)),
]


@pytest.mark.parametrize(("token", "kwargs", "name", "source", "ftype"), VALID, ids=[v[0] for v in VALID])
def test_valid_forms(token: str, kwargs: dict, name: str, source: object, ftype: FetchType | None) -> None:
    arg = parse(token, **kwargs)
    assert (arg.name, arg.source, arg.type) == (name, source, ftype)
    assert arg.explicit_name == ("=" in token.split("\\")[0])


@pytest.mark.parametrize(
    ("token", "text"),
    [
        ("fd=%di:s32", "fd=%di:s32"),
        ("%rax", "arg1=%ax"),
        ("%rsp", "arg1=%sp"),
        ("@4096", "arg1=@0x1000"),
        ("@+-16", "arg1=@+-0x10"),
        ("$COMM", "arg1=$comm"),
        ("+u-8(%di)", "arg1=-u8(%di)"),
        ("++8(%di)", "arg1=+8(%di)"),
        ("x=%di:b0x4@4/010", "x=%di:b4@4/8"),
        ("a=+0(%di):u8[0x10]", "a=+0(%di):u8[16]"),
        ('s=\\"a=b"', 's=\\"a=b"'),
    ],
)
def test_format(token: str, text: str) -> None:
    assert parse(token).format() == text


def test_default_name_follows_position() -> None:
    assert parse("%di", position=7).name == "arg7"
    args = parse_fetchargs(["%di", "x=%si", "%dx"], is_return=False)
    assert [a.name for a in args] == ["arg1", "x", "arg3"]
    assert [a.explicit_name for a in args] == [False, True, False]


def test_usdt_arg_cannot_be_printed() -> None:
    with pytest.raises(ValueError, match="arg1"):
        parse("+8(arg1)", usdt_args=2).format()


# --- invalid forms -----------------------------------------------------------------------------------------

INVALID = [
    # token, kwargs, part of the reason
    ("x=%foo", {}, "unknown register '%foo'"),
    ("%eax", {}, "unknown register"),
    ("%RAX", {}, "unknown register"),
    ("%fs_base", {}, "unknown register"),
    ("@sym", {}, "symbols are not available with uprobes"),
    ("@main+4", {}, "symbols are not available with uprobes"),
    ("@1x", {}, "bad address"),
    ("@+z", {}, "bad file offset"),
    ("@+", {}, "bad file offset"),
    ("$retval", {}, "$retval is only available on return probes"),
    ("+0($retval)", {}, "$retval is only available on return probes"),
    ("$arg1", {}, "kernel probes only"),
    ("$foo", {}, "unknown variable"),
    ("$stack-1", {}, "unknown variable"),
    ("$stack1x", {}, "unknown variable"),
    ("$stack4294967296", {}, "too big"),
    ("$comm[2]", {}, "unknown variable"),
    ("\\0x", {}, "bad immediate value"),
    ("\\abc", {}, "bad immediate value"),
    ("\\18446744073709551616", {}, "bad immediate value"),
    ("\\-9223372036854775809", {}, "bad immediate value"),
    ('\\"abc', {}, "not closed"),
    ('\\"', {}, "not closed"),
    ('\\"a:b"', {}, "not closed"),  # ':' starts the type, as in the kernel
    ('\\"a\x01"', {}, "unprintable"),
    ('\\"a b"', {}, "found ' '"),
    ('\\"a#b"', {}, "found '#'"),
    ("+0(%di", {}, "not closed with ')'"),
    ("+0%di", {}, "needs '('"),
    ("+z(%di)", {}, "bad dereference offset"),
    ("+(%di)", {}, "bad dereference offset"),
    ("-+8(%di)", {}, "bad dereference offset"),
    ("+0()", {}, "nothing to dereference"),
    ("+0(%di)junk", {}, "unexpected 'junk'"),
    ("+0x100000000(%di)", {}, "does not fit in 32 bits"),
    ("+0($comm)", {}, "can not be dereferenced"),
    ('+0(\\"a")', {}, "can not be dereferenced"),
    ("foo", {}, "unknown fetch argument 'foo'"),
    ("1234", {}, "unknown fetch argument"),
    ("arg0", {}, "not a USDT probe"),
    ("arg2", {"usdt_args": 2}, "out of range: the USDT marker has arguments arg0..arg1"),
    ("arg0", {"usdt_args": 0}, "out of range: the USDT marker has no arguments"),
    ("arg01", {"usdt_args": 3}, "unknown fetch argument"),
    ("+8(arg5)", {"usdt_args": 1}, "out of range"),
    ("%di:string", {}, "needs a memory argument"),
    ("%di:ustring", {}, "needs a memory argument"),
    ("$stack:string", {}, "needs a memory argument"),
    ("$stack3:string", {}, "needs a memory argument"),
    ("$retval:string", {"is_return": True}, "needs a memory argument"),
    ("%di:u64[2]", {}, "array needs a memory argument"),
    ("+u0(%di):u8[2]", {}, "drop the 'u'"),
    ("\\1:u8[2]", {}, "array needs a memory argument"),
    ("$comm:ustring", {}, "only takes the type 'string'"),
    ("$comm:u8", {}, "only takes the type 'string'"),
    ("$comm:string[2]", {}, "only takes the type 'string'"),
    ('\\"a":u8', {}, "only takes the type 'string'"),
    ("%di:symbol", {}, "kernel probes only"),
    ("+0(%di):symstr", {}, "kernel probes only"),
    ("%di:%pd", {}, "kernel probes only"),
    ("%di:int", {}, "unknown type 'int'"),
    ("%di:", {}, "unknown type ''"),
    ("%di:u32:u8", {}, "unknown type 'u32:u8'"),
    ("%di:B1@0/8", {}, "unknown type"),
    ("%di:b1@/8", {}, "unknown type"),
    ("%di:b1@0/8x", {}, "unknown type"),
    ("%di:b1@0/12", {}, "container of 8, 16, 32 or 64"),
    ("%di:b0@0/8", {}, "does not fit"),
    ("%di:b8@1/8", {}, "does not fit"),
    ("%di:b33@0/32", {}, "does not fit"),
    ("+0(%di):u8[2", {}, "not closed with ']'"),
    ("+0(%di):u8[2]x", {}, "unexpected 'x'"),
    ("+0(%di):u8[x]", {}, "bad array size"),
    ("+0(%di):u8[0]", {}, "bad array size"),
    ("+0(%di):u8[65]", {}, "too big"),
    ("=%di", {}, "name before '=' is empty"),
    ("x=", {}, "no fetch argument after '='"),
    ("x=:u8", {}, "no fetch argument before ':'"),
    ("1x=%di", {}, "not a C identifier"),
    ("a-b=%di", {}, "not a C identifier"),
    ("common_pid=%di", {}, "reserved"),
    ("__probe_ip=%di", {}, "reserved"),
    ("__pad=%di", {}, "reserved"),  # the kernel engine's own, with every hit
    ("__comm=%di", {}, "reserved"),
    ("x=%di y", {}, "blanks and '#' are not allowed"),
]


@pytest.mark.parametrize(("token", "kwargs", "reason"), INVALID, ids=[v[0] for v in INVALID])
def test_invalid_forms(token: str, kwargs: dict, reason: str) -> None:
    with pytest.raises(ProbeSyntaxError) as info:
        parse(token, **kwargs)
    message = str(info.value)
    shown = token.replace("\x01", "\\x01")  # control characters are shown escaped: the message stays one line
    assert message.startswith(f"bad fetch argument '{shown}': ")
    assert reason in message
    assert message.isprintable()


# --- limits ------------------------------------------------------------------------------------------------


def test_name_length_limit() -> None:
    assert parse("a" * MAX_ARG_NAME_LEN + "=%di").name == "a" * 32
    with pytest.raises(ProbeSyntaxError, match="longer than 32"):
        parse("a" * (MAX_ARG_NAME_LEN + 1) + "=%di")


def test_argument_count_limit() -> None:
    assert len(parse_fetchargs(["%di"] * MAX_TRACE_ARGS, is_return=False)) == 128
    with pytest.raises(ProbeSyntaxError, match="too many fetch arguments: 129"):
        parse_fetchargs(["%di"] * (MAX_TRACE_ARGS + 1), is_return=False)


def test_array_size_limit() -> None:
    assert parse(f"+0(%di):u8[{MAX_ARRAY_LEN}]").type == FetchType("u8", array=64)
    with pytest.raises(ProbeSyntaxError, match="at most 64"):
        parse(f"+0(%di):u8[{MAX_ARRAY_LEN + 1}]")


@pytest.mark.parametrize(
    ("base", "suffix", "max_depth"),
    [
        ("%di", "", 14),
        ("$stack", "", 14),
        ("@0", "", 13),  # @ADDR is a load plus a dereference
        ("@+0", ":x8", 13),
        ("%di", ":b1@0/8", 13),
        ("%di", ":u8[2]", 13),
        ("%di", ":b1@0/8[2]", 12),
        ("%di", ":string[2]", 12),  # a string array keeps the pointer: one more step
        ("@0", ":b1@0/8", 12),
        ("\\0", "", 14),
    ],
)
def test_deref_depth_limit(base: str, suffix: str, max_depth: int) -> None:
    assert parse(nest(max_depth, base) + suffix)
    with pytest.raises(ProbeSyntaxError, match="nested too deeply"):
        parse(nest(max_depth + 1, base) + suffix)


def test_argument_length_limit() -> None:
    fits = "\\" + '"' + "a" * (MAX_ARGSTR_LEN - 3) + '"'
    assert len(parse(fits).body()) == 63
    with pytest.raises(ProbeSyntaxError, match="longer than the kernel's 63"):
        parse("\\" + '"' + "a" * (MAX_ARGSTR_LEN - 2) + '"')
    # The limit applies to the text sent to the kernel, which may be longer than the user's.
    token = "+10(" * 3 + "+0(" * 10 + "@+1" + ")" * 13 + ":s16"
    assert len(token) <= MAX_ARGSTR_LEN
    with pytest.raises(ProbeSyntaxError, match="longer than the kernel's 63"):
        parse(token)


def test_event_size_limit() -> None:
    six = [f"a{i}=+0(%sp):u64[64]" for i in range(6)]
    assert sum(a.size for a in parse_fetchargs(six, is_return=False)) == 3072
    with pytest.raises(ProbeSyntaxError, match="3073 bytes"):
        parse_fetchargs([*six, "b=%di:u8"], is_return=False)


def test_duplicate_names() -> None:
    assert [a.name for a in parse_fetchargs(["arg1=%di", "%si"], is_return=False)] == ["arg1", "arg2"]
    with pytest.raises(ProbeSyntaxError, match="'x' is already used by 'x=%di'"):
        parse_fetchargs(["x=%di", "x=%si"], is_return=False)
    with pytest.raises(ProbeSyntaxError, match="'arg1' is already used by '%di'"):
        parse_fetchargs(["%di", "arg1=%si"], is_return=False)
    with pytest.raises(ProbeSyntaxError, match="bad fetch argument '%si'.*called arg1, arg2"):
        parse_fetchargs(["arg2=%di", "%si"], is_return=False)


def test_retval_only_on_return_probes() -> None:
    assert parse("$retval", is_return=True).source == RetVal()
    with pytest.raises(ProbeSyntaxError, match=r"'r=\$retval'"):
        parse_fetchargs(["r=$retval"], is_return=False)


def test_register_aliases_normalised() -> None:
    aliases = {"rax": "ax", "rbx": "bx", "rcx": "cx", "rdx": "dx", "rsi": "si", "rdi": "di",
               "rbp": "bp", "rsp": "sp", "rip": "ip", "eflags": "flags", "rflags": "flags"}
    for alias, name in aliases.items():
        assert parse(f"%{alias}").format() == f"arg1=%{name}"


# --- round trip --------------------------------------------------------------------------------------------

_REG_SPELLINGS = ["%di", "%si", "%dx", "%cx", "%r8", "%r9", "%ax", "%bp", "%sp", "%ip", "%flags", "%orig_ax",
                  "%cs", "%ss", "%r15", "%rax", "%rdi", "%rip", "%rsp", "%rbp", "%eflags"]
_SCALAR_TYPES = ["u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64", "x8", "x16", "x32", "x64", "char"]


def _number(rng: random.Random, value: int) -> str:
    """``value`` in one of the kernel's spellings."""
    return rng.choice([str(value), hex(value), "0" + oct(value)[2:] if value else "0"])


def _random_base(rng: random.Random, is_return: bool, usdt_args: int | None) -> str:
    choices = [
        lambda: rng.choice(_REG_SPELLINGS),
        lambda: "@" + _number(rng, rng.randrange(1 << rng.choice([8, 32, 47]))),
        lambda: "@+" + rng.choice(["", "-"]) + _number(rng, rng.randrange(1 << 20)),
        lambda: f"$stack{rng.randrange(64)}",
        lambda: "$stack",
        lambda: "\\" + rng.choice(["", "-", "+"]) + _number(rng, rng.randrange(1 << rng.choice([4, 31, 63]))),
    ]
    if is_return:
        choices.append(lambda: "$retval")
    if usdt_args:
        choices.append(lambda: f"arg{rng.randrange(usdt_args)}")
    return rng.choice(choices)()


def _random_token(rng: random.Random, is_return: bool, usdt_args: int | None) -> str:
    """A fetch argument in varied spellings; most are valid, a few break a nesting or length limit."""
    kind = rng.random()
    if kind < 0.05:
        body = rng.choice(["$comm", "$COMM", "$comm:string"])
    elif kind < 0.1:
        body = '\\"' + "".join(rng.choice("abc=xyz_.-/") for _ in range(rng.randrange(12))) + '"'
    else:
        body = _random_base(rng, is_return, usdt_args)
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3, rng.randrange(15)])):
            sign = rng.choice(["+", "-"])
            body = f"{sign}{rng.choice(['', 'u'])}{_number(rng, rng.randrange(256))}({body})"
        memory = body[0] in "+-@" or body.startswith("arg")
        roll = rng.random()
        if roll < 0.25:
            container = rng.choice([8, 16, 32, 64])
            width = rng.randint(1, container)
            body += f":b{width}@{rng.randint(0, container - width)}/{container}"
        elif roll < 0.6:
            body += ":" + rng.choice(_SCALAR_TYPES)
        elif roll < 0.75 and (memory or body.startswith("\\")):
            body += ":" + rng.choice(["string", "ustring"])
        if (memory and rng.random() < 0.3 and not body.endswith(("string", "ustring"))) or rng.random() < 0.02:
            body += f"{'' if ':' in body else ':u32'}[{rng.randint(1, MAX_ARRAY_LEN)}]"
    if rng.random() < 0.5:
        body = f"{rng.choice(['v', 'buf', '_x', 'fd2'])}{rng.randrange(100)}={body}"
    return body


def _random_valid_args(seed: int, count: int, *, is_return: bool, usdt_args: int | None) -> list[FetchArg]:
    rng = random.Random(seed)
    args = []
    while len(args) < count:
        try:
            args.append(parse(_random_token(rng, is_return, usdt_args), is_return=is_return, usdt_args=usdt_args))
        except ProbeSyntaxError:
            continue
    return args


@pytest.mark.parametrize("is_return", [False, True])
def test_round_trip_property(is_return: bool) -> None:
    rng = random.Random(20240611 + is_return)
    valid = 0
    for _ in range(3000):
        token = _random_token(rng, is_return, None)
        position = rng.randint(1, 128)
        try:
            arg = parse_fetcharg(token, position, is_return=is_return)
        except ProbeSyntaxError:
            continue
        valid += 1
        again = parse_fetcharg(arg.format(), position, is_return=is_return)
        assert again == arg, token
        assert again.format() == arg.format()
    assert valid > 2000


@pytest.mark.parametrize(("token", "kwargs"), [(v[0], v[1]) for v in VALID if not v[1].get("usdt_args")])
def test_round_trip_of_valid_table(token: str, kwargs: dict) -> None:
    arg = parse(token, **kwargs)
    assert parse(arg.format(), **kwargs) == arg


def test_usdt_args_round_trip_after_translation() -> None:
    arg = parse("p=+8(arg1):string", usdt_args=2)
    assert isinstance(arg.source, Deref) and arg.source.inner == UsdtArg(1)
    translated = FetchArg(arg.name, arg.explicit_name, Deref(8, Deref(-24, Register("bp"))), arg.type)
    assert parse(translated.format()) == translated


# --- the running kernel as oracle --------------------------------------------------------------------------

TRACING = Path("/sys/kernel/tracing")
UPROBE_EVENTS = TRACING / "uprobe_events"
TARGET = "/bin/true"


def _write_event(line: str) -> None:
    # Python's open(..., "a") seeks, which tracefs refuses for writers: use a bare O_APPEND write.
    fd = os.open(UPROBE_EVENTS, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _entry_file_offset(path: str) -> int:
    """File offset of the ELF entry point, where the kernel accepts a probe."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        entry = elf.header.e_entry
        for segment in elf.iter_segments("PT_LOAD"):
            if segment["p_vaddr"] <= entry < segment["p_vaddr"] + segment["p_filesz"]:
                return entry - segment["p_vaddr"] + segment["p_offset"]
    raise AssertionError(f"{path}: entry point {entry:#x} is in no PT_LOAD segment")


class KernelOracle:
    """Defines uprobe events in a private group and removes them all at the end."""

    def __init__(self) -> None:
        self.group = f"uprobes_test_fa{os.getpid()}"
        self.offset = _entry_file_offset(TARGET)
        self.created: list[str] = []

    def accepts(self, args: list[str], *, is_return: bool = False) -> bool:
        event = f"{self.group}/ev{len(self.created)}"
        kind = "r" if is_return else "p"
        try:
            _write_event(f"{kind}:{event} {TARGET}:{self.offset:#x} {' '.join(args)}")
        except OSError:
            return False
        self.created.append(event)
        return True

    def cleanup(self) -> None:
        for event in self.created:
            try:
                _write_event(f"-:{event}")
            except OSError:
                pass


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelOracle]:
    if os.geteuid() != 0:
        pytest.skip("needs root to define uprobe events")
    if not UPROBE_EVENTS.exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACING)], capture_output=True, check=False)
    if not UPROBE_EVENTS.exists():
        pytest.skip("tracefs uprobe_events is not available")
    oracle = KernelOracle()
    try:
        if not oracle.accepts([]):
            pytest.skip("the kernel refuses to define uprobe events here")
        yield oracle
    finally:
        oracle.cleanup()


ORACLE_VALID = [
    "fd=%di:s32",
    "%rsi",
    "p=+8(+0(%di)):u64",
    "q=-u16(+0(%rsp)):s16",
    "g=@+0x2010:x32",
    "a=@0x601040:u8",
    "s3=$stack3",
    "sp=$stack",
    "c=$comm",
    "i=\\-42",
    's=\\"hello"',
    "b=%di:b3@5/16",
    "arr=+0(%si):u16[8]",
    "str=+0(%si):string",
    "ustr=+0(%si):ustring",
    "strs=+0(%di):string[2]",
    "ch=%dx:char",
    "deep=" + nest(14, "%di"),
]


def test_kernel_accepts_what_we_print(kernel: KernelOracle) -> None:
    for token in ORACLE_VALID:
        text = parse(token).format()
        assert kernel.accepts([text]), text
    assert kernel.accepts([parse("r=$retval:s64", is_return=True).format()], is_return=True)
    # The kernel knows only pt_regs names: the parser's translation of %rax is what makes it work.
    assert not kernel.accepts(["x=%rax"])
    assert kernel.accepts([parse("x=%rax").format()])


def test_kernel_accepts_random_valid_args(kernel: KernelOracle) -> None:
    for is_return in (False, True):
        args = _random_valid_args(7 + is_return, 120, is_return=is_return, usdt_args=None)
        # Five arguments stay under the event size limit even as u64[64] arrays.
        for start in range(0, len(args), 5):
            batch = args[start : start + 5]
            names = [f"n{i}" for i in range(len(batch))]  # unique within the probe
            texts = [FetchArg(n, True, a.source, a.type).format() for n, a in zip(names, batch)]
            assert kernel.accepts(texts, is_return=is_return), texts


def test_kernel_limits_match(kernel: KernelOracle) -> None:
    assert kernel.accepts(["a" * MAX_ARG_NAME_LEN + "=%di"])
    assert not kernel.accepts(["a" * (MAX_ARG_NAME_LEN + 1) + "=%di"])
    assert kernel.accepts(["%di"] * MAX_TRACE_ARGS)
    assert not kernel.accepts(["%di"] * (MAX_TRACE_ARGS + 1))
    assert kernel.accepts([parse(nest(13, "@0") + ":u8").format()])
    assert not kernel.accepts(["x=" + nest(14, "@0") + ":u8"])
    assert not kernel.accepts(["x=" + nest(15, "%di")])
    six = [f"a{i}=+0(%sp):u64[64]" for i in range(6)]
    assert kernel.accepts(six)
    assert not kernel.accepts([*six, "b=%di:u8"])


# Refused by the parser and by the kernel; the parser's stricter checks (32-bit offsets, text after ')',
# USDT names) are left out, since the kernel accepts those.
ORACLE_INVALID = [
    ("x=%foo", False),
    ("x=+u0(%di):u8[2]", False),
    ("x=@sym", False),
    ("x=$retval", False),
    ("x=$arg1", False),
    ("x=%di:string", False),
    ("x=$stack:string", False),
    ("x=%di:u64[2]", False),
    ("x=+0(%di):u8[65]", False),
    ("x=+0(%di):u8[0]", False),
    ("x=%di:symbol", False),
    ("x=$comm:ustring", False),
    ("x=+0($comm)", False),
    ("x=%di:b8@1/8", False),
    ("x=%di:b1@0/12", False),
    ("x=+0(%di", False),
    ("x=\\0x", False),
    ("common_pid=%di", False),
    ("1x=%di", False),
    ("x=" + nest(15, "%di"), False),
    ("x=$retval:string", True),
]


@pytest.mark.parametrize(("token", "is_return"), ORACLE_INVALID, ids=[t for t, _ in ORACLE_INVALID])
def test_kernel_refuses_what_we_refuse(kernel: KernelOracle, token: str, is_return: bool) -> None:
    with pytest.raises(ProbeSyntaxError):
        parse(token, is_return=is_return)
    assert not kernel.accepts([token], is_return=is_return)

"""Tests for the x86-64 SDT marker argument parser."""

import os
import random
import re
import shutil
import subprocess

import pytest

from uprobes.sdt.arguments import SdtArgument, parse_arguments


def one(text: str) -> SdtArgument:
    [arg] = parse_arguments(text)
    return arg


# --- tokenisation ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", "\t\n  "])
def test_empty_or_blank_string_has_no_arguments(text):
    assert parse_arguments(text) == []


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("-4@%edi 8@-16(%rbp)", ["-4@%edi", "8@-16(%rbp)"]),
        ("  8@%rax\t-4@$0  ", ["8@%rax", "-4@$0"]),
        ("8@$100-(  ($8+$10) -$50)+$3 4@%ebx", ["8@$100-(  ($8+$10) -$50)+$3", "4@%ebx"]),
        ("8@( %rax , %rbx ) 1@%al", ["8@( %rax , %rbx )", "1@%al"]),
        ("%rdi -8(%rbp)", ["%rdi", "-8(%rbp)"]),
        ("8@%rax x@%rbx 4@%ecx", ["8@%rax", "x@%rbx", "4@%ecx"]),
        # size-less arguments after a sized one, as assembly-written markers have them
        ("8@$1 %rdi %rax", ["8@$1", "%rdi", "%rax"]),
        ("8@$1 -8(%rbp) 4@%ecx %rdx", ["8@$1", "-8(%rbp)", "4@%ecx", "%rdx"]),
        ("8@%rdi $5", ["8@%rdi", "$5"]),
    ],
)
def test_splits_only_on_whitespace_before_the_next_size_prefix(text, tokens):
    assert [a.text for a in parse_arguments(text)] == tokens


# --- size prefix ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, size, signed, is_float, type_name",
    [
        ("1@%al", 1, False, False, "u8"),
        ("-1@%al", 1, True, False, "s8"),
        ("2@%ax", 2, False, False, "u16"),
        ("-4@%eax", 4, True, False, "s32"),
        ("8@%rax", 8, False, False, "u64"),
        ("-8@%rax", 8, True, False, "s64"),
        ("16@%rax", 16, False, False, "u128"),
        ("24@8(%rsp)", 24, False, False, "u192"),
        ("4f@%ecx", 4, False, True, "f32"),
        ("8f@%r8", 8, False, True, "f64"),
        ("-8f@%rcx", 8, True, True, "f64"),
        ("16f@(%r8)", 16, False, True, "f128"),
        ("%rdi", 8, False, False, "u64"),
        ("-8(%rbp)", 8, False, False, "u64"),
    ],
)
def test_size_prefix_gives_size_sign_and_float(text, size, signed, is_float, type_name):
    arg = one(text)
    assert arg.kind != "invalid", arg.error
    assert (arg.size, arg.signed, arg.is_float, arg.type_name) == (size, signed, is_float, type_name)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("3@%rax", "'3@'"),
        ("0@%rax", "'0@'"),
        ("32@%rax", "'32@'"),
        ("2f@%ax", "'2f@'"),
        ("24f@%rax", "'24f@'"),
        ("x@%rax", "'x@'"),
        ("@%rax", "'@'"),
        ("4F@%eax", "'4F@'"),
    ],
)
def test_bad_size_prefix_is_invalid_and_named(text, fragment):
    arg = one(text)
    assert arg.kind == "invalid"
    assert fragment in arg.error


# --- constants ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("4@$5", 5),
        ("-4@$-9", -9),
        ("4@$-202182160", 4092785136),
        ("1@$-16", 240),
        ("1@$-56", 200),
        ("8@$-1", 0xFFFFFFFFFFFFFFFF),
        ("-4@$-1", -1),
        ("4@$-1", 0xFFFFFFFF),
        ("-1@$200", -56),
        ("2@$-32767", 32769),
        ("-4@$8192", 8192),
        ("8@$0", 0),
        ("-8@$0", 0),
        ("8@$0x10", 16),
        ("8@$0XfF", 255),
        ("-8@$-0x8000000000000000", -(1 << 63)),
        ("8@$18446744073709551615", 0xFFFFFFFFFFFFFFFF),
        ("16@$-1", (1 << 128) - 1),
        ("-16@$-1", -1),
        ("$7", 7),
    ],
)
def test_constant_is_truncated_to_size_then_extended_by_sign(text, value):
    arg = one(text)
    assert (arg.kind, arg.value) == ("const", value)


@pytest.mark.parametrize(
    "text, value",
    [
        ("8@$3+($10-$8)-$1", 4),
        ("8@$100-(  ($8+$10) -$50)+$3", 135),
        ("8@$8|$4", 12),
        ("8@$12&$10", 8),
        ("8@$12^$10", 6),
        ("8@$1<<$4", 16),
        ("8@$-16>>$2", (1 << 64) - 4),
        ("-8@$-16>>$2", -4),
        ("8@$7/$2", 3),
        ("-8@$-7/$2", -3),
        ("-8@$-7%$2", -1),
        ("-8@$7%$-2", 1),
        ("-8@$~$0", -1),
        ("-8@$-$5", -5),
        ("-8@$-(-$5)", 5),
        ("8@$2*$3", 6),
        ("8@$1+$2*$3", 7),
        ("8@$1+$2<<$1", 5),  # gas/GDB precedence: << binds tighter than +
        ("8@$1|$2+$4", 7),
        ("8@$(1+2)*3", 9),
        ("8@$9223372036854775807+$1", 1 << 63),
        ("8@$!0", 1),
        ("8@$!7", 0),
        ("8@$!!7", 1),
        ("-8@$-!0", -1),
        ("8@$~!0", (1 << 64) - 2),
        ("8@$!($3-$3)+$1", 2),
    ],
)
def test_constant_expressions_evaluate_like_gdb(text, value):
    arg = one(text)
    assert arg.kind == "const", arg.error
    assert arg.value == value


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("8@$1/$0", "division by zero"),
        ("8@$1%$0", "division by zero"),
        ("8@$1<<$64", "shift count 64"),
        ("8@$1>>$-1", "shift count -1"),
        ("8@$", "unexpected end"),
        ("8@$1+", "unexpected end"),
        ("8@$(1", "missing ')'"),
        ("8@$1)", "unexpected ')'"),
        ("8@$1 2", "unexpected '2'"),
        ("8@$0x", "bad number '0x'"),
        ("8@$12ab", "bad number '12ab'"),
        ("8@$18446744073709551616", "does not fit in 64 bits"),
        ("8@$counter", "symbol 'counter'"),
        ("8@$!counter", "cannot apply '!' to symbol 'counter'"),
        ("8@$1#2", "unexpected character '#'"),
        ("8@$5(%rbp)", "unexpected '(' in '$5(%rbp)'"),
    ],
)
def test_bad_constant_is_invalid_with_reason(text, fragment):
    arg = one(text)
    assert arg.kind == "invalid"
    assert fragment in arg.error


# --- registers ------------------------------------------------------------------------------

REGISTER_ALIASES = [
    ("rax", ["rax", "eax", "ax", "al"]),
    ("rbx", ["rbx", "ebx", "bx", "bl"]),
    ("rcx", ["rcx", "ecx", "cx", "cl"]),
    ("rdx", ["rdx", "edx", "dx", "dl"]),
    ("rsi", ["rsi", "esi", "si", "sil"]),
    ("rdi", ["rdi", "edi", "di", "dil"]),
    ("rbp", ["rbp", "ebp", "bp", "bpl"]),
    ("rsp", ["rsp", "esp", "sp", "spl"]),
    ("rip", ["rip", "eip", "ip"]),
    *((f"r{n}", [f"r{n}", f"r{n}d", f"r{n}w", f"r{n}b"]) for n in range(8, 16)),
    *((f"xmm{n}", [f"xmm{n}"]) for n in range(16)),
]


@pytest.mark.parametrize(
    "alias, canonical", [(alias, canonical) for canonical, aliases in REGISTER_ALIASES for alias in aliases]
)
def test_every_register_alias_maps_to_its_64_bit_register(alias, canonical):
    arg = one(f"8@%{alias}")
    assert (arg.kind, arg.reg, arg.shift) == ("reg", canonical, 0)


@pytest.mark.parametrize("alias, canonical", [("ah", "rax"), ("bh", "rbx"), ("ch", "rcx"), ("dh", "rdx")])
def test_high_byte_register_reads_bits_8_to_15(alias, canonical):
    arg = one(f"1@%{alias}")
    assert (arg.kind, arg.reg, arg.shift, arg.size) == ("reg", canonical, 8, 1)


def test_register_names_are_case_insensitive():
    assert one("-4@%EDI").reg == "rdi"


@pytest.mark.parametrize(
    "text, error",
    [
        ("8@%foo", "unknown register '%foo'"),
        ("8@%sih", "unknown register '%sih'"),
        ("8@%r16", "unknown register '%r16'"),
        ("8@%", "unknown register '%'"),
        ("8@%rax+1", "unexpected '+1' after '%rax'"),
    ],
)
def test_unknown_register_is_invalid_and_named(text, error):
    arg = one(text)
    assert (arg.kind, arg.error) == ("invalid", error)


# --- memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, base, index, scale, disp, symbol",
    [
        ("8@-16(%rbp)", "rbp", None, 1, -16, None),
        ("-4@112(%rsp)", "rsp", None, 1, 112, None),
        ("8@(%rsp)", "rsp", None, 1, 0, None),
        ("4@0(%r13)", "r13", None, 1, 0, None),
        ("8@0x10(%rax)", "rax", None, 1, 16, None),
        ("-4@-12+3+1(%rbp)", "rbp", None, 1, -8, None),
        ("-4@-4+16-16(%rbp)", "rbp", None, 1, -4, None),
        ("4@(4+4)(%rbp)", "rbp", None, 1, 8, None),
        ("-8@16(%rax,%rbx,8)", "rax", "rbx", 8, 16, None),
        ("1@-96(%rbp,%rax,8)", "rbp", "rax", 8, -96, None),
        ("4@(%rbx,%rcx)", "rbx", "rcx", 1, 0, None),
        ("4@(%rbx,%rcx,1)", "rbx", "rcx", 1, 0, None),
        ("4@(%rbx,%rcx,2)", "rbx", "rcx", 2, 0, None),
        ("4@(%rbx,%rcx,4)", "rbx", "rcx", 4, 0, None),
        ("8@(,%rax,8)", None, "rax", 8, 0, None),
        ("-4@(%rbp,%eax,4)", "rbp", "rax", 4, 0, None),
        ("8@( %r12 , %r13d , 2 )", "r12", "r13", 2, 0, None),
        ("-4@gs(%rip)", "rip", None, 1, 0, "gs"),
        ("-4@NBuffers(%rip)", "rip", None, 1, 0, "NBuffers"),
        ("-4@40+CheckpointStats(%rip)", "rip", None, 1, 40, "CheckpointStats"),
        ("8@mp_+52(%rip)", "rip", None, 1, 52, "mp_"),
        ("8@24+mp_(%rip)", "rip", None, 1, 24, "mp_"),
        ("8@glob-2(%rip)", "rip", None, 1, -2, "glob"),
        ("4@counter.0(%eip)", "rip", None, 1, 0, "counter.0"),
        ("8@-16(%rip)", "rip", None, 1, -16, None),
        ("-8@arr(,%rdi,8)", None, "rdi", 8, 0, "arr"),
        ("-4@gs", None, None, 1, 0, "gs"),
        ("8@mp_+52", None, None, 1, 52, "mp_"),
        ("8@_ZN4Foo3barE", None, None, 1, 0, "_ZN4Foo3barE"),
        ("8@.LANCHOR0+8", None, None, 1, 8, ".LANCHOR0"),
        ("8@counter$1", None, None, 1, 0, "counter$1"),
        ("8@0x1234", None, None, 1, 0x1234, None),
        ("8@4096", None, None, 1, 4096, None),
        ("8@(rax)", None, None, 1, 0, "rax"),  # without '%' gas reads a symbol, not a register
    ],
)
def test_memory_operand_fields(text, base, index, scale, disp, symbol):
    arg = one(text)
    assert arg.kind == "mem", arg.error
    assert (arg.base, arg.index, arg.scale, arg.disp, arg.symbol) == (base, index, scale, disp, symbol)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("8@(%rax,%rbx,0)", "scale '0'"),
        ("8@(%rax,%rbx,3)", "scale '3'"),
        ("8@(%rax,%rbx,16)", "scale '16'"),
        ("8@(%rax,%rbx,)", "scale ''"),
        ("8@(%rax,%rbx,4,1)", "too many ','"),
        ("8@(%foo)", "unknown register '%foo'"),
        ("8@(%rax,%bar,2)", "unknown register '%bar'"),
        ("8@(,)", "expected a register, got ''"),
        ("8@(%ah)", "'%ah' cannot address memory"),
        ("8@(%xmm0)", "'%xmm0' cannot address memory"),
        ("8@(%rax,%rsp)", "'%rsp' cannot be an index register"),
        ("8@x(%rip,%rax,2)", "'%rip' cannot be combined with an index"),
        ("8@-16(%rbp", "unexpected '(' in '-16(%rbp'"),
        ("8@a+b(%rip)", "cannot apply '+' to symbol 'b'"),
        ("8@16-x(%rip)", "cannot apply '-' to symbol 'x'"),
        ("8@x*2", "cannot apply '*' to symbol 'x'"),
        ("8@[sp, 120]", "unexpected character '['"),
        ("8@", "missing operand"),
        ("8@8@%rax", "unexpected character '@'"),
    ],
)
def test_bad_memory_operand_is_invalid_with_reason(text, fragment):
    arg = one(text)
    assert arg.kind == "invalid"
    assert fragment in arg.error


# --- error isolation ------------------------------------------------------------------------


def test_one_bad_argument_does_not_poison_its_neighbours():
    args = parse_arguments("8@%rdi 8@%foo -4@$1/$0 3@%rax 4@(%rax,%rbx,3) -4@40+CheckpointStats(%rip)")
    assert [a.kind for a in args] == ["reg", "invalid", "invalid", "invalid", "invalid", "mem"]
    assert args[1].error == "unknown register '%foo'"
    assert args[0].reg == "rdi"
    assert args[5].symbol == "CheckpointStats"


def test_invalid_argument_keeps_its_size_prefix():
    arg = one("-4@%bogus")
    assert (arg.kind, arg.size, arg.signed) == ("invalid", 4, True)


def test_valid_arguments_have_no_error():
    assert all(a.error is None for a in parse_arguments("8@%rax -4@$0 8@-16(%rbp)"))


# --- real specs (notes section 3) -----------------------------------------------------------

REAL_SPECS = [
    ("python:function__entry", "8@%rbp 8@%r12 -4@%eax", 3),
    ("python:line", "8@%r14 8@%rax -4@%ebp", 3),
    ("python:gc__start", "-4@112(%rsp)", 1),
    ("python:gc__done", "-8@%r12", 1),
    ("python:import__find__load__done", "8@%rax -4@%edx", 2),
    ("python:audit", "8@%rbx 8@%r15", 2),
    (
        "postgresql:checkpoint__done",
        "-4@40+CheckpointStats(%rip) -4@NBuffers(%rip) -4@44+CheckpointStats(%rip) "
        "-4@48+CheckpointStats(%rip) -4@52+CheckpointStats(%rip)",
        5,
    ),
    ("postgresql:lock__wait__start", "4@(%r12) 4@4(%r12) 4@8(%r12) 2@12(%r12) 1@14(%r12) -4@%r13d", 6),
    ("postgresql:buffer__read__start", "-4@%r15d 4@%ebx 4@0(%r13) 4@4(%r13) 4@8(%r13) -4@12(%r13) 1@%al", 7),
    (
        "postgresql:smgr__md__read__done",
        "-4@%r14d 4@%r13d 4@(%r12) 4@4(%r12) 4@8(%r12) -4@12(%r12) -4@%eax -4@$8192",
        8,
    ),
    ("postgresql:lwlock__wait__start", "8@%rax -4@$0", 2),
    ("postgresql:lwlock__wait__start", "8@%rax 4@%r14d", 2),
    ("libstdcxx:throw", "8@%rdi 8@%rsi", 2),
    ("libstdcxx:rethrow", "8@%rdx 8@%rax", 2),
    ("libstdcxx:catch", "8@%rdx 8@-80(%rbx)", 2),
    ("hotspot:method__entry", "-8@%rax 8@%rdx -4@%ecx 8@%rsi -4@%edi 8@%r8 -4@%r9d", 7),
    ("hotspot:thread__start", "8@%r13 -4@-60(%rbp) -8@-56(%rbp) 8@%r15 1@%al", 5),
    ("hotspot:class__loaded", "8@%rdx -4@%eax 8@152(%rdi) 1@%cl", 4),
    ("libpthread:pthread_start (Fedora)", "8@%xmm0 8@1600(%rax) 8@1608(%rax)", 3),
]


@pytest.mark.parametrize("probe, spec, count", REAL_SPECS, ids=[p for p, _, _ in REAL_SPECS])
def test_real_world_spec_parses_fully(probe, spec, count):
    args = parse_arguments(spec)
    assert len(args) == count
    assert [a.error for a in args if a.kind == "invalid"] == []


def test_postgres_checkpoint_done_details():
    first, nbuffers, *_ = parse_arguments("-4@40+CheckpointStats(%rip) -4@NBuffers(%rip)")
    assert (first.size, first.signed, first.base, first.symbol, first.disp) == (4, True, "rip", "CheckpointStats", 40)
    assert (nbuffers.base, nbuffers.symbol, nbuffers.disp) == ("rip", "NBuffers", 0)


REAL_BINARIES = [
    "/usr/bin/python3.11",
    "/usr/lib/postgresql/15/bin/postgres",
    "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
]


def test_every_argument_in_installed_binaries_parses():
    missing = [path for path in REAL_BINARIES if not os.path.exists(path)]
    if missing or shutil.which("readelf") is None:
        pytest.skip(f"needs readelf and {', '.join(missing or REAL_BINARIES)} on this machine")
    out = subprocess.run(
        ["readelf", "-n", "--wide", *REAL_BINARIES], capture_output=True, text=True, check=True
    ).stdout
    lines = re.findall(r"^\s*Arguments: ?(.*)$", out, re.MULTILINE)
    assert len(lines) > 50
    for line in lines:
        args = parse_arguments(line)
        assert len(args) == line.count("@"), line
        assert [(a.text, a.error) for a in args if a.kind == "invalid"] == [], line


# --- robustness -----------------------------------------------------------------------------

FRAGMENTS = ["@", "-", "8", "4f", "$", "%", "(", ")", ",", " ", "rax", "eax", "ah", "xmm3", "rip", "sym", "0x",
             "+", "*", "/", "<<", ">>", "~", "|", "0", "9" * 30, ".", "\t", "%r8b"]


def test_random_input_never_raises():
    rng = random.Random(20240601)
    alphabet = [chr(c) for c in range(32, 127)] + ["\t", "\n", "\x00", "\u00e9", "\u3000", "\u0663"]
    for _ in range(4000):
        if rng.random() < 0.5:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        else:
            text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randrange(25)))
        args = parse_arguments(text)
        assert all(isinstance(a, SdtArgument) for a in args)
        for a in args:
            assert a.text and a.text in text
            assert (a.kind == "invalid") == (a.error is not None)
            assert a.kind in ("const", "reg", "mem", "invalid")


@pytest.mark.parametrize(
    "text, error",
    [
        ("8@$" + "(" * 5000 + "1" + ")" * 5000, "expression nested too deeply"),
        ("8@$" + "-" * 5000 + "1", "expression nested too deeply"),
        ("8@" + "(" * 5000 + "%rax" + ")" * 5000, "expression nested too deeply"),
        ("8@$" + "9" * 5000, "does not fit"),
        ("9" * 5000 + "@%rax", "unsupported size"),
    ],
)
def test_pathological_input_is_invalid_not_a_crash(text, error):
    arg = one(text)
    assert arg.kind == "invalid" and error in arg.error and len(arg.error) < 200, arg.error


def test_a_long_but_flat_displacement_is_summed():
    """20,001 ones added: no nesting, so an operand as GDB reads it, not an error."""
    arg = one("8@" + "1+" * 20000 + "1(%rbp)")
    assert (arg.kind, arg.disp, arg.base) == ("mem", 20001, "rbp")


@pytest.mark.parametrize("engine", ["ptrace", "kernel"])
def test_a_marker_mixing_sized_and_size_less_arguments_reads_each(targets, engine):
    """mixedargs' marker was written with STAP_PROBE_ASM: its argument string is "8@$7 %rdi %rax"."""
    from conftest import run_json

    if engine == "kernel" and os.geteuid() != 0:
        pytest.skip("the kernel engine needs root")
    program = str(targets / "mixedargs")
    records, proc = run_json("trace", "--engine", engine, f"usdt:{program}:mixed:hit a=arg0 b=arg1 c=arg2",
                             "--", program, "4")
    assert proc.returncode == 0, proc.stderr
    printed = [tuple(int(word) for word in line.split()[1:]) for line in proc.stdout.splitlines()]
    seen = [(r["args"]["a"], r["args"]["b"], r["args"]["c"]) for r in records if "args" in r]
    assert seen == printed and len(seen) == 4

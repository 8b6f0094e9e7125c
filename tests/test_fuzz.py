"""Hostile input: every parser answers any input with our own one-line error or a result, never another
exception or a hang. A short hypothesis run of each fuzz target here; `make fuzz` runs atheris on each for a
million inputs. And a corpus of malformed ELF files (fuzz/malformed.py), through the reader and the CLI."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
from malformed import malformed_elves  # noqa: E402
from targets import BUILD, SEEDS, TARGETS, run_target, sdt_host  # noqa: E402

# A hang shows as an input slower than this; normal inputs take milliseconds.
FUZZ = settings(max_examples=300, deadline=timedelta(seconds=5), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _words(*tokens: str) -> st.SearchStrategy[str]:
    """Texts made of the grammar's own pieces (which random text rarely hits) mixed with any text."""
    return st.one_of(st.text(), st.lists(st.sampled_from(tokens), max_size=14).map("".join))


def _mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A seed with a few bytes overwritten, or cut short."""
    @st.composite
    def mutate(draw) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(0, len(data) - 1))
            data[at:at + 8] = draw(st.binary(min_size=1, max_size=8))
        if draw(st.booleans()):
            del data[draw(st.integers(0, len(data))):]
        return bytes(data)
    return mutate()


_USDT = ("-4@", "8@", "4f@", "8f@", "-1@", "16@", "%rax", "%eax", "%ah", "%r8d", "%xmm0", "%rip", "%rbp", "(", ")",
         ",", "+", "-", "$", "12", "0x10", "sym", " ", "@", "*", "9999999999999999999999")
_PROBE = ("uprobe:", "uretprobe:", "usdt:", "p:", "r:", "u:", "grp/", "ev ", "/bin/ls", "libc", ":", "+", "0x10",
          "(", ")", "main", "malloc@@GLIBC_2.2.5", "'", "%di", "=", " ", "$retval", "*", "\n", "%return", "python")
_FETCH = ("x=", "%di", "%ax", "+0(", "-8(", ")", ":u32", ":s16", ":string", ":ustring", ":symstr", ":x64", "[4]",
          ":b3@4/16", "@+0x10", "@0x601040", "$retval", "$comm", "$stack", "$stack3", "arg1", "$arg2", "\\123",
          '\\"t\\"', " ", "=", "+", "0x", "99999999999999999999")


@FUZZ
@given(_words(*_USDT))
def test_usdt_argument_parser(text):
    run_target("usdt-arguments", text.encode())


@FUZZ
@given(_words(*_PROBE))
def test_probe_parser(text):
    run_target("probe", text.encode())


@FUZZ
@given(_words(*_FETCH))
def test_fetch_argument_parser(text):
    run_target("fetchargs", text.encode())


@FUZZ
@given(st.one_of(st.binary(max_size=256), _mutated(SEEDS["sdt-notes"]())))
def test_sdt_note_parser(data):
    run_target("sdt-notes", data)


@settings(FUZZ, max_examples=150)
@given(st.one_of(st.binary(max_size=128), _mutated(SEEDS["elf"]())))
def test_elf_reader(data):
    run_target("elf", data)


def test_every_parser_has_a_fuzz_test_and_seeds():
    tested = {"usdt-arguments", "probe", "fetchargs", "sdt-notes", "elf"}
    assert set(TARGETS) == tested
    assert all(SEEDS[name]() for name in TARGETS)
    assert sdt_host()[2] > 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("malformed")
    files = {}
    for host in ("demo", "demo-minidebug"):
        for name, data in malformed_elves((BUILD / host).read_bytes()).items():
            files[f"{host}-{name}"] = out / f"{host}-{name}"
            files[f"{host}-{name}"].write_bytes(data)
    return files


def test_malformed_elf_corpus_is_refused_or_read(corpus):
    assert len(corpus) >= 70
    for path in corpus.values():
        run_target("elf", path.read_bytes())


@pytest.mark.parametrize("name", ["demo-truncated-at-64", "demo-absurd-e_shnum", "demo-overlapping-segments",
                                  "demo-note-descsz-huge", "demo-segment-past-end-of-file", "demo-not-x86-64",
                                  "demo-minidebug-minidebuginfo-not-xz"])
def test_cli_on_malformed_elf_is_one_line_or_a_listing(corpus, name):
    result = run_cli("list", str(corpus[name]))
    if result.status:
        assert result.status == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert str(corpus[name]) in result.stderr
    else:
        assert result.stdout


_SUBCOMMANDS = ("trace", "count", "latency", "hist", "stacks", "resolve", "list")
_OPTIONS = ("-d", "-n", "--interval", "--top", "--linear", "-p", "-c", "--by", "--engine", "--return-mode",
            "--max-stack", "--stack-size", "--format", "-o")
_FLAGS = ("--json", "--wall-clock", "--trap", "--no-follow", "--stack", "--version", "--functions")
_VALUES = ("-1", "0", "nan", "inf", "1e999", "2", "x", "", "99999999999999999999", "ptrace", 'ls "unclosed', "json",
           "chrome", "insn", "size,name", "/nonexistent/dir/out")
_PROBES = ("p:/bin/ls:main", "uprobe:libc:malloc+99999999999999999999999999", "p libc:0xffffffffffffffffff",
           "uprobe:libc:malloc x=", "uprobe:libc:malloc", "ls", "uprobe:/tmp:x", "uretprobe:libc:malloc $retval",
           "usdt:/bin/ls:a:b", "uprobe:libc:malloc if size >", "size")
# Every command line ends with a target that cannot run (so nothing is ever traced): a missing program, a
# directory, a file that is not executable, a pid that does not exist or a kernel thread.
_TARGETS = (["--", "/nonexistent/program"], ["--", "/tmp"], ["--", "/etc/passwd"], ["-p", "99999999"], ["-p", "2"])


@st.composite
def _command_lines(draw) -> list[str]:
    words = [draw(st.sampled_from(_SUBCOMMANDS))]
    for _ in range(draw(st.integers(0, 4))):
        words += draw(st.one_of(st.tuples(st.sampled_from(_OPTIONS), st.sampled_from(_VALUES)).map(list),
                                st.sampled_from(_FLAGS).map(lambda flag: [flag])))
    words += draw(st.lists(st.sampled_from(_PROBES), max_size=3))
    return words + draw(st.sampled_from(_TARGETS))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_command_lines())
def test_the_command_line_answers_any_input_with_a_result_or_one_line(argv):
    """The papercut cases of the newcomer's hour (bad numbers, unclosed quotes, a probe written p:PATH, numbers past
    64 bits, a kernel thread, a directory as the command...) in any mix: exit 0, or 2 with one line saying what is
    wrong; never a traceback."""
    result = run_cli(*argv)
    assert "Traceback" not in result.stderr, (argv, result.stderr)
    if result.status != 0:
        lines = [line for line in result.stderr.splitlines() if not line.startswith("uprobes: warning: ")]
        assert result.status == 2 and len(lines) == 1 and lines[0].startswith("uprobes: error: "), (argv, result)

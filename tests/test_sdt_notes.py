"""SDT markers read from .note.stapsdt agree with readelf, on our targets and on real programs."""

from __future__ import annotations

import os
import re
import struct

import pytest

from oracles import SdtOperand, file_offset, readelf_marker_arguments, readelf_sdt_notes
from uprobes.elf.objfile import ElfObject
from uprobes.sdt.notes import read_markers

PYTHON = "/usr/bin/python3.11"
POSTGRES = "/usr/lib/postgresql/15/bin/postgres"
LIBSTDCXX = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"
REAL_OBJECTS = [PYTHON, POSTGRES, LIBSTDCXX]


def _sites(path: str):
    return [site for marker in read_markers(ElfObject.open(path)) for site in marker.sites]


def _check_against_readelf(path: str) -> None:
    expected = readelf_sdt_notes(path)
    sites = _sites(path)
    assert expected, f"readelf found no markers in {path}"
    assert len(sites) == len(expected)
    ours = {(s.provider, s.name, s.address): s for s in sites}
    for note in expected:
        site = ours[(note.provider, note.name, note.location)]
        assert site.args_text == note.arguments
        assert site.offset == file_offset(path, note.location)
        if note.semaphore:
            assert site.semaphore == note.semaphore
            assert site.semaphore_offset == file_offset(path, note.semaphore)
        else:
            assert site.semaphore is None and site.semaphore_offset is None
        # one argument per "N@"; size-less assembly arguments are separated by spaces
        assert len(site.args) == (note.arguments.count("@") or len(note.arguments.split()))


@pytest.mark.parametrize("name", ["demo", "demo-nopie", "libprobed.so", "forms", "demo-stripped", "demo.debug"])
def test_markers_of_our_targets_match_readelf(targets, name):
    _check_against_readelf(str(targets / name))


@pytest.mark.parametrize("path", REAL_OBJECTS)
def test_markers_of_real_programs_match_readelf(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} is not installed (scripts/install-deps installs it)")
    _check_against_readelf(os.path.realpath(path))


def test_every_python_marker_has_a_semaphore():
    markers = read_markers(ElfObject.open(PYTHON))
    names = {m.name for m in markers}
    assert {"function__entry", "function__return", "line", "gc__start", "gc__done", "audit",
            "import__find__load__start", "import__find__load__done"} <= names
    assert all(m.has_semaphore for m in markers)


def test_libstdcxx_markers_have_no_semaphore():
    markers = read_markers(ElfObject.open(LIBSTDCXX))
    assert {m.qualified_name for m in markers} >= {"libstdcxx:throw", "libstdcxx:rethrow", "libstdcxx:catch"}
    assert not any(m.has_semaphore for m in markers)


def test_postgres_symbol_operands_parse():
    """postgresql:checkpoint__done's arguments are values at symbols, %rip-relative (``-4@40+CheckpointStats(%rip)``
    in readelf): each one's size, sign and symbol are readelf's."""
    sites = {s.qualified_name: s for s in _sites(POSTGRES)}
    args = sites["postgresql:checkpoint__done"].args
    (words,) = readelf_marker_arguments(POSTGRES, "postgresql", "checkpoint__done")
    expected = [(SdtOperand.parse(word), re.fullmatch(r"(?:\d+\+)?(\w+)\(%rip\)", word.split("@")[1]))
                for word in words]
    assert all(symbol for _, symbol in expected)
    assert [a.kind for a in args] == ["mem"] * len(words)
    assert [(a.symbol, a.base, a.size, a.signed) for a in args] == [
        (symbol[1], "rip", operand.size, operand.signed) for operand, symbol in expected]


def test_semaphore_markers_point_at_the_writable_segment(targets):
    obj = ElfObject.open(str(targets / "demo"))
    for marker in read_markers(obj):
        for site in marker.sites:
            assert obj.segment_for_vaddr(site.semaphore).writable
            assert obj.read(site.address, 1) == b"\x90"  # the marker's nop


def test_inlined_marker_keeps_each_sites_arguments(targets):
    forms = str(targets / "forms")
    marker = next(m for m in read_markers(ElfObject.open(forms)) if m.name == "inlined")
    sites = sorted(marker.sites, key=lambda site: site.address)
    expected = readelf_marker_arguments(forms, "forms", "inlined")
    assert len(expected) == 2 and expected[0] != expected[1]  # two copies, their arguments in other registers
    assert [s.args_text for s in sites] == [" ".join(words) for words in expected]
    assert [[(a.size, a.signed) for a in s.args] for s in sites] == [
        [(SdtOperand.parse(word).size, SdtOperand.parse(word).signed) for word in words] for words in expected]


def test_object_without_markers_has_none(targets):
    assert read_markers(ElfObject.open(str(targets / "uselib"))) == []


def test_a_prelinked_object_is_corrected_by_its_stapsdt_base(targets, tmp_path):
    """prelink moves .stapsdt.base without touching the notes: sites and semaphores move by the difference."""
    path = targets / "demo"
    note = readelf_sdt_notes(str(path))[0]
    base = ElfObject.open(str(path)).section(".stapsdt.base").addr
    data = path.read_bytes()
    record = struct.pack("<QQQ", note.location, base, note.semaphore)
    assert data.count(record) == 1
    moved = tmp_path / "demo-prelinked"
    moved.write_bytes(data.replace(record, struct.pack("<QQQ", note.location, base - 0x10, note.semaphore)))
    site = next(s for s in _sites(str(moved)) if (s.provider, s.name) == (note.provider, note.name))
    assert (site.address, site.semaphore) == (note.location + 0x10, note.semaphore + 0x10)
    assert site.offset == file_offset(str(path), note.location) + 0x10

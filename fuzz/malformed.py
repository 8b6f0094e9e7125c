"""A corpus of malformed ELF files, each made from a real program by one deliberate defect.

``malformed_elves(data)`` takes a well-formed 64-bit little-endian ELF with SDT notes (tests/targets/build/demo)
and returns {name: bytes}: truncations, absurd counts and offsets in the headers, overlapping and oversized
segments, broken section headers and symbol tables, notes whose sizes lie, and wrong identities. A reader
must refuse each with its own one-line error or read what is readable; nothing else.
"""

from __future__ import annotations

import io
import struct

from elftools.elf.elffile import ELFFile

__all__ = ["malformed_elves"]

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # e_ident .. e_shstrndx
_PHDR = struct.Struct("<IIQQQQQQ")  # p_type p_flags p_offset p_vaddr p_paddr p_filesz p_memsz p_align
_SHDR = struct.Struct("<IIQQQQIIQQ")  # sh_name sh_type sh_flags sh_addr sh_offset sh_size sh_link sh_info ...
_NHDR = struct.Struct("<III")  # n_namesz n_descsz n_type
_PT_LOAD = 1
_HUGE = 1 << 62


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def malformed_elves(data: bytes) -> dict[str, bytes]:
    """One defect per entry; see the module docstring."""
    elf = ELFFile(io.BytesIO(data))
    header = _EHDR.unpack_from(data)
    phoff, shoff, phnum = header[5], header[6], header[9]
    corpus: dict[str, bytes] = {}

    for size in (0, 4, 16, 63, 64, phoff + 20, len(data) // 2, shoff + 10, len(data) - 1):
        corpus[f"truncated-at-{size}"] = data[:size]
    corpus["32-bit-class"] = _patched(data, 4, "<B", 1)
    corpus["big-endian"] = _patched(data, 5, "<B", 2)
    corpus["not-x86-64"] = _patched(data, 18, "<H", 183)  # EM_AARCH64
    for field, offset, fmt, value in (("e_phnum", 56, "<H", 0xFFFF), ("e_shnum", 60, "<H", 0xFFFF),
                                      ("e_shstrndx", 62, "<H", 0xFFFE), ("e_phoff", 32, "<Q", _HUGE),
                                      ("e_shoff", 40, "<Q", _HUGE), ("e_phentsize", 54, "<H", 0),
                                      ("e_shentsize", 58, "<H", 1), ("e_shoff-inside-header", 40, "<Q", 8)):
        corpus[f"absurd-{field}"] = _patched(data, offset, fmt, value)

    loads = [phoff + i * _PHDR.size for i in range(phnum) if _PHDR.unpack_from(data, phoff + i * _PHDR.size)[0] == _PT_LOAD]
    first_vaddr = _PHDR.unpack_from(data, loads[0])[3]
    for at in loads[1:]:
        corpus["overlapping-segments"] = _patched(_patched(data, at + 16, "<Q", first_vaddr), at + 24, "<Q", first_vaddr)
        break
    corpus["segment-past-end-of-file"] = _patched(data, loads[-1] + 32, "<Q", len(data) * 4)
    corpus["segment-offset-huge"] = _patched(data, loads[0] + 8, "<Q", _HUGE)
    corpus["segment-memsz-huge"] = _patched(data, loads[0] + 40, "<Q", _HUGE)

    for index, section in enumerate(elf.iter_sections()):
        at = shoff + index * _SHDR.size
        if section.name in (".symtab", ".dynsym"):
            corpus[f"{section.name[1:]}-size-huge"] = _patched(data, at + 32, "<Q", _HUGE)
            corpus[f"{section.name[1:]}-size-odd"] = _patched(data, at + 32, "<Q", section["sh_size"] - 5)
            corpus[f"{section.name[1:]}-link-missing"] = _patched(data, at + 40, "<I", 0xFFFF)
            first_name = section["sh_offset"] + 24  # st_name of symbol 1 (symbol 0 is null)
            corpus[f"{section.name[1:]}-name-past-strings"] = _patched(data, first_name, "<I", 0xFFFFFFF0)
        if section.name == ".strtab":
            corpus["strtab-offset-past-end"] = _patched(data, at + 24, "<Q", len(data) + 4096)
        if section.name == ".note.stapsdt":
            note = section["sh_offset"]
            corpus["note-namesz-huge"] = _patched(data, note, "<I", 0xFFFFFFFF)
            corpus["note-descsz-huge"] = _patched(data, note + 4, "<I", 0xFFFFFFF0)
            corpus["note-descsz-too-small"] = _patched(data, note + 4, "<I", 4)
            corpus["note-descsz-zero"] = _patched(data, note + 4, "<I", 0)
            corpus["note-section-size-huge"] = _patched(data, at + 32, "<Q", _HUGE)
            namesz, descsz, _ = _NHDR.unpack_from(data, note)
            desc = note + _NHDR.size + (namesz + 3) // 4 * 4
            strings = bytearray(data)
            strings[desc + 24:desc + descsz] = b"x" * (descsz - 24)  # provider, name, args: no NUL anywhere
            corpus["note-strings-unterminated"] = bytes(strings)
            corpus["note-pc-outside-code"] = _patched(data, desc, "<Q", _HUGE)
            corpus["note-semaphore-outside-segments"] = _patched(data, desc + 16, "<Q", _HUGE)
        if section.name == ".gnu_debugdata":
            corpus["minidebuginfo-not-xz"] = data[:section["sh_offset"]] + b"\0" * section["sh_size"] + \
                data[section["sh_offset"] + section["sh_size"]:]
    corpus["section-headers-zeroed"] = data[:shoff] + bytes(len(data) - shoff)
    return corpus

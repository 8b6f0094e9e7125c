"""Decoding x86-64 code with iced-x86: where instructions start, and how they read in AT&T syntax."""

from __future__ import annotations

from dataclasses import dataclass

from iced_x86 import Decoder, DecoderOptions, Formatter, FormatterSyntax, Instruction

__all__ = ["DecodedInstruction", "decode_at", "instruction_containing", "instruction_starts"]

_MAX_INSTRUCTION = 15
_formatter = Formatter(FormatterSyntax.GAS)


@dataclass(frozen=True, slots=True)
class DecodedInstruction:
    """One instruction: its address, length, bytes and AT&T text (``push %rbp``)."""

    address: int
    length: int
    raw: bytes
    text: str
    invalid: bool

    @property
    def end(self) -> int:
        return self.address + self.length


def _describe(instr: Instruction, code: bytes, start: int) -> DecodedInstruction:
    offset = instr.ip - start
    raw = code[offset:offset + instr.len]
    invalid = instr.is_invalid
    return DecodedInstruction(instr.ip, instr.len, raw, "(bad)" if invalid else _formatter.format(instr), invalid)


def decode_at(code: bytes, address: int) -> DecodedInstruction:
    """The instruction whose first byte is ``code[0]``, located at ``address``."""
    decoder = Decoder(64, code[:_MAX_INSTRUCTION], DecoderOptions.NONE, ip=address)
    return _describe(decoder.decode(), code, address)


def instruction_containing(code: bytes, start: int, target: int) -> DecodedInstruction | None:
    """Decode linearly from ``start`` (a function's first byte) and return the instruction holding ``target``.

    None when ``target`` lies past the decoded bytes. The caller compares ``.address`` with ``target`` to
    learn whether ``target`` is an instruction boundary.
    """
    decoder = Decoder(64, code, DecoderOptions.NONE, ip=start)
    for instr in decoder:
        if instr.ip <= target < instr.ip + instr.len:
            return _describe(instr, code, start)
        if instr.ip > target:
            break
    return None


def instruction_starts(code: bytes, start: int) -> list[int]:
    """Where each instruction starts, decoding ``code`` (located at ``start``) linearly to its end."""
    return [instr.ip for instr in Decoder(64, code, DecoderOptions.NONE, ip=start)]

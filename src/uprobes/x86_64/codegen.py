"""Machine code we generate, encoded by iced-x86 one instruction at a time at the address it will run at."""

from __future__ import annotations

from iced_x86 import BlockEncoder, Decoder, DecoderOptions, Instruction

__all__ = ["encode"]


def encode(instructions: list[Instruction], address: int) -> list[bytes]:
    """Each instruction's bytes, laid out one after the other from ``address``. An instruction taken from other
    code keeps its meaning: branch targets and rip-relative operands are re-encoded for where it now runs
    (short branches widened when needed). Raises ValueError when one cannot be, or would need to become
    several instructions (a branch out of reach: the caller falls back)."""
    encoded = []
    for instruction in instructions:
        block = BlockEncoder(64)
        block.add(instruction)
        code = block.encode(address)
        if sum(1 for _ in Decoder(64, code, DecoderOptions.NONE, ip=address)) != 1:
            raise ValueError(f"re-encoding at {address:#x} makes more than one instruction of it")
        encoded.append(code)
        address += len(code)
    return encoded

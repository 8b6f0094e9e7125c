"""How many function entries of an object a jump probe can take, by the analysis alone (no process needed).

    .venv/bin/python bench/jumpable.py [OBJECT...]   (default: python3.11 and libc.so.6)

Counts the functions of 5 bytes or more in the symbol table, one per address, and prints the share whose
first instruction :func:`uprobes.x86_64.jumps.jump_site` accepts, and the most common reasons for the rest.
"""

from __future__ import annotations

import collections
import re
import sys

from uprobes.elf.objfile import ElfObject
from uprobes.x86_64.jumps import JUMP_LENGTH, jump_site

DEFAULT = ("/usr/bin/python3.11", "/usr/lib/x86_64-linux-gnu/libc.so.6")


def survey(path: str) -> tuple[int, int, collections.Counter]:
    """(functions, jump-patchable ones, reasons for the others) for the object at ``path``."""
    obj = ElfObject.open(path)
    starts = {sym.value for sym in obj.symbols.functions if sym.size >= JUMP_LENGTH}
    reasons: collections.Counter = collections.Counter()
    for start in starts:
        site = jump_site(start, obj)
        if isinstance(site, str):
            reasons[re.sub(r"'[^']*'|0x[0-9a-f]+", "…", site)] += 1
    return len(starts), len(starts) - sum(reasons.values()), reasons


def main(paths: list[str]) -> None:
    for path in paths:
        total, jumpable, reasons = survey(path)
        print(f"{path}: {jumpable}/{total} function entries jump-patchable ({100 * jumpable / total:.1f}%)")
        for reason, count in reasons.most_common(5):
            print(f"    {count:6d}  {reason}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(DEFAULT))

"""Share of function-entry probes the ptrace engine serves with one stop (emulated or boosted).

    .venv/bin/python bench/onestop.py [--json] [OBJECT...]

For every function symbol of each object (default: /usr/bin/python3.11 and libc.so.6), the first instruction
is analysed as the engine analyses it at insertion: emulated and boosted instructions cost one stop per hit, a
stepped one two. Prints the shares and the most common stepped instructions.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from uprobes.elf.locate import find_object
from uprobes.elf.objfile import ElfObject
from uprobes.errors import UprobesError
from uprobes.x86_64.analysis import analyze

DEFAULT_OBJECTS = ("/usr/bin/python3.11", "libc.so.6")


def entry_kinds(path: str) -> tuple[Counter, Counter]:
    """How each function entry of ``path`` is served ("emulate", "boost", "step", "refuse"), and the
    mnemonics of the stepped ones."""
    obj = ElfObject.open(find_object(path))
    kinds, stepped = Counter(), Counter()
    for address in sorted({sym.value for sym in obj.symbols.functions if sym.value}):
        try:
            plan = analyze(obj.read(address, 15), address)
        except UprobesError:
            kinds["refuse"] += 1
            continue
        kind = "emulate" if plan.kind == "emulate" else "boost" if plan.boost_code else "step"
        kinds[kind] += 1
        if kind == "step":
            stepped[plan.text.split()[0]] += 1
    return kinds, stepped


def one_stop_share(kinds: Counter) -> float:
    return (kinds["emulate"] + kinds["boost"]) / max(1, sum(kinds.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("objects", nargs="*", default=DEFAULT_OBJECTS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {}
    for path in args.objects:
        kinds, stepped = entry_kinds(path)
        results[path] = {"functions": sum(kinds.values()), **kinds, "one_stop": round(one_stop_share(kinds), 4),
                         "stepped_most": stepped.most_common(5)}
        if not args.json:
            print(f"{path}: {sum(kinds.values())} function entries, one stop {one_stop_share(kinds):.1%} "
                  f"(emulated {kinds['emulate']}, boosted {kinds['boost']}, stepped {kinds['step']}, "
                  f"refused {kinds['refuse']}); stepped most: {stepped.most_common(5)}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()

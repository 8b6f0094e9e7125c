"""The ptrace engine with a Python handler: count the hits of one probe through ``uprobes.api.Session``.

    python bench/pyhandler.py [--stop] PROBE -- CMD ARGS...

Starts CMD with the probe in place, runs a handler that increments a counter at every hit (from the hit's
record, or with ``--stop`` while the thread is stopped at the probe), and prints ``pyhandler: hits=N`` on
stderr when CMD has ended. Exits with CMD's status. bench/run.py times it.
"""

from __future__ import annotations

import sys

from uprobes.api import Session


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: pyhandler.py [--stop] PROBE -- CMD ARGS...", file=sys.stderr)
        return 2
    stop = argv[0] == "--stop"
    argv = argv[stop:]
    at = argv.index("--")
    probe, command = " ".join(argv[:at]), argv[at + 1:]
    hits = 0

    def handler(hit) -> None:
        nonlocal hits
        hits += 1

    with Session(command=command, keep_events=False) as session:
        session.probe(probe, handler, stop=stop)
        status = session.run()
    print(f"pyhandler: hits={hits}", file=sys.stderr)
    return status if status is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

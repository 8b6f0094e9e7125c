"""Cost of one probe hit, per engine, measured in one run on the same target (issue 4's figures).

    .venv/bin/python bench/hitcost.py [CALLS]

Runs tests/targets/build/threads (one thread calling hit()) under `uprobes count` with one probe on an
emulated instruction (hit+0, `lea`) or on a stepped instruction (hit+4, `and $7,%esi`), with each engine,
for CALLS/4 and CALLS calls. Per-hit cost is the slope between the two (medians of 3), so start-up and
attach costs cancel out; untraced calls cost nanoseconds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent
TARGET = ROOT / "tests" / "targets" / "build" / "threads"


def _run(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def _median(command: list[str], runs: int = 3) -> float:
    return statistics.median(_run(command) for _ in range(runs))


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    few = calls // 4
    results = {}
    for label, where in (("emulated (lea)", "hit"), ("stepped (and)", "hit+4")):
        for engine in ("kernel", "ptrace"):
            times = [_median([sys.executable, "-m", "uprobes", "count", "--engine", engine,
                              f"uprobe:{TARGET}:{where}", "--", str(TARGET), "1", str(n)]) for n in (few, calls)]
            results[(label, engine)] = (times[1] - times[0]) / (calls - few) * 1e6
    for label in ("emulated (lea)", "stepped (and)"):
        kernel, ptrace = results[(label, "kernel")], results[(label, "ptrace")]
        print(f"{label:16} kernel {kernel:7.2f} us/hit   ptrace {ptrace:7.2f} us/hit   ratio {ptrace / kernel:5.1f}x")
    print(json.dumps({f"{k[0]}/{k[1]}": round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()

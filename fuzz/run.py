"""Fuzz one parser with atheris (libFuzzer, coverage-guided): ``fuzz/run.py TARGET [RUNS [SECONDS]]``.

TARGET is one of fuzz/targets.py's (elf, sdt-notes, usdt-arguments, probe, fetchargs). The run starts from
that target's seeds, keeps the inputs that reach new code in build/fuzz/TARGET/corpus (so a later run goes
on from there), and stops after RUNS inputs (default 1,000,000) or SECONDS, at the first input that raises anything but
our own error, or at one that takes more than 10 s (a hang); such an input is saved under build/fuzz/TARGET/
and the exit status is not 0. ``make fuzz`` runs every target.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
with atheris.instrument_imports(include=["uprobes", "elftools", "targets"]):
    from targets import ROOT, SEEDS, TARGETS, run_target


def main() -> None:
    if len(sys.argv) not in (2, 3, 4) or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: fuzz/run.py {{{','.join(TARGETS)}}} [RUNS [SECONDS]]")
    name = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    seconds = int(sys.argv[3]) if len(sys.argv) > 3 else 0  # 0: no limit
    work = ROOT / "build" / "fuzz" / name
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(SEEDS[name]()):
        (corpus / f"seed-{index}").write_bytes(seed)
    max_len = max(len(seed) for seed in SEEDS[name]()) * 2 if name == "elf" else 4096

    def one_input(data: bytes) -> None:
        run_target(name, data)

    atheris.Setup([sys.argv[0], str(corpus), f"-runs={runs}", f"-max_total_time={seconds}", "-timeout=10",
                   f"-max_len={max_len}",
                   f"-artifact_prefix={work}/", "-print_final_stats=1"], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

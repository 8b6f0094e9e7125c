"""The benchmark: per-hit cost of each tool on each kind of probe site, and the other figures of `make bench`.

    .venv/bin/python bench/run.py [--quick] [--only PATTERN[,PATTERN...]] [--output FILE] [--runs R] [--span S]

Per-hit cost is a slope, as in bench/hitcost.py: each tool runs `hits SITE N/4` and `hits SITE N` (R times
each, interleaved), and cost = (median t(N) - median t(N/4)) / (3N/4), so that start-up, attach and exit
costs cancel out. N is chosen per tool and site by a short calibration, so that t(N) - t(N/4) is about S
seconds (0.6 by default). The spread is the range of the R per-pair slopes. Every run's count is checked
against the iterations the target did: a run with a wrong count (or a failed run) makes its cell FAILED,
never timed. Tools run one after the other, never in parallel; nothing is pinned to a CPU.

Also measured: inserting and removing 1,000 and 10,000 probes in a running process (bench/insert.py),
`uprobes list` on libpython3.11 and OpenJDK's libjvm.so, the event rate of `uprobes trace --json -o FILE`
(the same slope method), and the peak RSS of `uprobes count` holding 10,000 probes.

PATTERNs (shell globs) select what runs: SITE/TOOL for the per-hit cells (`entry/ptrace`, `*/kernel`,
`usdt/*`), and `insert/ENGINE`, `list/libpython`, `list/libjvm`, `trace/ENGINE`, `rss/ENGINE` for the rest.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import glob
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TARGET = BENCH / "targets" / "build" / "hits"
PY = sys.executable
UPROBES = [PY, "-m", "uprobes"]
LIBPYTHON = "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"

SITES = {  # what each site is; probe words per tool ({H} is the target's path)
    "entry": dict(label="entry: push %rbp", symbol="site_entry",
                  uprobes="uprobe:{H}:site_entry", bpftrace="uprobe:{H}:site_entry",
                  perf="bench_hits:entry=site_entry", gdb='dprintf *site_entry,"HIT\\n"'),
    "alu": dict(label="alu: imul (%rsi),%rdi", symbol="site_alu",
                uprobes="uprobe:{H}:site_alu", bpftrace="uprobe:{H}:site_alu",
                perf="bench_hits:alu=site_alu", gdb='dprintf *site_alu,"HIT\\n"'),
    "riprel": dict(label="riprel: mov x(%rip),%rax", symbol="site_riprel",
                   uprobes="uprobe:{H}:site_riprel", bpftrace="uprobe:{H}:site_riprel",
                   perf="bench_hits:riprel=site_riprel", gdb='dprintf *site_riprel,"HIT\\n"'),
    "ret": dict(label="ret: return probe", symbol="site_ret",
                uprobes="uretprobe:{H}:site_ret", bpftrace="uretprobe:{H}:site_ret",
                perf="bench_hits:ret=site_ret%return", gdb=None),
    "usdt": dict(label="usdt: marker, 3 args", symbol=None,
                 uprobes="usdt:{H}:bench:hit", bpftrace="usdt:{H}:bench:hit",
                 perf="sdt_bench:hit", gdb='break -probe-stap bench:hit\ncommands\nsilent\nprintf "HIT\\n"\ncontinue\nend'),
}
TOOLS = {
    "baseline": "no probe",
    "kernel": "uprobes count --engine kernel",
    "ptrace": "uprobes count --engine ptrace --trap",
    "ptrace-jump": "uprobes count --engine ptrace (jump probes)",
    "kernel-trace": "uprobes trace --engine kernel -o FILE, 3 args (time in the target)",
    "ptrace-trace": "uprobes trace --engine ptrace -o FILE, 3 args (jump probes; time in the target; × the kernel engine's trace)",
    "ptrace-py": "ptrace + Python handler (from records: jump probes)",
    "ptrace-py-stop": "ptrace + Python handler, stop=True (a trap)",
    "bpftrace": "bpftrace count()",
    "perf": "perf probe + perf record",
    "gdb": "gdb dprintf",
}
NEEDS_ROOT = {"kernel", "kernel-trace", "bpftrace", "perf"}
# Largest N per tool: the calibration never goes past it (a safety net for a tool much slower than expected).
N_MAX = {"baseline": 200_000_000, "kernel": 20_000_000, "bpftrace": 20_000_000, "perf": 1_000_000,
         "ptrace": 400_000, "ptrace-jump": 200_000_000, "ptrace-py": 200_000, "ptrace-py-stop": 200_000, "gdb": 50_000,
         "ptrace-trace": 60_000,  # within one ring (65,536 records), so that every hit is written
         "kernel-trace": 2_000_000}
TRACERS = {"kernel-trace": "kernel", "ptrace-trace": "ptrace"}  # the tools that are `uprobes trace`, their engine
# What a tool's cost is a ratio to, where not the kernel engine's count: the kernel engine doing the same work
RATIO_TO = {"ptrace-trace": "kernel-trace"}
TRACED_ARGS = "a=%di b=%si c=%dx"  # what ptrace-trace fetches where the probe itself names nothing (a marker: its 3)
COUNTERS = {"kernel", "ptrace", "ptrace-jump"}  # the tools that are `uprobes count`
RUN_TIMEOUT = 300


class Failed(Exception):
    """A run that did not do what it should: the cell is reported FAILED with this reason."""


class Missing(Exception):
    """A tool that is not installed, or cannot run here (not root): the cell is reported as such."""


# -- running things ------------------------------------------------------------------------------------------


def _run(command: list[str], timeout: float = RUN_TIMEOUT, **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``command`` to its end with stdout and stderr captured; its wall time in seconds and its result."""
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        raise Failed(f"timed out after {timeout:.0f} s: {shlex.join(command)[:300]}") from None
    return time.perf_counter() - start, result


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])[-400:]


def _check_status(result: subprocess.CompletedProcess, command: list[str]) -> None:
    if result.returncode != 0:
        raise Failed(f"exit status {result.returncode}: {_tail(result.stderr) or _tail(result.stdout)} "
                     f"[{shlex.join(command)[:200]}]")


def _check_target(stdout: str, n: int) -> None:
    """The target prints its iteration count on a line of its own."""
    if str(n) not in stdout.splitlines():
        raise Failed(f"the target did not report {n} iterations: {_tail(stdout)}")


def _check_count(seen: int, n: int, what: str) -> None:
    if seen != n:
        raise Failed(f"{what} counted {seen} hits for {n} iterations")


# -- the tools -----------------------------------------------------------------------------------------------


class HitCell:
    """One tool on one site: ``run(n)`` runs the target for n iterations under the tool, checks the count
    and returns the wall time. ``setup``/``teardown`` bracket all of a cell's runs (perf's probe definitions)."""

    def __init__(self, site: str, tool: str, workdir: Path) -> None:
        self.site, self.tool, self.workdir = site, tool, workdir
        self.spec = SITES[site]
        self.notes: list[str] = []
        self._perf_event: str | None = None
        self._duplicates = 0
        self.startup_s: float | None = None  # a run of 4 iterations, once calibration has measured it

    def _words(self, key: str) -> str:
        return self.spec[key].format(H=TARGET)

    def target(self, n: int) -> list[str]:
        return [str(TARGET), self.site, str(n)]

    def setup(self) -> None:
        if self.tool in NEEDS_ROOT and os.geteuid() != 0:
            raise Missing("needs root")
        needed = {"bpftrace": "bpftrace", "perf": "perf", "gdb": "gdb"}.get(self.tool)
        if needed and shutil.which(needed) is None:
            raise Missing(f"{needed} is not installed (make bench installs it)")
        if self.tool == "gdb" and self.spec["gdb"] is None:
            raise Missing("n/a: gdb has no breakpoint on a function's return (dprintf needs a location)")
        if self.tool == "gdb":
            script = self.workdir / f"gdb-{self.site}.gdb"
            script.write_text("set pagination off\nset confirm off\nset debuginfod enabled off\n"
                              f"{self.spec['gdb']}\nrun\n")
            self._gdb_script = script
        if self.tool == "perf":
            self._perf_setup()

    def _perf_setup(self) -> None:
        self._perf_cleanup()
        if self.site == "usdt":
            # perf's SDT support: the binary goes into perf's build-id cache, then `perf probe sdt_PROVIDER:NAME`.
            subprocess.run(["perf", "buildid-cache", "--purge", str(TARGET)], capture_output=True)
            _, added = _run(["perf", "buildid-cache", "-a", str(TARGET)])
            _check_status(added, ["perf", "buildid-cache", "-a", str(TARGET)])
            command = ["perf", "probe", "-a", self.spec["perf"]]
        else:
            command = ["perf", "probe", "-x", str(TARGET), "-a", self.spec["perf"]]
        _, result = _run(command)
        _check_status(result, command)
        events = re.findall(r"^\s+(\S+:\S+)\s+\(on ", result.stdout + result.stderr, re.M)
        if not events:
            raise Failed(f"perf probe added no event: {_tail(result.stderr)}")
        self._perf_event = events[0]
        self._perf_data = self.workdir / f"perf-{self.site}.data"

    def _perf_cleanup(self) -> None:
        group = "sdt_bench" if self.site == "usdt" else "bench_hits"
        subprocess.run(["perf", "probe", "-q", "-d", f"{group}:*"], capture_output=True)

    def teardown(self) -> None:
        if self.tool == "perf" and shutil.which("perf") and os.geteuid() == 0:
            self._perf_cleanup()
        if self._duplicates:
            self.notes.append(f"perf record wrote {self._duplicates} duplicate samples (same thread, same "
                              f"nanosecond) over all runs; each counted once")

    def command(self, n: int) -> list[str]:
        target = self.target(n)
        if self.tool == "baseline":
            return target
        if self.tool in COUNTERS:
            engine, *options = {"kernel": ["kernel"], "ptrace": ["ptrace", "--trap"],
                                "ptrace-jump": ["ptrace"]}[self.tool]
            return [*UPROBES, "count", "--engine", engine, *options, "--json", "-o", str(self.workdir / "count.jsonl"),
                    self._words("uprobes"), "--", *target]
        if self.tool in ("ptrace-py", "ptrace-py-stop"):
            stop = ["--stop"] if self.tool == "ptrace-py-stop" else []
            return [PY, str(BENCH / "pyhandler.py"), *stop, self._words("uprobes"), "--", *target]
        if self.tool in TRACERS:
            probe = self._words("uprobes") + ("" if self.site == "usdt" else f" {TRACED_ARGS}")
            return [*UPROBES, "trace", "--engine", TRACERS[self.tool], "--json", "-o", str(self.workdir / "trace.jsonl"),
                    probe, "--", *target]
        if self.tool == "bpftrace":
            return ["bpftrace", "-e", f"{self._words('bpftrace')} {{ @n = count(); }}", "-c", shlex.join(target)]
        if self.tool == "perf":
            # --no-bpf-event: without it perf's side-band thread, which polls with a 1 s timeout, holds perf
            # record's exit back by up to a second, so its wall time moves in steps of ~1 s and no slope holds.
            return ["perf", "record", "--no-bpf-event", "-q", "-e", self._perf_event, "-o", str(self._perf_data),
                    "--", *target]
        if self.tool == "gdb":
            return ["gdb", "-batch", "-nx", "-q", "-x", str(self._gdb_script), "--args", *target]
        raise ValueError(self.tool)

    def run(self, n: int) -> float:
        command = self.command(n)
        if self.tool in COUNTERS:
            (self.workdir / "count.jsonl").unlink(missing_ok=True)
        seconds, result = _run(command)
        _check_status(result, command)
        if self.tool in ("ptrace-jump", "ptrace-trace") and "0 of 1 probe points were jumps" in result.stderr \
                and not any("trapped" in note for note in self.notes):
            self.notes.append("trapped: " + _tail(result.stderr, 1))
        _check_target(result.stdout, n)
        _check_count(self._count(result), n, self.tool)
        if self.tool in TRACERS:  # the hits' cost in the target, not the tool's writing of the events
            return int(re.search(r"^elapsed_ns=(\d+)$", result.stdout, re.M)[1]) / 1e9
        return seconds

    def _count(self, result: subprocess.CompletedProcess) -> int:
        if self.tool == "baseline":
            return int(result.stdout.split()[0])
        if self.tool in COUNTERS:
            path = self.workdir / "count.jsonl"
            records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
            return sum(r.get("hits", 0) for r in records)
        if self.tool in ("ptrace-py", "ptrace-py-stop"):
            found = re.findall(r"^pyhandler: hits=(\d+)$", result.stderr, re.M)
            return int(found[-1]) if found else -1
        if self.tool == "ptrace-trace":  # events; a lost one (there should be none) is not counted
            with open(self.workdir / "trace.jsonl") as f:
                return sum(1 for line in f if line.startswith('{"probe"'))
        if self.tool == "kernel-trace":  # events and the records the kernel lost (its buffer full): each was a hit
            with open(self.workdir / "trace.jsonl") as f:
                return sum(1 if line.startswith('{"probe"') else json.loads(line).get("lost", 0) for line in f)
        if self.tool == "bpftrace":
            found = re.findall(r"^@n: (\d+)$", result.stdout, re.M)
            return int(found[-1]) if found else 0  # bpftrace prints no map at all when nothing hit
        if self.tool == "perf":
            command = ["perf", "script", "-i", str(self._perf_data), "-F", "tid,time", "--ns"]
            with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as script:
                samples = 0
                distinct = set()
                for line in script.stdout:
                    samples += 1
                    distinct.add(hash(line))
            if script.returncode != 0:
                raise Failed(f"perf script: exit status {script.returncode}")
            self._duplicates += samples - len(distinct)
            return len(distinct)
        if self.tool == "gdb":
            return sum(1 for line in result.stdout.splitlines() if line == "HIT")
        raise ValueError(self.tool)


TRACE_RATES = (25_000, 50_000, 100_000, 200_000, 400_000, 800_000, 1_200_000, 1_600_000, 3_200_000)
TRACE_ENGINES = ("kernel", "ptrace", "ptrace-trap")
_TRACE_LABELS = {"kernel": "kernel engine", "ptrace": "ptrace engine, jump probes", "ptrace-trap": "ptrace engine, --trap"}
TRACE_SECONDS = 2
# trace --stack against the same trace without it, per engine: the hits' cost in the target at a pace each
# keeps up with (every hit an event), from the time it spends between its sleeps.
STACK_COSTS = {"kernel": (("--engine", "kernel"), ("--engine", "kernel", "--stack")),
               "ptrace": (("--engine", "ptrace", "--trap"), ("--engine", "ptrace", "--stack"))}
STACK_RATE, STACK_HITS = 2_000, 6_000
UNWIND_TABLES = ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/bin/python3.11")
_TABLE_LOAD = """import sys, time
from uprobes.elf.objfile import ElfObject
obj = ElfObject.open(sys.argv[1])
began = time.perf_counter()
obj.unwind_table.row(obj.entry)
print(time.perf_counter() - began)
"""


def measure_trace(engine: str, workdir: Path, runs: int) -> dict:
    """`uprobes trace --json -o FILE` on the entry site, the target paced at rising rates for TRACE_SECONDS
    each: the highest rate at which every hit became an event (the median over ``runs`` ladders)."""
    if engine == "kernel" and os.geteuid() != 0:
        return {"status": "missing", "reason": "needs root"}
    ladders = []
    try:
        for _ in range(runs):
            ladders.append(_trace_ladder(engine, workdir))
    except Failed as why:
        return {"status": "failed", "reason": str(why), "ladders": ladders}
    sustained = sorted(max((rung["hits_per_s"] for rung in ladder if not rung["lost"]), default=0)
                       for ladder in ladders)
    if not sustained[-1]:
        return {"status": "failed", "reason": f"events lost at every rate: {ladders}", "ladders": ladders}
    return {"status": "ok", "events_per_s": statistics.median(sustained), "min": sustained[0], "max": sustained[-1],
            "ladders": ladders}


def _trace_ladder(engine: str, workdir: Path) -> list[dict]:
    """One run per rate of TRACE_RATES, up to the first that loses events or that the probed target
    cannot keep (it runs slower than 90% of the rate asked)."""
    out = workdir / "trace.jsonl"
    rungs = []
    for rate in TRACE_RATES:
        n = rate * TRACE_SECONDS
        out.unlink(missing_ok=True)
        engine_options = ["--engine", "ptrace", "--trap"] if engine == "ptrace-trap" else ["--engine", engine]
        command = [*UPROBES, "trace", *engine_options, "--json", "-o", str(out), f"uprobe:{TARGET}:site_entry",
                   "--", str(TARGET), "entry", str(n), str(rate)]
        _, result = _run(command)
        _check_status(result, command)
        _check_target(result.stdout, n)
        elapsed_s = int(re.search(r"^elapsed_ns=(\d+)$", result.stdout, re.M)[1]) / 1e9
        events = lost = 0
        with open(out) as f:
            for line in f:
                if line.startswith('{"lost"'):
                    lost = json.loads(line)["lost"]
                else:
                    events += 1
        if events + lost != n:
            raise Failed(f"trace at {rate:,} hits/s wrote {events:,} events and reported {lost:,} lost for {n:,} "
                         f"hits: some went missing without a word")
        rungs.append({"rate": rate, "hits_per_s": n / elapsed_s, "events": events, "lost": lost})
        if lost or n / elapsed_s < 0.9 * rate:
            break
    return rungs


def measure_stack_cost(engine: str, workdir: Path, runs: int) -> dict:
    """What ``trace --stack`` adds to a hit: the entry site traced at STACK_RATE hits/s with and without it,
    ``runs`` pairs; per hit, the target's time outside its sleeps (the median of the runs)."""
    if engine == "kernel" and os.geteuid() != 0:
        return {"status": "missing", "reason": "needs root"}
    out = workdir / "stack.jsonl"
    costs: dict[str, list[float]] = {"plain": [], "stack": []}
    try:
        for _ in range(runs):
            for kind, options in zip(costs, STACK_COSTS[engine]):
                out.unlink(missing_ok=True)
                command = [*UPROBES, "trace", *options, "--json", "-o", str(out), f"uprobe:{TARGET}:site_entry",
                           "--", str(TARGET), "entry", str(STACK_HITS), str(STACK_RATE)]
                _, result = _run(command)
                _check_status(result, command)
                _check_target(result.stdout, STACK_HITS)
                with open(out) as f:
                    events = [json.loads(line) for line in f if line.startswith('{"probe"')]
                if len(events) != STACK_HITS or (kind == "stack" and not all(e.get("stack") for e in events)):
                    raise Failed(f"{shlex.join(options)}: {len(events):,} events for {STACK_HITS:,} hits")
                costs[kind].append(int(re.search(r"^busy_ns=(\d+)$", result.stdout, re.M)[1]) / STACK_HITS)
    except Failed as why:
        return {"status": "failed", "reason": str(why)}
    plain, stack = (statistics.median(values) for values in costs.values())
    return {"status": "ok", "plain_ns": plain, "stack_ns": stack, "ratio": stack / plain,
            "depth": len(events[0]["stack"]), "runs": costs}


def measure_unwind_table(path: str, runs: int) -> dict:
    """How long an object's unwind table takes to be ready for the first lookup (a fresh process each run)."""
    seconds = []
    for _ in range(runs):
        _, result = _run([PY, "-c", _TABLE_LOAD, path])
        _check_status(result, [PY, "-c", "...", path])
        seconds.append(float(result.stdout))
    return {"status": "ok", "path": path, "s": statistics.median(seconds), "min_s": min(seconds),
            "max_s": max(seconds)}


# -- the slope -----------------------------------------------------------------------------------------------


def _round_n(n: float, n_max: int) -> int:
    n = max(400, min(n_max, n))
    digits = 10 ** max(0, len(str(int(n))) - 2)
    return max(400, int(round(n / digits) * digits) // 4 * 4)


def calibrate(cell: HitCell, span: float, n_max: int) -> tuple[int, float, list[str]]:
    """An N for which t(N) - t(N/4) is about ``span`` seconds, or half the tool's start-up time if that is
    longer (so that start-up jitter stays small beside it): grow n until a run takes clearly longer than one
    of 4 iterations, then scale. Returns N, the span aimed at, and a log."""
    log = []
    start = cell.startup_s = min(cell.run(4), cell.run(4))
    log.append(f"n=4: {start:.3f}s")
    span = max(span, start / 2)
    enough = max(span / 3, start / 4)
    n = 1000
    while True:
        t = cell.run(n)
        extra = t - start
        log.append(f"n={n}: {t:.3f}s")
        if extra >= enough or n >= n_max:
            break
        grow = 16 if extra <= enough / 30 else min(16.0, max(2.0, enough * 1.5 / extra))
        n = min(n_max, int(n * grow))
    per_hit = extra / n if extra > 0 else span / n_max
    return _round_n(span / (0.75 * per_hit), n_max), span, log


def measure(cell: HitCell, runs: int, span: float, n_max: int) -> dict:
    """The per-hit cost of ``cell``: a dict with status "ok", "failed" or "missing"."""
    try:
        cell.setup()
    except Missing as why:
        cell.teardown()
        return {"status": "missing", "reason": str(why)}
    except Failed as why:
        cell.teardown()
        return {"status": "failed", "reason": str(why)}
    started = time.perf_counter()
    try:
        n, aimed, log = calibrate(cell, span, n_max)
        quarter = n // 4
        t_quarter, t_full = [], []
        for _ in range(runs):
            t_quarter.append(cell.run(quarter))
            t_full.append(cell.run(n))
    except Failed as why:
        return {"status": "failed", "reason": str(why)}
    finally:
        cell.teardown()
    hits = n - quarter
    slopes = sorted((full - q) / hits * 1e9 for q, full in zip(t_quarter, t_full))
    ns = (statistics.median(t_full) - statistics.median(t_quarter)) / hits * 1e9
    if ns <= 0:
        return {"status": "failed", "reason": f"no positive slope: t(N/4) {statistics.median(t_quarter):.3f} s, "
                                              f"t(N) {statistics.median(t_full):.3f} s for N={n} (noise larger "
                                              f"than the hits' cost)", "t_n_s": t_full, "t_quarter_s": t_quarter}
    return {"status": "ok", "ns": ns, "span_s": aimed, "min_ns": slopes[0], "max_ns": slopes[-1],
            "spread_pct": (slopes[-1] - slopes[0]) / 2 / ns * 100 if ns > 0 else None,
            "n": n, "runs": runs, "t_n_s": t_full, "t_quarter_s": t_quarter, "calibration": log,
            "seconds": time.perf_counter() - started, "notes": cell.notes}


# -- the other measurements ----------------------------------------------------------------------------------


def _sleeper() -> subprocess.Popen:
    sleeper = subprocess.Popen([str(TARGET), "sleep"], stdout=subprocess.PIPE, text=True)
    sleeper.stdout.readline()  # its pid: it is running
    return sleeper


def measure_insert(engine: str, count: int, probe_file: Path, runs: int) -> dict:
    """Insert then remove ``count`` probes (libc instructions) in a running process, ``runs`` times."""
    if engine == "kernel" and os.geteuid() != 0:
        return {"status": "missing", "reason": "needs root"}
    results = []
    for _ in range(runs):
        sleeper = _sleeper()
        try:
            command = [PY, str(BENCH / "insert.py"), "--engine", engine, "--pid", str(sleeper.pid),
                       "--probes", str(probe_file)]
            seconds, result = _run(command, timeout=600)
            if result.returncode != 0:
                return {"status": "failed", "reason": _tail(result.stderr, 2)}
            record = json.loads(result.stdout)
            if sleeper.poll() is not None:
                return {"status": "failed", "reason": f"the target died (status {sleeper.returncode})"}
        finally:
            sleeper.kill()
            sleeper.wait()
        if (record["probe_points"] != count or not set(record["bytes_attached"]) <= {0xCC, 0xE9}  # int3, jmp
                or record["bytes_after_close"] != record["bytes_original"]):
            return {"status": "failed", "reason": f"not every probe placed and removed: {record}"}
        record["wall_s"] = seconds
        results.append(record)
    figure = {key: statistics.median(r[key] for r in results) for key in ("resolve_s", "attach_s", "close_s",
                                                                          "vm_hwm_kb")}
    spread = {key: [min(r[key] for r in results), max(r[key] for r in results)] for key in figure}
    return {"status": "ok", "probes": count, **figure, "range": spread, "runs": results}


def measure_command(command: list[str], runs: int) -> tuple[dict, str]:
    """Wall time of a whole uprobes command (interpreter start-up included), after one run that warms the page
    cache; and what that first run printed."""
    _, result = _run(command)
    if result.returncode != 0:
        return {"status": "failed", "reason": _tail(result.stderr)}, ""
    times = []
    for _ in range(runs):
        seconds, again = _run(command)
        if again.returncode != 0:
            return {"status": "failed", "reason": _tail(again.stderr)}, ""
        times.append(seconds)
    return {"status": "ok", "s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": runs}, \
        result.stdout


def measure_list(path: str | None, runs: int) -> dict:
    if path is None or not os.path.exists(path):
        return {"status": "missing", "reason": f"{path or 'libjvm.so'} not found"}
    record, printed = measure_command([*UPROBES, "list", path, "--json"], runs)
    if record["status"] != "ok":
        return record
    listing = json.loads(printed)
    return record | {"path": path, "functions": len(listing["functions"]),
                     "marker_sites": sum(len(m["sites"]) for m in listing["markers"]), "size_bytes": os.path.getsize(path)}


def measure_dwarf(runs: int) -> dict[str, dict]:
    """How long libc's DWARF (libc6-dbg's debug file) takes to answer: a function's variables, its lines, and
    a probe on one of those lines with a variable, each a whole command."""
    libc = UNWIND_TABLES[0]
    lines_record, printed = measure_command([*UPROBES, "list", "--lines", "--json", libc, "malloc"], runs)
    results = {"list --lines libc malloc": lines_record}
    if lines_record["status"] != "ok":
        return results
    listing = json.loads(printed)
    line = [entry["line"] for entry in listing["lines"] if entry["code"]][2]
    base = os.path.basename(listing["file"])
    results["list --vars libc malloc"] = measure_command([*UPROBES, "list", "--vars", libc, "malloc"], runs)[0]
    results[f"resolve 'uprobe:libc:{base}:{line} bytes'"] = measure_command(
        [*UPROBES, "resolve", f"uprobe:{libc}:{base}:{line} bytes"], runs)[0]
    return results


def measure_rss(engine: str, probe_file: Path, workdir: Path) -> dict:
    """Peak RSS (VmHWM) of `uprobes count -p PID -d 1` holding every probe of ``probe_file``."""
    if engine == "kernel" and os.geteuid() != 0:
        return {"status": "missing", "reason": "needs root"}
    texts = probe_file.read_text().split()
    out = workdir / "rss.jsonl"
    sleeper = _sleeper()
    try:
        command = [*UPROBES, "count", "--engine", engine, "-p", str(sleeper.pid), "-d", "1", "--json", "-o", str(out),
                   *texts]
        started = time.perf_counter()
        errors = open(workdir / "rss.err", "w+")
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, text=True)
        hwm_kb = 0
        # VmHWM of the running process: the child's ru_maxrss would also count this process's memory, which a
        # forked child holds until its exec (and exec keeps that high-water mark).
        while child.poll() is None:
            hwm_kb = max(hwm_kb, _vm_hwm_kb(child.pid) or 0)
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        errors.seek(0)
        stderr = errors.read()
        errors.close()
    finally:
        sleeper.kill()
        sleeper.wait()
    if child.returncode != 0:
        return {"status": "failed", "reason": f"exit status {child.returncode}: {_tail(stderr, 2)}"}
    records = out.read_text().splitlines() if out.exists() else []
    if len(records) != len(texts):
        return {"status": "failed", "reason": f"{len(records)} count records for {len(texts)} probes"}
    return {"status": "ok", "probes": len(texts), "vm_hwm_kb": hwm_kb, "wall_s": seconds}


def _vm_hwm_kb(pid: int) -> int | None:
    from uprobes.proc.status import status_field

    value = status_field(f"/proc/{pid}/status", "VmHWM")
    return None if value is None else int(value.split()[0])


# -- machine, table ------------------------------------------------------------------------------------------


def _first_line(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (result.stdout or result.stderr).strip().splitlines()[0] if (result.stdout or result.stderr).strip() else None


def machine() -> dict:
    info: dict[str, str] = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break  # the first CPU's fields are enough
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    cpu = info.get("model name")
    if "cpu family" in info:  # a VM may show a bare "AMD EPYC": family and model tell the generation
        cpu = f"{cpu} (family {info['cpu family']}, model {info.get('model')})"
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    virt = _first_line(["systemd-detect-virt", "--vm"])
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "debian": debian, "virtualization": virt,
            "python": platform.python_version(), "loadavg_at_start": os.getloadavg(),
            "tools": {"bpftrace": _first_line(["bpftrace", "--version"]), "perf": _first_line(["perf", "--version"]),
                      "gdb": _first_line(["gdb", "--version"])}}


def _fmt_ns(ns: float) -> str:
    return f"{ns:,.1f}" if ns < 100 else f"{ns:,.0f}"


def _cell_text(cell: dict | None, with_ratio: bool) -> str:
    if cell is None:
        return "—"
    if cell["status"] == "missing":
        return "n/a" if cell["reason"].startswith("n/a") else "missing"
    if cell["status"] == "failed":
        return "FAILED"
    text = _fmt_ns(cell["ns"])
    if cell.get("spread_pct") is not None:
        text += f" ±{cell['spread_pct']:.0f}%"
    if with_ratio and cell.get("ratio_to_kernel") is not None:
        text += f" ({cell['ratio_to_kernel']:.2g}×)" if cell["ratio_to_kernel"] < 10 else f" ({cell['ratio_to_kernel']:.0f}×)"
    return text


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _outcome(record: dict, describe) -> str:
    """What a measurement found (``describe(record)``), or why it has no figure: FAILED/MISSING and the reason."""
    return describe(record) if record["status"] == "ok" else f"{record['status'].upper()}: {record['reason']}"


def table(results: dict) -> str:
    out = []
    hits = results["hits"]
    tools = [t for t in TOOLS if any(t in hits.get(s, {}) for s in SITES)]
    if tools:
        out.append("Per-hit cost in ns: median of the slopes' runs, ±half their range, (× our kernel engine's cost "
                   "on the same site in this run)")
        out.append("")
        rows = []
        for site in SITES:
            if site not in hits:
                continue
            plan = results["sites"].get(site, {}).get("ptrace_plan", "")
            rows.append([f"{SITES[site]['label']} [{plan}]",
                         *(_cell_text(hits[site].get(t), with_ratio=t != "baseline") for t in tools)])
        out.append(_markdown(["site [ptrace engine's plan]", *(TOOLS[t] for t in tools)], rows))
    extra = []
    for key, record in sorted(results["insert"].items(), key=lambda kv: (kv[0].split("/")[0], int(kv[0].split("/")[1]))):
        engine, count = key.split("/")
        extra.append([f"insert + remove {int(count):,} probes ({engine} engine)", _outcome(record, lambda r: (
            f"insert {r['attach_s']:.3f} s, remove {r['close_s']:.3f} s (resolving the probe texts: "
            f"{r['resolve_s']:.2f} s; peak RSS {r['vm_hwm_kb'] / 1024:.0f} MiB)"))])
    for key, record in results["list"].items():
        what = (f"uprobes list --json {os.path.basename(record['path'])}" if record["status"] == "ok"
                else f"uprobes list {key}")
        extra.append([what, _outcome(record, lambda r: (
            f"{r['s']:.2f} s ({r['min_s']:.2f}–{r['max_s']:.2f}; {r['functions']:,} functions, "
            f"{r['marker_sites']} marker sites)"))])
    for engine, record in results["trace"].items():
        extra.append([f"uprobes trace --json -o FILE ({_TRACE_LABELS[engine]})", _outcome(record, lambda r: (
            f"{r['events_per_s']:,.0f} events/s with none lost ({r['min']:,.0f}–{r['max']:,.0f}; the target paced at "
            f"{', '.join(f'{rate:,}' for rate in TRACE_RATES)} hits/s, up to the first rate with a loss)"))])
    for what, record in results["dwarf"].items():
        extra.append([f"uprobes {what} (DWARF from libc6-dbg)", _outcome(record, lambda r: (
            f"{r['s']:.2f} s ({r['min_s']:.2f}–{r['max_s']:.2f}; includes interpreter start-up)"))])
    for name, record in results["tables"].items():
        extra.append([f"unwind table of {name}: ready for its first lookup", _outcome(record, lambda r: (
            f"{r['s'] * 1000:.1f} ms ({r['min_s'] * 1000:.1f}–{r['max_s'] * 1000:.1f})"))])
    for engine, record in results["stacks"].items():
        extra.append([f"trace --stack, a hit's cost in the target ({_TRACE_LABELS[engine if engine == 'kernel' else 'ptrace-trap']})",
                      _outcome(record, lambda r: (
                          f"{r['stack_ns']:,.0f} ns with its stack ({r['depth']} frames) against {r['plain_ns']:,.0f} "
                          f"ns without: {r['ratio']:.2f}× (the target paced at {STACK_RATE:,} hits/s, every hit an "
                          f"event)"))])
    for engine, record in results["rss"].items():
        extra.append([f"peak RSS of uprobes count -p PID holding {record.get('probes', 'many'):,} probes ({engine} "
                      f"engine)", _outcome(record, lambda r: (
                          f"{r['vm_hwm_kb'] / 1024:.0f} MiB (VmHWM; the run took {r['wall_s']:.1f} s)"))])
    if extra:
        out += ["", _markdown(["measurement", "result"], extra)]
    notes = [f"- {site}/{tool}: {cell['status'].upper()}: {cell['reason']}" for site, cells in hits.items()
             for tool, cell in cells.items() if cell["status"] != "ok"]
    notes += [f"- {site}/{tool}: {note}" for site, cells in hits.items() for tool, cell in cells.items()
              for note in cell.get("notes", ())]
    if notes:
        out += ["", *notes]
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------------------------


def _selected(key: str, only: list[str] | None) -> bool:
    return only is None or any(fnmatch.fnmatchcase(key, pattern) for pattern in only)


def _site_plans() -> dict:
    """What the ptrace engine's analysis does with each site's instruction (emulate / step; a jump if counted)."""
    from uprobes.engines.ptrace.jumps import site_for
    from uprobes.probes.resolve import resolve_text
    from uprobes.x86_64.analysis import analyze
    from uprobes.errors import UprobesError

    plans = {}
    for site, spec in SITES.items():
        text = spec["uprobes"].format(H=TARGET)
        try:
            probe = resolve_text(text)[0]
            with open(probe.path, "rb") as f:
                f.seek(probe.offset)
                plan = analyze(f.read(16), probe.offset)
        except (UprobesError, OSError) as exc:
            plans[site] = {"probe": text, "ptrace_plan": f"error: {exc}"}
            continue
        kind = plan.kind + (", boostable" if plan.kind == "step" and plan.boost_code is not None else "")
        if site == "ret":
            kind = f"entry {plan.kind} + int3 trampoline"
        if not isinstance(site_for(probe), str):
            kind += "; counted: a jump" + (" + return trampoline" if site == "ret" else "")
        plans[site] = {"probe": text, "instruction": plan.text, "ptrace_plan": kind}
    return plans


def _libjvm() -> str | None:
    found = sorted({os.path.realpath(p) for p in glob.glob("/usr/lib/jvm/*/lib/server/libjvm.so")})
    openjdk = [p for p in found if "openjdk" in p]
    return (openjdk or found or [None])[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 runs, short spans, fewer probes")
    parser.add_argument("--only", help="comma-separated globs: SITE/TOOL, insert/ENGINE, list/NAME, trace/ENGINE, "
                                       "stacks/ENGINE, tables/NAME, dwarf/libc, rss/ENGINE")
    parser.add_argument("--output", default=str(BENCH / "results.json"), help="where to write the results")
    parser.add_argument("--runs", type=int, help="runs per N (default 5, --quick 2)")
    parser.add_argument("--span", type=float, help="seconds of hits between t(N/4) and t(N) (default 0.6)")
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 5)
    span = args.span or (0.15 if args.quick else 0.6)
    only = [p.strip() for p in args.only.split(",")] if args.only else None
    insert_counts = (100, 1000) if args.quick else (1000, 10000)

    subprocess.run(["make", "-s", "-C", str(BENCH / "targets")], check=True)
    began = time.perf_counter()
    results: dict = {"machine": machine(), "settings": {"runs": runs, "span_s": span, "quick": args.quick,
                                                        "only": only, "command": shlex.join(sys.argv)},
                     "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "sites": _site_plans(), "hits": {}, "insert": {}, "list": {}, "dwarf": {}, "trace": {}, "stacks": {},
                     "tables": {}, "rss": {},
                     "failures": []}

    def note(key: str, record: dict) -> None:
        state = record["status"] if record["status"] != "ok" else _fmt_ns(record["ns"]) + " ns" \
            if "ns" in record else "ok"
        print(f"  {key:24} {state}{'' if record['status'] == 'ok' else ': ' + record['reason']}", file=sys.stderr,
              flush=True)
        if record["status"] == "failed":
            results["failures"].append({"what": key, "reason": record["reason"]})

    with tempfile.TemporaryDirectory(prefix="uprobes-bench-") as tmp:
        workdir = Path(tmp)
        print("per-hit cost:", file=sys.stderr)
        for site in SITES:
            for tool in TOOLS:
                key = f"{site}/{tool}"
                if not _selected(key, only):
                    continue
                record = measure(HitCell(site, tool, workdir), runs, span, N_MAX[tool])
                results["hits"].setdefault(site, {})[tool] = record
                note(key, record)
        for site, cells in results["hits"].items():
            for tool, cell in cells.items():
                kernel = cells.get(RATIO_TO.get(tool, "kernel"))
                if cell["status"] == "ok" and kernel and kernel["status"] == "ok" and tool != "baseline":
                    cell["ratio_to_kernel"] = cell["ns"] / kernel["ns"]

        wanted = [k for k in ("insert/ptrace", "insert/kernel", "rss/ptrace", "rss/kernel") if _selected(k, only)]
        if wanted:
            sys.path.insert(0, str(BENCH))
            from insert import instruction_probes

            probe_files = {}
            for count in insert_counts:
                probe_files[count] = workdir / f"probes-{count}.txt"
                probe_files[count].write_text("\n".join(instruction_probes(count)) + "\n")
        if any(_selected(f"insert/{e}", only) for e in ("ptrace", "kernel")):
            print("insert and remove:", file=sys.stderr)
        for engine in ("ptrace", "kernel"):
            if not _selected(f"insert/{engine}", only):
                continue
            for count in insert_counts:
                record = measure_insert(engine, count, probe_files[count], runs=3)
                results["insert"][f"{engine}/{count}"] = record
                note(f"insert/{engine}/{count}", record)
        if any(_selected(f"list/{n}", only) for n in ("libpython", "libjvm")):
            print("uprobes list:", file=sys.stderr)
        for name, path in (("libpython", LIBPYTHON), ("libjvm", _libjvm())):
            if _selected(f"list/{name}", only):
                results["list"][name] = measure_list(path, runs)
                note(f"list/{name}", results["list"][name])
        if _selected("dwarf/libc", only):
            print("DWARF:", file=sys.stderr)
            results["dwarf"] = measure_dwarf(runs)
            for what, record in results["dwarf"].items():
                note(f"dwarf/{what}", record)
        for section, title, engines, measure_engine in (("trace", "trace rate", TRACE_ENGINES, measure_trace),
                                                        ("stacks", "stack cost", STACK_COSTS, measure_stack_cost)):
            if any(_selected(f"{section}/{e}", only) for e in engines):
                print(f"{title}:", file=sys.stderr)
            for engine in engines:
                if _selected(f"{section}/{engine}", only):
                    results[section][engine] = measure_engine(engine, workdir, runs)
                    note(f"{section}/{engine}", results[section][engine])
        for path in UNWIND_TABLES:
            name = os.path.basename(path)
            if _selected(f"tables/{name}", only):
                results["tables"][name] = measure_unwind_table(path, runs)
                note(f"tables/{name}", results["tables"][name])
        if any(_selected(f"rss/{e}", only) for e in ("ptrace", "kernel")):
            print("peak RSS:", file=sys.stderr)
        for engine in ("ptrace", "kernel"):
            if not _selected(f"rss/{engine}", only):
                continue
            count = max(insert_counts)
            record = measure_rss(engine, probe_files[count], workdir)
            record.setdefault("probes", count)
            results["rss"][engine] = record
            note(f"rss/{engine}", record)

    results["duration_s"] = time.perf_counter() - began
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    output = Path(args.output)
    output.write_text(json.dumps(results, indent=1) + "\n")
    m = results["machine"]
    print(table(results))
    print(f"\n{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Linux {m['kernel']}, Debian {m['debian']}"
          f"{', ' + m['virtualization'] if m['virtualization'] else ''}; Python {m['python']}; "
          f"{m['tools']['bpftrace']}, {m['tools']['perf']}, {m['tools']['gdb']}")
    print(f"{results['duration_s']:.0f} s; load average {m['loadavg_at_start'][0]:.2f} at the start, "
          f"{m['loadavg_at_end'][0]:.2f} at the end; {len(results['failures'])} failed; written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

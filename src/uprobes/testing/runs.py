"""What a test sees of a program run under probes: its status and output, and every hit, with assertions whose
failures read well in pytest's report.

A run is ``uprobes trace --json`` in a child process (the test's own process never traces anything): the
program's stdout and stderr come back apart from the tool's messages, and the hits from the JSON records.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["ProbeHit", "ProbedRun", "run_probed", "attach_probed"]

_SHOWN = 5  # hits a failure message lists


@dataclass(frozen=True)
class ProbeHit:
    """One hit: the probe's name (``work``, ``work%return``, ``calls:step``), who hit it, when (CLOCK_MONOTONIC
    nanoseconds), its arguments and, for a return, the value returned."""

    probe: str
    pid: int
    tid: int
    comm: str
    time: int
    args: dict
    retval: int | None = None

    def __str__(self) -> str:
        args = " ".join(f"{name}={value!r}" for name, value in self.args.items())
        returned = f" retval={self.retval}" if self.probe.endswith("%return") else ""
        return f"{self.probe} (tid {self.tid}){' ' + args if args else ''}{returned}"


@dataclass
class ProbedRun:
    """A program run under probes. ``status``: its exit status (128 + N if signal N ended it; None for a
    process attached to); ``stdout`` and ``stderr``: its own output (bytes); ``messages``: the tool's lines."""

    status: int | None
    stdout: bytes
    stderr: bytes
    messages: list[str]
    all_hits: list[ProbeHit] = field(default_factory=list)
    lost: int = 0

    def hits(self, probe: str = "*") -> list[ProbeHit]:
        """The hits of the probes whose name matches ``probe`` (a name or a glob), in time order (so each
        thread's in the order it made them)."""
        return [hit for hit in self.all_hits if fnmatch.fnmatchcase(hit.probe, probe)]

    def count(self, probe: str = "*") -> int:
        """How many hits :meth:`hits` gives."""
        return len(self.hits(probe))

    def assert_called(self, probe: str, times: int | None = None, with_args: dict | None = None) -> None:
        """The probe was hit (``times`` times, if given; with ``with_args`` among its arguments, if given:
        then the hits with those arguments are counted)."""
        hits = self.hits(probe)
        matching = [hit for hit in hits if with_args is None or
                    all(hit.args.get(name) == value for name, value in with_args.items())]
        wanted = f"{times} time{'s' if times != 1 else ''}" if times is not None else "at least once"
        with_text = f" with {_args(with_args)}" if with_args else ""
        if (times is None and not matching) or (times is not None and len(matching) != times):
            raise AssertionError(f"{probe} was expected to be hit {wanted}{with_text}, and was hit "
                                 f"{len(matching)} time{'s' if len(matching) != 1 else ''}"
                                 f"{' so' if with_args else ''}{_seen(hits)}")

    def assert_not_called(self, probe: str) -> None:
        """The probe was never hit."""
        hits = self.hits(probe)
        if hits:
            raise AssertionError(f"{probe} was expected not to be hit, and was hit {len(hits)} "
                                 f"time{'s' if len(hits) != 1 else ''}{_seen(hits)}")

    def assert_order(self, *probes: str) -> None:
        """In every thread that hit the first probe, the first hit of each probe comes in this order."""
        threads = sorted({hit.tid for hit in self.hits(probes[0])})
        if not threads:
            raise AssertionError(f"{probes[0]} was expected to be hit first, and was never hit{_seen(self.all_hits)}")
        for tid in threads:
            firsts = []
            for probe in probes:
                first = next((hit for hit in self.hits(probe) if hit.tid == tid), None)
                if first is None:
                    raise AssertionError(f"{probe} was expected after {', '.join(probes[:probes.index(probe)])} "
                                         f"in thread {tid}, and was never hit there{_seen(self._of(tid))}")
                firsts.append(first)
            for before, after, name_before, name_after in zip(firsts, firsts[1:], probes, probes[1:]):
                if after.time < before.time:
                    raise AssertionError(f"{name_after} was expected after {name_before} in thread {tid}, and came "
                                         f"before it{_seen(self._of(tid))}")

    def _of(self, tid: int) -> list[ProbeHit]:
        return [hit for hit in self.all_hits if hit.tid == tid]


def _args(args: dict) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in args.items())


def _seen(hits: list[ProbeHit]) -> str:
    if not hits:
        return ""
    shown = "\n".join(f"  {hit}" for hit in hits[:_SHOWN])
    more = f"\n  ... and {len(hits) - _SHOWN} more" if len(hits) > _SHOWN else ""
    return f"; the hits seen:\n{shown}{more}"


def _command(engine: str, probes: tuple[str, ...], output: str) -> list[str]:
    return [sys.executable, "-m", "uprobes", "trace", "--engine", engine, "--json", "-o", output, *probes]


def _collect(output: str, status: int | None, stdout: bytes, stderr: bytes) -> ProbedRun:
    messages, own = [], []
    for line in stderr.decode(errors="replace").splitlines(keepends=True):
        (messages if line.startswith("uprobes: ") else own).append(line)
    hits, lost = [], 0
    if os.path.exists(output):
        with open(output, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if "probe" in record:
                    hits.append(ProbeHit(record["probe"], record["pid"], record["tid"], record["comm"],
                                         record["ts_ns"], record["args"], record.get("retval")))
                else:
                    lost = record.get("lost", 0)
    error = next((m for m in messages if m.startswith("uprobes: error: ")), None)
    if error is not None:
        raise RuntimeError(error.strip())
    return ProbedRun(status, stdout, "".join(own).encode(), [m.rstrip("\n") for m in messages], hits, lost)


def run_probed(argv: list[str], probes: tuple[str, ...], engine: str = "ptrace", timeout: float = 60) -> ProbedRun:
    """Run ``argv`` with ``probes`` in place before its first instruction, to its end."""
    with tempfile.TemporaryDirectory() as directory:
        output = os.path.join(directory, "hits.jsonl")
        proc = subprocess.run([*_command(engine, probes, output), "--", *argv], capture_output=True,
                              timeout=timeout)
        return _collect(output, proc.returncode, proc.stdout, proc.stderr)


@contextmanager
def attach_probed(pid: int, probes: tuple[str, ...], engine: str = "ptrace", timeout: float = 60
                  ) -> Iterator[ProbedRun]:
    """Probes in process ``pid`` while the block runs; the run's hits are there once it ends."""
    with tempfile.TemporaryDirectory() as directory:
        output = os.path.join(directory, "hits.jsonl")
        tracer = subprocess.Popen([*_command(engine, probes, output), "-p", str(pid)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        started = []
        for line in tracer.stderr:  # until the probes are in place (or the tool gave up)
            started.append(line)
            if re.match(rb"uprobes: \d+ probe points? attached", line) or line.startswith(b"uprobes: error: "):
                break
        run = ProbedRun(None, b"", b"", [])
        try:
            if tracer.poll() is not None or not started or b"attached" not in started[-1]:
                tracer.wait(timeout)
                raise RuntimeError(b"".join(started).decode(errors="replace").strip() or "uprobes ended")
            yield run
        finally:
            if tracer.poll() is None:
                tracer.send_signal(signal.SIGINT)
            stdout, rest = tracer.communicate(timeout=timeout)
            done = _collect(output, None, b"", b"".join(started) + rest)
            run.messages, run.all_hits, run.lost = done.messages, done.all_hits, done.lost

"""Shared fixtures: the C targets (built once per session by tests/targets/Makefile) and a CLI runner."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


TARGETS_DIR = Path(__file__).parent / "targets"
BUILD_DIR = TARGETS_DIR / "build"
TRACEFS = Path("/sys/kernel/tracing")


@pytest.fixture(scope="session")
def targets() -> Path:
    """Directory of the compiled test targets (demo, demo-nopie, libprobed.so, forms, ...)."""
    subprocess.run(["make", "-s", "-C", str(TARGETS_DIR)], check=True)
    return BUILD_DIR


@dataclass
class CliResult:
    status: int
    stdout: str
    stderr: str


def run_cli(*args: str, check: bool = False) -> CliResult:
    """Run ``python -m uprobes ARGS`` as a user would; assert nothing ever prints a traceback."""
    proc = subprocess.run([sys.executable, "-m", "uprobes", *args], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def run_json(command: str, *args: str, timeout: float = 300) -> tuple[list[dict], subprocess.CompletedProcess]:
    """Run ``uprobes COMMAND --json -o FILE ARGS`` (our records apart from the traced command's own output);
    return the records and the finished process, whose stdout is the command's."""
    out = Path(f"/tmp/uprobes-test-{os.getpid()}-{os.urandom(4).hex()}.jsonl")
    proc = subprocess.run([sys.executable, "-m", "uprobes", command, "--json", "-o", str(out), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    out.unlink(missing_ok=True)
    return records, proc


@pytest.fixture
def cli():
    return run_cli


def wait_until(condition: Callable[[], object], what: str, timeout: float = 120) -> None:
    """Until ``condition()`` holds: an event a test waits for instead of a time. ``timeout`` is a generous bound
    for a loaded machine (no figure depends on it); past it the test fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


class OutputLines:
    """A process's output stream read line by line in a thread as it comes: ``lines`` so far."""

    def __init__(self, stream, on_line: Callable[[str], None] | None = None) -> None:
        self.lines: list[str] = []
        self._on_line = on_line
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)
            if self._on_line:
                self._on_line(line)

    def closed(self, timeout: float = 120) -> str:
        """All of it, once every process that writes to it has closed it."""
        self._reader.join(timeout)
        assert not self._reader.is_alive(), f"the stream is still open: {''.join(self.lines)[-2000:]}"
        return "".join(self.lines)


class RunningTool:
    """``uprobes ARGS`` started in the background, what it writes read as it comes, so that a test waits for
    what it needs to see (attached, N events) instead of for a time: a slow machine only takes longer.
    ``stdout=False`` sends its standard output to /dev/null; ``stdin``: a descriptor it (and a command it runs)
    reads."""

    def __init__(self, *args: str, stdout: bool = True, stdin: int | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "uprobes", *args], text=True, stderr=subprocess.PIPE,
                                     stdout=subprocess.PIPE if stdout else subprocess.DEVNULL, stdin=stdin)
        self.attached = threading.Event()
        self.err = OutputLines(self.proc.stderr, lambda line: " attached (" in line and self.attached.set())
        self.out = OutputLines(self.proc.stdout) if stdout else None
        self._records: list[dict] = []

    def wait_for(self, condition: Callable[[], object], what: str, timeout: float = 120) -> None:
        """Until ``condition()`` holds; fails if the tool ends first."""
        def holds() -> object:
            assert self.proc.poll() is None or condition(), \
                f"uprobes ended ({self.proc.returncode}) before {what}: {''.join(self.err.lines)}"
            return condition()
        wait_until(holds, what, timeout)

    def wait_attached(self, timeout: float = 120) -> None:
        self.wait_for(self.attached.is_set, "its probes attached", timeout)

    def records(self) -> list[dict]:
        """The JSON records it has written to stdout so far (each line parsed once)."""
        self._records += [json.loads(line) for line in self.out.lines[len(self._records):]]
        return self._records

    def events(self) -> list[dict]:
        return [record for record in self.records() if "probe" in record]

    def ended(self, timeout: float = 120) -> tuple[str, str]:
        """Once it has ended and everything it wrote is read (a worker it forked included): stdout and stderr."""
        self.proc.wait(timeout)
        err = self.err.closed(timeout)
        return (self.out.closed(timeout) if self.out else ""), err

    def finish(self, signum: int | None = signal.SIGINT, timeout: float = 120) -> tuple[str, str]:
        """Send ``signum`` (None: none, it ends by itself), then :meth:`ended`; it printed no traceback."""
        if signum is not None:
            self.proc.send_signal(signum)
        out, err = self.ended(timeout)
        assert "Traceback" not in err, err
        return out, err

    def __enter__(self) -> RunningTool:
        return self

    def __exit__(self, *exc_info) -> None:
        """A test that failed midway still leaves nothing running (SIGINT: the tool detaches cleanly)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(params=["ptrace", "kernel"])
def engine(request, targets) -> str:
    """Each engine in turn: the kernel's only as root, with tracefs mounted (skipped otherwise). A test module
    may define its own."""
    if request.param == "kernel":
        request.getfixturevalue("tracefs")
    return request.param


@pytest.fixture(scope="session")
def tracefs() -> Path:
    """The mounted tracefs, mounting it if needed; skips when not root."""
    if os.geteuid() != 0:
        pytest.skip("writing uprobe_events needs root")
    if not (TRACEFS / "uprobe_events").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)
    return TRACEFS


def _group_of(definition: str) -> str:
    """The group of a uprobe_events line (``p:GROUP/EVENT PATH:OFFSET ...``)."""
    return definition.split()[0].split(":", 1)[1].split("/")[0]


def kernel_groups() -> set[str]:
    """The group of every uprobe event defined now, as uprobe_events lists them (anyone's)."""
    return {_group_of(line) for line in (TRACEFS / "uprobe_events").read_text().splitlines() if line.strip()}


def run_group_pid(group: str) -> int | None:
    """The pid a run's group is named after (the tool names them uprobes_<pid>_<start>_<n>); None for a group
    named otherwise, which no run of the tool makes."""
    match = re.fullmatch(r"uprobes_(\d+)(?:_\d+_\d+)?", group)
    return int(match[1]) if match else None


def run_groups_of(pids: set[int]) -> set[str]:
    """The groups defined now of the runs of processes ``pids`` (a tool and the worker it forked)."""
    return {group for group in kernel_groups() if run_group_pid(group) in pids}


def _of_another_live_run(group: str) -> bool:
    """Whether ``group`` is a run's of a process alive now that is not this one (another test session's)."""
    pid = run_group_pid(group)
    return pid not in (None, os.getpid()) and Path(f"/proc/{pid}").exists()


def definitions_since(before: str) -> list[str]:
    """The lines of uprobe_events now that were not in ``before`` (its text then), but those of another live
    process's runs."""
    lines = set(before.splitlines())
    return [line for line in (TRACEFS / "uprobe_events").read_text().splitlines()
            if line not in lines and not _of_another_live_run(_group_of(line))]


@contextmanager
def no_run_group_left_behind() -> Iterator[None]:
    """Around a test: afterwards, uprobe_events holds no run's group it did not hold before, but those of
    processes alive now that are not this one (another test session on this machine): a group the test left is
    caught whether its process has ended (a CLI run) or not (an engine run inside pytest). Read from tracefs
    itself, not judged by the tool's own stale_groups(); groups that were there before, and groups no run of
    the tool makes, are not the test's."""
    before = kernel_groups()
    yield
    appeared = {group for group in kernel_groups() - before if run_group_pid(group) is not None}
    assert {group for group in appeared if not _of_another_live_run(group)} == set()


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` now (a tool's worker: src/uprobes/cli/guard.py)."""
    children = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry))
    return children


NOBODY = 65534


def error_as_nobody(action) -> str:
    """Run ``action`` as uid/gid nobody in a forked child; return the message of the UprobesError it raised
    ("no error" if none, "unexpected ..." for any other exception, which the caller's assertion shows)."""
    from uprobes.errors import UprobesError

    if os.geteuid() != 0:
        pytest.skip("dropping to another user needs root")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()
            message = "no error"
        except UprobesError as exc:
            message = str(exc)
        except BaseException as exc:
            message = f"unexpected {type(exc).__name__}: {exc}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    return message


# A program that names itself (its comm, what --match matches), then calls getppid (or the os function the line
# names) as many times as each line on stdin says, printing "done" after each; with "traceme" first, its parent
# traces it (so no one else may).
_CALLER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if sys.argv[2:] == ["traceme"]:
    assert libc.ptrace(0, 0, None, None) == 0
libc.prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME
print("ready", flush=True)
for line in sys.stdin:
    n, function = (line.split() + ["getppid"])[:2]
    for _ in range(int(n)):
        getattr(os, function)()
    print("done", flush=True)
"""


class Caller:
    """A process of ``_CALLER``, named ``name`` (its comm): it makes the calls it is asked for, each time."""

    def __init__(self, name: str, *options: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _CALLER, name, *options], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n"

    def calls(self, n: int, function: str = "getppid") -> None:
        self.proc.stdin.write(f"{n} {function}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "done\n"

    def end(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(timeout=30)

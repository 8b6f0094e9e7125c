"""Shared fixtures: the C targets (built once per session by tests/targets/Makefile) and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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

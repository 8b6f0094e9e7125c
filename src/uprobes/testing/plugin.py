"""The pytest plugin, installed with the package (entry point ``pytest11``): the ``uprobes`` fixture.

    def test_work_is_called_once_per_item(uprobes):
        run = uprobes.run(["./calls", "5"], "uprobe:./calls:work i=%di:s32")
        assert run.status == 0
        run.assert_called("work", times=5)

The ptrace engine by default (no root, no eBPF: any CI); ``@pytest.mark.uprobes(engine="kernel")`` asks for
the kernel's (skipped without root). Where ptrace is not allowed (``kernel.yama.ptrace_scope``, a sandbox's
seccomp filter), tests using the fixture are skipped with the reason. Probes of Python code running in the
test's own interpreter are out of scope: the fixture probes programs the test starts.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from .runs import ProbedRun, attach_probed, run_probed

__all__ = ["Uprobes"]

_PTRACE_TRACEME = 0


class Uprobes:
    """What the ``uprobes`` fixture gives a test."""

    def __init__(self, engine: str) -> None:
        self.engine = engine

    def run(self, argv: list[str], *probes: str, engine: str | None = None, timeout: float = 60) -> ProbedRun:
        """Run ``argv`` to its end with ``probes`` in place from its first instruction."""
        return run_probed(list(argv), probes, engine or self.engine, timeout)

    @contextmanager
    def attach(self, pid: int, *probes: str, engine: str | None = None, timeout: float = 60
               ) -> Iterator[ProbedRun]:
        """Probe process ``pid`` (one the test started) while the ``with`` block runs; the hits are in the run
        once the block ends."""
        with attach_probed(pid, probes, engine or self.engine, timeout) as run:
            yield run


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "uprobes(engine): the engine the uprobes fixture uses (ptrace, kernel)")


@pytest.fixture
def uprobes(request) -> Uprobes:
    """Run programs under probes and assert what they did inside (:class:`Uprobes`)."""
    marker = request.node.get_closest_marker("uprobes")
    engine = marker.kwargs.get("engine", "ptrace") if marker else "ptrace"
    if engine not in ("ptrace", "kernel"):
        raise pytest.UsageError(f"@pytest.mark.uprobes(engine={engine!r}): the engines are ptrace and kernel")
    why = _kernel_refusal() if engine == "kernel" else _ptrace_refusal()
    if why:
        pytest.skip(why)
    return Uprobes(engine)


def _kernel_refusal() -> str | None:
    if os.geteuid() != 0:
        return "the kernel engine needs root"
    return None


@functools.cache
def _ptrace_refusal() -> str | None:
    """Why this process's children could not be traced, or None."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f.read().strip()
    except OSError:
        scope = "0"
    if scope == "3" or scope == "2" and os.geteuid() != 0:
        return f"ptrace is not allowed here: kernel.yama.ptrace_scope is {scope}"
    pid = os.fork()
    if pid == 0:  # a child asks to be traced: a seccomp filter that forbids ptrace says no
        libc = ctypes.CDLL(None, use_errno=True)
        os._exit(0 if libc.ptrace(_PTRACE_TRACEME, 0, None, None) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return "ptrace is not allowed here (a security policy refuses PTRACE_TRACEME)"
    return None

"""Refusals a non-root user meets are explained, not tracebacks: run in a forked child that drops to nobody."""

from __future__ import annotations

import os
import shutil

import pytest

from uprobes.elf.objfile import ElfObject
from uprobes.errors import UprobesError
from uprobes.proc.maps import read_maps

NOBODY = 65534


def _error_as_nobody(action) -> str:
    """Run ``action`` as uid/gid nobody in a child process; return the UprobesError message it raised."""
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
        except BaseException as exc:  # anything else is a bug the test must show
            message = f"unexpected {type(exc).__name__}: {exc}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    return message


def test_another_users_process_is_refused_with_the_reason():
    message = _error_as_nobody(lambda: read_maps(1))
    assert message == ("cannot read /proc/1/maps: permission denied (the process belongs to another user; "
                       "run as root or as its owner)")


def test_an_unreadable_file_is_refused_with_the_reason(targets, tmp_path):
    secret = tmp_path / "secret-demo"
    shutil.copy(targets / "demo", secret)
    os.chmod(secret, 0o600)
    os.chmod(tmp_path, 0o755)
    message = _error_as_nobody(lambda: ElfObject.open(str(secret)))
    assert message == f"{secret}: permission denied (run as a user who can read it)"

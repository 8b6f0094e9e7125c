"""Refusals a non-root user meets are explained, not tracebacks: run in a forked child that drops to nobody."""

from __future__ import annotations

import os
import shutil

from conftest import error_as_nobody
from uprobes.elf.objfile import ElfObject
from uprobes.proc.maps import read_maps

def test_another_users_process_is_refused_with_the_reason():
    message = error_as_nobody(lambda: read_maps(1))
    assert message == ("cannot read /proc/1/maps: permission denied (the process belongs to another user; "
                       "run as root or as its owner)")


def test_an_unreadable_file_is_refused_with_the_reason(targets, tmp_path):
    secret = tmp_path / "secret-demo"
    shutil.copy(targets / "demo", secret)
    os.chmod(secret, 0o600)
    os.chmod(tmp_path, 0o755)
    message = error_as_nobody(lambda: ElfObject.open(str(secret)))
    assert message == f"{secret}: permission denied (run as a user who can read it)"

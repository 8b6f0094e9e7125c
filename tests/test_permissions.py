"""Refusals a non-root user meets are explained, not tracebacks: run in a forked child that drops to nobody."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import error_as_nobody
from uprobes.elf.objfile import ElfObject
from uprobes.proc.maps import read_maps

def test_another_users_process_is_refused_with_the_reason():
    message = error_as_nobody(lambda: read_maps(1))
    assert message == ("cannot read /proc/1/maps: permission denied (the process belongs to another user; "
                       "run as root or as its owner)")


def test_a_process_of_ours_that_is_not_dumpable_is_refused_with_the_reason():
    """nobody's own process, made non-dumpable with prctl: the owner matches, so the reason is dumpability."""
    code = "import ctypes, time; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); print('ready', flush=True); time.sleep(60)"
    target = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               "/usr/bin/python3.11", "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout.readline() == "ready\n"
        message = error_as_nobody(lambda: read_maps(target.pid))
        assert f"process {target.pid} is yours but not dumpable" in message
    finally:
        target.kill()
        target.wait()


def test_an_unreadable_file_is_refused_with_the_reason(targets, public_dir):
    secret = public_dir / "secret-demo"
    shutil.copy(targets / "demo", secret)
    os.chmod(secret, 0o600)
    message = error_as_nobody(lambda: ElfObject.open(str(secret)))
    assert message == f"{secret}: permission denied (run as a user who can read it)"


@pytest.fixture
def public_dir():
    """A directory every user can reach (pytest's own tmp_path is under a root-only directory)."""
    path = Path(tempfile.mkdtemp(prefix="uprobes-perm-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_a_setuid_or_setgid_command_is_refused_when_not_root(targets, public_dir):
    """Under ptrace by a user, the kernel would exec it without its privileges: it would not behave as it does."""
    from uprobes.proc.launch import HeldCommand

    for bit, word in ((0o4755, "setuid"), (0o2755, "setgid")):
        program = public_dir / f"demo-{word}"
        shutil.copy(targets / "demo", program)
        os.chmod(program, bit)
        message = error_as_nobody(lambda: HeldCommand([str(program), "1"], ptraced_by_user=True))
        assert message == (f"{program} is {word}: traced by a user who is not root, the kernel would run it "
                           f"without those privileges; run as root (or use the kernel engine, as root)")
    message = error_as_nobody(lambda: HeldCommand(["/usr/bin/passwd", "-S"], ptraced_by_user=True))
    assert message.startswith("/usr/bin/passwd is setuid: ")


def test_the_cli_refuses_a_setuid_command_for_the_ptrace_engine_as_a_user(targets, public_dir):
    import subprocess
    import sys

    import uprobes

    package = Path(uprobes.__file__).resolve().parent
    if any(not folder.stat().st_mode & 0o001 for folder in [package, *package.parents]):
        pytest.skip("nobody cannot reach this checkout (a folder on its path is closed to other users)")
    program = public_dir / "demo-setuid"
    shutil.copy(targets / "demo", program)
    os.chmod(program, 0o4755)
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    proc = subprocess.run([*as_nobody, sys.executable, "-m", "uprobes", "trace", "--engine", "ptrace",
                           f"uprobe:{program}:price_of", "--", str(program), "1"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"uprobes: error: {program} is setuid: traced by a user who is not root, the kernel would " \
                          f"run it without those privileges; run as root (or use the kernel engine, as root)\n"


def test_system_wide_without_root_says_what_would_work():
    import uprobes.engines.kernel.engine  # noqa: F401  (imported as root: nobody may not read the interpreter's files)
    from uprobes.cli.tracing import _engine

    message = error_as_nobody(lambda: _engine("auto", system_wide=True))
    assert message.startswith("the kernel engine needs root")
    assert message.endswith("with -p PID or a command (system-wide tracing needs the kernel engine)")

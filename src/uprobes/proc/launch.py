"""Starting a command that waits, between fork and exec, until the tracer has its probes in place."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import time

from ..errors import UprobesError

__all__ = ["HeldCommand", "exit_status"]


class HeldCommand:
    """A child process forked for ``argv`` and held before ``exec`` until :meth:`release`.

    Its stdin, stdout and stderr are ours, untouched. Its pid is known while it is held, so a tracer can
    attach to it before the program's first instruction.
    """

    def __init__(self, argv: list[str], ptraced_by_user: bool = False, signal_mask: set | None = None) -> None:
        """``ptraced_by_user``: a tracer without root will ptrace it, so a program that gains privileges at
        exec is refused (the kernel would run it without them, and it would not behave as it does).
        ``signal_mask``: the signals it runs with blocked (the caller's own mask may block more meanwhile)."""
        if not argv:
            raise UprobesError("no command to run")
        program = shutil.which(argv[0])
        if program is None:
            raise UprobesError(_not_runnable(argv[0]))
        if ptraced_by_user:
            _refuse_privileged(program)
        read_end, self._release_fd = os.pipe()
        # subprocess.Popen waits for the exec, so a child held before it is forked by hand.
        self.pid = os.fork()
        if self.pid == 0:  # the child: wait for the tracer, then become the command
            try:
                os.close(self._release_fd)
                if os.read(read_end, 1):
                    os.close(read_end)
                    if signal_mask is not None:
                        signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)
                    os.execvp(argv[0], argv)
            except OSError as exc:
                os.write(2, f"uprobes: cannot run {argv[0]}: {exc.strerror}\n".encode())
            os._exit(127)
        os.close(read_end)
        self.returncode: int | None = None
        # While a tracer in this process traces the child, waiting here would take its ptrace stops
        # (the kernel reports them to the tracing thread whatever the flags); the tracer sets returncode.
        self.traced = False

    def release(self) -> None:
        """Let the child exec its program."""
        if self._release_fd is not None:
            os.write(self._release_fd, b"x")
            os.close(self._release_fd)
            self._release_fd = None

    def poll(self) -> int | None:
        """The exit status (see :func:`exit_status`) once the child has ended, else None."""
        if self.returncode is None and not self.traced:
            self._reap(os.WNOHANG)
        return None if self.returncode is None else exit_status(self.returncode)

    def wait(self) -> int:
        if self.returncode is None:
            self._reap(0)
        return exit_status(self.returncode) if self.returncode is not None else 0

    def _reap(self, flags: int) -> None:
        # waitid with WEXITED only: a traced child's ptrace stops are its tracer's business, not ours.
        try:
            result = os.waitid(os.P_PID, self.pid, os.WEXITED | flags)
        except ChildProcessError:  # reaped by a tracer of ours, which reports the status itself
            return
        if result is not None:
            exited = result.si_code == os.CLD_EXITED
            self.returncode = result.si_status if exited else -result.si_status

    def stop(self, grace: float = 0.0) -> None:
        """Unblock the child without letting it run the command, or terminate the command if it still runs
        after ``grace`` seconds (a Ctrl-C reaches the command too, and ends it by itself)."""
        if self._release_fd is not None:
            os.close(self._release_fd)  # the child reads EOF and exits without exec
            self._release_fd = None
            return
        deadline = time.monotonic() + grace
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # reaped by a tracer meanwhile; it knows the status


def _not_runnable(name: str) -> str:
    """Why ``name`` cannot be run: it is a directory, not executable, or found nowhere."""
    if "/" in name and os.path.isdir(name):
        return f"{name} is a directory, not a command"
    if "/" in name and os.path.exists(name):
        return f"{name} is not executable (chmod +x it, or run it with its interpreter)"
    return f"command not found: {name}"


def _refuse_privileged(program: str) -> None:
    try:
        mode = os.stat(program).st_mode
        capabilities = _file_capabilities(program)
    except OSError:
        return  # exec will say what is wrong
    gains = [what for what, present in (("setuid", mode & stat.S_ISUID), ("setgid", mode & stat.S_ISGID),
                                        ("given file capabilities", capabilities)) if present]
    if gains:
        raise UprobesError(f"{program} is {' and '.join(gains)}: traced by a user who is not root, the kernel would "
                           f"run it without those privileges; run as root (or use the kernel engine, as root)")


def _file_capabilities(path: str) -> bool:
    try:
        return bool(os.getxattr(path, "security.capability"))
    except OSError:
        return False  # no such attribute, or no xattr support


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: its exit code, or 128 + the signal that killed it."""
    return 128 - returncode if returncode < 0 else returncode

"""Starting a command that waits, between fork and exec, until the tracer has its probes in place."""

from __future__ import annotations

import os
import shutil
import signal

from ..errors import UprobesError

__all__ = ["HeldCommand", "exit_status"]


class HeldCommand:
    """A child process forked for ``argv`` and held before ``exec`` until :meth:`release`.

    Its stdin, stdout and stderr are ours, untouched. Its pid is known while it is held, so a tracer can
    attach to it before the program's first instruction.
    """

    def __init__(self, argv: list[str]) -> None:
        if not argv:
            raise UprobesError("no command to run")
        if shutil.which(argv[0]) is None:
            raise UprobesError(f"command not found: {argv[0]}")
        read_end, self._release_fd = os.pipe()
        # subprocess.Popen waits for the exec, so a child held before it is forked by hand.
        self.pid = os.fork()
        if self.pid == 0:  # the child: wait for the tracer, then become the command
            try:
                os.close(self._release_fd)
                if os.read(read_end, 1):
                    os.close(read_end)
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

    def stop(self) -> None:
        """Unblock the child without letting it run the command, or terminate the command if it runs."""
        if self._release_fd is not None:
            os.close(self._release_fd)  # the child reads EOF and exits without exec
            self._release_fd = None
        elif self.poll() is None:
            os.kill(self.pid, signal.SIGTERM)


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: its exit code, or 128 + the signal that killed it."""
    return 128 - returncode if returncode < 0 else returncode

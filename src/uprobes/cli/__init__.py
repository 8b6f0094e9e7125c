"""The ``uprobes`` command line."""

import signal as _signal


def _quit_while_loading(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# A stop signal that comes while the command is still loading ends it quietly (nothing is attached yet, and a
# KeyboardInterrupt traceback out of an import would only alarm); main() and each run put their own handlers.
for _signum in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
    _signal.signal(_signum, _quit_while_loading)

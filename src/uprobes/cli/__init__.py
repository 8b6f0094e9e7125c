"""The ``uprobes`` command line."""

import os as _os
import signal as _signal


def _quit_while_loading(signum: int, frame: object) -> None:
    # Nothing is attached or written yet. Raising here instead (SystemExit, KeyboardInterrupt) can land in an
    # import lock's callback or a class's __set_name__ and turn into another error, or a deadlock: both seen
    # in the kill trials.
    _os._exit(128 + signum)


STOP_SIGNALS = frozenset({_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP})
"""What stops a run cleanly: Ctrl-C, ``kill``, a closed terminal."""

# A stop signal that comes while the command is still loading ends it at once; main() and each run put their
# own handlers in place.
for _signum in STOP_SIGNALS:
    _signal.signal(_signum, _quit_while_loading)

"""``python -m uprobes``."""

import signal
import sys

# Before anything else loads: a stop signal while the command loads ends it quietly (see uprobes.cli).
for _signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(_signum, lambda signum, frame: sys.exit(128 + signum))

from .cli.main import main  # noqa: E402

sys.exit(main())

"""``uprobes serve``: the probes' counts and call durations as a Prometheus exporter, for as long as it runs."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from contextlib import ExitStack

from ..errors import UprobesError
from ..output.columns import EventColumns
from ..proc.status import thread_comm
from . import STOP_SIGNALS
from .tracing import POLL_SECONDS, Run, check_names, key_names

__all__ = ["run_serve", "listen_address"]

_LABEL = re.compile(r"(?!__)[A-Za-z_][A-Za-z0-9_]*")


def listen_address(text: str) -> tuple[str, int]:
    """``--listen ADDR:PORT`` (``:PORT`` for every address), as argparse's type."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--listen takes ADDR:PORT (127.0.0.1:9930, :9930), not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def run_serve(args: argparse.Namespace) -> int:
    """Run the probes and serve their metrics on ``--listen`` until a stop signal (or ``-d``); the target
    ending leaves what was counted served, with ``uprobes_target_up`` 0."""
    from prometheus_client import CollectorRegistry, start_http_server

    from ..output.prometheus import ProbeMetrics, label_name

    keys = key_names(args.by, "--by")
    if not args.words and not args.latency:
        raise UprobesError("serve needs probes to count (PROBE...) or functions to time (--latency FUNCTION)")
    labels = ["probe", "path"]
    for key in keys:
        label = label_name(key)
        if label in labels:
            raise UprobesError(f"--by {key}: a label '{label}' is there already (probe and path are labels of their "
                               f"own); name the argument otherwise ({label}2=...)")
        if not _LABEL.fullmatch(label):
            raise UprobesError(f"--by {key}: Prometheus labels are ASCII letters, digits and _, not starting with "
                               f"__; name the argument otherwise")
        labels.append(label)
    host, port = args.listen
    registry = CollectorRegistry(auto_describe=False)
    # The server's thread must not take the signals the run waits for (SIGCHLD) or holds back (stop signals):
    # a thread starts with the mask of the one that made it.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS | {signal.SIGCHLD})
    try:
        server, _ = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise UprobesError(f"cannot serve on {host}:{port}: {exc.strerror}") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    with ExitStack() as stack:
        stack.callback(server.shutdown)
        run = Run(args, stack, counting=not keys and not args.latency,
                  check=lambda probes: check_names(probes, keys, "--by"),
                  timed=tuple(dict.fromkeys(args.latency or ())))
        metrics = ProbeMetrics([p.name for p in run.probes], [p.path for p in run.probes], keys, run.timed,
                               _target(run), args.max_series)
        metrics.placed, metrics.up = len(run.probes), 1
        registry.register(metrics)
        print(f"uprobes: serving metrics on http://{host}:{port}/metrics", file=sys.stderr, flush=True)
        try:
            run.go()
            while True:
                finished = run.finished()
                metrics.add(run.poll_columns(0 if finished else POLL_SECONDS))
                if run.counting:
                    metrics.set_hits(run.hit_counts())
                metrics.lost = run.engine.lost
                if finished:
                    break
            expired = run.deadline is not None and time.monotonic() >= run.deadline
            run.end_command()
            run.engine.close()
            metrics.add(EventColumns(single=run.judged(run.engine.leftover())))
            with metrics.lock:
                metrics.up, metrics.placed, metrics.lost = 0, 0, run.engine.lost
            if run.counting:
                metrics.set_hits(run.hit_counts())
            if not expired:
                print("uprobes: the target has ended; serving what was counted until stopped", file=sys.stderr,
                      flush=True)
                while run.deadline is None or time.monotonic() < run.deadline:
                    time.sleep(POLL_SECONDS)
        except KeyboardInterrupt as stop:
            run.interrupted(stop)  # a command still running is stopped
        run.engine.close()
        return 0  # a stop signal is how a server ends


def _target(run: Run) -> str:
    """The target as a label that outlives a restart: the command's name, the process's, or every process."""
    if run.command:
        return os.path.basename(run.command[0])
    if run.pid is not None:
        return thread_comm(run.pid, run.pid) or f"pid {run.pid}"
    return "every process"

"""``uprobes serve``: the probes' counts and call durations for Prometheus (served) and OpenTelemetry (pushed
over OTLP), for as long as it runs."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
import urllib.parse
from contextlib import ExitStack, contextmanager

from ..errors import UprobesError
from ..output.columns import EventColumns
from ..proc.matching import matching_processes
from ..proc.status import has_ended, start_time, thread_comm
from . import STOP_SIGNALS
from .tracing import POLL_SECONDS, Run, check_integer, check_names, key_names, launches_command

__all__ = ["run_serve", "listen_address", "otlp_url"]

_LABEL = re.compile(r"(?!__)[A-Za-z_][A-Za-z0-9_]*")
_DEFAULT_LISTEN = "127.0.0.1:9930"
_SCAN_SECONDS = 0.5  # how often --match looks for new processes


def listen_address(text: str) -> tuple[str, int]:
    """``--listen ADDR:PORT`` (``:PORT`` for every address), as argparse's type."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--listen takes ADDR:PORT (127.0.0.1:9930, :9930), not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def otlp_url(text: str) -> str:
    """``--otlp URL``: an http(s) URL of an OTLP/HTTP receiver, as argparse's type; without a path, the
    protocol's own for metrics (``/v1/metrics``)."""
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise argparse.ArgumentTypeError(f"--otlp takes the URL of an OTLP/HTTP receiver "
                                         f"(http://collector:4318/v1/metrics), not {text!r}")
    return text if parsed.path not in ("", "/") else urllib.parse.urlunsplit(parsed._replace(path="/v1/metrics"))


@contextmanager
def _threads_without_signals():
    """Threads started here never take the signals the run waits for (SIGCHLD) or holds back (stop signals): a
    thread starts with the signal mask of the one that made it."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS | {signal.SIGCHLD})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def run_serve(args: argparse.Namespace) -> int:
    """Run the probes and export their metrics (served on ``--listen``, pushed to ``--otlp``) until a stop signal
    (or ``-d``); the target ending leaves what was counted served, with ``uprobes_target_up`` 0. SIGHUP reads
    the ``--config`` file again and runs its probes, the series that stay going on from their values."""
    from prometheus_client import CollectorRegistry, start_http_server

    from ..output.metrics import ProbeMetrics
    from ..output.otlp import OtlpPush, redacted

    _check_options(args)
    listen = args.listen or (None if args.otlp else listen_address(_DEFAULT_LISTEN))
    registry = CollectorRegistry(auto_describe=False)
    with ExitStack() as stack:
        if listen is not None:
            host, port = listen
            try:
                with _threads_without_signals():
                    server, _ = start_http_server(port, host, registry=registry)
            except OSError as exc:
                raise UprobesError(f"cannot serve on {host}:{port}: {exc.strerror}") from None
            stack.callback(server.shutdown)
        serving = _Serving(args)
        stack.callback(lambda: serving.stack.close())  # the configuration running then
        metrics = ProbeMetrics(*serving.plan())
        serving.started(metrics)
        registry.register(metrics)
        push = None
        if args.otlp:
            with _threads_without_signals():
                push = OtlpPush(metrics, args.otlp, args.otlp_interval)
        if listen is not None:
            print(f"uprobes: serving metrics on http://{listen[0]}:{listen[1]}/metrics", file=sys.stderr, flush=True)
        if push is not None:
            print(f"uprobes: pushing metrics to {redacted(args.otlp)} every {args.otlp_interval:g} s", file=sys.stderr,
                  flush=True)
        try:
            serving.run.go()
            while True:
                if serving.reload_wanted:
                    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # one of the two runs is ours
                    try:
                        serving = serving.reloaded(metrics)
                    finally:  # not SETMASK: the new engine's own blocked signals (SIGCHLD for ptrace) stay so
                        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS - mask)
                    continue
                run = serving.run
                if serving.matcher is not None:
                    serving.matcher.scan()
                finished = run.finished()
                metrics.add(run.poll_columns(0 if finished else POLL_SECONDS))
                if run.counting:
                    metrics.set_hits(run.hit_counts())
                metrics.lost = run.engine.lost
                if finished:
                    break
            run = serving.run
            expired = run.deadline is not None and time.monotonic() >= run.deadline
            run.end_command()
            _finish(run, metrics)
            if not expired:
                print("uprobes: the target has ended; serving what was counted until stopped", file=sys.stderr,
                      flush=True)
                while run.deadline is None or time.monotonic() < run.deadline:
                    time.sleep(POLL_SECONDS)
        except KeyboardInterrupt as stop:
            serving.run.interrupted(stop)  # a command still running is stopped
            _finish(serving.run, metrics)
        if push is not None and not push.close():
            print(f"uprobes: warning: the last push to {redacted(args.otlp)} failed ({push.failures} failed in all)",
                  file=sys.stderr)
        return 0  # a stop signal is how a server ends


def _check_options(args: argparse.Namespace) -> None:
    """Probes to run, and ``--by`` keys that can be Prometheus labels."""
    from ..output.metrics import label_name

    if not args.words and not args.latency:
        raise UprobesError("serve needs probes to count (PROBE...) or functions to time (--latency FUNCTION)")
    labels = ["probe", "path"]
    for key in key_names(args.by, "--by"):
        label = label_name(key)
        if label in labels:
            raise UprobesError(f"--by {key}: a label '{label}' is there already (probe and path are labels of their "
                               f"own); name the argument otherwise ({label}2=...)")
        if not _LABEL.fullmatch(label):
            raise UprobesError(f"--by {key}: Prometheus labels are ASCII letters, digits and _, not starting with "
                               f"__; name the argument otherwise")
        labels.append(label)


class _Serving:
    """One configuration running: its probes attached (:attr:`run`), its processes found (:attr:`matcher`)."""

    def __init__(self, args: argparse.Namespace, start: bool = True) -> None:
        """``start`` False: its probes resolved and checked only, until :meth:`start`."""
        self.args = args
        self.keys = key_names(args.by, "--by")
        self.drawn = key_names(args.hist, "--hist")
        self.stack = ExitStack()
        self.matcher: _Matcher | None = None
        self.reload_wanted = False
        try:
            self.run = Run(args, self.stack, counting=not self.keys and not args.latency and not self.drawn,
                           check=lambda probes: _check_arguments(probes, self.keys, self.drawn),
                           timed=tuple(dict.fromkeys(args.latency or ())),
                           matching=tuple(dict.fromkeys(args.match or ())), start=start, objects_later=False)
        except BaseException:
            self.stack.close()
            raise
        self.listen()

    def start(self) -> None:
        try:
            self.run.start()
        except BaseException:
            self.stack.close()
            raise

    def listen(self) -> None:
        """SIGHUP reloads the file (without one, it stops the run, as SIGTERM does)."""
        if self.args.config is not None:
            signal.signal(signal.SIGHUP, self._want_reload)

    def _want_reload(self, signum, frame) -> None:
        self.reload_wanted = True

    def plan(self) -> tuple:
        """What :class:`ProbeMetrics` (and its ``reload``) take for this configuration."""
        run = self.run
        return ([p.name for p in run.probes], [p.path for p in run.probes], self.keys, run.timed,
                run.matching or [_target(run)], self.args.max_series, self.drawn)

    def started(self, metrics) -> None:
        """Its metrics in place: its probes counted as placed, its target up (or its processes looked for)."""
        metrics.placed = len(self.run.probes)
        if self.run.matching:
            self.matcher = _Matcher(self.run, metrics)
        else:
            metrics.targets[_target(self.run)].processes = 1

    def reloaded(self, metrics) -> _Serving:
        """The ``--config`` file read again and, once its probes resolve and check, its configuration running in
        place of this one; where it cannot be, this one goes on (or again, if placing the new one failed)."""
        from .main import parse_arguments

        self.reload_wanted = False
        try:
            if self.run.command:
                raise UprobesError("a launched command is not reloaded (restart to change its probes)")
            args = parse_arguments(self.args.argv)
            _check_options(args)
            if launches_command(args):
                raise UprobesError("the file gives a command to launch: a reload does not launch one (restart)")
            need_restart = [option for option in ("listen", "otlp", "otlp_interval") if
                            getattr(args, option) != getattr(self.args, option)]
            serving = _Serving(args, start=False)
        except UprobesError as exc:
            _reload_failed(exc)
            self.listen()
            return self
        if need_restart:
            print(f"uprobes: warning: reload: {', '.join('--' + o.replace('_', '-') for o in need_restart)} take "
                  f"effect at a restart", file=sys.stderr, flush=True)
            for option in need_restart:
                setattr(args, option, getattr(self.args, option))
        _finish(self.run, metrics)
        self.stack.close()
        try:
            serving.start()
        except UprobesError as exc:
            _reload_failed(exc)
            serving = _Serving(self.args)
        else:
            print(f"uprobes: reloaded {args.config}", file=sys.stderr, flush=True)
        metrics.reload(*serving.plan())
        serving.started(metrics)
        return serving


def _reload_failed(error: UprobesError) -> None:
    print(f"uprobes: warning: reload: {error}; the configuration as it was goes on", file=sys.stderr, flush=True)


def _finish(run: Run, metrics) -> None:
    """Every probe removed: the metrics as they end, with what was read while detaching."""
    run.engine.close()
    metrics.add(EventColumns(single=run.judged(run.engine.leftover())))
    if run.counting:
        metrics.set_hits(run.hit_counts())
    with metrics.lock:
        metrics.placed, metrics.lost = 0, run.engine.lost
        for health in metrics.targets.values():
            health.processes = 0


class _Matcher:
    """``--match``: every process whose command matches a glob traced from when a scan finds it (every
    :data:`_SCAN_SECONDS`) until it ends; one that cannot be traced, and is still there at the next scan (not one
    that was ending), is said (the first of each glob) and counted, and the others go on."""

    def __init__(self, run: Run, metrics) -> None:
        self.run, self.metrics = run, metrics
        self.traced: dict[tuple[int, int | None], str] = {}  # (pid, start time) -> the glob it matched
        self.failed: dict[tuple[int, int | None], tuple[str, str]] = {}  # -> glob, why: judged at the next scan
        self.refused: set[tuple[int, int | None]] = set()  # not tried again
        self.said: set[str] = set()  # globs whose first failure was said
        self.next_scan = 0.0

    def scan(self) -> None:
        now = time.monotonic()
        if now < self.next_scan:
            return
        self.next_scan = now + _SCAN_SECONDS
        self.traced = {process: glob for process, glob in self.traced.items() if self._lives(process)}
        self.refused = {process for process in self.refused if self._lives(process)}
        failed, self.failed = self.failed, {}
        for process, (glob, why) in failed.items():
            if self._lives(process):
                self._refuse(process, glob, why)
        for pid, glob in matching_processes(self.run.matching).items():
            process = (pid, start_time(pid))
            if process in self.traced or process in self.refused:
                continue
            try:
                self.run.engine.add_process(pid)
            except UprobesError as exc:
                if not has_ended(pid):
                    self.failed[process] = (glob, str(exc))
                continue
            self.traced[process] = glob
        with self.metrics.lock:
            for glob, health in self.metrics.targets.items():
                health.processes = sum(1 for matched in self.traced.values() if matched == glob)

    @staticmethod
    def _lives(process: tuple[int, int | None]) -> bool:
        pid, started = process
        return not has_ended(pid) and start_time(pid) == started

    def _refuse(self, process: tuple[int, int | None], glob: str, why: str) -> None:
        self.refused.add(process)
        if glob not in self.said:  # said before it is counted, where a scrape could see it
            self.said.add(glob)
            print(f"uprobes: warning: --match {glob}: {why}; the others are traced (more failures are counted in "
                  f"uprobes_attach_failures_total)", file=sys.stderr, flush=True)
        with self.metrics.lock:
            self.metrics.targets[glob].failures += 1


def _check_arguments(probes: list, keys: tuple[str, ...], drawn: tuple[str, ...]) -> None:
    """--by keys are arguments of every probe; --hist arguments of at least one, integers."""
    check_names(probes, keys, "--by")
    for name in drawn:
        fetching = [probe for probe in probes if any(arg.name == name for arg in probe.fetchargs)]
        if not fetching:
            raise UprobesError(f"--hist {name}: no probe fetches an argument '{name}'")
        check_integer(fetching, name, "--hist")


def _target(run: Run) -> str:
    """The target as a label that outlives a restart: the command's name, the process's, or every process."""
    if run.command:
        return os.path.basename(run.command[0])
    if run.pids:
        return ", ".join(dict.fromkeys(thread_comm(pid, pid) or f"pid {pid}" for pid in run.pids))
    return "every process"

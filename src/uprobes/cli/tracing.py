"""``uprobes trace`` and ``uprobes count``: run probes on a command, a process or the whole system."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace

from ..elf.locate import find_object, glob_matches, is_glob, linked_objects
from ..errors import ElfError, NotInObject, UprobesError
from ..output.chrome import ChromeTraceWriter
from ..output.aggregate import SPECIAL_KEYS, CallsInFlight, CountsByKey, HistogramsByKey
from ..output.columns import EventColumns
from ..output.event import Event
from ..output.writers import EventWriter, count_records, format_count_table, format_keyed_counts
from ..probes.predicate import INTEGER
from ..probes.later import ObjectsLater, probe_point
from ..probes.resolve import RETURN_MODES, Probe, ReturnMode, argument_kinds, resolve_probe, return_probes
from ..probes.spec import group_probe_words, parse_probe
from ..proc.launch import HeldCommand
from ..proc.maps import mapped_objects, path_in_process, read_maps
from ..proc.status import has_ended, namespace_pid, status_field, tgid, thread_comm
from ..stacks import StackLimits
from ..x86_64.unwind import DEFAULT_DEPTH, STACK_BYTES
from . import STOP_SIGNALS

__all__ = ["Run", "POLL_SECONDS", "key_names", "check_names", "check_integer", "add_tracing_options", "pids_of",
           "add_return_mode_option", "add_stack_options", "positive", "run_trace", "run_count", "run_latency",
           "run_stacks", "run_hist"]

POLL_SECONDS = 0.1


# A stop signal this soon after the one that is ending the run is that one again: sent to the process group, it
# reaches the worker of an attached run both directly and passed on by the process in front (guard.py).
_SAME_STOP_S = 1.0


class _Stop(KeyboardInterrupt):
    """Raised by the handlers of the stop signals, so that SIGTERM and SIGHUP end a run exactly as Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def add_tracing_options(parser: argparse.ArgumentParser, metavar: str = "PROBE",
                        words: str = "probes, each with its fetch arguments (and 'if EXPR')", writes: bool = True,
                        some: str = "+") -> None:
    """The options of every command that runs probes; ``writes``: -o and --json; ``some``: how many PROBEs."""
    parser.add_argument("--engine", choices=("auto", "kernel", "ptrace"), default="auto",
                        help="kernel: the kernel's uprobes through tracefs and perf (root); "
                             "ptrace: our own engine; auto: the kernel engine where it is usable")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("-p", "--pid", dest="pids", action="append", type=_pid_list, metavar="PID[,PID...]",
                        help="only these processes (and the threads and children each makes); repeatable")
    target.add_argument("-c", "--command", dest="command_line", metavar="CMD",
                        help="run CMD with every probe in place, and trace it (CMD is split into words as a shell "
                             "would, but no shell runs it: for redirections or pipes, -c \"sh -c '...'\" or -- sh -c "
                             "'...')")
    parser.add_argument("--all-or-nothing", action="store_true",
                        help="with several -p: end with an error if one of them cannot be traced (by default it is "
                             "named, and the others are traced)")
    parser.add_argument("--no-follow", action="store_true",
                        help="leave the children the process forks alone (by default they are traced too)")
    parser.add_argument("--trap", action="store_true",
                        help="ptrace engine: every probe stops the program at an int3; by default a probe with "
                             "no Python handler becomes a jump to generated code where its site allows (a return "
                             "probe: at its function's entry, and its return goes through generated code too), "
                             "with no stop")
    add_return_mode_option(parser)
    parser.add_argument("-d", "--duration", type=positive(float, "-d", "a number of seconds"), metavar="SECONDS",
                        help="stop after SECONDS")
    if writes:
        parser.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
        parser.add_argument("--json", action="store_true", help="JSON lines instead of text")
    parser.add_argument("words", nargs=some, metavar=metavar, help=words)


def add_return_mode_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--return-mode", choices=RETURN_MODES, default="auto",
                        help="how return probes are placed: insn, a probe on each ret and tail call of the function "
                             "(nothing on the stack changes); stack, the return address replaced by the engine's "
                             "trampoline; auto (the default): insn for Go programs, and on the kernel engine for "
                             "objects that link the C++ unwinder (its trampoline breaks exceptions), stack otherwise")


def add_stack_options(parser: argparse.ArgumentParser) -> None:
    """``--max-stack`` and ``--stack-size``, for ``trace --stack`` and ``stacks``."""
    parser.add_argument("--max-stack", type=_number("--max-stack", "a number of frames", 1, 1024),
                        default=DEFAULT_DEPTH, metavar="N",
                        help=f"at most N frames per stack (default {DEFAULT_DEPTH}); a longer one ends in [truncated]")
    parser.add_argument("--stack-size", type=_number("--stack-size", "a number of bytes", 64, _MAX_STACK_SIZE, 8),
                        default=STACK_BYTES, metavar="BYTES",
                        help=f"how much of each hit's stack is copied to unwind it (default {STACK_BYTES}, as perf "
                             f"record --call-graph dwarf); a stack deeper than that ends in [incomplete]")


_MAX_STACK_SIZE = 65528  # perf's limit: a sample is at most 64 KiB


def _pid_list(text: str) -> list[int]:
    """``-p 1234`` or ``-p 1234,5678``, as argparse's type."""
    words = text.split(",")
    if not all(word.isascii() and word.isdigit() and int(word) > 0 for word in words):
        raise argparse.ArgumentTypeError(f"-p takes process ids (1234, or 1234,5678), not {text!r}")
    return [int(word) for word in words]


def pids_of(args: argparse.Namespace) -> None:
    """``args.pids``: the processes every -p gave, once each, in order."""
    args.pids = list(dict.fromkeys(pid for group in args.pids or () for pid in group))


def _number(option: str, what: str, low: int, high: int, multiple: int = 1):
    """An argparse type: an integer from ``low`` to ``high``, a multiple of ``multiple``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high or value % multiple:
            also = f", a multiple of {multiple}" if multiple > 1 else ""
            raise argparse.ArgumentTypeError(f"{option} takes {what} from {low} to {high}{also}, not {text!r}")
        return value
    return parse


def positive(kind: type, option: str, what: str, most: float = float("inf")):
    """An argparse type: a number of ``kind`` above zero (and at most ``most``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{option} takes {what} above 0, not {text!r}")
        if value > most:
            raise argparse.ArgumentTypeError(f"{option} takes {what} up to {most:g}, not {text!r}")
        return value
    return parse


def _stack_limits(args: argparse.Namespace) -> StackLimits:
    return StackLimits(args.max_stack, args.stack_size)


def launches_command(args: argparse.Namespace) -> bool:
    """Whether the run starts a command (-c or --), rather than attaching to a process or to everyone."""
    return bool(args.command_line or args.dash_command)


def _split_command(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    """Probe texts and the command to run, from PROBE... [-- CMD ARGS...] or -c 'CMD'."""
    words = list(args.words)
    try:
        command = shlex.split(args.command_line) if args.command_line is not None else None
    except ValueError as exc:
        raise UprobesError(f"-c {args.command_line!r}: {str(exc).lower()}: -c splits the command as a shell "
                           f"would, without running one") from None
    if command == []:
        raise UprobesError("-c '': empty command")
    if args.dash_command:
        if command is not None or args.pids:
            raise UprobesError("give the command once: with -c 'CMD' or after --, not with -p")
        command = args.dash_command
    return group_probe_words(words), command


def _check_process(pid: int, mappings: list) -> None:
    """-p names a process with code of its own: not a kernel thread, nor one thread of a process."""
    if not mappings:
        if (status_field(f"/proc/{pid}/status", "State") or "").startswith("Z"):
            raise UprobesError(f"process {pid} has ended (a zombie its parent has not reaped)")
        raise UprobesError(f"process {pid} ({thread_comm(pid, pid) or '?'}) is a kernel thread: it runs no user "
                           f"code to probe")
    leader = tgid(pid)
    if leader != pid:
        raise UprobesError(f"{pid} is a thread of process {leader}: -p takes the process, whose threads are all "
                           f"traced; give -p {leader}")


def _traceable(pids: list[int], all_or_nothing: bool) -> list[int]:
    """The processes of -p that run code of their own: one alone must (an error says why not); of several,
    those that do (the others named, or an error with ``all_or_nothing``)."""
    kept = []
    for pid in pids:
        try:
            _check_process(pid, read_maps(pid))
        except UprobesError as exc:
            if len(pids) == 1:
                raise
            _left_out(exc, all_or_nothing)
            continue
        kept.append(pid)
    if pids and not kept:
        raise UprobesError("none of the processes given with -p could be traced")
    return kept


def _left_out(error: UprobesError, all_or_nothing: bool) -> None:
    """One of several processes of -p cannot be traced: said, and the others are (an error with
    ``all_or_nothing``)."""
    if all_or_nothing:
        raise UprobesError(f"{error} (--all-or-nothing)") from None
    print(f"uprobes: warning: {error}; the other processes are traced", file=sys.stderr)


def _resolved(texts: list[str], pids: list[int], returns: ReturnMode, waiting: frozenset[str] = frozenset(),
              starting: list[str] = ()) -> list[Probe]:
    """The probe points of ``texts``, with -p as each process sees its files (a container's; the objects it maps,
    for '*'), each point once (a file by device and inode); a text is an error only where it names nothing in
    any of them. A text of ``waiting`` (PATH '*' or a glob, whose objects mapped later are resolved then) may
    name nothing yet: said, not an error; for a launched command (without -p) it is looked for in the objects
    it maps as it starts (``starting``: its program and the libraries it links)."""
    objects: dict[int | None, dict] = {pid: {} for pid in pids or [None]}  # the files opened, per process
    probes: list[Probe] = []
    for text in texts:
        spec = parse_probe(text)
        found: dict = {}
        errors = []
        for pid, opened in objects.items():
            for each in ([replace(spec, target=path) for path in starting if glob_matches(path, spec.target)]
                         if text in waiting and pid is None else [spec]):
                try:
                    for probe in resolve_probe(each, opened, pid, returns):
                        found.setdefault(probe_point(probe) if len(objects) > 1 else len(found), probe)
                except UprobesError as exc:
                    errors.append(exc)
        real = [error for error in errors if text not in waiting or not isinstance(error, (NotInObject, ElfError))]
        if real and not found:
            raise real[0]
        for error in real if text in waiting else ():  # where the others were found
            print(f"uprobes: warning: {error}: left out", file=sys.stderr)
        if errors and not found and pids:
            print(f"uprobes: warning: '{text}' names nothing in the objects mapped now; it is looked for in each "
                  f"object mapped from now on", file=sys.stderr)
        probes += found.values()
    return probes


def _points(count: int) -> str:
    return f"{count} probe point{'s' if count != 1 else ''}"


def _of_mapped_objects(text: str) -> bool:
    """Whether a probe's PATH is '*' or a glob of names (``libfoo*``): of the objects a process maps (which
    an address, a place in one file, cannot be)."""
    spec = parse_probe(text)
    if not is_glob(spec.target) or "/" in spec.target:
        return False
    if spec.address is not None or spec.offset is not None:
        raise UprobesError(f"probe '{text}': an address is a place in one file, and '{spec.target}' is every "
                           f"object the process maps: give the file's path")
    return True


def _objects_of(pid: int) -> list[str]:
    """The objects process ``pid`` maps (none once it has ended)."""
    try:
        return mapped_objects(pid)
    except UprobesError:
        return []


def _starting(command: list[str]) -> list[str]:
    """The objects a command maps as it starts: its program and the libraries it links (none where it names no
    program: an error of its own at the launch)."""
    try:
        program = find_object(command[0])
    except UprobesError:
        return []
    return [program, *linked_objects(program)]


def _forgotten_dashes(texts: list[str], command: list[str] | None) -> str:
    """A hint for an error in the probes when their last word is a program and no command was given: the
    ``--`` before it was forgotten."""
    last = texts[-1].split()[-1] if texts and texts[-1].split() else ""
    if command or len(texts[-1].split()) < 2 or "=" in last or ":" in last or not shutil.which(last):
        return ""
    return f" (to run {last}, give it after --: ... -- {last})"


def _engine(name: str, system_wide: bool, jumps: bool = True):
    """The engine asked for; ``auto`` is the kernel engine where it is usable, else the ptrace engine."""
    from ..errors import KernelEngineError

    if name in ("kernel", "auto"):
        from ..engines.kernel.engine import KernelEngine

        try:
            return KernelEngine()
        except KernelEngineError as exc:
            if system_wide:
                raise UprobesError(f"{exc}, with -p PID or a command (system-wide tracing needs the kernel engine)"
                                   ) from None
            if name == "kernel":
                raise
    from ..engines.ptrace.engine import PtraceEngine

    if system_wide:
        raise UprobesError("the ptrace engine traces one process: give -p PID or a command (-c 'CMD' or -- CMD); "
                           "system-wide tracing needs the kernel engine (root)")
    return PtraceEngine(jumps=jumps)


class Run:
    """What every command that runs probes shares: probes resolved, engine attached, command launched, signals
    handled."""

    def __init__(self, args: argparse.Namespace, stack: ExitStack, counting: bool = False,
                 pair_returns: bool = False, stacks: StackLimits | None = None,
                 check: Callable[[list[Probe]], None] | None = None, timed: tuple[str, ...] = (),
                 matching: tuple[str, ...] = (), start: bool = True, objects_later: bool = True) -> None:
        """``check``: raises an error about the probes, once resolved, before anything is placed; ``timed``:
        functions whose calls are timed, each an entry probe and its return probes after the others (their
        indexes in :attr:`timed`); ``matching``: globs of the processes to trace, none at first (the caller
        adds each with ``engine.add_process``), each on its own (its forks are not followed); ``start`` False:
        the probes are resolved and checked, and nothing is placed or launched until :meth:`start`;
        ``objects_later`` False: '*' is the objects mapped at the start (a command's: those it links) only, the
        probes those resolved then."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, _raise_stop)
        # Stop signals wait until the run is set up: raised in the middle of an import (the engine's modules load
        # here), one lands in an import lock's callback, is printed as ignored, and the run goes on for ever
        # (seen in the kill trials).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        texts, command = _split_command(args)
        self.command = command
        self.matching = matching
        if matching and (args.pids or command):
            raise UprobesError("--match finds the processes to trace: give it without -p or a command")
        #: The processes given with -p (those that can be traced, where several were given).
        self.pids = _traceable(args.pids, args.all_or_nothing)
        self.engine = stack.enter_context(_engine(args.engine, jumps=not args.trap,
                                                  system_wide=not self.pids and not command and not matching))
        returns = ReturnMode(args.return_mode, self.engine.unwinder_meets_stack)
        # '*' and globs of names as PATH, with processes to trace: also every object they map later (a glob of
        # paths is of the files there, found now)
        waiting = frozenset(text for text in texts if (self.pids or command) and _of_mapped_objects(text))
        starting = _starting(command) if command and waiting else []
        try:
            self.probes: list[Probe] = _resolved(texts, self.pids, returns, waiting, starting)
        except UprobesError as exc:
            raise UprobesError(f"{exc}{_forgotten_dashes(texts, command)}") from None
        if pair_returns:
            self.probes = _entry_and_return(self.probes, returns)
        self._added_notes: list[str] = []  # what _found_later added, said once the engine has placed it
        self._objects_later = objects_later and bool(waiting)
        searched = starting or [path_in_process(pid, path) for pid in self.pids if waiting for path in _objects_of(pid)]
        self._later = ObjectsLater([parse_probe(text) for text in texts if text in waiting], self.probes, returns,
                                   searched, (lambda probes: _entry_and_return(probes, returns)) if pair_returns
                                   else None)
        if check is not None:
            check(self.probes)
        self.timed: list[range] = []
        for text in timed:
            try:
                pair = _entry_and_return(_resolved([text], self.pids, returns), returns)
            except UprobesError as exc:
                raise UprobesError(f"--latency {text}: {exc}") from None
            self.timed.append(range(len(self.probes), len(self.probes) + len(pair)))
            self.probes += pair
        self._predicates = {i: p.predicate for i, p in enumerate(self.probes) if p.predicate is not None}
        # a predicate judges each hit's arguments: counted from events, unless the engine's counters can
        self.counting = counting and all(p.predicate is None or self.engine.counts_filtered and p.kernel_filter
                                         for p in self.probes) and not any(s.predicate for s in self._later.specs)
        self.hits = [0] * len(self.probes)
        self.status = 0
        self._mask = mask
        self._args, self._stack, self._stacks = args, stack, stacks
        if start:
            self.start()

    def start(self) -> None:
        """Launch the command (held), place the probes, let the command go."""
        args, command, matching = self._args, self.command, self.matching
        self.child = (HeldCommand(command, ptraced_by_user=self.engine.reaps_children and os.geteuid() != 0,
                                  signal_mask=self._mask) if command else None)
        self._stack.callback(self._stop_child)
        self._warn_about(self.probes)
        if self.child is not None:
            self.child.traced = self.engine.reaps_children
        several = len(self.pids) > 1
        self.engine.attach(self.probes, () if matching or several else self.child.pid if self.child else
                           self.pids[0] if self.pids else None, counting=self.counting, held=self.child is not None,
                           follow_forks=not args.no_follow and not matching, stacks=self._stacks,
                           later=self._found_later if self._objects_later else None)
        if several:
            self.pids = [pid for pid in self.pids if self._added(pid, args.all_or_nothing)]
            if not self.pids:
                raise UprobesError("none of the processes given with -p could be traced")
        #: What the probes are on: "pid 1234", "the command", "every process", "processes matching 'GLOB'".
        self.scope = (", ".join(map(_pid_text, self.pids)) if self.pids else "the command" if self.child else
                      f"processes matching {' or '.join(map(repr, matching))}" if matching else "every process")
        more = "; more in the objects mapped from now on" if self._objects_later else ""
        print(f"uprobes: {_points(len(self.probes))} attached ({self.engine.name} engine, {self.scope}{more})",
              file=sys.stderr, flush=True)
        self.deadline = time.monotonic() + args.duration if args.duration else None
        self._duration = args.duration
        self.stopped_after: str | None = None  # the run's limit that stopped the command
        if self.child:
            self.child.release()

    def _warn_about(self, probes: list[Probe]) -> None:
        """What the user should know of these probes before they run: arguments left out, how they are placed."""
        for note in (f"{p.name} at {p.path}:{p.offset:#x}: left out {u}" for p in probes
                     for u in p.unavailable + (p.kernel_unavailable if self.engine.name == "kernel" else ())):
            print(f"uprobes: warning: {note}", file=sys.stderr)
        for note in dict.fromkeys(f"{p.name}: {note}" for p in probes for note in p.notes):
            print(f"uprobes: warning: {note}", file=sys.stderr)

    def _found_later(self, pid: int, path: str) -> list[Probe]:
        """The engine's :data:`~uprobes.engines.base.LaterProbes`: the new points of the texts whose PATH is '*'
        or a glob in an object process ``pid`` maps, made the run's probes (the next indexes)."""
        found = self._later(pid, path)
        self._added_notes += (f"warning: {why}" for why in self._later.left_out)
        self._later.left_out.clear()
        for probe in found:
            if probe.predicate is not None:
                self._predicates[len(self.probes)] = probe.predicate
            self.probes.append(probe)
            self.hits.append(0)
        if found:
            self._warn_about(found)
            self._added_notes.append(f"{_points(len(found))} added in {path} (mapped by process {pid})")
        return found

    def unfound(self) -> list[str]:
        """The texts whose PATH is '*' or a glob that named nothing in any object the processes mapped."""
        return self._later.unfound()

    def go(self) -> None:
        """Let stop signals in: one that came while the run was set up ends it now, as a stop does, inside the
        caller's ``try`` (so what was counted or seen is still reported)."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS - self._mask)

    def collect(self, take: Callable[[list[Event]], None]) -> None:
        """Run until the command or process ends, the duration is over or a stop signal comes, giving ``take``
        every event: those polled, those seen before a stop signal and those read while detaching."""
        try:
            self.go()
            while True:
                finished = self.finished()
                take(self.poll(0 if finished else POLL_SECONDS))
                if finished:
                    break
        except KeyboardInterrupt as stop:
            take(self.poll(0))
            self.interrupted(stop)
        else:
            self.end_command()
        self.engine.close()
        take(self.judged(self.engine.leftover()))

    def poll(self, timeout: float) -> list:
        """The engine's events of up to ``timeout`` seconds, those its probes' predicates keep; its warnings
        meanwhile go to stderr at once."""
        events = self.judged(self.engine.poll(timeout))
        self.warn()
        return events

    def poll_columns(self, timeout: float) -> EventColumns:
        """:meth:`poll`, in columns where the engine has them."""
        events = self.engine.poll_columns(timeout)
        self.warn()
        if not self._predicates:
            return events
        groups = []
        for group in events.groups:
            predicate = self._predicates.get(group.probe_index)
            if predicate is not None:
                keep = predicate.mask(len(group.ts_ns), group.columns, group.fixed, group.pid, group.tid, group.comm)
                group = group if keep.all() else group.select(keep.nonzero()[0].tolist())
            self.hits[group.probe_index] += len(group.ts_ns)
            if group.ts_ns:
                groups.append(group)
        return EventColumns(groups, self.judged(events.single))

    def judged(self, events: list[Event]) -> list[Event]:
        """The events the predicates of their probes keep (counted, where the engine does not count)."""
        if not self._predicates:
            return events
        kept = [event for event in events if (predicate := self._predicates.get(event.probe_index)) is None
                or predicate.holds(event.args, event.pid, event.tid, event.comm)]
        for event in kept:
            self.hits[event.probe_index] += 1
        return kept

    def hit_counts(self) -> list[int]:
        """Hits so far per probe: the engine's counts, or where the run counts by events (a predicate judges
        its hits), the events kept."""
        return self.engine.hit_counts() if self.counting else list(self.hits)

    def warn(self) -> None:
        """The engine's warnings, and the probe points it added in objects mapped since (once placed)."""
        for notice in self.engine.notices():
            print(f"uprobes: warning: {notice}", file=sys.stderr, flush=True)
        for added in self._added_notes:
            print(f"uprobes: {added}", file=sys.stderr, flush=True)
        self._added_notes.clear()

    def _stop_child(self) -> None:
        if self.child and self.child.poll() is None:
            self.child.stop()

    def finished(self) -> bool:
        """True once the command or process has ended or the duration is over."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return True
        if self.child is not None:
            self._take_reaped_status()
            status = self.child.poll()
            if status is not None:
                self.status = status
                return True
        if self.pids and all(has_ended(pid) for pid in self.pids):
            return True
        return False

    def _added(self, pid: int, all_or_nothing: bool) -> bool:
        """One of several processes traced; one that cannot be is named (an error with ``all_or_nothing``)."""
        try:
            self.engine.add_process(pid)
        except UprobesError as exc:
            _left_out(exc, all_or_nothing)
            return False
        return True

    def interrupted(self, stop: KeyboardInterrupt) -> None:
        """Ctrl-C, SIGTERM or SIGHUP: a command we started is stopped too and its status becomes ours."""
        if self.child is not None:
            self.end_command(grace=0.5)
        else:
            self.status = 128 + getattr(stop, "signum", signal.SIGINT)

    def end_command(self, grace: float = 0.0, limit: str | None = None) -> None:
        """The run is over (the command exited, -d, -n or a signal): a command we started that still runs
        ``grace`` seconds later is terminated, and its exit status becomes ours; but where the run's own
        ``limit`` (-n: "2 events") or -d ended it, it was stopped as asked: the status is 0, and it is said."""
        if self.child is None:
            return
        self.engine.close()  # a traced child must be let go before it can be stopped and waited for
        self._take_reaped_status()
        self.child.traced = False
        if limit is None and self.deadline is not None and time.monotonic() >= self.deadline:
            limit = f"{self._duration:g} s"
        running = self.child.poll() is None
        self.child.stop(grace)
        self.status = self.child.wait()
        if running and limit is not None:
            self.stopped_after, self.status = limit, 0

    def _take_reaped_status(self) -> None:
        reaped = self.engine.exited(self.child.pid)  # a tracer that reaped the child knows how it ended
        if reaped is not None:
            self.child.returncode = reaped


def _entry_and_return(probes: list[Probe], returns: ReturnMode) -> list[Probe]:
    """For ``latency``: one function's entry probe and its return probes, without fetch arguments."""

    functions = {(p.path, p.entry_offset) for p in probes}
    if len(functions) != 1 or any(p.site is not None for p in probes):
        raise UprobesError("latency takes one function: give uprobe:PATH:FUNCTION (a glob must match one)")
    if probes[0].fetchargs:
        raise UprobesError(f"latency times calls and fetches nothing: drop the fetch arguments of '{probes[0].spec}'")
    if "+" in probes[0].location or probes[0].location.startswith("0x"):  # not at a symbol's first byte
        raise UprobesError(f"latency times a function from its first instruction, not {probes[0].location}")
    if probes[0].is_return:
        raise UprobesError(f"latency takes the function's entry, uprobe:PATH:FUNCTION, not '{probes[0].spec}'")
    entry = replace(probes[0], fetchargs=(), explicit_event=False)
    return [entry, *return_probes(entry, returns)]


_last_stop = -math.inf  # time.monotonic() of the stop signal that is ending the run


def _raise_stop(signum, frame) -> None:
    global _last_stop
    now = time.monotonic()
    if now - _last_stop < _SAME_STOP_S:  # the stop under way, once more: its clean-up and output go on
        return
    _last_stop = now
    raise _Stop(signum)


class _OutputFile(io.FileIO):
    """The -o file: a failed write (a full disk, say) is a one-line error, and the run still cleans up."""

    def write(self, data) -> int:
        try:
            return super().write(data)
        except OSError as exc:
            raise UprobesError(f"cannot write {self.name}: {exc.strerror}") from None


def _open_output(args: argparse.Namespace, stack: ExitStack):
    if not args.output:
        return sys.stdout
    try:
        raw = _OutputFile(args.output, "w")
    except OSError as exc:
        raise UprobesError(f"cannot write {args.output}: {exc.strerror}") from None
    return stack.enter_context(io.TextIOWrapper(io.BufferedWriter(raw, 1 << 16), encoding="utf-8"))


def _pid_text(pid: int) -> str:
    """``pid 1234``, and the pid it has in its own pid namespace when it is in another (a container)."""
    inner = namespace_pid(pid)
    return f"pid {pid}" + (f", pid {inner} in its namespace" if inner is not None else "")


def run_trace(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        out = _open_output(args, stack)
        run = Run(args, stack, stacks=_stack_limits(args) if args.stack else None)
        writer = (ChromeTraceWriter(out, run.probes) if args.format == "chrome"
                  else EventWriter(out, args.format == "json", run.probes, args.wall_clock))
        seen, limit = 0, ""
        try:
            run.go()
            while True:
                finished = run.finished()
                events = run.poll_columns(0 if finished else POLL_SECONDS)
                if not args.max_events or seen + len(events) < args.max_events:
                    writer.columns(events)
                    seen += len(events)
                else:
                    for event in events.events()[:args.max_events - seen]:
                        writer.event(event)
                    seen = args.max_events
                    limit, finished = f"{args.max_events} event{'s' if args.max_events != 1 else ''}", True
                if finished:
                    break
                out.flush()
        except KeyboardInterrupt as stop:
            for event in run.poll(0):  # what was seen before the signal
                writer.event(event)
            run.interrupted(stop)
        else:
            run.end_command(limit=limit or None)
        run.engine.close()
        for event in run.judged(run.engine.leftover()):  # records read while detaching
            if args.max_events and seen >= args.max_events:
                break
            writer.event(event)
            seen += 1
        _report_lost(writer, run.engine.lost)
        if isinstance(writer, ChromeTraceWriter):
            writer.close()  # the end of the document: no viewer opens it without
        _report_notes(run)
        out.flush()
        return run.status


def _report_notes(run: Run) -> None:
    run.engine.close()  # what detaching found is part of the report
    run.warn()
    for note in run.engine.report():
        print(f"uprobes: {note}", file=sys.stderr)
    for text in run.unfound():
        print(f"uprobes: never found: '{text}' named nothing in any object the processes mapped", file=sys.stderr)
    returncode = run.child.returncode if run.child else None
    if run.stopped_after is not None:
        print(f"uprobes: stopped the command after {run.stopped_after}, as asked", file=sys.stderr)
    elif returncode is not None and returncode < 0:
        signum = signal.Signals(-returncode)
        print(f"uprobes: the command was killed by {signum.name} ({signal.strsignal(signum)})", file=sys.stderr)


def _report_uncounted(out, lost: int, as_json: bool,
                      why: str = "with this many probes each hit is a record); count fewer probes at once") -> None:
    """Hits the counts miss (their records found the buffers full)."""
    if lost:
        if as_json:
            out.write(json.dumps({"lost": lost}) + "\n")
            out.flush()
        print(f"uprobes: {lost} hits are missing from the counts (the buffers overflowed: {why}", file=sys.stderr)


def _report_lost(writer: EventWriter | ChromeTraceWriter, lost: int) -> None:
    writer.lost(lost)
    if lost:
        print(f"uprobes: lost {lost} events (the ring buffers overflowed; try fewer probes or --json -o FILE)",
              file=sys.stderr)


def key_names(text: str | None, option: str) -> tuple[str, ...]:
    """``--by size,name``: the names, each a fetch argument's or ``$pid``, ``$tid``, ``$comm``."""
    if text is None:
        return ()
    names = tuple(name.strip() for name in text.split(","))
    for name in names:
        if not (name.isidentifier() or name in SPECIAL_KEYS):
            raise UprobesError(f"{option} takes names of fetch arguments (or $pid, $tid, $comm), separated by "
                               f"commas, not {name!r}")
    return names


def check_names(probes: list[Probe], names: tuple[str, ...], option: str) -> None:
    """Every probe fetches each of ``names`` (or it is a special): a one-line error naming what is missing."""
    for probe in probes:
        fetched = [arg.name for arg in probe.fetchargs]
        for name in names:
            if name not in fetched and name not in SPECIAL_KEYS:
                have = ", ".join(fetched) or "none"
                raise UprobesError(f"{option} {name}: probe '{probe.spec}' has no argument '{name}' (its "
                                   f"arguments: {have}; and $pid, $tid, $comm)")


def run_count(args: argparse.Namespace) -> int:
    keys = key_names(args.by, "--by")
    if args.top is not None and not keys:
        raise UprobesError("--top N keeps the N keys with the most hits: give --by ARG too")
    if keys:
        return _run_aggregation(args, CountsByKey(keys), keys)
    with ExitStack() as stack:
        out = _open_output(args, stack)
        run = Run(args, stack, counting=True)
        intervals = _Intervals(args.interval)
        reported = [0] * len(run.probes)  # hits up to the last interval's report

        def report() -> None:
            hits = run.hit_counts()
            reported.extend([0] * (len(hits) - len(reported)))  # probes found in objects mapped since
            _write_counts(out, run.probes, [now - before for now, before in zip(hits, reported)], args.json,
                          intervals)
            reported[:] = hits

        try:
            run.go()
            while True:
                finished = run.finished()
                run.poll_columns(0 if finished else POLL_SECONDS)  # the ptrace engine services its target in here
                if finished:  # that poll took what the last moments left in the buffers
                    break
                if intervals.due():
                    report()
        except KeyboardInterrupt as stop:
            run.poll_columns(0)  # what was seen before the signal
            run.interrupted(stop)
        else:
            run.end_command()
        if not run.counting:  # counted by events: those read while detaching count too
            run.engine.close()
            run.judged(run.engine.leftover())
        # The kernel's counters hold every hit up to now, so nothing is lost between reports.
        intervals.due(at_end=True)
        report()
        _report_uncounted(out, run.engine.lost, args.json)
        _report_notes(run)
        return run.status


def run_latency(args: argparse.Namespace) -> int:
    """Time each call of a function from entry to return; a log2 histogram at the end, and the engine's own time
    per call beside it (ptrace engine)."""
    from ..output.histogram import duration

    with ExitStack() as stack:
        out = _open_output(args, stack)
        run = Run(args, stack, pair_returns=True)
        calls = _CallTimes()
        run.collect(calls.add)
        own = None
        if run.engine.name == "ptrace" and calls.histogram.values:
            own = _ptrace_time_per_call(args, trap=not set(range(len(run.probes))) <= run.engine.jumped())
        if args.json:
            out.write(json.dumps({"probe": run.probes[0].name, **calls.histogram.summary("_ns"),
                                  "buckets": [{"low_ns": lo, "high_ns": hi, "count": n}
                                              for lo, hi, n in calls.histogram.buckets()],
                                  **({"engine_ns": own} if own is not None else {}),
                                  **({"lost": run.engine.lost} if run.engine.lost else {})}) + "\n")
        else:
            out.write(f"{run.probes[0].name}: time from entry to return\n"
                      f"{calls.histogram.render(duration, empty='no calls completed')}")
            if own is not None:
                out.write(f"each time includes the engine's own, about {duration(own)} (a call that does nothing, "
                          f"timed the same way)\n")
        if run.engine.lost:
            print(f"uprobes: {run.engine.lost} events were lost (the buffers overflowed): the calls they end or begin "
                  f"are not in the histogram", file=sys.stderr)
        _report_notes(run)
        return run.status


class _CallTimes:
    """Calls timed from their entry and return events, per thread (nested calls innermost first)."""

    def __init__(self) -> None:
        from ..output.histogram import Histogram

        self.histogram = Histogram()
        self._in_flight = CallsInFlight()

    def add(self, events: list[Event]) -> None:
        for event in events:
            if not event.is_return:
                self._in_flight.entry(event.tid, event.ts_ns)
            elif (duration := self._in_flight.exit(event.tid, event.ts_ns)) is not None:
                self.histogram.add(duration)


# A call that does nothing: libc's abs, called by a Python child through ctypes (so no compiler is needed).
_EMPTY_CALLS = 300
_EMPTY_CALL_PROGRAM = f"import ctypes\nabs = ctypes.CDLL(None).abs\nfor _ in range({_EMPTY_CALLS}): abs(-1)\n"


def _ptrace_time_per_call(args: argparse.Namespace, trap: bool) -> int | None:
    """The ptrace engine's own time in each call it times: the median time of a call that does nothing, timed
    the same way (jumps or traps, the same return mode); None where that cannot be measured (said why)."""
    empty_call = [sys.executable, "-c", _EMPTY_CALL_PROGRAM]
    calibration = argparse.Namespace(**{**vars(args), "words": ["uprobe:libc:abs"], "pids": [], "command_line": None,
                                        "dash_command": empty_call, "duration": None, "trap": trap, "no_follow": True})
    said = io.StringIO()
    try:
        with ExitStack() as stack, contextlib.redirect_stderr(said):
            run = Run(calibration, stack, pair_returns=True)
            calls = _CallTimes()
            run.collect(calls.add)
            if run.status != 0 or len(calls.histogram.values) < _EMPTY_CALLS // 2:
                raise UprobesError(f"the empty calls ended with status {run.status}, {len(calls.histogram.values)} "
                                   f"timed")
    except UprobesError as exc:
        print(f"uprobes: warning: the engine's own time per call was not measured: {exc}", file=sys.stderr)
        return None
    return calls.histogram.summary()["p50"]


class _Intervals:
    """``--interval SECONDS``: when the figures of the last interval are due, and how each report says which
    interval it covers (every report covers its own interval: nothing is cumulative)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.number = 0
        self._started = time.monotonic()
        self._next = self._started + seconds if seconds else None
        self._covered = 0.0  # seconds the report being written covers

    def due(self, at_end: bool = False) -> bool:
        """True when a report is due (``at_end``: the last one, of whatever time is left); it is then counted."""
        now = time.monotonic()
        if self._next is None or not at_end and now < self._next:
            return False
        self.number += 1
        self._covered, self._started = now - self._started, now
        self._next = now + self.seconds
        return True

    def heading(self) -> str:
        """Text: the wall-clock time and the interval's length above each report (nothing without --interval)."""
        if self.seconds is None:
            return ""
        return f"{time.strftime('%H:%M:%S')}  interval {self.number}: the last {self._covered:.1f} s (not cumulative)\n"

    def fields(self) -> dict:
        """JSON: the interval's number, its end as wall-clock time and its length."""
        if self.seconds is None:
            return {}
        return {"interval": self.number, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(self._covered, 3)}


def _write_counts(out, probes: list[Probe], hits: list[int], as_json: bool, intervals: _Intervals) -> None:
    counts = [(p.name, p.path, p.offset, n) for p, n in zip(probes, hits)]
    if as_json:
        out.writelines(json.dumps({**record, **intervals.fields()}) + "\n" for record in count_records(counts))
    else:
        out.write(intervals.heading() + format_count_table(counts))
    out.flush()


def run_stacks(args: argparse.Namespace) -> int:
    """Count hits per distinct user stack; folded lines (or JSON records) at the end."""
    from ..output.folded import StackCounts

    with ExitStack() as stack:
        out = _open_output(args, stack)
        run = Run(args, stack, stacks=_stack_limits(args))
        counts = StackCounts()
        run.collect(counts.add)
        out.write(counts.json_lines() if args.json else counts.folded())
        _report_uncounted(out, run.engine.lost, args.json, "each hit's stack is a large record); probe fewer hits")
        _report_notes(run)
        out.flush()
        return run.status


def run_hist(args: argparse.Namespace) -> int:
    """A histogram of one argument's values per probe (and per key of ``--by``)."""
    if not args.words or not args.words[-1].isidentifier():
        raise UprobesError("hist PROBE... ARG: give the name of the argument to draw last, e.g. uprobes hist "
                           "'uprobe:libc:malloc size=%di:u64' size")
    arg = args.words.pop()
    if not args.words:
        raise UprobesError(f"hist PROBE... ARG: give a probe that fetches {arg}")
    keys = key_names(args.by, "--by")
    return _run_aggregation(args, HistogramsByKey(arg, keys, args.linear), keys, arg)


def _run_aggregation(args: argparse.Namespace, aggregate, keys: tuple[str, ...], arg: str | None = None) -> int:
    """``count --by`` and ``hist``: events aggregated as they come, printed at the end (and every
    ``--interval`` seconds, each time from zero)."""
    with ExitStack() as stack:
        out = _open_output(args, stack)
        def check(probes: list[Probe]) -> None:
            check_names(probes, keys, "--by")
            if arg is not None:
                check_names(probes, (arg,), "hist")
                check_integer(probes, arg)

        run = Run(args, stack, check=check)
        intervals = _Intervals(args.interval)
        try:
            run.go()
            while True:
                finished = run.finished()
                aggregate.add(run.poll_columns(0 if finished else POLL_SECONDS))
                if finished:  # that poll took what the last moments left in the buffers
                    break
                if intervals.due():
                    _write_aggregate(out, run.probes, aggregate, args, intervals)
                    aggregate.clear()
        except KeyboardInterrupt as stop:
            aggregate.add(run.poll_columns(0))  # what was seen before the signal
            run.interrupted(stop)
        else:
            run.end_command()
        run.engine.close()
        aggregate.add(EventColumns(single=run.judged(run.engine.leftover())))
        intervals.due(at_end=True)
        _write_aggregate(out, run.probes, aggregate, args, intervals)
        _report_lost_aggregated(run.engine.lost)
        _report_notes(run)
        return run.status


def check_integer(probes: list[Probe], arg: str, option: str = "hist") -> None:
    """Each of ``probes`` fetches ``arg`` as an integer (a histogram draws integers)."""
    for probe in probes:
        kind = argument_kinds(probe)[arg]
        if kind != INTEGER:
            fetcharg = next(a for a in probe.fetchargs if a.name == arg)
            raise UprobesError(f"{option} {arg}: probe '{probe.spec}' fetches it as {fetcharg.type_text or kind}; "
                               f"a histogram draws integers")


def _write_aggregate(out, probes: list[Probe], aggregate, args: argparse.Namespace, intervals: _Intervals) -> None:
    """The figures so far; with ``--interval``, those of the last interval (headed in text, numbered in JSON)."""
    keys = aggregate.keys
    interval = intervals.fields()
    if not args.json:
        out.write(intervals.heading())
    if isinstance(aggregate, CountsByKey):
        rows = aggregate.rows(args.top)
        if args.json:
            out.writelines(json.dumps({"probe": probes[probe].name, "key": dict(zip(keys, key)), "hits": hits,
                                       **interval}) + "\n" for probe, key, hits in rows)
        else:
            out.write(format_keyed_counts(keys, [(probes[probe].name, key, hits) for probe, key, hits in rows]))
    else:
        for probe, key, histogram in aggregate.items():
            if args.json:
                record = {"probe": probes[probe].name, "arg": aggregate.arg, **({"key": dict(zip(keys, key))}
                                                                               if keys else {}),
                          **histogram.summary(), "buckets": [{"low": low, "high": high, "count": n}
                                                             for low, high, n in histogram.buckets()], **interval}
                out.write(json.dumps(record) + "\n")
            else:
                where = ", ".join(f"{name}={json.dumps(value)}" for name, value in zip(keys, key))
                out.write(f"{probes[probe].name}: {aggregate.arg}{f' ({where})' if where else ''}\n"
                          f"{histogram.render()}")
        if not aggregate.histograms:
            out.write(json.dumps({"count": 0, **interval}) + "\n" if args.json else "no hits\n")
    out.flush()


def _report_lost_aggregated(lost: int) -> None:
    if lost:
        print(f"uprobes: lost {lost} events (the ring buffers overflowed): the figures leave them out",
              file=sys.stderr)

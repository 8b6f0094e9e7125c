"""The ``uprobes`` command line: argument parsing, dispatch, and turning errors into one line and exit 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap

from ..errors import UprobesError
from .serve_config import config_of
from .serving import listen_address, otlp_url
from .tracing import add_return_mode_option, add_stack_options, add_tracing_options, pids_of, positive

__all__ = ["main"]

_EXAMPLES = {
    "list": [("uprobes list /usr/bin/python3.11 'python:*'", "SDT markers of python3.11, semaphores and arguments"),
             ("uprobes list libc 'malloc*'", "functions of libc.so.6 whose names start with malloc"),
             ("uprobes list -p 1234", "every object mapped in process 1234"),
             ("uprobes list --vars libc malloc", "the variables a probe can read at malloc (with libc6-dbg)")],
    "trace": [("uprobes trace --engine ptrace 'uretprobe:libc:malloc ret=$retval' -- ls /",
               "every malloc of ls and what it returned, without root"),
              ("uprobes trace 'uprobe:libc:malloc size=%di:u64 if size >= 1048576' -- ls -R /usr",
               "only the mallocs of 1 MiB or more"),
              ("uprobes trace --format chrome -o ls.json 'uprobe:libc:malloc' 'uretprobe:libc:malloc' -- ls /",
               "malloc's calls as slices, for https://ui.perfetto.dev")],
    "count": [("uprobes count -d 5 'uprobe:libc:mem*'", "calls of libc's mem* functions, system-wide (root), 5 s"),
              ("uprobes count --engine ptrace 'uprobe:libc:malloc' -- ls /", "malloc's calls in ls, without root"),
              ("uprobes count --by size 'uprobe:libc:malloc size=%di:u64' -- ls /", "which sizes, how often")],
    "latency": [("uprobes latency -p 1234 'uprobe:libc:malloc'", "how long malloc takes in process 1234"),
                ("uprobes latency --engine ptrace 'uprobe:libc:malloc' -- ls /", "the same for ls, without root")],
    "hist": [("uprobes hist 'uprobe:libc:malloc size=%di:u64' size -- ls /", "malloc's sizes as a log2 histogram"),
             ("uprobes hist --linear 64 --by '$comm' 'uprobe:libc:malloc size=%di:u64' size -d 5",
              "per program, in buckets of 64 bytes, 5 s")],
    "stacks": [("uprobes stacks -d 5 -p 1234 'uprobe:libc:malloc' -o malloc.folded",
                "who calls malloc, as folded stacks for a flame graph")],
    "resolve": [("uprobes resolve 'uretprobe:libc:malloc ret=$retval:x64'", "the uprobe_events line it stands for"),
                ("uprobes resolve --engine ptrace 'uprobe:libc:malloc'", "and whether the ptrace engine jumps there")],
    "cleanup": [("uprobes cleanup", "delete what runs killed by SIGKILL left in tracefs")],
    "serve": [("uprobes serve -p 1234 'uprobe:libc:malloc' --latency 'uprobe:libc:free'",
               "malloc's hits and free's durations in process 1234, at http://127.0.0.1:9930/metrics"),
              ("uprobes serve --listen :9930 --by size 'uprobe:libc:malloc size=%di:u64'",
               "malloc's hits per size, system-wide (root), served on every address")],
}


def _examples(*commands: str) -> str:
    """The examples of ``commands``, for an epilog: each command, then what it does on the line below."""
    lines = [f"  {command}\n      {what}" for name in commands for command, what in _EXAMPLES[name]]
    return "examples:\n" + "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as for every other input error
        self.exit(2, f"uprobes: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("uprobes")
    except PackageNotFoundError:
        return "(not installed)"


def _build_parser(serve_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The command line; ``serve_defaults``: option values a ``serve --config`` file gives."""
    parser = _Parser(prog="uprobes", description="Linux user-space probes for x86-64 programs.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog=_examples("list", "trace", "count", "latency", "hist", "stacks", "resolve"))
    parser.add_argument("--version", action="version", version=f"uprobes {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    listing = commands.add_parser("list", help="list the functions and SDT markers of a file or a process",
                                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_examples("list"))
    listing.add_argument("target", nargs="?", metavar="TARGET",
                         help="a path, a program in PATH (python3) or a library (libc, libc.so.6)")
    listing.add_argument("pattern", nargs="?", default="*", metavar="PATTERN",
                         help="glob over function names and PROVIDER:NAME of markers (default: everything)")
    listing.add_argument("-p", "--pid", type=int, help="list every object mapped in this process: one line each, "
                                                      "unless a PATTERN or --functions is given")
    listing.add_argument("--functions", action="store_true",
                         help="with -p: every function and marker of every object (as a PATTERN of '*')")
    listing.add_argument("--json", action="store_true", help="one JSON document instead of text")
    source = listing.add_mutually_exclusive_group()
    source.add_argument("--vars", action="store_true",
                        help="the variables a probe can read at PATTERN (FUNCTION, FUNCTION:+N or FILE:LINE), "
                             "with their types and where each is there (from DWARF)")
    source.add_argument("--lines", action="store_true",
                        help="the source lines of the function PATTERN that a line probe can go on (from DWARF)")

    trace = commands.add_parser("trace", help="print every hit of the probes, with its arguments",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_examples("trace"))
    add_tracing_options(trace)
    trace.add_argument("--stack", action="store_true",
                       help="add each hit's user stack (ptrace engine: every probe then stops the program)")
    add_stack_options(trace)
    trace.add_argument("-n", "--max-events", type=positive(int, "-n", "a number of events"), metavar="N",
                       help="stop after N events")
    trace.add_argument("--format", choices=("text", "json", "chrome"),
                       help="text (the default), json (JSON lines, as --json) or chrome (trace-event JSON for "
                            "https://ui.perfetto.dev and chrome://tracing: calls as slices; needs -o FILE)")
    trace.add_argument("--wall-clock", action="store_true",
                       help="JSON: each event also gives realtime_ns, its wall-clock time (CLOCK_REALTIME, ns since "
                            "1970) beside ts_ns (CLOCK_MONOTONIC, ns since boot)")
    count = commands.add_parser("count", help="count the hits of each probe",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_examples("count"))
    add_tracing_options(count)
    count.add_argument("--interval", type=positive(float, "--interval", "a number of seconds"), metavar="SECONDS",
                       help="print the counts of each SECONDS as they pass, and of the rest at the end (each report "
                            "its own interval's: not cumulative)")
    count.add_argument("--by", metavar="ARG[,ARG...]",
                       help="count hits per distinct value of these fetch arguments (or $pid, $tid, $comm), most "
                            "first")
    count.add_argument("--top", type=positive(int, "--top", "a number of keys"), metavar="N",
                       help="with --by: only the N keys with the most hits")
    hist = commands.add_parser("hist", help="a histogram of an argument's values: uprobes hist PROBE... ARG",
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_examples("hist"))
    add_tracing_options(hist)
    hist.add_argument("--linear", type=positive(int, "--linear", "a step"), metavar="STEP",
                      help="buckets of STEP values each (default: powers of two, as latency's)")
    hist.add_argument("--by", metavar="ARG[,ARG...]", help="one histogram per distinct value of these arguments")
    hist.add_argument("--interval", type=positive(float, "--interval", "a number of seconds"), metavar="SECONDS",
                      help="also print the histograms of the last SECONDS, every SECONDS")
    latency = _described(commands, "latency", "time each call of a function, as a log2 histogram",
                         "Time each call of a function from its entry to its return. Each time includes the "
                         "engine's own part: on the ptrace engine about 20 ns where its probes are jumps and tens of "
                         "microseconds where they trap (measured after the run on a call that does nothing, and "
                         "printed below the histogram); on the kernel engine its trap at the return and its handling "
                         "of the function's first instruction (about 1 us where the kernel emulates it, 10 us where "
                         "it single-steps it in a virtual machine).")
    add_tracing_options(latency, "FUNCTION", "the function to time: uprobe:PATH:FUNCTION (a glob matching one), "
                                             "without fetch arguments ('if EXPR' may follow)")
    stacks = commands.add_parser("stacks", help="count hits per distinct user stack, as folded lines for flame graphs",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_examples("stacks"))
    add_tracing_options(stacks)
    add_stack_options(stacks)
    serve = _described(commands, "serve", "export the probes' hits, call durations and values, for Prometheus "
                                          "and OpenTelemetry",
                       "Run the probes and serve at http://ADDR:PORT/metrics (and/or push over OTLP to --otlp URL) "
                       "uprobes_hits_total per probe (and --by key), uprobes_latency_seconds per --latency function, "
                       "uprobes_argument per --hist argument, and the run's health (uprobes_lost_events_total, "
                       "uprobes_probes_placed, uprobes_target_up...), until a stop signal or -d. When the target "
                       "ends, what was counted stays served (uprobes_target_up 0). With --match, every process whose "
                       "name or command line matches is traced, those that start later too, each while it runs.")
    add_tracing_options(serve, writes=False, some="*")
    serve.add_argument("--listen", type=listen_address, metavar="ADDR:PORT",
                       help="where to serve /metrics (default 127.0.0.1:9930 unless --otlp is given; :PORT for every "
                            "IPv4 address)")
    serve.add_argument("--otlp", type=otlp_url, metavar="URL",
                       help="push the metrics to an OTLP/HTTP receiver, e.g. http://collector:4318/v1/metrics")
    serve.add_argument("--otlp-interval", type=positive(float, "--otlp-interval", "a number of seconds", 86400),
                       default=10.0,
                       metavar="SECONDS", help="push every SECONDS (default 10), and once more at the end")
    serve.add_argument("--latency", action="append", metavar="FUNCTION",
                       help="time each call of FUNCTION (uprobe:PATH:FUNCTION), as uprobes_latency_seconds "
                            "(repeatable)")
    serve.add_argument("--by", metavar="ARG[,ARG...]", help="count hits per distinct value of these arguments (a "
                                                            "label each)")
    serve.add_argument("--config", metavar="FILE",
                       help="probes and options from a TOML file, its keys the options' names (probes = [...], "
                            "latency = [...], match = [...], by, hist, listen, otlp, otlp_interval, max_series, engine, pid, command, "
                            "no_follow, trap, return_mode, duration); the command line's own win; SIGHUP reads it again")
    serve.add_argument("--hist", metavar="ARG[,ARG...]",
                       help="draw the values of these arguments, per probe that fetches them, as the histogram "
                            "uprobes_argument (0, then powers of two to 2^40)")
    serve.add_argument("--match", action="append", metavar="GLOB",
                       help="trace every process, running or started later, whose name (as ps -e shows it) or "
                            "command line matches GLOB (repeatable; instead of -p or a command; forks are traced "
                            "when they match too)")
    serve.add_argument("--max-series", type=positive(int, "--max-series", "a number of keys"), default=1000,
                       metavar="N", help="at most N distinct --by keys per probe; hits past them count under "
                                         "__other__ (default 1000)")
    serve.set_defaults(**(serve_defaults or {}))  # after every option: it changes their defaults
    commands.add_parser("cleanup", help="delete the kernel uprobe events that runs which died left behind",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_examples("cleanup"),
                        description="Delete the kernel uprobe events (tracefs) left behind by uprobes runs whose "
                                    "process died (SIGKILLed, say); those of live runs are left alone. Needs root.")

    resolve = commands.add_parser("resolve", help="show the probe points a probe names, as uprobe_events lines",
                                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_examples("resolve"))
    resolve.add_argument("probes", nargs="+", metavar="PROBE", help="a probe with its fetch arguments, quoted")
    resolve.add_argument("--json", action="store_true", help="one JSON object per probe point")
    resolve.add_argument("-p", "--pid", type=int, help="paths as this process sees them, and '*' as every object "
                                                      "it maps")
    add_return_mode_option(resolve)
    resolve.add_argument("--engine", choices=("ptrace",),
                         help="ptrace: also say how that engine places each probe point: a jump (no stop per hit; "
                              "counted, or traced too) or an int3, and why not a jump")
    return parser


def _described(commands, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose --help has a paragraph of its own, wrapped, above its options and examples."""
    return commands.add_parser(name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=_examples(name), description=textwrap.fill(description, 79))


def _split_dash_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """``uprobes trace PROBE... -- CMD ARGS``: what follows ``--`` is the command, untouched."""
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1:]
    return argv, []


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The command line ``argv`` (and a ``serve --config`` file's values, read now: a problem with it is an
    UprobesError); ``argv`` is kept in the result, for ``serve`` to read the file again."""
    words, dash_command = _split_dash_command(argv)
    config = config_of(words)  # serve --config FILE: the file's values are the defaults of the options
    args = _build_parser(config.defaults if config else {}).parse_args(words)
    args.dash_command, args.argv = dash_command, argv
    if hasattr(args, "pids"):
        pids_of(args)
    if config is not None:
        config.complete(args)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``uprobes`` console script; returns the exit status."""
    try:
        args = parse_arguments(sys.argv[1:] if argv is None else argv)
    except UprobesError as exc:
        print(f"uprobes: error: {exc}", file=sys.stderr)
        return 2
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C is a KeyboardInterrupt again
        return _dispatch(args)
    except UprobesError as exc:
        print(f"uprobes: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # before a run started; a run's own clean-up has happened already
        return 128 + getattr(stop, "signum", signal.SIGINT)
    except BrokenPipeError:  # `uprobes list ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "list" and (args.vars or args.lines):
        from .source_listing import run_source_listing

        return run_source_listing(args)
    if args.command == "list":
        from .listing import run_list

        return run_list(args)
    if args.command == "resolve":
        from .resolving import run_resolve

        return run_resolve(args)
    if args.command == "cleanup":
        from .cleanup import run_cleanup

        return run_cleanup(args)
    from .tracing import launches_command, run_count, run_hist, run_latency, run_stacks, run_trace

    if args.command == "trace":
        args.format = _trace_format(args)
    if not launches_command(args):
        from .guard import work_in_a_child

        work_in_a_child()  # the traced process survives a SIGKILL of the pid the user holds
    if args.command == "serve":
        from .serving import run_serve

        return run_serve(args)
    return {"trace": run_trace, "count": run_count, "latency": run_latency, "stacks": run_stacks,
            "hist": run_hist}[args.command](args)


def _trace_format(args: argparse.Namespace) -> str:
    """What ``trace`` writes: ``--format``, or ``--json`` (the same as ``--format json``); text by default."""
    if args.json and args.format not in (None, "json"):
        raise UprobesError(f"--json means --format json: give --format {args.format} without --json")
    output_format = "json" if args.json else args.format or "text"
    if output_format == "chrome" and not args.output:
        raise UprobesError("--format chrome writes one JSON document to a file: add -o FILE, then open FILE in "
                           "https://ui.perfetto.dev or chrome://tracing")
    if args.wall_clock and output_format != "json":
        raise UprobesError("--wall-clock adds each event's wall-clock time to JSON: give --json too (text shows the "
                           "time of day already)")
    return output_format


if __name__ == "__main__":
    sys.exit(main())

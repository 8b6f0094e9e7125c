"""PostgreSQL 15's USDT markers on a real server, with both engines: every query a client sends, with its
text, and the transactions around them, from a tracer attached to the postmaster before the client's backend
was forked. The server must be undisturbed after, and the markers' semaphores back at zero."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import RunningTool, children_of, kernel_groups, run_cli, run_groups_of, wait_until

PG_BIN = Path("/usr/lib/postgresql/15/bin")
POSTGRES = str(PG_BIN / "postgres")
PSQL = str(PG_BIN / "psql")
PORT = 54329  # on a unix socket in a directory of our own: no other server can clash with it
PROBES = [f"usdt:{POSTGRES}:postgresql:query__start arg0:string",
          f"usdt:{POSTGRES}:postgresql:transaction__start",
          f"usdt:{POSTGRES}:postgresql:transaction__commit"]
QUERY, START, COMMIT = "postgresql:query__start", "postgresql:transaction__start", "postgresql:transaction__commit"
MARKER = "uprobes-marker-1"
# One psql session, one -c per statement: each reaches the server as one query with exactly this text.
STATEMENTS = [f"SELECT '{MARKER}', pg_backend_pid()", "SELECT 41 + 1", "BEGIN", "CREATE TEMP TABLE t(x int)",
              "INSERT INTO t VALUES (1), (2), (3)", "SELECT sum(x) FROM t", "COMMIT"]
IN_THE_BLOCK = STATEMENTS[3:]  # what runs inside the explicit transaction (its COMMIT included)
AS_POSTGRES = {"user": "postgres", "group": "postgres", "extra_groups": [], "cwd": "/"}  # our cwd may be closed to it

pytestmark = [pytest.mark.skipif(not os.path.exists(POSTGRES), reason=f"{POSTGRES} is not installed"),
              pytest.mark.skipif(os.geteuid() != 0, reason="running a server as user postgres needs root")]


@dataclass
class Server:
    directory: Path  # owned by postgres: the data directory and the socket are in it
    postmaster: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.postmaster.pid

    def _client_env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "HOME": str(self.directory), "LC_ALL": "C"}

    def _connection(self) -> list[str]:
        return ["-h", str(self.directory), "-p", str(PORT), "-U", "postgres", "-d", "postgres"]

    def psql(self, *statements: str) -> list[str]:
        """Run ``statements`` in one psql session; the rows it printed (unaligned, ``|`` between columns)."""
        command = [PSQL, *self._connection(), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"]
        for statement in statements:
            command += ["-c", statement]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env=self._client_env(),
                              **AS_POSTGRES)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        return proc.stdout.splitlines()

    def run_client(self) -> int:
        """The client of every test: STATEMENTS in one session. Returns the pid of the backend that served it,
        as pg_backend_pid() told the client, once that backend has exited: the transaction it runs at exit
        (to drop the temporary table) is over too."""
        rows = self.psql(*STATEMENTS)
        backend = rows[0].rpartition("|")[2]
        assert rows == [f"{MARKER}|{backend}", "42", "6"]
        wait_until(lambda: not _alive(int(backend)), f"backend {backend} to exit")
        return int(backend)

    @contextmanager
    def session(self) -> Iterator[Callable[[str], str]]:
        """An interactive psql session kept open: ``ask(statement)`` returns the one row it prints."""
        client = subprocess.Popen([PSQL, *self._connection(), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self._client_env(),
                                  **AS_POSTGRES)

        def ask(statement: str) -> str:
            client.stdin.write(statement + ";\n")
            client.stdin.flush()
            return client.stdout.readline().rstrip("\n")  # "" if psql stopped on an error

        try:
            yield ask
        finally:
            client.stdin.close()
            client.wait(timeout=30)

    def log(self) -> str:
        return (self.directory / "server.log").read_text(errors="replace")


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: reaped between the open and the read
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _as_postgres(*command: str) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, **AS_POSTGRES)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A PostgreSQL 15 server of our own, run by user postgres, listening only on a unix socket in a fresh
    directory; stopped (fast shutdown) and removed at the end of the module."""
    directory = Path(tempfile.mkdtemp(prefix="uprobes-pg-", dir="/tmp"))
    shutil.chown(directory, "postgres", "postgres")
    postmaster = None
    try:
        data = directory / "data"
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                     "--locale=C", "--no-sync", "--no-instructions")
        with open(directory / "server.log", "w") as log:
            postmaster = subprocess.Popen([POSTGRES, "-D", str(data), "-k", str(directory), "-p", str(PORT),
                                           "-c", "listen_addresses=", "-c", "fsync=off"],
                                          stdout=log, stderr=subprocess.STDOUT, **AS_POSTGRES)
        running = Server(directory, postmaster)
        ready = [str(PG_BIN / "pg_isready"), "-q", *running._connection(), "-t", "1"]

        def accepting() -> bool:
            assert postmaster.poll() is None, f"the server did not start:\n{running.log()}"
            return subprocess.run(ready, env=running._client_env(), **AS_POSTGRES).returncode == 0

        wait_until(accepting, "the server to accept connections")
        yield running
    finally:
        if postmaster is not None:
            postmaster.send_signal(signal.SIGINT)  # fast shutdown
            try:
                postmaster.wait(timeout=30)
            except subprocess.TimeoutExpired:
                postmaster.kill()
                postmaster.wait()
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Tracing:
    tracer: RunningTool
    records: list[dict] = field(default_factory=list)
    stderr: str = ""

    def events_of(self, pid: int) -> list[dict]:
        """The events of one process, in time order."""
        return sorted((r for r in self.records if r.get("pid") == pid), key=lambda r: r["ts_ns"])


@contextmanager
def _tracing(server: Server, engine: str) -> Iterator[Tracing]:
    """``uprobes trace --json -p POSTMASTER PROBES`` with ``engine``: the body runs once the tracer has attached
    (with the kernel engine, its run's group defined); on leaving, the tracer is stopped with SIGINT and has
    ended cleanly (status 130, nothing else said, its group gone) and its records are read. No deadline: the
    clients take as long as the machine needs."""
    output = server.directory / f"events-{engine}-{os.urandom(4).hex()}.jsonl"
    with RunningTool("trace", "--engine", engine, "--json", "-o", str(output), "-p", str(server.pid),
                     *PROBES) as tracer:
        tracer.wait_attached()
        assert f"3 probe points attached ({engine} engine, pid {server.pid})" in tracer.err.lines[0]
        # the run's own group, named after the tool or the worker it forked to trace (cli/guard.py)
        own = run_groups_of({tracer.proc.pid, *children_of(tracer.proc.pid)}) if engine == "kernel" else set()
        assert len(own) == (engine == "kernel")
        tracing = Tracing(tracer)
        yield tracing
        out, tracing.stderr = tracer.finish()
    assert tracer.proc.returncode == 128 + signal.SIGINT, tracing.stderr
    # the events went to the file; no warning, no note but how the ptrace engine placed the probes
    notes = [line for line in tracing.stderr.splitlines()
             if not re.match(r"uprobes: (\d+ of \d+ probe points were jumps|\S+ trapped at an int3|\d+ probe points "
                             r"attached)", line)]
    assert out == "" and notes == [], tracing.stderr
    tracing.records = [json.loads(line) for line in output.read_text().splitlines()]
    output.unlink()
    assert tracing.records[-1] == {"lost": 0}
    if engine == "kernel":
        assert not own & kernel_groups()  # the run's own group went with it


def _query_start_semaphore(pid: int) -> int:
    """The semaphore of postgresql:query__start in process ``pid`` now, as ``uprobes list -p`` reads it."""
    listing = json.loads(run_cli("list", "-p", str(pid), "--json", QUERY, check=True).stdout)
    (postgres,) = [o for o in listing["objects"] if o["path"].endswith("/bin/postgres")]
    (site,) = postgres["markers"][0]["sites"]
    return site["semaphore_value"]


def _code_differs_from_the_file(pid: int) -> bool:
    """Whether the postgres code mapped in ``pid`` differs from the file's bytes (an int3 left behind)."""
    differs = False
    with open(f"/proc/{pid}/mem", "rb") as mem, open(POSTGRES, "rb") as program:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            if len(fields) == 6 and fields[5] == POSTGRES and "x" in fields[1]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                program.seek(int(fields[2], 16))
                mem.seek(start)
                differs |= mem.read(end - start) != program.read(end - start)
    return differs


def _tracer_pid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("TracerPid:")).split()[1])


def _transactions(events: list[dict]) -> list[tuple[dict, dict]]:
    """The (start, commit) pairs of one backend's events: equal in number and local transaction id, each start
    before its commit and after the previous commit."""
    starts = [e for e in events if e["probe"] == START]
    commits = [e for e in events if e["probe"] == COMMIT]
    assert [s["args"]["arg0"] for s in starts] == [c["args"]["arg0"] for c in commits]
    pairs = list(zip(starts, commits))
    assert all(s["ts_ns"] < c["ts_ns"] for s, c in pairs)
    assert all(c["ts_ns"] < s["ts_ns"] for (_, c), (s, _) in zip(pairs, pairs[1:]))
    return pairs


@pytest.mark.parametrize("engine", ["ptrace", "kernel"])
def test_every_query_of_a_new_backend_with_its_text(server: Server, engine: str, request):
    if engine == "kernel":
        request.getfixturevalue("tracefs")
    with ExitStack() as sessions:
        with _tracing(server, engine) as tracing:
            enabled = _query_start_semaphore(server.pid)
            witness = sessions.enter_context(server.session())  # a backend forked while traced, living on
            witness_pid = int(witness("SELECT pg_backend_pid()"))
            backend = server.run_client()
        events = tracing.events_of(backend)
        queries = [e for e in events if e["probe"] == QUERY]
        assert [q["args"]["arg0"] for q in queries] == STATEMENTS  # each once, with its exact text
        assert {r["pid"] for r in tracing.records if MARKER in str(r.get("args", {}).get("arg0"))} == {backend}
        assert backend != server.pid and server.pid not in {r.get("pid") for r in tracing.records}
        assert {(e["tid"], e["comm"]) for e in events} == {(backend, "postgres")}
        transactions = _transactions(events)
        inside = [q["args"]["arg0"] for q in queries if any(s["ts_ns"] < q["ts_ns"] < c["ts_ns"]
                                                            for s, c in transactions)]
        assert inside == IN_THE_BLOCK  # the others each began a transaction of their own
        # psql keeps the semicolon of what it reads from its input
        assert [e["args"]["arg0"] for e in tracing.events_of(witness_pid) if e["probe"] == QUERY] == [
            "SELECT pg_backend_pid();"]

        # The server is undisturbed, and every count the tracer added is taken back.
        assert enabled == 1
        assert server.postmaster.poll() is None
        assert (server.directory / "data" / "postmaster.pid").read_text().split()[0] == str(server.pid)
        for pid in (server.pid, witness_pid):
            assert _tracer_pid(pid) == 0 and not _code_differs_from_the_file(pid)
            assert _query_start_semaphore(pid) == 0
        assert witness("SELECT 6 * 7") == "42"
    with server.session() as fresh:
        assert _query_start_semaphore(int(fresh("SELECT pg_backend_pid()"))) == 0
        assert fresh(f"SELECT '{MARKER}' || (41 + 1)") == f"{MARKER}42"


def _seen(events: list[dict]) -> list[tuple[str, object]]:
    """(probe, arg0) of one backend's events in time order, transaction ids counted from its first one."""
    first = next(e["args"]["arg0"] for e in events if e["probe"] == START)
    return [(e["probe"], e["args"]["arg0"] - first if e["probe"] in (START, COMMIT) else e["args"]["arg0"])
            for e in events]


def test_both_engines_see_the_same_queries_of_one_server(server: Server, tracefs: Path):
    seen = {}
    for engine in ("ptrace", "kernel"):
        with _tracing(server, engine) as tracing:
            backend = server.run_client()
        seen[engine] = _seen(tracing.events_of(backend))
    assert seen["ptrace"] == seen["kernel"]  # the same multiset, in the same order
    assert [arg for probe, arg in seen["kernel"] if probe == QUERY] == STATEMENTS
    assert server.psql("SELECT 41 + 1") == ["42"]

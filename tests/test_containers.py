"""Programs in their own mount namespace (issue 20): a program and a library at paths only the program's
namespace has, as in any container, probed with -p by its own path, by /proc/PID/root/..., by /proc/PID/exe
and by bare name, and listed, on both engines. The namespace is made with unshare(1) and a tmpfs mounted in
it: no container runtime needed. Values are checked against what the program prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

ENGINES = ["ptrace", "kernel"]


@pytest.fixture(params=ENGINES)
def engine(request, targets):
    if os.geteuid() != 0:
        pytest.skip("a mount namespace (unshare --mount) needs root")
    return request.param


@pytest.fixture
def contained(targets, tmp_path):
    """``placement later LIB`` started in a mount namespace of its own, from a tmpfs mounted there on
    ``tmp_path/app`` (empty in ours), with libctor.so beside it; yields (process, directory)."""
    app = tmp_path / "app"
    app.mkdir()
    script = (f"mount -t tmpfs none {app} && cp {targets / 'placement'} {targets / 'libctor.so'} {app}/ && "
              f"exec {app}/placement later {app}/libctor.so")
    process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n"
        assert not (app / "placement").exists()  # only its namespace has the files
        yield process, app
    finally:
        process.kill()
        process.wait()


def _untraced(targets) -> str:
    run = subprocess.run([str(targets / "placement"), "later", str(targets / "libctor.so")], input="\n\n",
                         capture_output=True, text=True, timeout=30)
    return run.stdout


class _Tracing:
    """``uprobes trace --json -p PID PROBES`` (or system-wide) beside a test: started, waited for until attached, stopped with
    Ctrl-C; its events once it is done."""

    def __init__(self, engine: str, pid: int, probes: list[str], out: Path, system_wide: bool = False) -> None:
        self.out = out
        scope = [] if system_wide else ["-p", str(pid)]
        self.tool = subprocess.Popen([sys.executable, "-m", "uprobes", "trace", "--engine", engine, "--json", "-o",
                                      str(out), *scope, *probes], stderr=subprocess.PIPE, text=True)
        self.said = ""
        while "attached" not in self.said:
            line = self.tool.stderr.readline()
            if not line:
                break
            self.said += line

    def stop(self) -> list[dict]:
        if self.tool.poll() is None:
            self.tool.send_signal(signal.SIGINT)
        _, rest = self.tool.communicate(timeout=60)
        self.said += rest
        assert "Traceback" not in self.said, self.said
        return [json.loads(line) for line in self.out.read_text().splitlines()] if self.out.exists() else []


def test_a_program_and_a_library_only_its_namespace_has(targets, engine, contained, tmp_path):
    process, app = contained
    pid = process.pid
    probes = [f"uprobe:{app}/placement:step", f"uprobe:/proc/{pid}/root{app}/placement:step i=%di",
              f"p:by_exe /proc/{pid}/exe:step", "p:by_name placement:step", f"uprobe:{app}/libctor.so:lib_work i=%di"]
    tracing = _Tracing(engine, pid, probes, tmp_path / "events.jsonl")
    assert tracing.tool.poll() is None, tracing.said
    process.stdin.write("\n")
    process.stdin.flush()
    printed = process.stdout.readline()  # after step(0..2), dlopen of the library, lib_work(0..2)
    events = tracing.stop()
    process.stdin.write("\n")
    process.stdin.flush()
    assert printed + process.stdout.read() == _untraced(targets).split("ready\n", 1)[1]
    assert process.wait(timeout=30) == 0
    by_probe: dict[str, list] = {}
    for event in events:
        if "probe" in event:
            by_probe.setdefault(event["probe"], []).append(event["args"])
    assert "step" in by_probe, (events, tracing.said, printed)
    assert sorted(by_probe.pop("step"), key=lambda args: (len(args), str(args))) == [{}] * 3 + [{"i": 0}, {"i": 1}, {"i": 2}]
    assert by_probe == {"by_exe": [{}] * 3, "by_name": [{}] * 3, "lib_work": [{"i": 0}, {"i": 1}, {"i": 2}]}


def test_list_shows_what_a_contained_process_maps(targets, contained):
    if os.geteuid() != 0:
        pytest.skip("a mount namespace (unshare --mount) needs root")
    process, app = contained
    listing = json.loads(run_cli("list", "-p", str(process.pid), "--json", "step", check=True).stdout)
    found = {os.path.basename(obj["path"]): obj for obj in listing["objects"]}
    assert found["placement"]["path"] == f"/proc/{process.pid}/root{app}/placement"
    assert [f["name"] for f in found["placement"]["functions"]] == ["step"]


def test_system_wide_a_path_through_a_process_root_probes_that_file(targets, contained, tmp_path):
    """Without -p, the kernel engine probes the file /proc/PID/root/... names, in whatever process runs it."""
    if os.geteuid() != 0:
        pytest.skip("the kernel engine needs root")
    process, app = contained
    tracing = _Tracing("kernel", 0, [f"uprobe:/proc/{process.pid}/root{app}/placement:step i=%di"],
                       tmp_path / "events.jsonl", system_wide=True)
    assert tracing.tool.poll() is None, tracing.said
    process.stdin.write("\n")
    process.stdin.flush()
    assert process.stdout.readline().startswith("later steps 33")
    events = [event for event in tracing.stop() if "probe" in event]
    process.stdin.write("\n")
    process.stdin.flush()
    assert [(event["pid"], event["args"]) for event in events] == [(process.pid, {"i": i}) for i in range(3)]
    assert "every process" in tracing.said


def test_list_reads_a_jit_map_file_in_the_process_namespace(tmp_path):
    """A JIT compiler writes /tmp/perf-PID.map with its own pid, in its own /tmp: here a process that is pid 1
    of a pid namespace, with a tmpfs on /tmp of its own mount namespace, writes one as the JVM or Node would."""
    if os.geteuid() != 0:
        pytest.skip("namespaces (unshare) need root")
    script = ("mount -t tmpfs none /tmp && printf '7f0000001000 40 jit::hot_loop\\n7f0000001040 20 jit::cold path\\n"
              "not a line\\n' > /tmp/perf-$$.map && echo ready && exec sleep 60")
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "--mount", "--propagation", "private", "sh", "-c", script],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert outer.stdout.readline() == "ready\n"
        pid = int(subprocess.run(["pgrep", "-P", str(outer.pid)], capture_output=True, text=True).stdout.split()[0])
        assert not Path("/tmp/perf-1.map").exists() or Path("/tmp/perf-1.map").read_text().find("jit::") < 0
        listing = json.loads(run_cli("list", "-p", str(pid), "--json", "jit::*", check=True).stdout)
        (jit,) = [obj for obj in listing["objects"] if obj["kind"] == "jit"]
        assert jit["path"] == "/tmp/perf-1.map"
        assert [(f["name"], f["address"], f["size"]) for f in jit["functions"]] == [
            ("jit::hot_loop", 0x7F0000001000, 0x40), ("jit::cold path", 0x7F0000001040, 0x20)]
        assert "jit::hot_loop" in run_cli("list", "-p", str(pid), "--functions", check=True).stdout
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(outer.pid)])  # the namespace's pid 1, and with it the namespace
        outer.kill()
        outer.wait()

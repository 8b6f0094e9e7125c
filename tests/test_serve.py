"""`uprobes serve`: a real Prometheus (Debian's package, started here on a loopback port, scraping every second)
reads the hits and call durations of a program with known activity, through its own query API; the exposition
itself is read with prometheus-client's parser."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import run_cli

PROMETHEUS = "/usr/bin/prometheus"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


class _Serving:
    """``uprobes serve --listen 127.0.0.1:PORT ARGS`` in the background, until it says it serves."""

    def __init__(self, *args: str) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "uprobes", "serve", "--listen", f"127.0.0.1:{self.port}",
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.said = ""
        while "serving metrics on" not in self.said:
            line = self.proc.stderr.readline()
            assert line, self.said + self.proc.stderr.read()
            self.said += line

    def metrics(self) -> dict[str, list]:
        """Each sample of /metrics by name: (labels, value)."""
        samples: dict[str, list] = {}
        text = _get(f"http://127.0.0.1:{self.port}/metrics").decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((sample.labels, sample.value))
        return samples

    def wait_said(self, words: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while words not in self.said:
            assert time.monotonic() < deadline, self.said
            self.said += self.proc.stderr.readline()

    def stop(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, self.said + err


@pytest.fixture
def serving():
    started = []

    def start(*args: str) -> _Serving:
        started.append(_Serving(*args))
        return started[-1]

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture
def prometheus(tmp_path: Path):
    """Start Prometheus scraping a port every second; gives a query function of PromQL to its result."""
    if not Path(PROMETHEUS).exists():
        pytest.fail("prometheus is not installed: scripts/install-deps installs it")
    procs = []

    def start(target_port: int):
        port = _free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs: [{{job_name: uprobes, static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]}}]\n")
        procs.append(subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'data'}",
                                       f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        deadline = time.monotonic() + 30
        while True:
            try:
                _get(f"http://127.0.0.1:{port}/-/ready")
                break
            except OSError:
                assert procs[-1].poll() is None and time.monotonic() < deadline, "prometheus did not start"
                time.sleep(0.1)

        def query(expression: str) -> list[dict]:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
            return json.loads(_get(url))["data"]["result"]

        return query

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def _settled(query, expression: str, wanted, timeout: float = 60):
    """The value Prometheus gives ``expression`` once it is ``wanted`` (it scrapes a first time ~5 s after start)."""
    deadline = time.monotonic() + timeout
    while True:
        result = query(expression)
        values = sorted((tuple(sorted(r["metric"].items())), float(r["value"][1])) for r in result)
        if values == wanted or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


@pytest.mark.parametrize("engine", ["ptrace", "kernel"])
def test_prometheus_reads_the_hits_and_call_durations_the_program_made(targets, serving, prometheus, engine):
    if engine == "kernel" and os.geteuid() != 0:
        pytest.skip("the kernel engine needs root")
    calls = os.path.realpath(targets / "calls")
    server = serving("--engine", engine, "--latency", f"uprobe:{calls}:work", f"uprobe:{calls}:work",
                     f"usdt:{calls}:calls:step", "--", calls, "40", "5")
    server.wait_said("the target has ended")
    query = prometheus(server.port)
    labels = (("instance", f"127.0.0.1:{server.port}"), ("job", "uprobes"))
    hits = _settled(query, "uprobes_hits_total", [((("__name__", "uprobes_hits_total"), *labels, ("path", calls),
                                                     ("probe", probe)), 40.0) for probe in ("calls:step", "work")])
    assert hits == [((("__name__", "uprobes_hits_total"), *labels, ("path", calls), ("probe", probe)), 40.0)
                    for probe in ("calls:step", "work")]
    buckets = query('uprobes_latency_seconds_bucket{function="work"}')
    counts = sorted((float(b["metric"]["le"]), float(b["value"][1])) for b in buckets)
    assert counts[-1] == (float("inf"), 40.0) and [n for _, n in counts] == sorted(n for _, n in counts)
    assert float(query("uprobes_latency_seconds_count")[0]["value"][1]) == 40.0
    assert float(query("uprobes_latency_seconds_sum")[0]["value"][1]) > 0
    up = query("uprobes_target_up")
    assert [(r["metric"]["target"], r["value"][1]) for r in up] == [("calls", "0")]
    assert query("uprobes_lost_events_total")[0]["value"][1] == "0"
    status, out, said = server.stop()
    assert status == 0 and out.startswith("calls 40 ") and "Traceback" not in said, said


def test_hits_by_key_are_bounded_and_what_is_past_the_bound_is_counted(targets, serving):
    calls = os.path.realpath(targets / "calls")
    server = serving("--engine", "ptrace", "--by", "i", "--max-series", "10", f"uprobe:{calls}:work i=%di:s32",
                     "--", calls, "30")
    server.wait_said("the target has ended")
    samples = server.metrics()
    by_i = {labels["i"]: value for labels, value in samples["uprobes_hits_total"]}
    assert by_i == {**{str(i): 1.0 for i in range(10)}, "__other__": 20.0}
    assert samples["uprobes_series_dropped_total"] == [({"probe": "work", "path": calls}, 20.0)]
    assert server.stop()[0] == 0


def test_a_process_is_served_while_it_runs_and_left_as_it_was(targets, serving):
    calls = str(targets / "calls")
    target = subprocess.Popen([calls, "1000000", "20"], stdout=subprocess.DEVNULL)
    try:
        server = serving("--engine", "ptrace", "-p", str(target.pid), f"uprobe:{calls}:work")
        deadline = time.monotonic() + 30
        while server.metrics()["uprobes_hits_total"][0][1] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        samples = server.metrics()
        assert samples["uprobes_target_up"] == [({"target": "calls"}, 1.0)]
        assert samples["uprobes_probes_placed"] == [({}, 1.0)]
        status, _, said = server.stop()
        assert status == 0, said
        assert target.poll() is None  # untouched: still running, probes gone
        with open(f"/proc/{target.pid}/maps") as maps:
            assert "uprobes" not in maps.read()
    finally:
        target.kill()
        target.wait()


@pytest.mark.parametrize("args, message", [
    ([], "serve needs probes to count (PROBE...) or functions to time (--latency FUNCTION)"),
    (["--listen", "127.0.0.1:99999", "uprobe:libc:malloc"], "--listen takes ADDR:PORT"),
    (["--by", "probe", "uprobe:libc:malloc probe=%di"], "--by probe: a label 'probe' is there already"),
    (["--by", "size,size", "uprobe:libc:malloc size=%di"], "--by size: a label 'size' is there already"),
    (["--by", "pid,$pid", "uprobe:libc:malloc pid=%di"], "--by $pid: a label 'pid' is there already"),
    (["--latency", "uprobe:libc:malloc size=%di"], "--latency uprobe:libc:malloc size=%di: latency times calls and "
                                                     "fetches nothing"),
])
def test_serve_errors_are_one_line(args, message):
    result = run_cli("serve", "--engine", "ptrace", *args, "--", "true")
    assert result.status == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
        result.stderr


def test_a_port_in_use_is_named_before_anything_is_placed(targets):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--engine", "ptrace", "--listen", f"127.0.0.1:{port}",
                         f"uprobe:{targets / 'calls'}:work", "--", str(targets / "calls"), "1")
    assert result.status == 2 and result.stderr == (f"uprobes: error: cannot serve on 127.0.0.1:{port}: Address "
                                                    f"already in use\n")
    assert "calls 1" not in result.stdout  # the command never ran


def test_the_readme_alert_rules_are_valid_prometheus_rules():
    rules = Path(__file__).resolve().parent.parent / "examples" / "uprobes-alerts.yml"
    result = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS: 3 rules found" in result.stdout, result.stdout + result.stderr


def test_the_probe_points_of_one_probe_are_one_series(targets, serving):
    """clampx's first line has a probe point in each of its two copies inlined into both() (lines.c): one series,
    the sum, as Prometheus keeps one sample per set of labels."""
    program = os.path.realpath(targets / "lines-O2")
    clamp = next(n for n, text in enumerate((targets.parent / "lines.c").read_text().splitlines(), 1)
                 if "COUNTED CLAMP" in text)
    server = serving("--engine", "ptrace", f"uprobe:{program}:lines.c:{clamp}", "--", program, "4")
    server.wait_said("the target has ended")
    assert "2 probe points attached" in server.said
    assert server.metrics()["uprobes_hits_total"] == [({"probe": f"lines.c:{clamp}", "path": program}, 8.0)]
    status, out, _ = server.stop()
    assert status == 0 and "clamp 8 " in out


def test_calls_are_timed_in_the_order_they_happened_whatever_the_order_of_the_groups():
    """A poll's events come in groups, one per probe and thread: entries [1, 3] and returns [2, 4] of one thread
    are two calls of 1 ns each, not 0 and 3 ns."""
    from uprobes.output.columns import EventColumns, Group
    from uprobes.output.prometheus import ProbeMetrics

    metrics = ProbeMetrics(["f", "f%return"], ["/bin/x", "/bin/x"], timed=[range(0, 2)])
    def group(index: int, times: list[int]) -> Group:
        return Group(["f", "f%return"][index], index, 10, 10, "x", 0x1000, (), {}, {}, times, [0] * len(times))
    metrics.add(EventColumns([group(1, [2_000, 4_000]), group(0, [1_000, 3_000])]))
    latency = {sample.name: sample for family in metrics.collect() for sample in family.samples
               if family.name == "uprobes_latency_seconds" and sample.labels.get("le") in (None, "1e-07", "+Inf")}
    assert latency["uprobes_latency_seconds_count"].value == 2
    assert latency["uprobes_latency_seconds_sum"].value == pytest.approx(2e-6)

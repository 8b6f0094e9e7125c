"""`uprobes serve`: a real Prometheus (Debian's package, started here on a loopback port, scraping every second)
reads the hits and call durations of a program with known activity, through its own query API; the exposition
itself is read with prometheus-client's parser."""

from __future__ import annotations

import json
import select
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

from conftest import Caller, run_cli

PROMETHEUS = "/usr/bin/prometheus"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


class _Serving:
    """``uprobes serve --listen 127.0.0.1:PORT ARGS`` in the background, until it says it serves (or pushes:
    ``--otlp`` alone, ``listen`` False, serves nothing)."""

    def __init__(self, *args: str, listen: bool = True, port: int | None = None) -> None:
        """``port``: where it serves when ARGS say (a configuration file)."""
        self.port = port or _free_port()
        listening = ["--listen", f"127.0.0.1:{self.port}"] if listen else []
        self.proc = subprocess.Popen([sys.executable, "-m", "uprobes", "serve", *listening, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.said = ""
        while "serving metrics on" not in self.said and "pushing metrics to" not in self.said:
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

    def wait_said(self, words: str, timeout: float = 60, times: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.said.count(words) < times:
            assert time.monotonic() < deadline, self.said
            self.said += self.proc.stderr.readline()

    def stop(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, self.said + err


@pytest.fixture
def serving():
    started = []

    def start(*args: str, listen: bool = True, port: int | None = None) -> _Serving:
        started.append(_Serving(*args, listen=listen, port=port))
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
    alerts = rules.read_text().count("- alert:")
    assert result.returncode == 0 and f"SUCCESS: {alerts} rules found" in result.stdout, result.stdout + result.stderr


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
    from uprobes.output.metrics import ProbeMetrics

    metrics = ProbeMetrics(["f", "f%return"], ["/bin/x", "/bin/x"], timed=[range(0, 2)])
    def group(index: int, times: list[int]) -> Group:
        return Group(["f", "f%return"][index], index, 10, 10, "x", 0x1000, (), {}, {}, times, [0] * len(times))
    metrics.add(EventColumns([group(1, [2_000, 4_000]), group(0, [1_000, 3_000])]))
    latency = {sample.name: sample for family in metrics.collect() for sample in family.samples
               if family.name == "uprobes_latency_seconds" and sample.labels.get("le") in (None, "1e-07", "+Inf")}
    assert latency["uprobes_latency_seconds_count"].value == 2
    assert latency["uprobes_latency_seconds_sum"].value == pytest.approx(2e-6)


class _OtlpReceiver:
    """An OTLP/HTTP metrics receiver on a loopback port: each request decoded with the protocol's own schema
    (opentelemetry-proto's ExportMetricsServiceRequest). No OpenTelemetry Collector installs here (Debian has none,
    Prometheus 2.42 has no OTLP receiver): this is what such a receiver would be handed."""

    def __init__(self) -> None:
        import gzip
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (ExportMetricsServiceRequest,
                                                                                  ExportMetricsServiceResponse)
        self.requests: list = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportMetricsServiceRequest()
                request.ParseFromString(body)
                received.append((self.path, self.headers["Content-Type"], request))
                answer = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def last(self) -> dict[str, list]:
        """The last request's data points by metric name: (attributes, the point)."""
        _, _, request = self.requests[-1]
        points: dict[str, list] = {}
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    data = getattr(metric, metric.WhichOneof("data"))
                    points[metric.name] = [({a.key: a.value.string_value for a in p.attributes}, p)
                                           for p in data.data_points]
        return points


def test_the_metrics_are_pushed_over_otlp(targets, serving):
    receiver = _OtlpReceiver()
    calls = os.path.realpath(targets / "calls")
    try:
        server = serving("--engine", "ptrace", "--otlp", receiver.url, "--otlp-interval", "0.3", "--latency",
                         f"uprobe:{calls}:work", f"uprobe:{calls}:work", "--", calls, "40", listen=False)
        server.wait_said("the target has ended")
        deadline = time.monotonic() + 30
        while not receiver.requests:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        status, out, said = server.stop()  # a last push, with the final figures
        assert status == 0 and out.startswith("calls 40 ") and "failed" not in said, said
        assert "serving metrics" not in said  # --otlp alone serves nothing
    finally:
        receiver.server.shutdown()
    path, content_type, request = receiver.requests[-1]
    assert path == "/v1/metrics" and content_type == "application/x-protobuf"
    resource = {a.key: a.value for a in request.resource_metrics[0].resource.attributes}
    assert resource["service.name"].string_value == "uprobes"
    points = receiver.last()
    ((attributes, hits),) = points["uprobes_hits"]
    assert attributes == {"probe": "work", "path": calls} and hits.as_int == 40
    ((attributes, latency),) = points["uprobes_latency_seconds"]
    assert attributes == {"function": "work", "path": calls} and latency.count == 40 == sum(latency.bucket_counts)
    assert list(latency.explicit_bounds) == pytest.approx([1e-7, 2.5e-7, 5e-7] + [m * 10.0 ** e for e in range(-6, 1)
                                                                                     for m in (1, 2.5, 5)] + [10.0])
    assert 0 < latency.min <= latency.max and latency.sum > 0
    assert [p.as_int for _, p in points["uprobes_otlp_failures"]] == [0]
    assert [(a, p.as_int) for a, p in points["uprobes_target_up"]] == [({"target": "calls"}, 0)]
    assert len(receiver.requests) >= 2  # at the interval, and the last at the end


def test_an_argument_drawn_as_a_histogram_has_the_program_s_values(targets, serving):
    """--hist size: takes' sizes (as the program prints them) in uprobes_argument's buckets, 0 then powers of two."""
    from oracles import takes_calls

    takes = os.path.realpath(targets / "takes")
    server = serving("--engine", "ptrace", "--hist", "size", f"uprobe:{takes}:take size=%di:s64", "--", takes, "300")
    server.wait_said("the target has ended")
    samples = server.metrics()
    status, out, _ = server.stop()
    assert status == 0
    sizes = [size for size, *_ in takes_calls(out, 300)]
    bounds = [0.0, *(float(2 ** k) for k in range(41)), float("inf")]
    buckets = sorted((float(labels["le"]), value) for labels, value in samples["uprobes_argument_bucket"])
    assert buckets == [(bound, float(sum(size <= bound for size in sizes))) for bound in bounds]
    assert samples["uprobes_argument_count"] == [({"probe": "take", "path": takes, "arg": "size"}, 300.0)]
    assert samples["uprobes_argument_sum"] == [({"probe": "take", "path": takes, "arg": "size"}, float(sum(sizes)))]
    result = run_cli("serve", "--hist", "name", f"uprobe:{takes}:take name=+0(%si):string", "--", takes, "1")
    assert result.status == 2 and "--hist name: probe" in result.stderr and "a histogram draws integers" in \
        result.stderr


@pytest.mark.stress
def test_a_long_serve_keeps_its_memory_flat_and_its_series_bounded(targets, serving):
    """Two minutes of calls, a thousand a second, each with its own key (--by i: bounded by --max-series), timed
    (--latency) and drawn (--hist): the exporter's memory stays flat once it has run a while (it grows by about
    60 bytes an event over the first 60,000 or so, then stays), and every hit is counted or counted as lost. (At
    full speed, with an event per hit, most would be lost: README says so.)"""
    calls = os.path.realpath(targets / "calls")
    n = 120_000
    server = serving("--engine", "ptrace", "--by", "i", "--hist", "i", "--latency", f"uprobe:{calls}:work",
                     f"uprobe:{calls}:work i=%di:s32", "--", calls, str(n), "1")
    samples = []
    while server.proc.poll() is None and "the target has ended" not in server.said:
        metrics = server.metrics()
        hits = sum(value for _, value in metrics.get("uprobes_hits_total", []))
        with open(f"/proc/{server.proc.pid}/status") as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        samples.append((hits, rss))
        time.sleep(0.5)
        if server.proc.stderr in select.select([server.proc.stderr], [], [], 0)[0]:
            server.said += server.proc.stderr.readline()
    metrics = server.metrics()
    hits = sum(value for _, value in metrics["uprobes_hits_total"])
    lost = metrics["uprobes_lost_events_total"][0][1]
    assert len(metrics["uprobes_hits_total"]) == 1001  # 1000 keys and __other__
    status, out, said = server.stop()
    assert status == 0 and out.startswith(f"calls {n} "), said
    assert hits + lost >= n and hits <= n
    settled = n * 3 // 5
    later = [rss for counted, rss in samples if counted >= settled]
    print(f"\nRSS from {settled:,} to {n:,} hits: {min(later)}-{max(later)} KiB over {len(later)} samples; "
          f"lost {lost:g}")
    assert len(later) >= 3 and max(later) - min(later) < 2048, samples[::10]  # KiB


def test_a_configuration_file_gives_the_probes_and_options(targets, tmp_path, serving):
    """The keys are the options' names; the command line's own win (its --max-series here), its probes add."""
    calls = os.path.realpath(targets / "calls")
    port = _free_port()
    config = tmp_path / "serve.toml"
    config.write_text(f'''# shipped by configuration management
engine = "ptrace"
listen = "127.0.0.1:{port}"
probes = ["uprobe:{calls}:work i=%di:s32"]
latency = ["uprobe:{calls}:work"]
by = "i"
max_series = 50
command = ["{calls}", "20"]
''')
    server = serving("--config", str(config), "--max-series", "5", f"usdt:{calls}:calls:step i=arg0", listen=False,
                     port=port)
    server.wait_said("the target has ended")
    samples = server.metrics()
    by_i = {(labels["probe"], labels["i"]): value for labels, value in samples["uprobes_hits_total"]}
    assert by_i == {**{("work", str(i)): 1.0 for i in range(5)}, ("work", "__other__"): 15.0,
                    **{("calls:step", str(i)): 1.0 for i in range(5)}, ("calls:step", "__other__"): 15.0}
    assert [value for _, value in samples["uprobes_latency_seconds_count"]] == [20.0]
    status, out, _ = server.stop()
    assert status == 0 and out.startswith("calls 20 ")


@pytest.mark.parametrize("text, message", [
    ('engine = "ptrace"\nbogus = 3\n', "{path}:2: unknown key 'bogus'; the keys are probes, latency,"),
    ('probes = ["uprobe:libc:malloc"]\n\nmax_series = -3\n', "{path}:3: max_series: max_series takes a number of "
                                                             "keys above 0, not '-3'"),
    ('probes = "uprobe:libc:malloc"\n', "{path}:1: probes: expected a list of strings (at least one), not "
                                        "'uprobe:libc:malloc'"),
    ('engine = "ptrace\n', "{path}: Illegal character"),
])
def test_a_bad_configuration_is_one_line_naming_the_file_the_line_and_the_key(tmp_path, text, message):
    config = tmp_path / "serve.toml"
    config.write_text(text)
    result = run_cli("serve", "--config", str(config))
    assert result.status == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("uprobes: error: " + message.format(path=config)), result.stderr


def test_the_command_line_wins_over_the_file_even_with_the_default_value(targets, tmp_path, serving):
    """A file's engine = "kernel" and max_series are defaults: --engine ptrace (and --max-series 1000, the
    built-in default) given on the command line win; the command line's target wins over the file's."""
    calls = os.path.realpath(targets / "calls")
    config = tmp_path / "serve.toml"
    config.write_text(f'engine = "kernel"\nmax_series = 2\nby = "i"\npid = 1\nprobes = ["uprobe:{calls}:work i=%di"]\n')
    server = serving("--config", str(config), "--engine", "ptrace", "--max-series", "1000", "--", calls, "5")
    server.wait_said("the target has ended")
    keys = sorted(labels["i"] for labels, _ in server.metrics()["uprobes_hits_total"])
    assert server.stop()[0] == 0
    assert "(ptrace engine, the command)" in server.said
    assert keys == ["0", "1", "2", "3", "4"]  # five keys: not the file's 2


def test_a_push_to_a_receiver_that_is_not_there_is_counted_and_said_once(targets, serving):
    calls = os.path.realpath(targets / "calls")
    receiver = f"http://user:secret@127.0.0.1:{_free_port()}"
    server = serving("--engine", "ptrace", "--otlp", receiver, "--otlp-interval", "0.2", f"uprobe:{calls}:work",
                     "--", calls, "3")
    server.wait_said("the target has ended")
    time.sleep(1)
    failures = server.metrics()["uprobes_otlp_failures_total"][0][1]
    status, _, said = server.stop()
    assert status == 0 and failures >= 1 and "Traceback" not in said
    assert said.count("a push to http://127.0.0.1:") == 1 and "secret" not in said, said
    assert "/v1/metrics" in said  # the protocol's own path, where the URL gave none
    assert "the last push to" in said


def _until(server: _Serving, metric: str, labels: dict, value: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (labels, value) not in server.metrics().get(metric, []):
        assert time.monotonic() < deadline, (metric, labels, value, server.metrics().get(metric), server.said)
        time.sleep(0.1)


def test_processes_that_match_are_traced_as_they_come_and_go(serving, prometheus, engine):
    """--match: processes of a name traced from when they start to when they end, the hits of all of them (one
    restarted meanwhile) in one series that Prometheus reads; a glob no process matches is a target that is down;
    a process still running when the exporter stops is left as it was."""
    name = f"served{os.getpid() % 100000}"
    server = serving("--engine", engine, "--match", name, "--match", f"{name}x*", "uprobe:libc:getppid")
    query = prometheus(server.port)
    target = {"target": name}
    first = Caller(name)
    _until(server, "uprobes_target_processes", target, 1)
    first.calls(300)
    second = Caller(name)
    _until(server, "uprobes_target_processes", target, 2)
    second.calls(200)
    assert first.end() == 0
    _until(server, "uprobes_target_processes", target, 1)
    restarted = Caller(name)
    _until(server, "uprobes_target_processes", target, 2)
    restarted.calls(100)
    _until(server, "uprobes_hits_total", {"probe": "getppid", "path": os.path.realpath(_libc())}, 600)
    hits = _settled(query, "sum(uprobes_hits_total)", [((), 600.0)])
    assert hits == [((), 600.0)]
    up = _settled(query, "max by (target) (uprobes_target_up)", [((("target", name),), 1.0),
                                                                  ((("target", f"{name}x*"),), 0.0)])
    assert up == [((("target", name),), 1.0), ((("target", f"{name}x*"),), 0.0)]
    try:
        assert restarted.end() == 0
        status, _, said = server.stop()
        assert status == 0 and "Traceback" not in said, said
        second.calls(5)  # still running, as it was
        if engine == "ptrace":  # the kernel's own area ([uprobes]) stays, as after any kernel uprobe
            with open(f"/proc/{second.proc.pid}/maps") as maps:
                assert "uprobes" not in maps.read()
        else:
            with open("/sys/kernel/tracing/uprobe_events") as events:
                assert f"uprobes_{server.proc.pid}_" not in events.read()
    finally:
        second.end()


def test_a_process_that_cannot_be_traced_is_counted_and_the_others_are_served(serving):
    """A matching process another tracer holds is named once and counted in uprobes_attach_failures_total; the
    one that can be traced is, exactly."""
    name = f"refused{os.getpid() % 100000}"
    held = Caller(name, "traceme")
    server = serving("--engine", "ptrace", "--match", name, "uprobe:libc:getppid")
    free = Caller(name)
    try:
        _until(server, "uprobes_target_processes", {"target": name}, 1)
        _until(server, "uprobes_attach_failures_total", {"target": name}, 1)
        free.calls(50)
        held.calls(70)
        _until(server, "uprobes_hits_total", {"probe": "getppid", "path": os.path.realpath(_libc())}, 50)
        status, _, said = server.stop()
        assert status == 0, said
        assert said.count(f"it is already traced by process {os.getpid()}") == 1, said
    finally:
        assert free.end() == 0 and held.end() == 0


def _worker(server: _Serving) -> int:
    """The process of ``uprobes serve`` that traces: the one the test started waits for it (cli/guard.py)."""
    with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as children:
        return int(children.read().split()[0])


def _libc() -> str:
    """The C library the test's processes map."""
    with open("/proc/self/maps") as maps:
        return next(line.split()[-1] for line in maps if "/libc.so" in line)


def test_sighup_reloads_the_configuration_and_the_series_that_stay_go_on(tmp_path, serving, engine):
    """SIGHUP: the --config file read again, the engine changed, a probe added and one removed; the series of the
    probe that stays go on from its count; a file that has gone bad, or a probe that does not resolve, is named and
    the running configuration goes on."""
    name = f"reload{os.getpid() % 100000}"
    config = tmp_path / "serve.toml"
    other = "kernel" if engine == "ptrace" else "ptrace"
    config.write_text(f'engine = "{other}"\nmatch = ["{name}"]\nprobes = ["uprobe:libc:getppid"]\n')
    program = Caller(name)
    server = serving("--config", str(config))
    libc = os.path.realpath(_libc())
    try:
        _until(server, "uprobes_target_processes", {"target": name}, 1)
        program.calls(100)
        _until(server, "uprobes_hits_total", {"probe": "getppid", "path": libc}, 100)
        config.write_text(f'engine = "{engine}"\nmatch = ["{name}"]\n'
                          f'probes = ["uprobe:libc:getppid", "uprobe:libc:getuid"]\n')
        server.proc.send_signal(signal.SIGHUP)
        server.wait_said("reloaded")
        _until(server, "uprobes_target_processes", {"target": name}, 1)
        program.calls(50)
        program.calls(30, "getuid")
        _until(server, "uprobes_hits_total", {"probe": "getppid", "path": libc}, 150)
        _until(server, "uprobes_hits_total", {"probe": "getuid", "path": libc}, 30)
        good = config.read_text()
        config.write_text(good + "max_series = -3\n")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_said("the configuration as it was goes on")
        assert "serve.toml:4: max_series" in server.said
        config.write_text(good.replace("getuid", "no_such_function_here"))
        server.proc.send_signal(signal.SIGHUP)
        server.wait_said("the configuration as it was goes on", times=2)
        assert "no_such_function_here" in server.said
        program.calls(20)
        _until(server, "uprobes_hits_total", {"probe": "getppid", "path": libc}, 170)
        config.write_text(f'engine = "{engine}"\nmatch = ["{name}"]\nprobes = ["uprobe:libc:getuid"]\n')
        server.proc.send_signal(signal.SIGHUP)
        server.wait_said("reloaded", times=2)
        _until(server, "uprobes_target_processes", {"target": name}, 1)
        program.calls(5, "getuid")
        _until(server, "uprobes_hits_total", {"probe": "getuid", "path": libc}, 35)
        assert [labels["probe"] for labels, _ in server.metrics()["uprobes_hits_total"]] == ["getuid"]
        status, _, said = server.stop()
        assert status == 0 and said.count("reloaded") == 2 and "Traceback" not in said, said
    finally:
        assert program.end() == 0


@pytest.mark.stress
def test_processes_coming_and_going_for_a_long_time_leave_nothing_growing(serving, engine):
    """--match over a hundred processes that start, make calls and end, one after another: every call counted,
    and the exporter's descriptors and memory as they were once it had run a while (each process's perf
    descriptors closed, each ptrace family forgotten)."""
    name = f"churn{os.getpid() % 100000}"
    server = serving("--engine", engine, "--match", name, "uprobe:libc:getppid")
    target = {"target": name}
    libc = os.path.realpath(_libc())
    rounds, calls = 100, 10
    measured = []
    for round_ in range(rounds):
        program = Caller(name)
        _until(server, "uprobes_target_processes", target, 1)
        program.calls(calls)
        _until(server, "uprobes_hits_total", {"probe": "getppid", "path": libc}, (round_ + 1) * calls)
        assert program.end() == 0
        _until(server, "uprobes_target_processes", target, 0)
        if round_ in (rounds // 5, rounds - 1):
            time.sleep(1.5)  # an ended process's perf descriptors are closed within a second of its end
            worker = _worker(server)
            with open(f"/proc/{worker}/status") as status:
                rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            measured.append((len(os.listdir(f"/proc/{worker}/fd")), rss))
    status, _, said = server.stop()
    assert status == 0 and "Traceback" not in said, said
    (fds_then, rss_then), (fds_now, rss_now) = measured
    print(f"\n{engine}: descriptors {fds_then} -> {fds_now}, RSS {rss_then} -> {rss_now} KiB over {rounds * 4 // 5} "
          f"processes")
    assert fds_now == fds_then and rss_now - rss_then < 2048


_FORKING = """
import ctypes, os, sys, time
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME: its children keep the name
print("ready", flush=True)
children = []
for i in range(int(sys.argv[2])):
    child = os.fork()
    if child == 0:
        time.sleep(0.02 * (i % 10))
        os._exit(0)
    children.append(child)
    time.sleep(0.01)
for child in children:
    os.waitpid(child, 0)
"""


def test_a_server_forking_short_lived_workers_is_served_without_a_false_failure(serving, engine):
    """--match '*NAME*' on a process that forks 300 short-lived children of its name: the exporter goes on (a
    child that ends while it is being traced is no failure), never traces itself (its own command line holds
    the glob) nor the process it runs under, and leaves a stopped process stopped."""
    name = f"forker{os.getpid() % 100000}"
    stopped = Caller(name)
    os.kill(stopped.proc.pid, signal.SIGSTOP)
    server = serving("--engine", engine, "--match", f"*{name}*", "uprobe:libc:getppid")
    try:
        _until(server, "uprobes_target_processes", {"target": f"*{name}*"}, 1)
        stopped.proc.stdin.write("10\n")
        stopped.proc.stdin.flush()
        forker = subprocess.Popen([sys.executable, "-c", _FORKING, name, "300"], stdout=subprocess.PIPE, text=True)
        assert forker.stdout.readline() == "ready\n"
        assert forker.wait(timeout=120) == 0
        assert not select.select([stopped.proc.stdout], [], [], 0)[0]  # traced, and still stopped meanwhile
        os.kill(stopped.proc.pid, signal.SIGCONT)
        assert stopped.proc.stdout.readline() == "done\n"
        _until(server, "uprobes_hits_total", {"probe": "getppid", "path": os.path.realpath(_libc())}, 10)
        samples = server.metrics()
        assert samples["uprobes_attach_failures_total"] == [({"target": f"*{name}*"}, 0.0)], server.said
        status, _, said = server.stop()
        assert status == 0 and "Traceback" not in said and "warning" not in said, said
    finally:
        os.kill(stopped.proc.pid, signal.SIGCONT)
        stopped.end()


def test_star_on_a_served_command_is_its_program_and_linked_libraries(targets, serving, engine):
    """serve 'uprobe:*:lib_twice' 'uprobe::work' -- calls 6: '*' is the objects the command maps as it starts
    (its program, the library it links), resolved when serve starts: each series counts every call."""
    library, program = os.path.realpath(targets / "libprobed.so"), os.path.realpath(targets / "calls")
    server = serving("--engine", engine, "uprobe:*:lib_twice", "uprobe::work", "--", program, "6")
    server.wait_said("the target has ended")
    assert "2 probe points attached" in server.said
    assert sorted((labels["probe"], labels["path"], value) for labels, value in
                  server.metrics()["uprobes_hits_total"]) == [("lib_twice", library, 6.0), ("work", program, 6.0)]
    status, out, _ = server.stop()
    assert status == 0 and "calls 6 " in out

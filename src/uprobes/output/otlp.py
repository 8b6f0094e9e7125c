"""Probe metrics pushed over OTLP/HTTP (``uprobes serve --otlp URL``), for OpenTelemetry users: the same
snapshot Prometheus scrapes (:class:`~uprobes.output.metrics.ProbeMetrics`), cumulative since the run started,
sent every interval and once more at the end by the OpenTelemetry SDK's OTLP exporter.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import urllib.parse

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics.export import (AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric,
                                              MetricExportResult, MetricsData, NumberDataPoint, ResourceMetrics,
                                              ScopeMetrics, Sum)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from .metrics import Family, ProbeMetrics, Series

__all__ = ["OtlpPush", "redacted"]

_SCOPE = InstrumentationScope("uprobes")
_MOST_SECONDS_PER_PUSH = 5.0  # a receiver that does not answer must not hold the end of a run for long


class OtlpPush:
    """A thread that pushes ``metrics`` to ``url`` every ``interval`` seconds until :meth:`close`; failed pushes
    are counted (``uprobes_otlp_failures_total``) and the next one carries the totals anyway."""

    def __init__(self, metrics: ProbeMetrics, url: str, interval: float) -> None:
        self.metrics, self.url, self.interval = metrics, url, interval
        self.failures = 0
        self._started_ns = time.time_ns()
        self._resource = Resource.create({"service.name": "uprobes", "host.name": socket.gethostname(),
                                          "process.pid": os.getpid()})
        # The SDK logs each failed push; they are counted, and said once (the first)
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
        self._exporter = self._new_exporter()
        self._stop = threading.Event()
        metrics.more.append(self._health)
        self._thread = threading.Thread(target=self._run, name="otlp-push", daemon=True)
        self._thread.start()

    def _new_exporter(self) -> OTLPMetricExporter:
        return OTLPMetricExporter(endpoint=self.url, timeout=min(self.interval, _MOST_SECONDS_PER_PUSH))

    def _health(self) -> list[Family]:
        return [Family("uprobes_otlp_failures_total", "counter", "Pushes over OTLP the receiver did not take",
                       "{push}", [Series({}, self.failures)])]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.push(self._exporter)

    def push(self, exporter: OTLPMetricExporter) -> bool:
        """Send the metrics as they are now; whether the receiver took them."""
        now = time.time_ns()
        data = MetricsData([ResourceMetrics(self._resource, [ScopeMetrics(_SCOPE, [
            _metric(family, self._started_ns, now) for family in self.metrics.snapshot()], "")], "")])
        try:
            if exporter.export(data) is MetricExportResult.SUCCESS:
                return True
        except Exception:  # the SDK's transport errors (older versions let them out): counted as a failure
            pass
        self.failures += 1
        if self.failures == 1:
            print(f"uprobes: warning: a push to {redacted(self.url)} failed (failures are counted in "
                  f"uprobes_otlp_failures_total)", file=sys.stderr, flush=True)
        return False

    def close(self) -> bool:
        """Stop the thread (a push in flight gives up its retries) and push the final figures once, by a new
        exporter; whether the receiver took them."""
        self._stop.set()
        self._exporter.shutdown()
        self._thread.join()
        final = self._new_exporter()
        try:
            return self.push(final)
        finally:
            final.shutdown()


def redacted(url: str) -> str:
    """``url`` without what may be a secret: user and password, query and fragment."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parsed.port is not None:
        netloc += f":{parsed.port}"
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", ""))


def _metric(family: Family, start_ns: int, now_ns: int) -> Metric:
    """One family as the SDK's data: a counter a cumulative monotonic sum, a histogram cumulative."""
    name = family.name.removesuffix("_total")
    if family.kind == "histogram":  # a series with no value yet has no minimum or maximum: it waits for one
        points = [HistogramDataPoint(s.labels, start_ns, now_ns, sum(s.counts), s.sum, s.counts, s.bounds, s.min, s.max)
                  for s in family.series if any(s.counts)]
        return Metric(name, family.help, family.unit, Histogram(points, AggregationTemporality.CUMULATIVE))
    points = [NumberDataPoint(s.labels, start_ns, now_ns, s.value) for s in family.series]
    if family.kind == "counter":
        return Metric(name, family.help, family.unit, Sum(points, AggregationTemporality.CUMULATIVE, True))
    return Metric(name, family.help, family.unit, Gauge(points))

"""Prometheus metrics of the API process (docs/product.md D6), in a registry of their own per app.

Counters and histograms are updated by the middleware and the routes; the gauges (queue depth,
jobs by status, ready workers) are read from the runner and the job store when ``/metrics`` is
scraped, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics", "STAGES"]

STAGES = ("queue", "decode", "network", "crf", "postprocess", "encode", "total")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Gauges(Collector):
    """Gauges computed at scrape time by ``read()``: ``{name: (help, label names, {labels: value})}``."""

    def __init__(
        self, read: Callable[[], Mapping[str, tuple[str, tuple[str, ...], Mapping[tuple[str, ...], float]]]]
    ):
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, (doc, labels, values) in self._read().items():
            g = GaugeMetricFamily(name, doc, labels=list(labels))
            for key, value in values.items():
                g.add_metric(list(key), float(value))
            yield g

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


class Metrics:
    """The metric names of D6 (``hsc_*``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "hsc_http_requests", "HTTP requests by route and status code", ["route", "code"], registry=r
        )
        self.latency = Histogram(
            "hsc_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "hsc_stage_seconds",
            "time of one image per stage (single-image requests)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "hsc_images",
            "images answered by this API process, by model and outcome",
            ["model", "outcome"],
            registry=r,
        )
        self.failures = Counter("hsc_failures", "error answers by code", ["code"], registry=r)

    def add_gauges(self, read: Callable[[], Mapping[str, Any]]) -> None:
        self.registry.register(_Gauges(read))

    def observe_result(self, model: str, timings_ms: Mapping[str, Any]) -> None:
        self.images.labels(model=model, outcome="ok").inc()
        for stage, ms in timings_ms.items():
            if stage in STAGES and isinstance(ms, (int, float)):
                self.stage.labels(stage=stage).observe(float(ms) / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics of the REST API, labelled by route template, never by raw path.

BentoML's own HTTP metrics label every series with the raw URL path, so each head id, and
each made-up URL anyone sends (no key needed), adds series for good: +24 MiB of server
memory per 1,000 random URLs, measured (SECURITY.md). They are switched off in
`service/service.py`; these take their place at `GET /v1/metrics`.

Several API worker processes share one Prometheus multiprocess directory: each writes
its values there, and a read adds up every worker's, so /v1/metrics and /v1/stats answer
for the whole server (`own_multiprocess_dir`).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _render
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.head_cache import HeadCache


def own_multiprocess_dir(run_dir: Path) -> None:
    """BentoML points every server of a machine at one multiprocess directory (under
    BENTOML_HOME) and empties it whenever a server starts, so two servers wipe each other's
    counts. Each Graft server has its own: the process of `bentoml serve`, which imports
    the service first, makes it; its workers inherit the variable."""
    own = os.environ.get("GRAFT_METRICS_DIR")
    if own is None:
        for old in run_dir.glob("metrics-*"):  # left by servers that are gone
            if not _pid_alive(int(old.name.removeprefix("metrics-"))):
                shutil.rmtree(old, ignore_errors=True)
        own = str(run_dir / f"metrics-{os.getpid()}")
        shutil.rmtree(own, ignore_errors=True)
        os.makedirs(own)
        os.environ["GRAFT_METRICS_DIR"] = own
    # Read by prometheus_client as each metric is created: set before ours are.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = own


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


class RouteMetrics:
    """Requests and their latency by route template and status, in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "graft_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "graft_request_duration_seconds",
            "Time to answer, by route template",
            ["method", "route"],
            registry=registry,
        )


class RequestMetrics:
    """ASGI middleware: counts and times each request under the route that answered it."""

    def __init__(self, app: ASGIApp, metrics: RouteMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            # The router puts the matched route in the scope; its template is bounded.
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.seconds.labels(method, route).observe(time.perf_counter() - started)


class HeadCacheGauges:
    """This worker's head cache, published after each lookup (four writes to shared
    memory, about a microsecond each) so that a read can add up every worker's."""

    FIELDS = ("heads", "bytes", "hits", "misses")

    def __init__(self, registry: CollectorRegistry) -> None:
        self._gauges = {
            field: Gauge(
                f"graft_head_cache_{field}",
                f"head cache {field}, summed over the live API workers",
                multiprocess_mode="livesum",
                registry=registry,
            )
            for field in self.FIELDS
        }

    def publish(self, cache: HeadCache) -> None:
        for field, gauge in self._gauges.items():
            gauge.set(len(cache) if field == "heads" else getattr(cache, field))


class _GraftSeries:
    """Only Graft's own series of a collector (BentoML's workers write theirs beside)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self):
        return [m for m in self.registry.collect() if m.name.startswith("graft_")]


def _every_worker(registry: CollectorRegistry) -> CollectorRegistry | _GraftSeries:
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return registry  # one process: its own registry is the whole server
    merged = CollectorRegistry()
    MultiProcessCollector(merged)
    return _GraftSeries(merged)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """Every worker's series in Prometheus' text format, with its content type."""
    return _render(_every_worker(registry)), CONTENT_TYPE_LATEST


def head_cache_totals(registry: CollectorRegistry) -> dict[str, int]:
    """The head caches of every API worker, added up."""
    totals = dict.fromkeys(HeadCacheGauges.FIELDS, 0)
    for metric in _every_worker(registry).collect():
        field = metric.name.removeprefix("graft_head_cache_")
        if field in totals:
            totals[field] = int(sum(sample.value for sample in metric.samples))
    return totals

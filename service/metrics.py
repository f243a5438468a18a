"""Prometheus metrics of the REST API, labelled by route template, never by raw path.

BentoML's own HTTP metrics label every series with the raw URL path, so each head id, and
each made-up URL anyone sends (no key needed), adds series for good: +24 MiB of server
memory per 1,000 random URLs, measured (SECURITY.md). They are switched off in
`service/service.py`; these take their place at `GET /v1/metrics`.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _render
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


class RequestMetrics:
    """ASGI middleware: counts and times each request under the route that answered it."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
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
            self.requests.labels(method, route, str(status)).inc()
            self.seconds.labels(method, route).observe(time.perf_counter() - started)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus' text format, with its content type."""
    return _render(registry), CONTENT_TYPE_LATEST

"""REST API v1, mounted by the BentoML service at /v1: a router per resource (tenants,
stats, backbones, heads, predict). Routes parse, authenticate, call the application
(`service/core.py`), and shape the answer; the API document's own parts are
`document.py`, the reading of bodies of several media types `bodies.py`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry

from service.api import backbones, heads, predict, stats, tenants
from service.api.document import complete
from service.errors import MethodNotAllowed, NotFound, install_error_handlers
from service.limits import BodySizeLimit
from service.metrics import RequestMetrics, RouteMetrics, render

ROUTERS = (tenants.router, stats.router, backbones.router, heads.router, predict.router)


def create_app(max_body_bytes: int, limits: str = "") -> FastAPI:
    """The API; `limits`: what this server's settings allow, for the document."""
    app = FastAPI(
        title="Graft",
        version="1",
        description="Per-tenant heads on shared frozen backbones. "
        f'Errors: `{{"error": {{"code", "message"}}}}`. {limits}'.strip(),
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    # The application object (service/core.py) publishes its head cache here too.
    registry = app.state.metrics_registry = CollectorRegistry()
    app.state.route_metrics = RouteMetrics(registry)
    app.add_middleware(RequestMetrics, metrics=app.state.route_metrics)
    for router in ROUTERS:
        app.include_router(router)

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            complete(generate())  # generate() keeps what it made in app.openapi_schema
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus text format: requests and latency by route template."""
        body, content_type = render(registry)
        return Response(body, media_type=content_type)

    # BentoML mounts this app "passively": a path no route matches would fall through to
    # BentoML's plain-text 404. This last route keeps every /v1 answer in the JSON shape:
    # 405 with the methods the path has (Allow), or 404 for a path the API does not have.
    routes = [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]

    @app.api_route(
        "/{path:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE"],
        include_in_schema=False,
    )
    def no_such_route(path: str, request: Request) -> None:
        allowed = {m for r in routes if r.path_regex.match(f"/{path}") for m in r.methods or ()}
        if allowed:
            raise MethodNotAllowed(
                f"{request.method} is not a method of /v1/{path}; it takes"
                f" {', '.join(sorted(allowed))}",
                headers={"Allow": ", ".join(sorted(allowed))},
            )
        raise NotFound(f"no route for {request.method} /v1/{path}; see /v1/docs")

    return app

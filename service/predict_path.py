"""POST /v1/heads/{head_id}/predict, answered in front of the framework.

The hot route. Through BentoML's mount and FastAPI's middleware, routing and dependency
solving, a single-image predict cost an API worker 3.2 ms of CPU; answered here with the
same functions, 2.0-2.15 ms, and the server answered 17% more images per second (BENCHMARKS.md).
It keeps what those layers gave the route: the body size limit, the request metrics under
the route's template, the key and the rate limit, the JSON error shape. Every other
request, and other methods on this path, go on to the app.
"""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from graft.schemas import PredictOptions
from service.api.predict import answer_predict, router
from service.auth import bearer, current_tenant
from service.errors import error_response
from service.limits import BodySizeLimit
from service.metrics import RequestMetrics

_PREDICT = re.compile(r"/v1/heads/([^/]+)/predict")


class PredictPath:
    """ASGI middleware of the BentoML service; `api` is the app mounted at /v1."""

    def __init__(self, app: ASGIApp, api: FastAPI, max_body_bytes: int) -> None:
        self.app = app
        self.api = api
        self.route = next(
            route
            for route in router.routes
            if isinstance(route, APIRoute) and route.name == "predict"
        )
        self.answer = RequestMetrics(
            BodySizeLimit(self._predict, max_bytes=max_body_bytes), api.state.route_metrics
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_post = scope["type"] == "http" and scope["method"] == "POST"
        match = _PREDICT.fullmatch(scope["path"]) if is_post else None
        if match is None:
            await self.app(scope, receive, send)
            return
        # The scope as the mount and the router would give it to the route.
        routed = {
            **scope,
            "app": self.api,
            "route": self.route,
            "path_params": {"head_id": match[1]},
        }
        await self.answer(routed, receive, send)

    async def _predict(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            graft = self.api.state.graft
            tenant = await current_tenant(request, graft, await bearer(request))
            query = PredictOptions.model_validate(dict(request.query_params))
            response = await answer_predict(
                request, graft, tenant, request.path_params["head_id"], query
            )
        except Exception as exc:  # noqa: BLE001 - every error answers in the JSON shape
            response = error_response(request, exc)
        await response(scope, receive, send)

"""The BentoML service: loads the shared backbones once per process and mounts the REST
API at /v1. Start it with `make serve` (or `bentoml serve service.service:Graft`)."""

from __future__ import annotations

import logging
import os

# A self-hosted service phones nowhere; set before bentoml is imported.
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
# BentoML builds an OpenTelemetry span per request even though none is exported (its
# sample rate is 0); without the SDK the server's memory grows half as fast under load
# (BENCHMARKS.md). Set OTEL_SDK_DISABLED=false to trace.
os.environ.setdefault("OTEL_SDK_DISABLED", "true")

import bentoml  # noqa: E402

from service.api import create_app  # noqa: E402
from service.auth import resolve_admin_key  # noqa: E402
from service.core import Graft as GraftCore  # noqa: E402
from service.errors import JsonNotFoundUnderV1  # noqa: E402
from service.settings import Settings  # noqa: E402

log = logging.getLogger("graft")
settings = Settings()
app = create_app(settings.max_body_bytes)


@bentoml.service(
    name="graft",
    # One process holds the backbone sessions; ONNX Runtime and the threads of the API
    # use the cores. More workers would each load every backbone again.
    workers=1,
    traffic={"timeout": 600},
    logging={"access": {"enabled": settings.access_log}},
    # BentoML labels its HTTP metrics by raw path: a series per head id and per made-up URL,
    # without bound. /v1/metrics (service/metrics.py) labels by route template instead.
    metrics={"enabled": False},
)
@bentoml.asgi_app(app, path="/v1")
class Graft:
    def __init__(self) -> None:
        self.graft = GraftCore(settings)
        app.state.graft = self.graft
        app.state.admin_key = resolve_admin_key(settings)
        log.info(
            "graft ready: data in %s, backbones %s",
            settings.data_dir,
            ", ".join(self.graft.backbones),
        )

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.graft.close()


Graft.add_asgi_middleware(JsonNotFoundUnderV1)

"""The BentoML services: API workers that mount the REST API at /v1, and one backbone
runner that owns the ONNX Runtime sessions. Start both with `make serve` (or `bentoml serve
service.service:Graft`, which starts the runner it depends on)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any

# A self-hosted service phones nowhere; set before bentoml is imported.
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
# BentoML builds an OpenTelemetry span per request even though none is exported (its
# sample rate is 0); without the SDK the server's memory grows half as fast under load
# (BENCHMARKS.md). Set OTEL_SDK_DISABLED=false to trace.
os.environ.setdefault("OTEL_SDK_DISABLED", "true")

import bentoml  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from adapters import heads  # noqa: E402
from adapters.store import Store  # noqa: E402
from service.api import create_app  # noqa: E402
from service.auth import resolve_admin_key  # noqa: E402
from service.console import Console  # noqa: E402
from service.core import Application  # noqa: E402
from service.errors import JsonNotFoundUnderV1  # noqa: E402
from service.lifetime import end_with_arbiter, record_arbiter, watch_parent  # noqa: E402
from service.link import link_address  # noqa: E402
from service.metrics import own_multiprocess_dir  # noqa: E402
from service.predict_path import PredictPath  # noqa: E402
from service.runner import Runner  # noqa: E402
from service.runner_client import RunnerClient  # noqa: E402
from service.settings import Settings  # noqa: E402

log = logging.getLogger("graft")
settings = Settings()
# BentoML's arbiter ends with what started it; its workers with it (service/lifetime.py).
if record_arbiter() and settings.end_with_parent:
    watch_parent(os.getppid())
own_multiprocess_dir(settings.run_dir)
app = create_app(settings.max_body_bytes, settings.documented_limits())
SERVICE_CONFIG = {
    "traffic": {"timeout": 600},
    "logging": {"access": {"enabled": settings.access_log}},
    # BentoML labels its HTTP metrics by raw path: a series per head id and per made-up
    # URL, without bound. /v1/metrics (service/metrics.py) labels by route template instead.
    "metrics": {"enabled": False},
}
if os.environ["OTEL_SDK_DISABLED"] == "true":
    # Not tracing: BentoML's OpenTelemetry middleware still made an unrecorded span per
    # request and wrapped every send, 5% of an API worker's Python time per predict.
    SERVICE_CONFIG["tracing"] = {"excluded_urls": [".*"]}


@bentoml.service(
    name="graft-runner",
    # One process per device owns the backbone sessions and batches every worker's rows.
    workers=1,
    resources={"gpu": 1} if settings.device == "cuda" else {},
    **SERVICE_CONFIG,
)
class BackboneRunner:
    def __init__(self) -> None:
        end_with_arbiter()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # One runner per server start: no training job can be running yet.
        store = Store(settings.database_url)
        # This replica's processes from before are gone: their jobs are free now (not when
        # their leases run out), for this replica's workers or any other's.
        released = store.release_leases(owner_prefix=f"{settings.replica_id}/")
        recovered = store.recover_interrupted()
        unserved = {
            backbone: count
            for backbone, count in store.heads_per_backbone().items()
            if backbone not in (*settings.backbone_ids, "auto")  # auto: not yet chosen
        }
        store.close()
        if unserved:
            # Their predicts answer 409 backbone_not_served until GRAFT_BACKBONES names them.
            log.warning(
                "heads on backbones this server does not load (GRAFT_BACKBONES): %s",
                ", ".join(f"{backbone} ({count})" for backbone, count in unserved.items()),
            )
        if released:
            log.warning("freed %d training jobs this replica held before it restarted", released)
        if recovered:
            log.warning("resolved %d heads whose training a restart interrupted", recovered)
        self.runner = Runner(settings)
        log.info(
            "graft runner ready on %s: backbones %s on %s",
            settings.runner_link or settings.runner_socket,
            ", ".join(self.runner.backbones),
            settings.device,
        )

    @bentoml.api
    def stats(self) -> dict:
        """Each backbone's batcher: batches, rows, training rows, mean batch size."""
        return self.runner.stats()

    @bentoml.api
    def measures(self) -> dict:
        """Each backbone's memory and time per row, measured as it loaded."""
        return self.runner.measures

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.runner.close()


@bentoml.service(
    name="graft",
    # API workers: HTTP, auth, decoding, tokenising, heads and training jobs. They hold no
    # backbone session; rows go to the runner over its socket (service/runner_client.py).
    workers=settings.api_workers,
    **SERVICE_CONFIG,
)
@bentoml.asgi_app(app, path="/v1")
class Graft:
    # BentoML starts the runner as a process of its own; its `stats` API is called through
    # BentoML, the hot path goes over the runner's socket (BENCHMARKS.md says why: the
    # hand-off between processes, bench/handoff.py, removed after 03efd04).
    backbone_runner = bentoml.depends(BackboneRunner, url=settings.runner_url)

    def __init__(self) -> None:
        end_with_arbiter()
        # One core per worker: the parallelism is in the workers. Numpy's BLAS threads
        # would also escape the nice of training threads (threads inherit it; a pool made
        # at import does not).
        threadpool_limits(1)
        # This worker trains heads: their libraries now, not in its first training.
        heads.import_training_libraries()
        # A training job's Python (the head's fit) may hold the GIL for up to the switch
        # interval each time a predict's thread wants it, several times per predict: 5 ms
        # by default. (Its effect on the p99 is under this machine's noise; BENCHMARKS.md.)
        sys.setswitchinterval(0.0005)
        address, authkey = link_address(settings)
        runner = RunnerClient(address, authkey=authkey)
        self.graft = Application(
            settings,
            runner,
            runner_stats=functools.partial(self.backbone_runner.call, "stats"),
            runner_measures=functools.partial(self.backbone_runner.call, "measures"),
            metrics_registry=app.state.metrics_registry,
        )
        app.state.graft = self.graft
        app.state.admin_key = resolve_admin_key(settings)
        log.info("graft API worker ready: data in %s", settings.data_dir)

    def __is_ready__(self) -> bool:
        return self.graft.runner.is_connected()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.graft.close()


# bentoml.service made Graft a Service, whose type its hints do not carry.
graft_service: Any = Graft
# Outermost first: predicts are answered before the mount (service/predict_path.py).
graft_service.add_asgi_middleware(PredictPath, api=app, max_body_bytes=settings.max_body_bytes)
graft_service.add_asgi_middleware(JsonNotFoundUnderV1)
# The web console at / (service/console.py); /v1 requests go straight past it.
graft_service.add_asgi_middleware(Console)

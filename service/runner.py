"""The backbone runner: the process that owns the ONNX Runtime sessions, one per loaded
backbone, each behind a batcher that API workers reach over the link
(`service/runner_server.py`; their side: `service/runner_client.py`)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from adapters.depth_choice import RowLayout
from models.export import ensure_split, ensure_variant
from models.registry import BackboneSpec
from models.runtime import Backbone
from service.batcher import Batcher, Rows
from service.link import link_address
from service.runner_server import RunnerServer
from service.settings import Settings

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
log = logging.getLogger(__name__)


class Runner:
    """What the runner process holds: a session and a batcher per backbone, and the
    socket the API workers reach them through."""

    def __init__(self, settings: Settings) -> None:
        def session(spec: BackboneSpec, threads: int) -> Backbone:
            return Backbone(
                spec,
                ensure_variant(spec, settings.backbone_dir, settings.variant),
                device=settings.device,
                intra_op_threads=threads,
                max_batch_size=settings.backbone_batch_size,
                split=split_of(spec),
            )

        def split_of(spec: BackboneSpec) -> tuple[Path, Path] | None:
            return (
                ensure_split(spec, settings.backbone_dir) if settings.fine_tunable(spec) else None
            )

        def training_embed(spec: BackboneSpec) -> Callable[[Rows], np.ndarray]:
            # One thread, the lane's own: with two (niced) threads training took the
            # predict p99 to 3.3x and 5.4x its quiet value, against about 2x (BENCHMARKS.md).
            # A one-thread predict session runs on its caller's thread already: shared, it
            # costs no second copy of the weights (519 MiB for MPNet).
            if settings.intra_op_threads == 1:
                return self.backbones[spec.id].embed_rows
            return session(spec, 1).embed_rows

        # What each backbone costs this server, measured as it loads: `GET /v1/backbones`.
        self.measures: dict[str, dict] = {}
        self.backbones: dict[str, Backbone] = {}
        for spec in settings.loaded_backbones():
            # Exported (or quantised) first: that work's memory is not the session's.
            ensure_variant(spec, settings.backbone_dir, settings.variant)
            before = resident_bytes()
            backbone = session(spec, settings.intra_op_threads)
            started = time.perf_counter()
            if sizes := backbone.warm_up():  # on a GPU: each batch size's cuDNN search
                log.info(
                    "%s: batch sizes %s warmed up on the GPU in %.1f s",
                    spec.id,
                    ", ".join(map(str, sizes)),
                    time.perf_counter() - started,
                )
            ms_per_row = backbone.ms_per_row()  # also warms the session's memory up
            release_free_memory()
            self.backbones[spec.id] = backbone
            self.measures[spec.id] = {
                "memory_bytes": max(0, resident_bytes() - before),
                "ms_per_row": round(ms_per_row, 2),
                "depth_widths": backbone.depth_widths,
            }
        batchers = {
            backbone_id: Batcher(
                backbone.embed_rows,
                name=backbone_id,
                max_batch_size=settings.backbone_batch_size,
                max_latency_ms=settings.batch_max_latency_ms,
                training_slice_ms=settings.training_slice_ms,
                predict_lanes=settings.backbone_lanes,
                # On the CPU, training rows get a session of their own, run at a low OS
                # priority (service/batcher.py); a GPU shares its one session.
                training_lane=(
                    None if backbone.on_gpu else functools.partial(training_embed, backbone.spec)
                ),
                check_top=backbone.check_factors if backbone.fine_tunable else None,
                layout=RowLayout(backbone.spec.embedding_dim, tuple(backbone.depth_widths)),
            )
            for backbone_id, backbone in self.backbones.items()
        }
        address, authkey = link_address(settings)
        self.server = RunnerServer(address, batchers, authkey=authkey)

    def stats(self) -> dict:
        return {backbone_id: b.stats() for backbone_id, b in self.server.batchers.items()}

    def close(self) -> None:
        self.server.close()


def release_free_memory() -> None:
    """Gives back to the OS what loading a session allocated and freed (parsing, graph
    optimisation): glibc keeps it otherwise. 20-90 MiB per backbone (BENCHMARKS.md)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def resident_bytes() -> int:
    """This process's resident memory (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE

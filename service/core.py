"""The application in an API worker: the store, the head cache, the link to the backbone
runner and the training jobs, behind plain methods.

Routes (`service/api/`) only parse, authenticate and call these; nothing here knows
about HTTP beyond raising the typed errors of `service/errors.py`. The predict path reads
in one direction: head lookup -> decode (`service/inputs.py`) -> runner -> head.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry

from adapters import heads
from adapters.coherence import ChangeWatcher, KeyCache
from adapters.fleet import FleetSize, Heartbeat
from adapters.head_cache import HeadCache, ServingHead, Unservable
from adapters.onnx_export import combined_model, fine_tuned_backbone
from adapters.store import Head, Store, Tenant
from models.export import ensure_split, ensure_variant
from models.registry import BackboneSpec
from service.errors import (
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    Unprocessable,
)
from service.inputs import (
    RawInput,
    check_descriptions,
    check_head_size,
    check_labels,
    check_modality,
    to_rows,
)
from service.jobs import TrainingJobs
from service.limits import RateLimiter
from service.metrics import HeadCacheGauges, head_cache_totals
from service.runner_client import RunnerClient, RunnerUnavailable
from service.settings import Settings
from service.training import AUTO_BACKBONE, Trainer

log = logging.getLogger(__name__)


class Application:
    """Graft without HTTP: tenants, heads, training and predictions, for one API worker."""

    def __init__(
        self,
        settings: Settings,
        runner: RunnerClient,
        runner_stats: Callable[[], dict] = dict,
        runner_measures: Callable[[], dict] = dict,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.database_url)
        # The backbones this server loads (GRAFT_BACKBONES): what it lists, trains and serves.
        self.backbones: dict[str, BackboneSpec] = {
            spec.id: spec for spec in settings.loaded_backbones()
        }
        self.heads = HeadCache(self.store, settings.head_cache_bytes)
        self.keys = KeyCache(self.store)
        self._watcher = ChangeWatcher(self.store, settings.cache_poll_s, [self.heads, self.keys])
        self._metrics_registry = metrics_registry or CollectorRegistry()
        self._head_cache_gauges = HeadCacheGauges(self._metrics_registry)
        self.runner = runner
        self._runner_stats = runner_stats
        self._runner_measures = runner_measures
        self._measures: dict[str, dict] = {}
        self.training = Trainer(self.store, runner, settings)
        self.jobs = TrainingJobs(self.store, self.training, settings)
        self.rate_limiter = RateLimiter(
            settings.rate_limit_per_s,
            settings.rate_limit_burst,
            path=settings.run_dir / "rate_limits.sqlite3",
        )
        # This replica is alive, and takes its share of the fleet's rate limits.
        self._heartbeat = Heartbeat(self.store, settings.replica_id)
        self._fleet_size = FleetSize(self.store, self.rate_limiter.share_with)

    def close(self) -> None:
        self._fleet_size.close()
        self._heartbeat.close()
        self._watcher.close()
        self.jobs.close()
        self.training.close()
        self.runner.close()
        self.store.close()

    def stats(self) -> dict:
        """The head caches of every API worker, added up, and the runner's batchers."""
        return {
            "head_cache": {
                **head_cache_totals(self._metrics_registry),
                "max_bytes": self.heads.max_bytes,
                "workers": self.settings.api_workers,
            },
            "batchers": self._runner_stats(),
        }

    # Writes that every process's caches must see ---------------------------------------
    # Each drops this process's copy at once and answers once every other process has
    # polled (adapters/coherence.py): a client that has the answer finds it everywhere.

    def delete_tenant(self, tenant_id: str) -> None:
        if not self.store.delete_tenant(tenant_id=tenant_id):
            raise NotFound(f"no tenant {tenant_id!r}", code="tenant_not_found")
        self.keys.clear()
        time.sleep(self.settings.publish_delay_s)

    def rotate_key(self, tenant_id: str) -> str:
        api_key = self.store.rotate_key(tenant_id=tenant_id)
        if api_key is None:
            raise NotFound(f"no tenant {tenant_id!r}", code="tenant_not_found")
        self.keys.clear()
        time.sleep(self.settings.publish_delay_s)
        return api_key

    def delete_head(self, tenant: Tenant, head_id: str) -> None:
        if not self.store.delete_head(tenant_id=tenant.id, head_id=head_id):
            raise NotFound(f"no head {head_id!r}", code="head_not_found")
        self.heads.evict(head_id)
        time.sleep(self.settings.publish_delay_s)

    # Backbones ---------------------------------------------------------------------

    def backbone(self, backbone_id: str) -> BackboneSpec:
        """The backbone a request body names (an unknown one is a 422)."""
        spec = self.backbones.get(backbone_id)
        if spec is None:
            known = ", ".join(sorted(self.backbones))
            raise Unprocessable(
                f"unknown backbone {backbone_id!r}; known: {known}", code="unknown_backbone"
            )
        return spec

    def backbone_measures(self) -> dict[str, dict]:
        """What the runner measured as it loaded each backbone (asked once; empty while it
        cannot be reached)."""
        if not self._measures:
            try:
                self._measures = dict(self._runner_measures())
            except Exception as exc:  # the runner starting or gone: the fields stay null
                log.warning("backbone measures unavailable: %s", exc)
        return self._measures

    def backbone_spec(self, backbone_id: str) -> BackboneSpec:
        """The backbone a URL names (an unknown one is a 404)."""
        if backbone_id not in self.backbones:
            raise NotFound(f"no backbone {backbone_id!r}", code="backbone_not_found")
        return self.backbones[backbone_id]

    def served_backbone(self, head_id: str, backbone_id: str) -> BackboneSpec:
        """The backbone a head sits on, if this server loads it (a 409 if not)."""
        if backbone_id not in self.backbones:
            raise Conflict(
                f"head {head_id} sits on backbone {backbone_id!r}, which this server does not"
                f" load (GRAFT_BACKBONES: {', '.join(self.backbones)})",
                code="backbone_not_served",
            )
        return self.backbones[backbone_id]

    # Heads -------------------------------------------------------------------------

    def get_head(self, tenant: Tenant, head_id: str) -> Head:
        head = self.store.get_head(tenant_id=tenant.id, head_id=head_id)
        if head is None:
            raise NotFound(f"no head {head_id!r}", code="head_not_found")
        return head

    def create_head(
        self,
        tenant: Tenant,
        *,
        name: str,
        backbone_id: str,
        examples: Sequence[tuple[str, RawInput]],
        label_descriptions: dict[str, str] | None = None,
        fine_tune: str = "auto",
        unknown_keep: float = heads.UNKNOWN_KEEP,
    ) -> Head:
        """Validates everything, then trains; returns the head, trained or still training.
        `backbone_id` "auto" tries every backbone of the examples' modality; `fine_tune`
        "on" asks for a backbone that can be fine-tuned here."""
        raws = [raw for _, raw in examples]
        if backbone_id == AUTO_BACKBONE:
            modality = raws[0].kind if raws else "image"
            candidates = [b for b in self.backbones.values() if b.modality == modality]
            if not candidates:
                raise Unprocessable(
                    f"this server loads no {modality} backbone (GRAFT_BACKBONES:"
                    f" {', '.join(self.backbones)})",
                    code="unknown_backbone",
                )
        else:
            candidates = [self.backbone(backbone_id)]
        if fine_tune == "on" and not any(self.training.fine_tunable(b) for b in candidates):
            raise Unprocessable(
                f"backbone {backbone_id!r} cannot be fine-tuned on this server: fine-tuning is"
                " for backbones served in fp32 that split into a trunk and a top (README,"
                " Fine-tuning); use fine_tune auto or off",
                code="fine_tuning_unavailable",
            )
        labels = check_labels([label for label, _ in examples], (), self.settings)
        check_descriptions(candidates[0], label_descriptions or {}, labels)
        # Every input is checked and decoded here, for the first candidate; `auto` decodes
        # for the others during training, one backbone at a time, so the decoded images
        # of only one backbone are held at once.
        prepared = self.training.sets.prepare(tenant.id, candidates[0], raws)
        check_head_size(set(), prepared.content_hashes, labels, self.settings)
        options = [(candidates[0], lambda: prepared)] + [
            (spec, functools.partial(self.training.sets.prepare, tenant.id, spec, raws))
            for spec in candidates[1:]
        ]
        head = self.store.create_head(
            tenant_id=tenant.id,
            name=name,
            backbone=backbone_id,
            label_descriptions=label_descriptions,
            fine_tune=fine_tune,
            unknown_keep=unknown_keep,
            max_heads=self.settings.max_heads_per_tenant,
        )
        if head is None:
            raise Forbidden(
                f"this tenant has {self.settings.max_heads_per_tenant} heads, the most it may"
                " hold; delete one first",
                code="head_limit_reached",
            )
        return self._train_and_wait(tenant, head, options, list(zip(labels, raws, strict=True)))

    def add_examples(
        self, tenant: Tenant, head_id: str, examples: Sequence[tuple[str, RawInput]]
    ) -> Head:
        head = self.get_head(tenant, head_id)
        spec = self.chosen_backbone(head)
        labels = check_labels([label for label, _ in examples], head.labels, self.settings)
        raws = [raw for _, raw in examples]
        prepared = self.training.sets.prepare(tenant.id, spec, raws)
        stored = self.store.example_keys(tenant_id=tenant.id, head_id=head.id)
        check_head_size(stored, prepared.content_hashes, labels, self.settings)
        options = [(spec, lambda: prepared)]
        return self._train_and_wait(tenant, head, options, list(zip(labels, raws, strict=True)))

    def add_unlabeled(self, tenant: Tenant, head_id: str, inputs: Sequence[RawInput]) -> Head:
        """Stores unlabelled examples of the domain the head will serve and trains the next
        version, adapted to them where that looks helpful (adapters/adaptation.py)."""
        head = self.get_head(tenant, head_id)
        spec = self.chosen_backbone(head)
        prepared = self.training.sets.prepare(tenant.id, spec, inputs)
        stored = self.store.unlabeled_keys(tenant_id=tenant.id, head_id=head.id)
        total = len(stored | set(prepared.content_hashes))
        if total > self.settings.max_unlabeled_per_head:
            raise Forbidden(
                f"the head would hold {total} distinct unlabelled examples; at most"
                f" {self.settings.max_unlabeled_per_head}",
                code="unlabeled_limit_reached",
            )
        options = [(spec, lambda: prepared)]
        return self._train_and_wait(tenant, head, options, [(None, raw) for raw in inputs])

    def chosen_backbone(self, head: Head) -> BackboneSpec:
        """The backbone a head's next version trains on: the one it was trained on."""
        if head.backbone == AUTO_BACKBONE:
            raise Conflict(
                f"head {head.id} has not chosen its backbone yet (status: {head.status});"
                " add examples once it is ready",
                code="head_not_ready",
            )
        return self.served_backbone(head.id, head.backbone)

    def _train_and_wait(
        self, tenant: Tenant, head: Head, options, examples: list[tuple[str | None, RawInput]]
    ) -> Head:
        """Stores the training job (from here on a crash loses none of its examples), then
        waits up to GRAFT_SYNC_TRAINING_TIMEOUT_S for its first published version: the
        head, trained (201; an `auto` head may still be comparing fine-tuning, with a
        `progress`) or still training (202, also when the job waits behind another of the
        same head)."""
        try:
            job = self.jobs.start(head, options, examples)
        except LookupError:
            raise NotFound(f"no head {head.id!r}", code="head_not_found") from None
        if job is not None:
            with contextlib.suppress(FutureTimeout):  # still training: 202, the caller polls
                job.result(timeout=self.settings.sync_training_timeout_s)
        return self.get_head(tenant, head.id)

    async def predict(
        self, tenant: Tenant, head_id: str, inputs: Sequence[RawInput], top_k: int
    ) -> tuple[ServingHead, list[list[tuple[str, float]]], np.ndarray]:
        """The hot path: one light registry read and the decoding on a worker thread, the
        runner's shared batch awaited on the event loop (no thread waits for it), then the
        head. Returns the head, each row's top-k labels and each row's best similarity to
        the head's class means."""
        head, embedding = await run_in_threadpool(self._send_rows, tenant, head_id, inputs)
        try:
            # Shielded: a timeout must not cancel the future the runner's reader will set.
            embeddings = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(embedding)), self.settings.predict_timeout_s
            )
        except TimeoutError:
            raise Unavailable("prediction timed out; the service is overloaded") from None
        except RunnerUnavailable:
            raise Unavailable("the backbone runner is restarting; retry shortly") from None
        if embeddings.shape[1] != len(head.weights):
            # Trained on depths that the backbone's pass as served now does not give
            # (another export of it): a 409 that says what to do, not a shape error.
            raise Conflict(
                f"head {head.id} was trained on rows of {len(head.weights)} columns from"
                f" backbone {head.backbone}, which now gives {embeddings.shape[1]}; add"
                " examples to train it again",
                code="backbone_changed",
            )
        probabilities, similarity = head.apply(embeddings)
        return head, heads.top_k(probabilities, head.labels, top_k), similarity

    def _send_rows(
        self, tenant: Tenant, head_id: str, inputs: Sequence[RawInput]
    ) -> tuple[ServingHead, Future]:
        """Checks, the head (from the cache), the inputs decoded to rows and sent to the
        runner: the head and the future of the rows' embeddings."""
        if len(inputs) > self.settings.max_predict_inputs:
            raise PayloadTooLarge(
                f"{len(inputs)} inputs; at most {self.settings.max_predict_inputs} per call",
                code="too_many_inputs",
            )
        head = self.heads.get(tenant_id=tenant.id, head_id=head_id)
        self._head_cache_gauges.publish(self.heads)
        if head is None:
            raise NotFound(f"no head {head_id!r}", code="head_not_found")
        if isinstance(head, Unservable):
            raise Conflict(
                f"head {head_id} has no trained version yet (status: {head.status})",
                code="head_not_ready",
            )
        spec = self.served_backbone(head.id, head.backbone)
        if head.top is not None and not self.training.fine_tunable(spec):
            raise Conflict(
                f"head {head.id} is fine-tuned, and this server serves backbone {spec.id}"
                " whole (GRAFT_FINE_TUNING, GRAFT_VARIANT=fp32)",
                code="fine_tuning_unavailable",
            )
        check_modality(spec, inputs)
        rows = to_rows(spec, list(enumerate(inputs)), self.settings)
        try:
            return head, self.runner.embed(spec.id, rows, top=head.top, depths=head.depths)
        except RunnerUnavailable:
            raise Unavailable("the backbone runner is restarting; retry shortly") from None

    def export_onnx(
        self, tenant: Tenant, head_id: str, variant: str | None = None
    ) -> tuple[Head, bytes]:
        """Backbone (in `variant`, default the served one) + head as one ONNX model; a
        fine-tuned head's backbone is the trunk and its own top, in fp32."""
        head = self.get_head(tenant, head_id)
        if not head.servable:
            raise Conflict(f"head {head.id} has no trained version yet", code="head_not_ready")
        spec = self.served_backbone(head.id, head.backbone)
        variant = variant or self.settings.variant
        served = self.store.serving_head(tenant_id=tenant.id, head_id=head.id)
        if served is None:
            raise NotFound(f"no head {head_id!r}", code="head_not_found")
        if served.version != head.version:  # a new version landed between the reads
            return self.export_onnx(tenant, head_id, variant)
        if served.top_factors is None:
            path = ensure_variant(spec, self.settings.backbone_dir, variant)
            return head, combined_model(spec, path, head, variant=variant)
        if variant != "fp32":
            raise Conflict(
                f"head {head.id} is fine-tuned: its model exports in fp32 only",
                code="variant_unavailable",
            )
        split = ensure_split(spec, self.settings.backbone_dir)
        if split is None:
            raise Conflict(
                f"head {head.id} is fine-tuned, and backbone {spec.id} cannot be split here",
                code="fine_tuning_unavailable",
            )
        backbone = fine_tuned_backbone(*split, served.top_factors)
        return head, combined_model(spec, backbone, head, variant=variant, fine_tuned=True)

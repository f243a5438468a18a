"""The application: shared backbones, the store and training jobs, behind plain methods.

Routes (`service/api.py`) only parse, authenticate and call these; nothing here knows
about HTTP beyond raising the typed errors of `service/errors.py`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import logging
import threading
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Literal

import numpy as np

from adapters import heads
from adapters.head_cache import HeadCache, ServingHead, Unservable
from adapters.onnx_export import combined_model
from adapters.store import Head, Store, Tenant
from adapters.transferability import choose_backbone
from models.export import ensure_variant
from models.preprocess import InvalidInput, decode_image
from models.quantize import VARIANTS
from models.registry import BackboneSpec, list_backbones
from models.runtime import Backbone
from service.batcher import Batcher
from service.errors import (
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    Unprocessable,
)
from service.limits import RateLimiter
from service.settings import Settings

log = logging.getLogger(__name__)

# The backbone id that asks Graft to choose: every backbone of the examples' modality is
# scored (LogME), the best are tried, and the head keeps the one it validates best on.
AUTO_BACKBONE = "auto"


@dataclass(frozen=True)
class RawInput:
    """One input as the user sent it: image bytes or a text."""

    kind: Literal["image", "text"]
    data: bytes | str

    @classmethod
    def from_json(cls, image: str | None, text: str | None) -> RawInput:
        if text is not None:
            return cls("text", text)
        try:
            return cls("image", base64.b64decode(image or "", validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput("invalid_base64", "'image' is not valid base64") from None


@dataclass(frozen=True)
class TrainingSet:
    """A head's whole training set under one backbone, ready to fit."""

    new_vectors: dict[str, np.ndarray]  # embeddings computed for this training
    examples: list[tuple[str, str]]  # (content hash, label)
    x: np.ndarray  # (len(examples), embedding_dim)
    labels: list[str]


@dataclass
class PreparedInputs:
    """Examples checked against a backbone, ready for its ONNX session.

    `content_hashes[i]` identifies example i; `rows` holds the decoded inputs of the
    hashes in `to_embed` (each once); the others have cached embeddings.
    """

    content_hashes: list[str]
    to_embed: list[str]
    rows: np.ndarray | list[str]


class Graft:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.database_path)
        recovered = self.store.recover_interrupted()
        if recovered:
            log.warning("resolved %d heads whose training a restart interrupted", recovered)
        self.backbones: dict[str, Backbone] = {
            spec.id: Backbone(
                spec,
                ensure_variant(spec, settings.backbone_dir, settings.variant),
                device=settings.device,
                intra_op_threads=settings.intra_op_threads,
                max_batch_size=settings.backbone_batch_size,
            )
            for spec in list_backbones()
        }
        self.heads = HeadCache(self.store, settings.head_cache_bytes)
        self.batchers = {
            backbone_id: Batcher(
                backbone,
                max_batch_size=settings.backbone_batch_size,
                max_latency_ms=settings.batch_max_latency_ms,
            )
            for backbone_id, backbone in self.backbones.items()
        }
        self._training = ThreadPoolExecutor(
            max_workers=settings.training_workers, thread_name_prefix="graft-train"
        )
        self.rate_limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        self._head_locks: dict[str, threading.Lock] = {}
        self._head_locks_guard = threading.Lock()

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()
        self._training.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    def stats(self) -> dict:
        cache = self.heads
        return {
            "head_cache": {
                "heads": len(cache),
                "bytes": cache.bytes,
                "max_bytes": cache.max_bytes,
                "hits": cache.hits,
                "misses": cache.misses,
            },
            "batchers": {
                backbone_id: {
                    "batches": b.batches,
                    "rows": b.rows,
                    "mean_batch_size": round(b.rows / b.batches, 2) if b.batches else None,
                }
                for backbone_id, b in self.batchers.items()
            },
        }

    # Backbones ---------------------------------------------------------------------

    def backbone(self, backbone_id: str) -> Backbone:
        """The backbone a request body names (an unknown one is a 422)."""
        backbone = self.backbones.get(backbone_id)
        if backbone is None:
            known = ", ".join(sorted(self.backbones))
            raise Unprocessable(
                f"unknown backbone {backbone_id!r}; known: {known}", code="unknown_backbone"
            )
        return backbone

    def backbone_public(self, backbone_id: str) -> dict:
        return {
            **self.backbones[backbone_id].spec.public(),
            "variants": list(VARIANTS),
            "served_variant": self.settings.variant,
        }

    def backbone_spec(self, backbone_id: str) -> BackboneSpec:
        """The backbone a URL names (an unknown one is a 404)."""
        if backbone_id not in self.backbones:
            raise NotFound(f"no backbone {backbone_id!r}", code="backbone_not_found")
        return self.backbones[backbone_id].spec

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
    ) -> Head:
        """Validates everything, then trains; returns the head, trained or still training.
        `backbone_id` "auto" tries every backbone of the examples' modality."""
        raws = [raw for _, raw in examples]
        if backbone_id == AUTO_BACKBONE:
            modality = raws[0].kind if raws else "image"
            candidates = [b for b in self.backbones.values() if b.spec.modality == modality]
        else:
            candidates = [self.backbone(backbone_id)]
        labels = self._check_labels([label for label, _ in examples], existing=())
        self._check_descriptions(candidates[0].spec, label_descriptions or {}, labels)
        # Every input is checked and decoded here, for the first candidate; `auto` decodes
        # for the others during training, one backbone at a time, so the decoded images
        # of only one backbone are held at once.
        prepared = self._prepare(tenant, candidates[0], raws)
        self._check_head_size(set(), prepared.content_hashes, labels)
        options = [(candidates[0], lambda: prepared)] + [
            (backbone, functools.partial(self._prepare, tenant, backbone, raws))
            for backbone in candidates[1:]
        ]
        head = self.store.create_head(
            tenant_id=tenant.id,
            name=name,
            backbone=backbone_id,
            label_descriptions=label_descriptions,
            max_heads=self.settings.max_heads_per_tenant,
        )
        if head is None:
            raise Forbidden(
                f"this tenant has {self.settings.max_heads_per_tenant} heads, the most it may"
                " hold; delete one first",
                code="head_limit_reached",
            )
        return self._train_and_wait(tenant, head, options, labels)

    def add_examples(
        self, tenant: Tenant, head_id: str, examples: Sequence[tuple[str, RawInput]]
    ) -> Head:
        head = self.get_head(tenant, head_id)
        if head.backbone == AUTO_BACKBONE:
            raise Conflict(
                f"head {head.id} has not chosen its backbone yet (status: {head.status});"
                " add examples once it is ready",
                code="head_not_ready",
            )
        backbone = self.backbone(head.backbone)
        labels = self._check_labels([label for label, _ in examples], existing=head.labels)
        prepared = self._prepare(tenant, backbone, [raw for _, raw in examples])
        stored = self.store.example_keys(tenant_id=tenant.id, head_id=head.id)
        self._check_head_size(stored, prepared.content_hashes, labels)
        self.store.set_status(tenant_id=tenant.id, head_id=head.id, status="training")
        return self._train_and_wait(tenant, head, [(backbone, lambda: prepared)], labels)

    def _train_and_wait(
        self,
        tenant: Tenant,
        head: Head,
        options: list[tuple[Backbone, Callable[[], PreparedInputs]]],
        labels: list[str],
    ) -> Head:
        job: Future = self._training.submit(self._train, tenant, head, options, labels)
        with contextlib.suppress(FutureTimeout):  # still training: 202, the caller polls
            job.result(timeout=self.settings.sync_training_timeout_s)
        return self.get_head(tenant, head.id)

    def _train(
        self,
        tenant: Tenant,
        head: Head,
        options: list[tuple[Backbone, Callable[[], PreparedInputs]]],
        new_labels: list[str],
    ) -> None:
        """Embeds what is new, trains on the head's whole set, stores the version whole.
        With several backbone options (`auto`) the examples are embedded by each and
        `choose_backbone` picks one."""
        with self._head_lock(head.id):
            try:
                # One backbone at a time: its decoded inputs are dropped once embedded.
                sets = {
                    backbone.spec.id: self._training_set(
                        tenant, head, backbone, prepare(), new_labels
                    )
                    for backbone, prepare in options
                }
                label_embeddings = {
                    backbone.spec.id: self._label_embeddings(
                        backbone, head, sets[backbone.spec.id].labels
                    )
                    for backbone, _ in options
                }
                if head.backbone == AUTO_BACKBONE:
                    choice = choose_backbone(
                        {b: s.x for b, s in sets.items()},
                        next(iter(sets.values())).labels,
                        label_embeddings,
                    )
                    chosen, training_set = choice.backbone, sets[choice.backbone]
                    trained = choice.trained
                    trained.metrics["backbone_selection"] = choice.report
                else:
                    [(chosen, training_set)] = sets.items()
                    trained = heads.train_head(
                        training_set.x,
                        training_set.labels,
                        label_embeddings=label_embeddings[chosen],
                    )
                self.store.save_version(
                    tenant_id=tenant.id,
                    head_id=head.id,
                    backbone=chosen,
                    new_embeddings=training_set.new_vectors,
                    examples=training_set.examples,
                    labels=trained.labels,
                    weights=trained.weights,
                    bias=trained.bias,
                    prototypes=trained.prototypes,
                    unknown_threshold=trained.unknown_threshold,
                    metrics=trained.metrics,
                )
            except Exception as exc:
                log.exception("training head %s failed", head.id)
                current = self.store.get_head(tenant_id=tenant.id, head_id=head.id)
                if current is not None:
                    self.store.set_status(
                        tenant_id=tenant.id,
                        head_id=head.id,
                        status="ready" if current.servable else "failed",
                        error=f"training failed: {exc}",
                    )

    def _training_set(
        self,
        tenant: Tenant,
        head: Head,
        backbone: Backbone,
        prepared: PreparedInputs,
        new_labels: list[str],
    ) -> TrainingSet:
        """The head's stored examples plus the new ones, as this backbone's embeddings."""
        new_vectors = self._embed(backbone, prepared)
        cached = self.store.cached_embeddings(
            tenant_id=tenant.id,
            backbone=backbone.spec.id,
            content_hashes=[h for h in prepared.content_hashes if h not in new_vectors],
        )
        vectors = {**cached, **new_vectors}
        stored = self.store.training_set(tenant_id=tenant.id, head_id=head.id)
        for h, _, vector in stored:
            vectors.setdefault(h, vector)
        examples = [(h, label) for h, label, _ in stored]
        seen = set(examples)
        for pair in zip(prepared.content_hashes, new_labels, strict=True):
            if pair not in seen:
                seen.add(pair)
                examples.append(pair)
        # Checked when the request came in; this holds it against concurrent adds.
        if len(examples) > self.settings.max_examples_per_head:
            raise ValueError(
                f"{len(examples)} examples; at most {self.settings.max_examples_per_head} per head"
            )
        x = np.stack([vectors[h] for h, _ in examples])
        return TrainingSet(new_vectors, examples, x, [label for _, label in examples])

    @staticmethod
    def _label_embeddings(
        backbone: Backbone, head: Head, labels: list[str]
    ) -> dict[str, np.ndarray] | None:
        """Text heads: each label's description (default: the label itself), embedded."""
        if backbone.spec.modality != "text":
            return None
        names = sorted(set(labels))
        texts = [head.label_descriptions.get(label, label) for label in names]
        return dict(zip(names, backbone.embed_texts(texts), strict=True))

    def _head_lock(self, head_id: str) -> threading.Lock:
        with self._head_locks_guard:
            return self._head_locks.setdefault(head_id, threading.Lock())

    def predict(
        self, tenant: Tenant, head_id: str, inputs: Sequence[RawInput], top_k: int
    ) -> tuple[ServingHead, list[list[tuple[str, float]]], np.ndarray]:
        """The hot path: one light registry read, decode here, then the shared batcher.
        Returns the head, each row's top-k labels and each row's best similarity to the
        head's class means."""
        if len(inputs) > self.settings.max_predict_inputs:
            raise PayloadTooLarge(
                f"{len(inputs)} inputs; at most {self.settings.max_predict_inputs} per call",
                code="too_many_inputs",
            )
        head = self.heads.get(tenant_id=tenant.id, head_id=head_id)
        if head is None:
            raise NotFound(f"no head {head_id!r}", code="head_not_found")
        if isinstance(head, Unservable):
            raise Conflict(
                f"head {head_id} has no trained version yet (status: {head.status})",
                code="head_not_ready",
            )
        spec = self.backbones[head.backbone].spec
        self._check_modality(spec, inputs)
        rows = self._decode(spec, list(enumerate(inputs)))
        job = self.batchers[head.backbone].submit(head, rows)
        try:
            probabilities, similarity = job.result(timeout=self.settings.predict_timeout_s)
        except FutureTimeout:
            raise Unavailable("prediction timed out; the service is overloaded") from None
        return head, heads.top_k(probabilities, head.labels, top_k), similarity

    def export_onnx(
        self, tenant: Tenant, head_id: str, variant: str | None = None
    ) -> tuple[Head, bytes]:
        """Backbone (in `variant`, default the served one) + head as one ONNX model."""
        head = self.get_head(tenant, head_id)
        if not head.servable:
            raise Conflict(f"head {head.id} has no trained version yet", code="head_not_ready")
        spec = self.backbone(head.backbone).spec
        variant = variant or self.settings.variant
        path = ensure_variant(spec, self.settings.backbone_dir, variant)
        return head, combined_model(spec, path, head, variant=variant)

    # Inputs ------------------------------------------------------------------------

    def _check_labels(self, labels: list[str], existing: Sequence[str]) -> list[str]:
        s = self.settings
        if len(labels) > s.max_examples_per_request:
            raise PayloadTooLarge(
                f"{len(labels)} examples; at most {s.max_examples_per_request} per request",
                code="too_many_examples",
            )
        for label in set(labels):
            if not label.strip():
                raise Unprocessable("labels must not be empty or blank", code="invalid_label")
            if any(unicodedata.category(c) in ("Cc", "Cs") for c in label):
                raise Unprocessable(
                    f"label {label[:40]!r} holds a control character", code="invalid_label"
                )
            if len(label) > s.max_label_chars:
                raise Unprocessable(
                    f"label of {len(label)} characters; at most {s.max_label_chars}",
                    code="invalid_label",
                )
        distinct = set(existing) | set(labels)
        if len(distinct) < 2:
            raise Unprocessable(
                f"a head needs at least 2 labels; got {sorted(distinct)}", code="too_few_labels"
            )
        if len(distinct) > s.max_labels:
            raise Unprocessable(
                f"{len(distinct)} labels; at most {s.max_labels}", code="too_many_labels"
            )
        return labels

    def _check_head_size(
        self, stored: set[tuple[str, str]], content_hashes: list[str], labels: list[str]
    ) -> None:
        total = len(stored | set(zip(content_hashes, labels, strict=True)))
        if total > self.settings.max_examples_per_head:
            raise Forbidden(
                f"the head would hold {total} distinct examples; at most"
                f" {self.settings.max_examples_per_head}",
                code="example_limit_reached",
            )

    @staticmethod
    def _check_descriptions(
        spec: BackboneSpec, descriptions: dict[str, str], labels: list[str]
    ) -> None:
        if not descriptions:
            return
        if spec.modality != "text":
            raise Unprocessable(
                f"label_descriptions need a text backbone; {spec.id} is an {spec.modality}"
                " backbone",
                code="invalid_label_descriptions",
            )
        unknown = sorted(set(descriptions) - set(labels))
        if unknown:
            raise Unprocessable(
                f"label_descriptions name labels without examples: {unknown[:5]}",
                code="invalid_label_descriptions",
            )

    @staticmethod
    def _check_modality(spec: BackboneSpec, inputs: Sequence[RawInput]) -> None:
        for i, raw in enumerate(inputs):
            if raw.kind != spec.modality:
                raise Unprocessable(
                    f"input {i} is {raw.kind} but backbone {spec.id} takes {spec.modality}",
                    code="wrong_modality",
                )

    def _decode(
        self, spec: BackboneSpec, items: list[tuple[int, RawInput]]
    ) -> np.ndarray | list[str]:
        """Images to one uint8 NHWC array, texts checked; errors name the input's position."""
        decoded: list = []
        for position, raw in items:
            try:
                if spec.modality == "image":
                    assert isinstance(raw.data, bytes)
                    pre = spec.preprocessing
                    decoded.append(decode_image(raw.data, pre, self.settings.max_image_pixels))
                else:
                    assert isinstance(raw.data, str)
                    decoded.append(self._check_text(raw.data))
            except InvalidInput as exc:
                raise InvalidInput(exc.code, f"input {position}: {exc.message}") from None
        if spec.modality == "image":
            side = spec.preprocessing.image_size
            return np.stack(decoded) if decoded else np.empty((0, side, side, 3), np.uint8)
        return decoded

    def _prepare(
        self, tenant: Tenant, backbone: Backbone, inputs: Sequence[RawInput]
    ) -> PreparedInputs:
        """Checks examples against the backbone; decodes those with no cached embedding."""
        spec = backbone.spec
        self._check_modality(spec, inputs)
        hashes = [content_hash(raw) for raw in inputs]
        cached = self.store.cached_embeddings(
            tenant_id=tenant.id, backbone=spec.id, content_hashes=hashes
        )
        to_decode: list[tuple[int, RawInput]] = []
        to_embed: list[str] = []
        queued: set[str] = set()
        for position, (raw, h) in enumerate(zip(inputs, hashes, strict=True)):
            if h not in cached and h not in queued:
                queued.add(h)
                to_decode.append((position, raw))
                to_embed.append(h)
        rows = self._decode(spec, to_decode)
        return PreparedInputs(content_hashes=hashes, to_embed=to_embed, rows=rows)

    def _check_text(self, text: str) -> str:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: valid as a JSON escape, not as text
            raise InvalidInput("invalid_text", "text is not valid Unicode") from None
        if not text.strip():
            raise InvalidInput("empty_text", "text is empty")
        if len(text) > self.settings.max_text_chars:
            raise InvalidInput(
                "text_too_long",
                f"text of {len(text)} characters; at most {self.settings.max_text_chars}",
            )
        return text

    @staticmethod
    def _embed(backbone: Backbone, prepared: PreparedInputs) -> dict[str, np.ndarray]:
        if not prepared.to_embed:
            return {}
        if backbone.spec.modality == "image":
            vectors = backbone.embed_images(prepared.rows)
        else:
            vectors = backbone.embed_texts(prepared.rows)
        return dict(zip(prepared.to_embed, vectors, strict=True))


def content_hash(raw: RawInput) -> str:
    # surrogatepass: never fails here; invalid text is refused when it is checked, and
    # for valid text this is plain UTF-8.
    data = raw.data if isinstance(raw.data, bytes) else raw.data.encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw.kind.encode() + b"\0" + data).hexdigest()

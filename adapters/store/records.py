"""What the store's reads return, and how rows become them."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa

from adapters.store.tables import heads, training_jobs


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    created_at: str

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created_at": self.created_at}


@dataclass(frozen=True)
class Head:
    id: str
    tenant_id: str
    name: str
    backbone: str
    status: str
    version: int
    labels: list[str]
    weights: np.ndarray | None  # (columns read, n_labels)
    bias: np.ndarray | None
    prototypes: np.ndarray | None  # (leading columns, n_labels): normalised class means
    unknown_threshold: float | None
    label_descriptions: dict[str, str]
    fine_tune: str  # "auto", "on" or "off"
    unknown_keep: float  # the share of held-out rows its unknown threshold keeps
    metrics: dict[str, Any] | None
    error: str | None
    created_at: str
    updated_at: str
    progress: dict[str, Any] | None = None  # of its running training job, if any
    # How many of the deepest depths it reads after the embedding (adapters/depth_choice.py).
    depths: int = 0

    @property
    def servable(self) -> bool:
        """A head serves its latest trained version, even while a newer one trains."""
        return self.weights is not None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "backbone": self.backbone,
            "labels": self.labels,
            "label_descriptions": self.label_descriptions,
            "fine_tune": self.fine_tune,
            "unknown_keep": self.unknown_keep,
            "status": self.status,
            "version": self.version,
            "metrics": self.metrics,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "error": self.error,
            # Also on a ready head whose next version is on its way (service/training.py).
            "progress": self.progress,
        }


@dataclass(frozen=True)
class Job:
    """A training job, as the process that claimed it sees it."""

    id: str
    tenant_id: str
    head_id: str
    backbones: list[str]
    attempts: int


@dataclass(frozen=True)
class Lease:
    """A training job as leased to one process (`owner`): what that process writes of
    the job (its versions, progress and end) is kept only while the lease is its own."""

    job_id: str
    owner: str


class LeaseLost(Exception):
    """The job is no longer leased to this process: another took it over (this one was
    too slow to renew), or it was given up. Nothing this process would write is kept."""


@dataclass(frozen=True)
class ServingRow:
    """What serving needs of a head; the arrays are None when it has no trained version."""

    backbone: str
    status: str
    version: int
    labels: list[str]
    weights: np.ndarray | None
    bias: np.ndarray | None
    prototypes: np.ndarray | None
    unknown_threshold: float | None
    top_factors: list[np.ndarray] | None  # a fine-tuned head's (fp16), else None
    depths: int = 0


HEAD_COLUMNS = (
    *(
        heads.c[name]
        for name in (
            "id", "tenant_id", "name", "backbone", "status", "version", "labels", "weights",
            "bias", "prototypes", "unknown_threshold", "depths", "label_descriptions", "fine_tune",
            "unknown_keep", "metrics", "error", "created_at", "updated_at",
        )
    ),
    # The progress of the head's oldest job that reports one (the one running).
    sa.select(training_jobs.c.progress)
    .where(training_jobs.c.head_id == heads.c.id, training_jobs.c.progress.is_not(None))
    .order_by(training_jobs.c.created_at)
    .limit(1)
    .scalar_subquery()
    .label("progress"),
)  # fmt: skip


def blob(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=np.float32).tobytes()


def npz(factors: list[np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *(np.asarray(f, np.float16) for f in factors))
    return buffer.getvalue()


def factors(blob: bytes | None) -> list[np.ndarray] | None:
    """A head's stored top factors (fp16, in `factor_shapes` order), or None."""
    if blob is None:
        return None
    with np.load(io.BytesIO(blob)) as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def head_arrays(
    weights: bytes, bias: bytes, prototypes: bytes | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A head's stored blobs as its (columns read, n_labels) weights, its bias and its
    class means (None for a version trained before heads kept them)."""
    b = np.frombuffer(bias, dtype=np.float32)
    w = np.frombuffer(weights, dtype=np.float32).reshape(-1, len(b))
    p = None
    if prototypes is not None:
        p = np.frombuffer(prototypes, dtype=np.float32).reshape(-1, len(b))
    return w, b, p


def head_from_row(row) -> Head:
    (head_id, tenant_id, name, backbone, status, version, labels, weights, bias, prototypes,
     threshold, depths, descriptions, fine_tune, unknown_keep, metrics, error, created_at,
     updated_at, progress) = row  # fmt: skip
    label_list = json.loads(labels)
    w, b, p = head_arrays(weights, bias, prototypes) if weights is not None else (None,) * 3
    return Head(
        id=head_id,
        tenant_id=tenant_id,
        name=name,
        backbone=backbone,
        status=status,
        version=version,
        labels=label_list,
        weights=w,
        bias=b,
        prototypes=p,
        unknown_threshold=threshold,
        depths=depths,
        label_descriptions=json.loads(descriptions),
        fine_tune=fine_tune,
        unknown_keep=unknown_keep,
        metrics=json.loads(metrics) if metrics else None,
        error=error,
        created_at=created_at,
        updated_at=updated_at,
        progress=json.loads(progress) if progress else None,
    )

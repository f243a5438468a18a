"""Heads: created, read (whole, or what serving needs), listed, deleted, and their trained
versions saved whole in one transaction."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import sqlalchemy as sa

from adapters.heads import UNKNOWN_KEEP
from adapters.store.engine import Database, utc_now
from adapters.store.leases import hold
from adapters.store.records import (
    HEAD_COLUMNS,
    Head,
    Lease,
    ServingRow,
    blob,
    factors,
    head_arrays,
    head_from_row,
    npz,
)
from adapters.store.tables import (
    embeddings,
    example_inputs,
    head_examples,
    head_unlabeled,
    heads,
    tenants,
    training_jobs,
)

INTERRUPTED = "training was interrupted by a restart; post the examples again"


class Heads(Database):
    def head_versions(self, head_ids: Iterable[str]) -> dict[str, int]:
        """The current version of each of these heads that still exists."""
        ids = list(head_ids)
        found: dict[str, int] = {}
        with self._read() as db:
            for start in range(0, len(ids), 500):  # stay under SQLite's variable limit
                query = sa.select(heads.c.id, heads.c.version).where(
                    heads.c.id.in_(ids[start : start + 500])
                )
                found.update({head_id: version for head_id, version in db.execute(query)})
        return found

    def create_head(
        self,
        *,
        tenant_id: str,
        name: str,
        backbone: str,
        label_descriptions: dict[str, str] | None = None,
        fine_tune: str = "off",
        unknown_keep: float = UNKNOWN_KEEP,
        max_heads: int | None = None,
    ) -> Head | None:
        """A new head in `training` state; None if the tenant already has `max_heads`."""
        now = utc_now()
        head_id = uuid.uuid4().hex
        with self._tx() as db:
            if max_heads is not None:
                # Counted in the insert's transaction, under a lock on the tenant's row
                # (SQLite: the database's write lock), so concurrent creates on any replica
                # cannot overshoot.
                db.execute(
                    sa.select(tenants.c.id).where(tenants.c.id == tenant_id).with_for_update()
                )
                count = db.scalar(
                    sa.select(sa.func.count())
                    .select_from(heads)
                    .where(heads.c.tenant_id == tenant_id)
                )
                if (count or 0) >= max_heads:
                    return None
            db.execute(
                heads.insert().values(
                    id=head_id,
                    tenant_id=tenant_id,
                    name=name,
                    backbone=backbone,
                    status="training",
                    label_descriptions=json.dumps(label_descriptions or {}),
                    fine_tune=fine_tune,
                    unknown_keep=unknown_keep,
                    created_at=now,
                    updated_at=now,
                )
            )
        head = self.get_head(tenant_id=tenant_id, head_id=head_id)
        assert head is not None
        return head

    def get_head(self, *, tenant_id: str, head_id: str) -> Head | None:
        query = sa.select(*HEAD_COLUMNS).where(
            heads.c.id == head_id, heads.c.tenant_id == tenant_id
        )
        with self._read() as db:
            row = db.execute(query).first()
        return head_from_row(row) if row else None

    def serving_head(self, *, tenant_id: str, head_id: str) -> ServingRow | None:
        """What serving needs of a head, in one indexed read."""
        with self._read() as db:
            row = db.execute(_SERVING_HEAD, {"head_id": head_id, "tenant_id": tenant_id}).first()
        if row is None:
            return None
        backbone, status, version, labels, weights, bias, prototypes, threshold, top, depths = row
        if weights is None:
            return ServingRow(backbone, status, version, [], None, None, None, None, None)
        w, b, p = head_arrays(weights, bias, prototypes)
        return ServingRow(
            backbone, status, version, json.loads(labels), w, b, p, threshold, factors(top), depths
        )

    def list_heads(self, *, tenant_id: str) -> list[Head]:
        query = (
            sa.select(*HEAD_COLUMNS)
            .where(heads.c.tenant_id == tenant_id)
            .order_by(heads.c.created_at, heads.c.id)
        )
        with self._read() as db:
            return [head_from_row(row) for row in db.execute(query)]

    def heads_per_backbone(self) -> dict[str, int]:
        """How many heads, of every tenant, sit on each backbone (an operator's check at
        start, never a tenant's answer)."""
        query = sa.select(heads.c.backbone, sa.func.count()).group_by(heads.c.backbone)
        with self._read() as db:
            return {backbone: count for backbone, count in db.execute(query)}

    def delete_head(self, *, tenant_id: str, head_id: str) -> bool:
        with self._tx() as db:
            result = db.execute(
                heads.delete().where(heads.c.id == head_id, heads.c.tenant_id == tenant_id)
            )
            if result.rowcount == 0:
                return False
            self._changed(db)
            return True

    def set_status(
        self, *, tenant_id: str, head_id: str, status: str, error: str | None = None
    ) -> None:
        with self._tx() as db:
            db.execute(
                heads.update()
                .where(heads.c.id == head_id, heads.c.tenant_id == tenant_id)
                .values(status=status, error=error, updated_at=utc_now())
            )

    def recover_interrupted(self) -> int:
        """Heads left `training` with no job to finish them (written by a Graft from before
        jobs were rows) are resolved: a head with a stored version goes back to serving
        it; one without fails."""
        no_job = ~sa.exists().where(training_jobs.c.head_id == heads.c.id)
        with self._tx() as db:
            return resolve_heads(db, INTERRUPTED, heads.c.status == "training", no_job)

    def save_version(
        self,
        *,
        tenant_id: str,
        head_id: str,
        backbone: str,
        new_embeddings: dict[str, np.ndarray],
        examples: list[tuple[str, str]],
        labels: list[str],
        weights: np.ndarray,
        bias: np.ndarray,
        prototypes: np.ndarray,
        unknown_threshold: float | None,
        metrics: dict[str, Any],
        unlabeled: Iterable[str] = (),
        top_factors: list[np.ndarray] | None = None,
        depths: int = 0,
        inputs: dict[str, bytes] | None = None,
        ready: bool = True,
        lease: Lease | None = None,
    ) -> int | None:
        """Stores a trained version atomically: its number, or None if the head was deleted
        meanwhile. `backbone` is the one the version was trained on (an `auto` head's
        choice). With `ready=False` the head stays `training` until `finish_job`: serving
        takes the version at once, clients are told it is ready once every cache has it.
        A training job's version is stored only while `lease` holds (else `LeaseLost`)."""
        with self._tx() as db:
            if lease is not None:
                hold(db, lease)
            result = db.execute(
                heads.update()
                .where(heads.c.id == head_id, heads.c.tenant_id == tenant_id)
                .values(
                    status="ready" if ready else heads.c.status,
                    error=None,
                    version=heads.c.version + 1,
                    backbone=backbone,
                    labels=json.dumps(labels),
                    weights=blob(weights),
                    bias=blob(bias),
                    prototypes=blob(prototypes),
                    unknown_threshold=unknown_threshold,
                    top_factors=None if top_factors is None else npz(top_factors),
                    depths=depths,
                    metrics=json.dumps(metrics),
                    updated_at=utc_now(),
                )
            )
            if result.rowcount == 0:
                return None
            if new_embeddings:
                db.execute(
                    self._insert_ignoring_duplicates(embeddings),
                    [
                        {"tenant_id": tenant_id, "backbone": backbone, "content_hash": h,
                         "vector": blob(v)}
                        for h, v in new_embeddings.items()
                    ],
                )  # fmt: skip
            if examples:
                db.execute(
                    self._insert_ignoring_duplicates(head_examples),
                    [{"head_id": head_id, "content_hash": h, "label": label}
                     for h, label in examples],
                )  # fmt: skip
            if inputs:
                db.execute(
                    self._insert_ignoring_duplicates(example_inputs),
                    [{"tenant_id": tenant_id, "content_hash": h, "data": data}
                     for h, data in inputs.items()],
                )  # fmt: skip
            unlabeled = list(unlabeled)
            if unlabeled:
                db.execute(
                    self._insert_ignoring_duplicates(head_unlabeled),
                    [{"head_id": head_id, "content_hash": h} for h in unlabeled],
                )
            self._changed(db)
            return db.scalar(sa.select(heads.c.version).where(heads.c.id == head_id))


def resolve_heads(db: sa.Connection, error: str, *where: sa.ColumnElement) -> int:
    """The heads `where` selects go back to their last version, or fail if they have
    none, saying `error`."""
    return db.execute(
        heads.update()
        .where(*where)
        .values(
            status=sa.case((heads.c.version > 0, "ready"), else_="failed"),
            error=error,
            updated_at=utc_now(),
        )
    ).rowcount


# The read of a cold head, built once (building a statement costs more than running it).
_SERVING_HEAD = sa.select(
    heads.c.backbone,
    heads.c.status,
    heads.c.version,
    heads.c.labels,
    heads.c.weights,
    heads.c.bias,
    heads.c.prototypes,
    heads.c.unknown_threshold,
    heads.c.top_factors,
    heads.c.depths,
).where(heads.c.id == sa.bindparam("head_id"), heads.c.tenant_id == sa.bindparam("tenant_id"))

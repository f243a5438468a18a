"""A head's examples (labelled and not), the inputs kept for fine-tuning, and each
tenant's cached embeddings."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import sqlalchemy as sa

from adapters.store.engine import Database
from adapters.store.tables import (
    embeddings,
    example_inputs,
    head_examples,
    head_unlabeled,
    heads,
)


class Examples(Database):
    def cached_embeddings(
        self, *, tenant_id: str, backbone: str, content_hashes: Iterable[str]
    ) -> dict[str, np.ndarray]:
        hashes = list(set(content_hashes))
        found: dict[str, np.ndarray] = {}
        with self._read() as db:
            for start in range(0, len(hashes), 500):  # stay under SQLite's variable limit
                rows = db.execute(
                    sa.select(embeddings.c.content_hash, embeddings.c.vector).where(
                        embeddings.c.tenant_id == tenant_id,
                        embeddings.c.backbone == backbone,
                        embeddings.c.content_hash.in_(hashes[start : start + 500]),
                    )
                )
                found.update({h: np.frombuffer(v, dtype=np.float32) for h, v in rows})
        return found

    def example_keys(self, *, tenant_id: str, head_id: str) -> set[tuple[str, str]]:
        """(content_hash, label) of every example of the head's current version."""
        query = (
            sa.select(head_examples.c.content_hash, head_examples.c.label)
            .join(heads, heads.c.id == head_examples.c.head_id)
            .where(head_examples.c.head_id == head_id, heads.c.tenant_id == tenant_id)
        )
        with self._read() as db:
            return {tuple(row) for row in db.execute(query)}

    def unlabeled_keys(self, *, tenant_id: str, head_id: str) -> set[str]:
        """Content hashes of the unlabelled examples of the head's current version."""
        query = (
            sa.select(head_unlabeled.c.content_hash)
            .join(heads, heads.c.id == head_unlabeled.c.head_id)
            .where(head_unlabeled.c.head_id == head_id, heads.c.tenant_id == tenant_id)
        )
        with self._read() as db:
            return set(db.scalars(query))

    def training_set(self, *, tenant_id: str, head_id: str) -> list[tuple[str, str, np.ndarray]]:
        """(content_hash, label, embedding) of every example of the head's current version,
        in a fixed order (by content hash: the same on either engine)."""
        query = (
            sa.select(head_examples.c.content_hash, head_examples.c.label, embeddings.c.vector)
            .join(heads, heads.c.id == head_examples.c.head_id)
            .join(
                embeddings,
                (embeddings.c.tenant_id == heads.c.tenant_id)
                & (embeddings.c.backbone == heads.c.backbone)
                & (embeddings.c.content_hash == head_examples.c.content_hash),
            )
            .where(head_examples.c.head_id == head_id, heads.c.tenant_id == tenant_id)
            .order_by(head_examples.c.content_hash, head_examples.c.label)
        )
        with self._read() as db:
            rows = db.execute(query).all()
        return [(h, label, np.frombuffer(v, dtype=np.float32)) for h, label, v in rows]

    def inputs(self, *, tenant_id: str, content_hashes: Iterable[str]) -> dict[str, bytes]:
        """The kept inputs of these content hashes (those the tenant sent): image bytes, or
        a text as UTF-8."""
        hashes = list(content_hashes)
        found: dict[str, bytes] = {}
        with self._read() as db:
            for start in range(0, len(hashes), 500):  # bounded IN lists
                query = sa.select(example_inputs.c.content_hash, example_inputs.c.data).where(
                    example_inputs.c.tenant_id == tenant_id,
                    example_inputs.c.content_hash.in_(hashes[start : start + 500]),
                )
                found.update((h, data) for h, data in db.execute(query))
        return found

    def unlabeled_set(self, *, tenant_id: str, head_id: str) -> list[tuple[str, np.ndarray]]:
        """(content_hash, embedding) of every unlabelled example of the head's current
        version, by content hash."""
        query = (
            sa.select(head_unlabeled.c.content_hash, embeddings.c.vector)
            .join(heads, heads.c.id == head_unlabeled.c.head_id)
            .join(
                embeddings,
                (embeddings.c.tenant_id == heads.c.tenant_id)
                & (embeddings.c.backbone == heads.c.backbone)
                & (embeddings.c.content_hash == head_unlabeled.c.content_hash),
            )
            .where(head_unlabeled.c.head_id == head_id, heads.c.tenant_id == tenant_id)
            .order_by(head_unlabeled.c.content_hash)
        )
        with self._read() as db:
            rows = db.execute(query).all()
        return [(h, np.frombuffer(v, dtype=np.float32)) for h, v in rows]

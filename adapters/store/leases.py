"""The fence on a training job's writes: each is kept only while the job is still leased
to the process that writes it (`Lease`; adapters/store/jobs.py)."""

from __future__ import annotations

import sqlalchemy as sa

from adapters.store.records import Lease, LeaseLost
from adapters.store.tables import training_jobs


def hold(db: sa.Connection, lease: Lease) -> None:
    """Raises LeaseLost unless the job is still leased to `lease.owner`. In a write
    transaction: its row stays locked to the transaction's end (PostgreSQL; a claim skips
    a locked job), and SQLite's writers take turns."""
    held = db.execute(
        sa.select(training_jobs.c.id)
        .where(training_jobs.c.id == lease.job_id, training_jobs.c.lease_owner == lease.owner)
        .with_for_update()
    ).first()
    if held is None:
        raise LeaseLost(f"job {lease.job_id} is no longer leased to {lease.owner}")

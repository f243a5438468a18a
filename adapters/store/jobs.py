"""The training job queue: jobs stored with their examples, leased to one process at a
time, taken over when that process dies, and tried at most MAX_JOB_ATTEMPTS times.

What a process writes of a job (its versions, progress, end) is fenced by its lease
(`Lease`): a process that outlived its lease (too busy to renew it) while another took
the job over, or after the job was given up, gets `LeaseLost` and writes nothing."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import sqlalchemy as sa

from adapters.store.engine import Database, utc_now
from adapters.store.heads import resolve_heads
from adapters.store.leases import hold
from adapters.store.records import Job, Lease
from adapters.store.tables import heads, job_examples, training_jobs

# A job whose process died this many times is not tried again (its input may be the cause).
MAX_JOB_ATTEMPTS = 3
GAVE_UP = f"training stopped {MAX_JOB_ATTEMPTS} times with the process that ran it; not retried"


class Jobs(Database):
    def create_job(
        self,
        *,
        tenant_id: str,
        head_id: str,
        backbones: list[str],
        examples: list[tuple[str | None, str, bytes]],
        owner: str,
        lease_s: float,
    ) -> tuple[str, bool] | None:
        """Stores a training job with its new examples (label, or None for an unlabelled
        one; kind; data) and marks the head `training`, in one transaction: once this
        returns, a crash loses nothing. The job is claimed for `owner` unless the head has
        other jobs (a head trains one job at a time, oldest first). (job id, claimed); None
        if the head is gone."""
        job_id = uuid.uuid4().hex
        now = time.time()
        with self._tx() as db:
            # First: on PostgreSQL this locks the head's row, so concurrent jobs of one
            # head see each other.
            marked = db.execute(
                heads.update()
                .where(heads.c.id == head_id, heads.c.tenant_id == tenant_id)
                .values(status="training", error=None, updated_at=utc_now())
            )
            if marked.rowcount == 0:
                return None
            claimed = not db.scalar(
                sa.select(sa.func.count())
                .select_from(training_jobs)
                .where(training_jobs.c.head_id == head_id)
            )
            db.execute(
                training_jobs.insert().values(
                    id=job_id,
                    tenant_id=tenant_id,
                    head_id=head_id,
                    backbones=json.dumps(backbones),
                    created_at=utc_now(),
                    lease_owner=owner if claimed else None,
                    lease_until=now + lease_s if claimed else None,
                    attempts=1 if claimed else 0,
                )
            )
            if examples:
                db.execute(
                    job_examples.insert(),
                    [
                        {"job_id": job_id, "position": i, "label": label, "kind": kind,
                         "data": data}
                        for i, (label, kind, data) in enumerate(examples)
                    ],
                )  # fmt: skip
        return job_id, claimed

    def claim_job(self, *, owner: str, lease_s: float) -> Job | None:
        """The oldest job that no process holds (never claimed, or its lease ran out: its
        process died) and that is the oldest of its head, now leased to `owner`. A job
        claimed for the MAX_JOB_ATTEMPTS+1-th time fails its head instead."""
        now = time.time()
        older = training_jobs.alias("older")
        free = (
            sa.select(training_jobs)
            .where(
                sa.or_(training_jobs.c.lease_until.is_(None), training_jobs.c.lease_until < now),
                ~sa.exists().where(
                    older.c.head_id == training_jobs.c.head_id,
                    sa.tuple_(older.c.created_at, older.c.id)
                    < sa.tuple_(training_jobs.c.created_at, training_jobs.c.id),
                ),
            )
            .order_by(training_jobs.c.created_at, training_jobs.c.id)
            .limit(1)
            .with_for_update(skip_locked=True)  # replicas claiming at once take different jobs
        )
        with self._tx() as db:
            row = db.execute(free).first()
            if row is None:
                return None
            attempts = row.attempts + 1
            job = Job(row.id, row.tenant_id, row.head_id, json.loads(row.backbones), attempts)
            if job.attempts > MAX_JOB_ATTEMPTS:
                resolve_heads(db, GAVE_UP, heads.c.id == job.head_id)
                db.execute(training_jobs.delete().where(training_jobs.c.id == job.id))
                return None
            db.execute(
                training_jobs.update()
                .where(training_jobs.c.id == job.id)
                .values(
                    # A dead process's progress is stale: the new one starts over.
                    lease_owner=owner,
                    lease_until=now + lease_s,
                    attempts=job.attempts,
                    progress=None,
                )
            )
        return job

    def job_examples(self, *, job_id: str) -> list[tuple[str | None, str, bytes]]:
        """(label, kind, data) of the job's new examples, in the order they were sent; an
        unlabelled one has the label None."""
        query = (
            sa.select(job_examples.c.label, job_examples.c.kind, job_examples.c.data)
            .where(job_examples.c.job_id == job_id)
            .order_by(job_examples.c.position)
        )
        with self._read() as db:
            return [(label, kind, bytes(data)) for label, kind, data in db.execute(query)]

    def set_progress(self, *, lease: Lease, progress: dict[str, Any]) -> None:
        """How far the job is, for its head to show; written by the process training it."""
        with self._tx() as db:
            hold(db, lease)
            db.execute(
                training_jobs.update()
                .where(training_jobs.c.id == lease.job_id)
                .values(progress=json.dumps(progress))
            )

    def renew_leases(self, *, owner: str, lease_s: float) -> None:
        with self._tx() as db:
            db.execute(
                training_jobs.update()
                .where(training_jobs.c.lease_owner == owner)
                .values(lease_until=time.time() + lease_s)
            )

    def release_leases(self, *, owner_prefix: str) -> int:
        """Jobs held by processes that are known to be gone (a replica's, as it starts
        again; a process's own, as it stops) are free for any process to take now."""
        with self._tx() as db:
            return db.execute(
                training_jobs.update()
                .where(training_jobs.c.lease_owner.startswith(owner_prefix, autoescape=True))
                .values(lease_owner=None, lease_until=None, progress=None)
            ).rowcount

    def release_job(self, *, lease: Lease) -> None:
        """The job could not run for a passing reason of its process (the runner was
        restarting): free for any process again, the attempt not counted."""
        with self._tx() as db:
            hold(db, lease)
            db.execute(
                training_jobs.update()
                .where(training_jobs.c.id == lease.job_id)
                .values(
                    lease_owner=None,
                    lease_until=None,
                    attempts=training_jobs.c.attempts - 1,
                    progress=None,
                )
            )

    def finish_job(self, *, lease: Lease, tenant_id: str, head_id: str, version: int) -> None:
        """The job's version (saved with `ready=False`) is published: the head turns
        `ready`, unless a newer version was saved meanwhile, and the job is gone."""
        with self._tx() as db:
            hold(db, lease)
            _publish(db, tenant_id, head_id, version)
            db.execute(training_jobs.delete().where(training_jobs.c.id == lease.job_id))

    def publish_version(self, *, lease: Lease, tenant_id: str, head_id: str, version: int) -> None:
        """A version the job saved on its way (an `auto` head's frozen one) is published
        as `finish_job` would, while the job goes on."""
        with self._tx() as db:
            hold(db, lease)
            _publish(db, tenant_id, head_id, version)

    def fail_job(self, *, lease: Lease, tenant_id: str, head_id: str, error: str) -> None:
        """The job failed (not its process: it is not tried again); the head goes back to
        its last version, or fails if it has none."""
        with self._tx() as db:
            hold(db, lease)
            resolve_heads(db, error, heads.c.id == head_id, heads.c.tenant_id == tenant_id)
            db.execute(training_jobs.delete().where(training_jobs.c.id == lease.job_id))


def _publish(db: sa.Connection, tenant_id: str, head_id: str, version: int) -> None:
    """The head turns `ready` with this version, unless a newer one was saved meanwhile."""
    db.execute(
        heads.update()
        .where(
            heads.c.id == head_id,
            heads.c.tenant_id == tenant_id,
            heads.c.version == version,
            heads.c.status == "training",
        )
        .values(status="ready", updated_at=utc_now())
    )

"""Training jobs in an API worker: stored before the request is answered, leased to the
process that trains them, and taken over when that process dies.

Every job is a row in the store with its new examples (`adapters/store/jobs.py`), leased
to the process that trains it (renewed while it runs). A sweeper thread in every API
worker takes over jobs whose process died (the lease ran out, or its replica started
again) and jobs queued behind another of the same head: a crash on any replica loses no
acknowledged example, and every head ends `ready` or `failed`. The training itself is
`service/training.py`'s; a job runs on a thread of this worker at nice 10
(`service/priority.py`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import cast

from adapters.store import Head, Job, Lease, LeaseLost, Store
from service.inputs import InputKind, RawInput, as_bytes
from service.priority import TRAINING_JOB_NICE, lower_this_thread
from service.runner_client import RunnerUnavailable
from service.settings import Settings
from service.training import AUTO_BACKBONE, Option, Trainer

log = logging.getLogger(__name__)

# How often each worker looks for a job to take over (jittered, so workers spread out).
JOB_POLL_S = 1.0
# A running job's progress is written at most this often within a stage (each new stage
# at once): a write per message of 8 rows would be a write per 60 ms.
PROGRESS_INTERVAL_S = 1.0


class TrainingJobs:
    """This process's share of the job queue: the jobs it starts, and those it takes over."""

    def __init__(self, store: Store, trainer: Trainer, settings: Settings) -> None:
        self.store = store
        self.trainer = trainer
        self.settings = settings
        # Leases name the replica, so that one starting again frees its old processes' jobs.
        self.owner = f"{settings.replica_id}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._pool = ThreadPoolExecutor(
            max_workers=settings.training_workers,
            thread_name_prefix="graft-train",
            initializer=lower_this_thread,
            initargs=(TRAINING_JOB_NICE,),
        )
        self._jobs: set[str] = set()  # held by this process, running or waiting in the pool
        self._jobs_lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="graft-jobs", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        self._stop.set()
        self._sweeper.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        # Jobs cancelled in the pool are free for another process at once.
        self.store.release_leases(owner_prefix=self.owner)

    def start(
        self,
        head: Head,
        options: list[Option],
        examples: Sequence[tuple[str | None, RawInput]],
    ) -> Future | None:
        """Stores the job and its examples (label None: unlabelled), then trains it here:
        the future of its end, or None when it waits behind another job of the head (a
        sweeper will take it)."""
        created = self.store.create_job(
            tenant_id=head.tenant_id,
            head_id=head.id,
            backbones=[spec.id for spec, _ in options],
            examples=[(label, raw.kind, as_bytes(raw)) for label, raw in examples],
            owner=self.owner,
            lease_s=self.settings.job_lease_s,
        )
        if created is None:
            raise LookupError(f"head {head.id} was deleted")
        job_id, claimed = created
        if not claimed:
            return None
        return self._submit(job_id, head, options, [label for label, _ in examples])

    def _submit(
        self, job_id: str, head: Head, options: list[Option], labels: list[str | None]
    ) -> Future:
        """Runs the job on the pool: the future of its first published version (or of
        its end, when it publishes none)."""
        with self._jobs_lock:
            self._jobs.add(job_id)
        published: Future = Future()
        self._pool.submit(self._run, job_id, head, options, labels, published)
        return published

    def _run(
        self,
        job_id: str,
        head: Head,
        options: list[Option],
        new_labels: list[str | None],
        published: Future,
    ) -> None:
        """Trains the job's version, publishes it, and ends the job, whatever happens
        (while its lease is this process's: a job taken over is another's to end)."""
        lease = Lease(job_id, self.owner)

        def publish(version: int) -> None:  # a version on the way (service/training.py)
            time.sleep(self.settings.publish_delay_s)
            self.store.publish_version(
                lease=lease, tenant_id=head.tenant_id, head_id=head.id, version=version
            )
            if not published.done():  # the request waits for the first only
                published.set_result(version)

        try:
            progress = Progress(self.store, lease)
            version = self.trainer.train(head, options, new_labels, progress, lease, publish)
            if version is not None:
                # Ready once every process's cache serves it (adapters/coherence.py).
                time.sleep(self.settings.publish_delay_s)
                self.store.finish_job(
                    lease=lease, tenant_id=head.tenant_id, head_id=head.id, version=version
                )
        except LeaseLost:
            log.warning(
                "job %s of head %s was taken over or given up: this process's work on it is"
                " dropped",
                job_id,
                head.id,
            )
        except RunnerUnavailable:
            log.warning("the runner is restarting: job %s of head %s waits for it", job_id, head.id)
            with contextlib.suppress(LeaseLost):  # taken over meanwhile: another runs it
                self.store.release_job(lease=lease)
        except Exception as exc:
            log.exception("training head %s failed", head.id)
            with contextlib.suppress(LeaseLost):
                self.store.fail_job(
                    lease=lease,
                    tenant_id=head.tenant_id,
                    head_id=head.id,
                    error=f"training failed: {exc}",
                )
        finally:
            with self._jobs_lock:
                self._jobs.discard(job_id)
            if not published.done():
                published.set_result(None)

    def _sweep(self) -> None:
        """Renews this process's leases; when it trains nothing, takes over a free job."""
        renewed = time.monotonic()
        while not self._stop.wait(JOB_POLL_S * random.uniform(0.5, 1.5)):
            try:
                with self._jobs_lock:
                    busy = bool(self._jobs)
                if busy and time.monotonic() - renewed > self.settings.job_lease_s / 3:
                    self.store.renew_leases(owner=self.owner, lease_s=self.settings.job_lease_s)
                    renewed = time.monotonic()
                if not busy:
                    job = self.store.claim_job(owner=self.owner, lease_s=self.settings.job_lease_s)
                    if job is not None:
                        renewed = time.monotonic()
                        self._take_over(job)
            except Exception:
                log.exception("the training job sweeper failed; it tries again")

    def _take_over(self, job: Job) -> None:
        head = self.store.get_head(tenant_id=job.tenant_id, head_id=job.head_id)
        if head is None:
            return  # deleted with its jobs since
        log.warning(
            "taking over training job %s of head %s (attempt %d)", job.id, head.id, job.attempts
        )
        loaded = self.trainer.loaded
        backbones = job.backbones
        if len(backbones) == 1 and head.backbone not in (AUTO_BACKBONE, *backbones):
            # Queued behind an `auto` job that published a first version on one backbone
            # and then chose another: the head's next version trains on its choice.
            backbones = [head.backbone]
        missing = set(backbones) - set(loaded)
        if missing:
            # Replicas of one fleet should load the same backbones (README, Deploying).
            log.warning("job %s needs backbones %s, not loaded here", job.id, sorted(missing))
            self.store.release_job(lease=Lease(job.id, self.owner))
            return
        examples = [
            (
                label,
                RawInput("text", data.decode("utf-8"))
                if kind == "text"
                else RawInput(cast(InputKind, kind), data),
            )
            for label, kind, data in self.store.job_examples(job_id=job.id)
        ]
        raws = [raw for _, raw in examples]
        options: list[Option] = [
            (spec, functools.partial(self.trainer.sets.prepare, job.tenant_id, spec, raws))
            for spec in (loaded[b] for b in backbones)
        ]
        self._submit(job.id, head, options, [label for label, _ in examples])


class Progress:
    """Records how far a job is (`Store.set_progress`), for its head object to show:
    `stage` ("embedding", "fitting", "fine_tuning", "adapting") and `done` of `total`
    (rows embedded, tunings finished). A failed write is logged and the job goes on,
    unless the job is no longer this process's (`LeaseLost`, which stops it)."""

    def __init__(self, store: Store, lease: Lease) -> None:
        self.store, self.lease = store, lease
        self._stage: str | None = None
        self._written = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage == self._stage and now - self._written < PROGRESS_INTERVAL_S:
            return
        self._stage, self._written = stage, now
        try:
            progress = {"stage": stage, "done": done, "total": total}
            self.store.set_progress(lease=self.lease, progress=progress)
        except LeaseLost:
            raise  # the job is another's now: stop training it
        except Exception:
            log.warning("could not record the progress of job %s", self.lease.job_id, exc_info=True)

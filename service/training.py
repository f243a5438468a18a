"""Training jobs, in the API worker: embed what is new through the runner at training
priority, fit the head on its whole set, store the version whole.

Every job is a row in the store with its new examples, written before the request is
answered, and leased to the process that trains it (renewed while it runs). A sweeper
thread in every API worker takes over jobs whose process died (the lease ran out, or
its replica started again) and jobs queued behind another of the same head: a crash on
any replica loses no acknowledged example, and every head ends `ready` or `failed`.

What a training costs runs at a lower OS priority: the decoding of its images (`prepare`,
which the request waits for, so that bad input is refused before anything is stored) in
a process of its own at SCHED_IDLE (`service/decoder.py`), the job on a thread of this
worker at nice 10 (a fit holds the worker's GIL for long, which rules SCHED_IDLE out:
`service/priority.py`). A large training set thus yields the cores to predicts; the
runner, in turn, embeds training rows at SCHED_IDLE, beside predicts
(`service/batcher.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from adapters import finetune, heads
from adapters.adaptation import adapt
from adapters.finetune_head import FineTuning, TuningRequest
from adapters.store import Head, Job, Store
from adapters.transferability import choose_backbone
from models.export import split_exported, split_onnx_paths
from models.preprocess import text_rows
from models.registry import BackboneSpec, ImagePreprocessing
from service.decoder import TrainingDecoder
from service.fine_tuning import fine_tune_in_process
from service.inputs import RawInput, check_modality, content_hash, to_rows
from service.priority import TRAINING_JOB_NICE, lower_this_thread
from service.runner import RunnerClient, RunnerUnavailable
from service.settings import Settings

log = logging.getLogger(__name__)

# The backbone id that asks Graft to choose: every backbone of the examples' modality is
# scored (LogME), the best are tried, and the head keeps the one it validates best on.
AUTO_BACKBONE = "auto"
# How often each worker looks for a job to take over (jittered, so workers spread out).
JOB_POLL_S = 1.0
# Rows per message to the runner (8 decoded images: 1.2 MB).
TRAINING_MESSAGE_ROWS = 8
TRAINING_MESSAGES_IN_FLIGHT = 2
# A running job's progress is written at most this often within a stage (each new stage
# at once): a write per message of 8 rows would be a write per 60 ms.
PROGRESS_INTERVAL_S = 1.0


@dataclass
class PreparedInputs:
    """Examples checked against a backbone, ready for the runner.

    `content_hashes[i]` identifies example i; `rows` holds the backbone rows of the
    hashes in `to_embed` (each once); the others have cached embeddings.
    """

    content_hashes: list[str]
    to_embed: list[str]
    rows: np.ndarray | list[np.ndarray]
    inputs: dict[str, bytes]  # examples as sent, by content hash (fine-tuning tunes on them)


@dataclass(frozen=True)
class TrainingSet:
    """A head's whole training set under one backbone, ready to fit."""

    new_vectors: dict[str, np.ndarray]  # embeddings computed for this training
    examples: list[tuple[str, str]]  # (content hash, label)
    x: np.ndarray  # (len(examples), embedding_dim)
    labels: list[str]
    unlabeled: list[str]  # content hashes of the target domain's unlabelled examples
    target: np.ndarray  # (len(unlabeled), embedding_dim)


class Progress:
    """Records how far a job is (`Store.set_progress`), for its head object to show:
    `stage` ("embedding", "fitting", "fine_tuning", "adapting") and `done` of `total`
    (rows embedded, tunings finished). A failed write is logged; the job goes on."""

    def __init__(self, store: Store, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self._stage: str | None = None
        self._written = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage == self._stage and now - self._written < PROGRESS_INTERVAL_S:
            return
        self._stage, self._written = stage, now
        try:
            progress = {"stage": stage, "done": done, "total": total}
            self.store.set_progress(job_id=self.job_id, progress=progress)
        except Exception:
            log.warning("could not record the progress of job %s", self.job_id, exc_info=True)


# A backbone the head may be trained on, with its inputs prepared on demand (`auto`
# prepares one backbone at a time, so only one backbone's decoded images are held).
Option = tuple[BackboneSpec, Callable[[], PreparedInputs]]


class Trainer:
    def __init__(self, store: Store, runner: RunnerClient, settings: Settings) -> None:
        self.store = store
        self.runner = runner
        self.settings = settings
        # Leases name the replica, so that one starting again frees its old processes' jobs.
        self.owner = f"{settings.replica_id}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._pool = ThreadPoolExecutor(
            max_workers=settings.training_workers,
            thread_name_prefix="graft-train",
            initializer=lower_this_thread,
            initargs=(TRAINING_JOB_NICE,),
        )
        self._images = TrainingDecoder()
        self._loaded = {spec.id: spec for spec in settings.loaded_backbones()}
        self._jobs: set[str] = set()  # held by this process, running or waiting in the pool
        self._jobs_lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="graft-jobs", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        self._stop.set()
        self._sweeper.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._images.close()
        # Jobs cancelled in the pool are free for another process at once.
        self.store.release_leases(owner_prefix=self.owner)

    def prepare(
        self, tenant_id: str, spec: BackboneSpec, inputs: Sequence[RawInput]
    ) -> PreparedInputs:
        """Checks examples against the backbone; decodes those with no cached embedding
        (images in the decoding process, `service/decoder.py`; this thread waits)."""
        check_modality(spec, inputs)
        hashes = [content_hash(raw) for raw in inputs]
        cached = self.store.cached_embeddings(
            tenant_id=tenant_id, backbone=spec.id, content_hashes=hashes
        )
        to_decode: list[tuple[int, RawInput]] = []
        to_embed: list[str] = []
        queued: set[str] = set()
        for position, (raw, h) in enumerate(zip(inputs, hashes, strict=True)):
            if h not in cached and h not in queued:
                queued.add(h)
                to_decode.append((position, raw))
                to_embed.append(h)
        pre = spec.preprocessing
        if isinstance(pre, ImagePreprocessing):
            images = [(position, raw.data) for position, raw in to_decode]
            rows = self._images.decode(images, pre, self.settings.max_image_pixels)
        else:
            rows = to_rows(spec, to_decode, self.settings)
        kept = {h: _as_bytes(raw) for raw, h in zip(inputs, hashes, strict=True)}
        return PreparedInputs(content_hashes=hashes, to_embed=to_embed, rows=rows, inputs=kept)

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
            examples=[(label, raw.kind, _as_bytes(raw)) for label, raw in examples],
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
        with self._jobs_lock:
            self._jobs.add(job_id)
        return self._pool.submit(self._train, job_id, head, options, labels)

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
        missing = set(job.backbones) - set(self._loaded)
        if missing:
            # Replicas of one fleet should load the same backbones (README, Deploying).
            log.warning("job %s needs backbones %s, not loaded here", job.id, sorted(missing))
            self.store.release_job(job_id=job.id)
            return
        examples = [
            (label, RawInput(kind, data.decode("utf-8") if kind == "text" else data))
            for label, kind, data in self.store.job_examples(job_id=job.id)
        ]
        raws = [raw for _, raw in examples]
        options = [
            (spec, functools.partial(self.prepare, job.tenant_id, spec, raws))
            for spec in (self._loaded[b] for b in job.backbones)
        ]
        self._submit(job.id, head, options, [label for label, _ in examples])

    def _train(
        self, job_id: str, head: Head, options: list[Option], new_labels: list[str | None]
    ) -> None:
        """Embeds what is new, trains on the head's whole set, stores the version whole.
        With several backbone options (`auto`) the examples are embedded by each and
        `choose_backbone` picks one. With unlabelled examples the head is adapted to
        their domain, where that looks helpful (`adapters/adaptation.py`)."""
        tenant_id = head.tenant_id
        progress = Progress(self.store, job_id)
        try:
            # One backbone at a time: its decoded inputs are dropped once embedded.
            sets = {}
            new_inputs: dict[str, bytes] = {}
            for spec, prepare in options:
                prepared = prepare()
                new_inputs.update(prepared.inputs)
                sets[spec.id] = self._training_set(
                    tenant_id, head, spec, prepared, new_labels, progress
                )
            progress("fitting", 0, 1)
            label_embeddings = {
                spec.id: self._label_embeddings(spec, head, sets[spec.id].labels)
                for spec, _ in options
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
            x, target, names, factors = (
                training_set.x,
                training_set.target,
                label_embeddings[chosen],
                None,
            )
            if head.fine_tune != "off":
                spec = self._loaded[chosen]
                tuned = self._fine_tune(head, spec, training_set, new_inputs, progress)
                if tuned.head is not None:
                    trained, x, target, names = tuned.head, tuned.x, tuned.target, tuned.names
                    factors = tuned.factors
                trained.metrics["fine_tuning"] = tuned.report
            if training_set.unlabeled:
                progress("adapting", 0, 1)
                trained = adapt(x, training_set.labels, target, trained, label_embeddings=names)
            version = self.store.save_version(
                tenant_id=tenant_id,
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
                unlabeled=training_set.unlabeled,
                top_factors=factors,
                # Kept for the next versions' tuning, by heads that may fine-tune only.
                inputs=new_inputs if keeps_inputs(head, self._loaded[chosen]) else None,
                ready=False,
            )
            if version is not None:
                # Ready once every process's cache serves it (adapters/coherence.py).
                time.sleep(self.settings.publish_delay_s)
                self.store.finish_job(
                    job_id=job_id, tenant_id=tenant_id, head_id=head.id, version=version
                )
        except RunnerUnavailable:
            log.warning("the runner is restarting: job %s of head %s waits for it", job_id, head.id)
            self.store.release_job(job_id=job_id)
        except Exception as exc:
            log.exception("training head %s failed", head.id)
            self.store.fail_job(
                job_id=job_id, tenant_id=tenant_id, head_id=head.id, error=f"training failed: {exc}"
            )
        finally:
            with self._jobs_lock:
                self._jobs.discard(job_id)

    def _training_set(
        self,
        tenant_id: str,
        head: Head,
        spec: BackboneSpec,
        prepared: PreparedInputs,
        new_labels: list[str | None],
        progress: Progress,
    ) -> TrainingSet:
        """The head's stored examples plus the new ones, as this backbone's embeddings;
        unlabelled ones apart."""
        new_vectors = self._embed(spec, prepared, progress)
        cached = self.store.cached_embeddings(
            tenant_id=tenant_id,
            backbone=spec.id,
            content_hashes=[h for h in prepared.content_hashes if h not in new_vectors],
        )
        vectors = {**cached, **new_vectors}
        stored = self.store.training_set(tenant_id=tenant_id, head_id=head.id)
        for h, _, vector in stored:
            vectors.setdefault(h, vector)
        examples = [(h, label) for h, label, _ in stored]
        seen = set(examples)
        stored_unlabeled = self.store.unlabeled_set(tenant_id=tenant_id, head_id=head.id)
        for h, vector in stored_unlabeled:
            vectors.setdefault(h, vector)
        unlabeled = [h for h, _ in stored_unlabeled]
        seen_unlabeled = set(unlabeled)
        for h, label in zip(prepared.content_hashes, new_labels, strict=True):
            if label is None:
                if h not in seen_unlabeled:
                    seen_unlabeled.add(h)
                    unlabeled.append(h)
            elif (h, label) not in seen:
                seen.add((h, label))
                examples.append((h, label))
        # Checked when the request came in; this holds it against concurrent adds.
        if len(examples) > self.settings.max_examples_per_head:
            raise ValueError(
                f"{len(examples)} examples; at most {self.settings.max_examples_per_head} per head"
            )
        if len(unlabeled) > self.settings.max_unlabeled_per_head:
            raise ValueError(
                f"{len(unlabeled)} unlabelled examples; at most"
                f" {self.settings.max_unlabeled_per_head} per head"
            )
        x = np.stack([vectors[h] for h, _ in examples])
        target = np.stack([vectors[h] for h in unlabeled]) if unlabeled else x[:0]
        labels = [label for _, label in examples]
        return TrainingSet(new_vectors, examples, x, labels, unlabeled, target)

    def _fine_tune(
        self,
        head: Head,
        spec: BackboneSpec,
        training_set: TrainingSet,
        new_inputs: dict[str, bytes],
        progress: Progress,
    ) -> FineTuning:
        """The head fine-tuned on its own top (adapters/finetune.py) when `fine_tune` is
        "on", or "auto" and held-out folds say it beats the frozen head; the report of
        what was compared and chosen either way."""
        started = time.perf_counter()
        report: dict = {"requested": head.fine_tune, "chosen": "frozen"}

        def frozen(reason: str) -> FineTuning:
            return FineTuning(None, None, None, None, None, {**report, "reason": reason})

        if not self.fine_tunable(spec):
            return frozen(
                f"backbone {spec.id} is not fine-tuned: it is served whole here"
                " (GRAFT_FINE_TUNING, GRAFT_VARIANT; or a network that cannot be cut into"
                " a trunk and a top)"
            )
        if not keeps_inputs(head, spec):
            return frozen(
                "image heads are fine-tuned only when asked (fine_tune: on): on the sets"
                " measured it gained little for many times the training time (README,"
                " Fine-tuning)"
            )
        counts = Counter(training_set.labels)
        if min(counts.values()) < finetune.MIN_EXAMPLES_PER_LABEL:
            return frozen(
                f"a label has {min(counts.values())} example(s); fine-tuning is compared on"
                f" held-out folds, which need {finetune.MIN_EXAMPLES_PER_LABEL} per label"
            )
        n = len(training_set.examples)
        hashes = [h for h, _ in training_set.examples] + training_set.unlabeled
        inputs = {
            **self.store.inputs(tenant_id=head.tenant_id, content_hashes=hashes),
            **new_inputs,
        }
        missing = sum(h not in inputs for h in hashes)
        if missing:
            return frozen(
                f"{missing} example(s) were stored before their inputs were kept (a head"
                " created with fine_tune off); create the head again to fine-tune it"
            )
        progress("fine_tuning", 0, finetune.MAX_FOLDS + 1)
        request = TuningRequest(
            labelled=[inputs[h] for h in hashes[:n]],
            unlabelled=[inputs[h] for h in hashes[n:]],
            labels=training_set.labels,
            frozen=training_set.x,
            descriptions=head.label_descriptions,
            always=head.fine_tune == "on",
            trunk_onnx=split_onnx_paths(spec, self.settings.backbone_dir)[0],
            max_image_pixels=self.settings.max_image_pixels,
        )
        # In a process that ends with it: a worker holds no PyTorch (service/fine_tuning.py).
        tuned = fine_tune_in_process(
            spec,
            request,
            (self.settings.backbones_file, self.settings.sources_dir),
            lambda done, total: progress("fine_tuning", done, total),
        )
        report = {**report, **tuned.report, "seconds": round(time.perf_counter() - started, 1)}
        return dataclasses.replace(tuned, report=report)

    def fine_tunable(self, spec: BackboneSpec) -> bool:
        """Whether heads on this backbone can be fine-tuned here: the runner serves them
        through the trunk and top it exported and checked (none for a backbone it serves
        whole)."""
        return self.settings.fine_tunable(spec) and split_exported(spec, self.settings.backbone_dir)

    def _label_embeddings(
        self, spec: BackboneSpec, head: Head, labels: list[str]
    ) -> dict[str, np.ndarray] | None:
        """Text heads: each label's description (default: the label itself), embedded."""
        if spec.modality != "text":
            return None
        names = sorted(set(labels))
        texts = [head.label_descriptions.get(label, label) for label in names]
        vectors = self._run(spec, text_rows(spec, texts))
        return dict(zip(names, vectors, strict=True))

    def _embed(
        self, spec: BackboneSpec, prepared: PreparedInputs, progress: Progress
    ) -> dict[str, np.ndarray]:
        if not prepared.to_embed:
            return {}
        embedded = self._run(spec, prepared.rows, progress)
        return dict(zip(prepared.to_embed, embedded, strict=True))

    def _run(self, spec: BackboneSpec, rows, progress: Progress | None = None) -> np.ndarray:
        # In messages of a few rows, a few at a time: the worker's predicts share the link
        # and queue behind what is on it (1,000 images are 150 MB, which the runner would
        # also hold at once). Two in flight keep the runner's training lane busy.
        in_flight: deque[Future] = deque()
        embeddings = []
        for start in range(0, len(rows), TRAINING_MESSAGE_ROWS):
            if len(in_flight) == TRAINING_MESSAGES_IN_FLIGHT:
                embeddings.append(in_flight.popleft().result())
                if progress is not None:
                    progress("embedding", sum(map(len, embeddings)), len(rows))
            chunk = rows[start : start + TRAINING_MESSAGE_ROWS]
            in_flight.append(self.runner.embed(spec.id, chunk, "training"))
        embeddings.extend(future.result() for future in in_flight)
        return np.concatenate(embeddings)


def keeps_inputs(head: Head, spec: BackboneSpec) -> bool:
    """Whether the head's inputs are kept, for its later versions to fine-tune on: text
    heads that may fine-tune; image heads only asked to (`auto` keeps them frozen)."""
    if spec.modality == "image":
        return head.fine_tune == "on"
    return head.fine_tune != "off"


def _as_bytes(raw: RawInput) -> bytes:
    # Checked already: valid text, so plain UTF-8.
    return raw.data if isinstance(raw.data, bytes) else raw.data.encode("utf-8")

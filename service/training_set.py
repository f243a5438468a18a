"""A head's training set through the runner: its inputs checked and decoded, what is new
embedded at training priority with the deepest depths a head may read, and the whole set
read back with the rows the store keeps, in one order.

The decoding of images (`prepare`, which the request waits for, so that bad input is
refused before anything is stored) runs in a process of its own at SCHED_IDLE
(`service/decoder.py`); the runner embeds training rows at SCHED_IDLE beside predicts
(`service/batcher.py`). Fitting the head on the set is `service/training.py`'s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from adapters.depth_choice import OFFERED_DEPTHS, RowLayout
from adapters.store import Head, Store
from models.preprocess import text_rows
from models.registry import BackboneSpec, ImagePreprocessing
from service.decoder import TrainingDecoder
from service.inputs import RawInput, as_bytes, check_modality, content_hash, to_rows
from service.runner_client import RunnerClient
from service.settings import Settings

# Rows per message to the runner (8 decoded images: 1.2 MB).
TRAINING_MESSAGE_ROWS = 8
TRAINING_MESSAGES_IN_FLIGHT = 2


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

    new_vectors: dict[str, np.ndarray]  # rows computed for this training
    examples: list[tuple[str, str]]  # (content hash, label)
    x: np.ndarray  # (len(examples), layout.width)
    labels: list[str]
    unlabeled: list[str]  # content hashes of the target domain's unlabelled examples
    target: np.ndarray  # (len(unlabeled), layout.width)
    # What the rows hold: the embedding, then the deepest depths a head may read.
    layout: RowLayout


# How far a training is: (stage, done, total), for its head to show (service/jobs.py).
ReportProgress = Callable[[str, int, int], None]


class TrainingSets:
    """Training sets of this worker's heads, embedded through its link to the runner."""

    def __init__(self, store: Store, runner: RunnerClient, settings: Settings) -> None:
        self.store = store
        self.runner = runner
        self.settings = settings
        self._images = TrainingDecoder()

    def close(self) -> None:
        self._images.close()

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
            images = [(position, as_bytes(raw)) for position, raw in to_decode]
            rows: np.ndarray | list[np.ndarray]
            rows = self._images.decode(images, pre, self.settings.max_image_pixels)
        else:
            rows = to_rows(spec, to_decode, self.settings)
        kept = {h: as_bytes(raw) for raw, h in zip(inputs, hashes, strict=True)}
        return PreparedInputs(content_hashes=hashes, to_embed=to_embed, rows=rows, inputs=kept)

    def training_set(
        self,
        tenant_id: str,
        head: Head,
        spec: BackboneSpec,
        prepared: PreparedInputs,
        new_labels: list[str | None],
        progress: ReportProgress,
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
        # One order whatever is stored yet: an `auto` head's sets (one per backbone) are
        # read before and after its first version is saved, and share one list of labels.
        examples.sort()
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
        layout = self.layout(spec)
        if any(len(vectors[h]) != layout.width for h in [*(h for h, _ in examples), *unlabeled]):
            # Rows stored before they kept depths: the embedding alone, for every row.
            layout = RowLayout(spec.embedding_dim)
        x = np.stack([vectors[h][: layout.width] for h, _ in examples])
        target = np.stack([vectors[h][: layout.width] for h in unlabeled]) if unlabeled else x[:0]
        labels = [label for _, label in examples]
        return TrainingSet(new_vectors, examples, x, labels, unlabeled, target, layout)

    def layout(self, spec: BackboneSpec) -> RowLayout:
        """What a training asks the runner for, and keeps, of each example: its embedding
        and the deepest depths a head may read (adapters/depth_choice.py)."""
        widths = self.runner.depth_widths(spec.id)
        return RowLayout(spec.embedding_dim, widths).deepest(min(OFFERED_DEPTHS, len(widths)))

    def label_embeddings(
        self, spec: BackboneSpec, head: Head, training_set: TrainingSet
    ) -> dict[str, np.ndarray] | None:
        """Text heads: each label's description (default: the label itself), embedded as
        the training set's rows are."""
        if spec.modality != "text":
            return None
        names = sorted(set(training_set.labels))
        texts = [head.label_descriptions.get(label, label) for label in names]
        vectors = self.run(spec, text_rows(spec, texts))[:, : training_set.layout.width]
        return dict(zip(names, vectors, strict=True))

    def _embed(
        self, spec: BackboneSpec, prepared: PreparedInputs, progress: ReportProgress
    ) -> dict[str, np.ndarray]:
        if not prepared.to_embed:
            return {}
        embedded = self.run(spec, prepared.rows, progress)
        return dict(zip(prepared.to_embed, embedded, strict=True))

    def run(self, spec: BackboneSpec, rows, progress: ReportProgress | None = None) -> np.ndarray:
        """The rows' embeddings, each followed by the deepest depths a head may read, from
        the runner at training priority."""
        # In messages of a few rows, a few at a time: the worker's predicts share the link
        # and queue behind what is on it (1,000 images are 150 MB, which the runner would
        # also hold at once). Two in flight keep the runner's training lane busy.
        in_flight: deque[Future] = deque()
        embeddings = []
        depths = len(self.layout(spec).depth_widths)
        for start in range(0, len(rows), TRAINING_MESSAGE_ROWS):
            if len(in_flight) == TRAINING_MESSAGES_IN_FLIGHT:
                embeddings.append(in_flight.popleft().result())
                if progress is not None:
                    progress("embedding", sum(map(len, embeddings)), len(rows))
            chunk = rows[start : start + TRAINING_MESSAGE_ROWS]
            in_flight.append(self.runner.embed(spec.id, chunk, "training", depths=depths))
        embeddings.extend(future.result() for future in in_flight)
        return np.concatenate(embeddings)

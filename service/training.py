"""Training a head's version in an API worker: fit the head on its whole set (embedded by
`service/training_set.py`; choosing the backbone for `auto`), fine-tune its top and adapt
it to its unlabelled domain where that helps, and store the version whole, publishing a
working version first where more is compared after it. The job around it (leases,
take-over, publishing) is `service/jobs.py`.

What a training costs runs at a lower OS priority: the job on a thread at nice 10 (a fit
holds the worker's GIL for long, which rules SCHED_IDLE out: `service/priority.py`), the
decoding and the runner's embedding at SCHED_IDLE. A large training set thus yields the
cores to predicts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from adapters import finetune_compare, heads
from adapters.adaptation import adapt
from adapters.finetune_head import FineTuning, TuningRequest
from adapters.store import Head, Lease, Store
from adapters.transferability import choose_backbone
from models.export import split_exported, split_onnx_paths
from models.registry import BackboneSpec
from service.fine_tuning import fine_tune_in_process
from service.runner_client import RunnerClient
from service.settings import Settings
from service.training_set import PreparedInputs, ReportProgress, TrainingSet, TrainingSets

log = logging.getLogger(__name__)

# The backbone id that asks Graft to choose: every backbone of the examples' modality is
# scored (LogME), the best are tried, and the head keeps the one it validates best on.
AUTO_BACKBONE = "auto"


# A backbone the head may be trained on, with its inputs prepared on demand (`auto`
# prepares one backbone at a time, so only one backbone's decoded images are held).
Option = tuple[BackboneSpec, Callable[[], PreparedInputs]]


class Trainer:
    def __init__(self, store: Store, runner: RunnerClient, settings: Settings) -> None:
        self.store = store
        self.runner = runner
        self.settings = settings
        self.loaded = {spec.id: spec for spec in settings.loaded_backbones()}
        self.sets = TrainingSets(store, runner, settings)

    def close(self) -> None:
        self.sets.close()

    def train(
        self,
        head: Head,
        options: list[Option],
        new_labels: list[str | None],
        progress: ReportProgress,
        lease: Lease,
        publish: Callable[[int], None] | None = None,
    ) -> int | None:
        """Embeds what is new, trains on the head's whole set, stores the version whole
        (not yet ready: the job publishes it; only while the job's `lease` holds) and
        returns its number; None if the head was deleted meanwhile. With several backbone
        options (`auto`) the examples are embedded by each and `choose_backbone` picks
        one. With unlabelled examples the head is adapted to their domain, where that
        looks helpful (`adapters/adaptation.py`).

        Where more is compared after a head could already serve, the job does not wait to
        publish one (unless `fine_tune` is `on`, which promises the fine-tuned head): an
        `auto` backbone's head on the first backbone while the others embed, and a head
        whose `fine_tune` is `auto` frozen while fine-tuning is compared (minutes on a
        CPU). Each is stored and handed to `publish`; the next versions follow, each the
        best the comparisons so far chose."""
        tenant_id = head.tenant_id
        # One backbone at a time: its decoded inputs are dropped once embedded.
        sets = {}
        new_inputs: dict[str, bytes] = {}
        early = publish if head.fine_tune != "on" else None
        for spec, prepare in options:
            prepared = prepare()
            new_inputs.update(prepared.inputs)
            sets[spec.id] = self.sets.training_set(
                tenant_id, head, spec, prepared, new_labels, progress
            )
            if early is not None and len(sets) == 1 and len(options) > 1:
                self._publish_first(head, spec, sets[spec.id], new_inputs, progress, lease, early)
        progress("fitting", 0, 1)
        label_embeddings = {
            spec.id: self.sets.label_embeddings(spec, head, sets[spec.id]) for spec, _ in options
        }
        if head.backbone == AUTO_BACKBONE:
            choice = choose_backbone(
                {b: s.x for b, s in sets.items()},
                next(iter(sets.values())).labels,
                label_embeddings,
                unknown_keep=head.unknown_keep,
                layouts={b: s.layout for b, s in sets.items()},
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
                layout=training_set.layout,
                unknown_keep=head.unknown_keep,
            )
        frozen = self._frozen(trained, training_set, label_embeddings[chosen], progress)
        if head.fine_tune == "off":
            return self._save(head, chosen, training_set, frozen, None, new_inputs, lease)

        def publish_frozen() -> None:
            # `auto`: the frozen head serves while fine-tuning is compared.
            if early is not None:
                first = self._save(
                    head,
                    chosen,
                    training_set,
                    _reported(frozen, fine_tuning=PENDING),
                    None,
                    new_inputs,
                    lease,
                )
                if first is not None:
                    early(first)

        spec = self.loaded[chosen]
        tuned = self._fine_tune(head, spec, training_set, new_inputs, progress, publish_frozen)
        served, factors = frozen, None
        if tuned.head is not None:
            assert tuned.x is not None and tuned.target is not None  # with a head
            served = self._adapted(
                tuned.head, training_set.labels, tuned.x, tuned.target, tuned.names, progress
            )
            factors = tuned.factors
        # A fine-tuned head's metrics are its own; which backbone it chose, and how, stays.
        selection = {k: v for k, v in frozen.metrics.items() if k == "backbone_selection"}
        served = _reported(served, **selection, fine_tuning=tuned.report)
        return self._save(head, chosen, training_set, served, factors, new_inputs, lease)

    def _publish_first(
        self,
        head: Head,
        spec: BackboneSpec,
        training_set: TrainingSet,
        new_inputs: dict[str, bytes],
        progress: ReportProgress,
        lease: Lease,
        publish: Callable[[int], None],
    ) -> None:
        """An `auto` head's first version, on the first backbone embedded (the order of
        GRAFT_BACKBONES), served while the others are embedded and compared."""
        names = self.sets.label_embeddings(spec, head, training_set)
        trained = heads.train_head(
            training_set.x,
            training_set.labels,
            label_embeddings=names,
            layout=training_set.layout,
            unknown_keep=head.unknown_keep,
        )
        first = self._frozen(trained, training_set, names, progress)
        note = (
            f"served on {spec.id} while the other backbones are embedded and compared:"
            " a next version follows (the head's progress shows it)"
        )
        metrics = {**first.metrics, "warnings": [*first.metrics["warnings"], note]}
        if head.fine_tune != "off":
            metrics["fine_tuning"] = PENDING
        first = dataclasses.replace(first, metrics=metrics)
        version = self._save(head, spec.id, training_set, first, None, new_inputs, lease)
        if version is not None:
            # Shown with the version: the other backbones' embedding is under way.
            progress("embedding", 0, len(training_set.new_vectors))
            publish(version)

    def _frozen(
        self,
        trained: heads.TrainedHead,
        training_set: TrainingSet,
        names: dict[str, np.ndarray] | None,
        progress: ReportProgress,
    ) -> heads.TrainedHead:
        """A frozen head as served: adapted on the columns it reads (its embedding and
        the depths it chose) to its unlabelled examples' domain, where that helps."""
        columns = training_set.layout.columns(trained.depths)
        if names is not None:
            names = {label: v[columns] for label, v in names.items()}
        x, target = training_set.x[:, columns], training_set.target[:, columns]
        return self._adapted(trained, training_set.labels, x, target, names, progress)

    def _adapted(
        self,
        trained: heads.TrainedHead,
        labels: list[str],
        x: np.ndarray,
        target: np.ndarray,
        names: dict[str, np.ndarray] | None,
        progress: ReportProgress,
    ) -> heads.TrainedHead:
        """The head adapted to its unlabelled examples' domain, where that helps."""
        if not len(target):
            return trained
        progress("adapting", 0, 1)
        return adapt(x, labels, target, trained, label_embeddings=names)

    def _save(
        self,
        head: Head,
        backbone: str,
        training_set: TrainingSet,
        trained: heads.TrainedHead,
        factors: list[np.ndarray] | None,
        new_inputs: dict[str, bytes],
        lease: Lease,
    ) -> int | None:
        return self.store.save_version(
            tenant_id=head.tenant_id,
            head_id=head.id,
            backbone=backbone,
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
            depths=trained.depths,
            # Kept for the next versions' tuning, by heads that may fine-tune only.
            inputs=new_inputs if keeps_inputs(head, self.loaded[backbone]) else None,
            ready=False,
            lease=lease,
        )

    def _fine_tune(
        self,
        head: Head,
        spec: BackboneSpec,
        training_set: TrainingSet,
        new_inputs: dict[str, bytes],
        progress: ReportProgress,
        before_tuning: Callable[[], None],
    ) -> FineTuning:
        """The head fine-tuned on its own top (adapters/finetune.py) when `fine_tune` is
        "on", or "auto" and held-out folds say it beats the frozen head; the report of
        what was compared and chosen either way. `before_tuning` is called once the
        tuning is sure to run."""
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
        if min(counts.values()) < finetune_compare.MIN_EXAMPLES_PER_LABEL:
            return frozen(
                f"a label has {min(counts.values())} example(s); fine-tuning is compared on"
                f" held-out folds, which need {finetune_compare.MIN_EXAMPLES_PER_LABEL} per label"
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
        before_tuning()
        progress("fine_tuning", 0, finetune_compare.MAX_FOLDS + 1)
        request = TuningRequest(
            labelled=[inputs[h] for h in hashes[:n]],
            unlabelled=[inputs[h] for h in hashes[n:]],
            labels=training_set.labels,
            # Fine-tuning is weighed against a head on the frozen embedding.
            frozen=training_set.x[:, : spec.embedding_dim],
            descriptions=head.label_descriptions,
            always=head.fine_tune == "on",
            unknown_keep=head.unknown_keep,
            trunk_onnx=split_onnx_paths(spec, self.settings.backbone_dir)[0],
            max_image_pixels=self.settings.max_image_pixels,
            device=self.settings.device,
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


# The fine-tuning report of an `auto` head's frozen version, served while the tuning runs.
PENDING = {
    "requested": "auto",
    "chosen": "frozen",
    "reason": "served while fine-tuning is compared; a fine-tuned version follows if it"
    " measures better (the head's progress shows the comparison)",
}


def _reported(trained: heads.TrainedHead, **reports: dict) -> heads.TrainedHead:
    """The head with these reports added to its metrics."""
    return dataclasses.replace(trained, metrics={**trained.metrics, **reports})


def keeps_inputs(head: Head, spec: BackboneSpec) -> bool:
    """Whether the head's inputs are kept, for its later versions to fine-tune on: text
    heads that may fine-tune; image and audio heads only asked to (`auto` keeps them
    frozen; audio backbones are served whole)."""
    if spec.modality != "text":
        return head.fine_tune == "on"
    return head.fine_tune != "off"

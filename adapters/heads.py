"""Heads: training on embeddings and applying them. No torch, no I/O.

A head is an affine map from a backbone's L2-normalised embedding to one logit per
label, followed by a softmax: `probabilities = softmax(x @ weights + bias)`. That is what
`predict` computes in numpy and what the exported ONNX model computes in its graph.

Every head type trained here ends in that form: logistic regression directly, and a
prototype (nearest-class-mean) head because the cosine similarity of a normalised
embedding to a normalised class mean is itself a matrix product. Beside the weights a head
keeps its normalised class means (`prototypes`) and a similarity threshold: an input whose
best similarity to them falls below it is far from everything the head was trained on,
and is reported as unknown. Given rows that carry the depths of the backbone's pass, a
head may read some of them beside the embedding (adapters/depth_choice.py): `x` is then
those columns of the row, and the class means stay on the embedding.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from adapters.calibration import (
    MIN_EXAMPLES_PER_LABEL_FOR_CV,
    expected_calibration_error,
    fit_temperature,
    held_out_metrics,
    metric_warnings,
    nll,
    softmax,
)
from adapters.depth_choice import RowLayout, choose_depths

# Regularisation grid searched by cross-validation (sklearn's C: inverse strength).
C_GRID = (1.0, 10.0, 100.0)
MAX_FOLDS = 5
# newton-cg fits these small, dense problems about 15x faster than the default lbfgs here
# (300 x 1280 flowers embeddings: 0.02 s against 0.33 s per fit, same accuracy).
SOLVER = "newton-cg"
# Logits of a prototype head are this times a cosine similarity, before the temperature
# (fitted on held-out folds) sets the final scale.
PROTOTYPE_SCALE = 10.0
# Held-out log-losses closer than this are a tie, won by the earlier candidate (separable
# data drives every candidate's loss to about 0).
SAME_LOSS = 1e-3
# By default a head's unknown threshold keeps this share of its held-out rows (a head
# may ask for another: `unknown_keep`). Heads created before it was settable kept 0.99.
UNKNOWN_KEEP = 0.95


@dataclass(frozen=True)
class HeadType:
    """One candidate of the model choice: what is fitted and how."""

    kind: Literal["logistic_regression", "prototype"]
    c: float | None = None  # logistic regression only
    # Text heads: each label's name (or description) embedded by the backbone serves as
    # prior knowledge: an extra training row per label, or a pull on the class mean.
    label_names: bool = False

    def public(self) -> dict[str, Any]:
        return {"head_type": self.kind, "regularization_c": self.c, "label_names": self.label_names}


DEFAULT_TYPE = HeadType("logistic_regression", c=10.0)


@dataclass(frozen=True)
class TrainedHead:
    labels: list[str]
    weights: np.ndarray  # (embedding_dim, n_labels) float32
    bias: np.ndarray  # (n_labels,) float32
    prototypes: np.ndarray  # (embedding_dim, n_labels) float32, normalised class means
    unknown_threshold: float | None  # None: too few examples to set one
    metrics: dict[str, Any]
    # How many of the deepest depths it reads beside the embedding
    # (adapters/depth_choice.py): its weights apply to `RowLayout.columns(depths)` of a
    # row; 0 for the embedding alone.
    depths: int = 0


def candidates(with_label_names: bool) -> list[HeadType]:
    """The head types compared by cross-validation; on a tie the earlier one wins."""
    plain = [HeadType("logistic_regression", c=c) for c in C_GRID] + [HeadType("prototype")]
    if not with_label_names:
        return plain
    return plain + [HeadType(h.kind, h.c, label_names=True) for h in plain]


def train_head(
    embeddings: np.ndarray,
    labels: list[str],
    *,
    label_embeddings: dict[str, np.ndarray] | None = None,
    layout: RowLayout | None = None,
    unknown_keep: float = UNKNOWN_KEEP,
    seed: int = 0,
) -> TrainedHead:
    """Picks the head type by stratified k-fold CV when every label has enough examples,
    calibrates it on the held-out folds and sets its unknown threshold there. With a
    `layout` whose rows carry depths (adapters/depth_choice.py), `embeddings` are those
    rows (label embeddings too), and the head first chooses the depths it reads on the
    same folds; its weights then apply to `layout.columns(head.depths)` of a row."""
    start = time.perf_counter()
    counts = Counter(labels)
    if len(counts) < 2:
        raise ValueError("a head needs at least two labels")
    classes = sorted(counts)
    y = np.array([classes.index(label) for label in labels])
    names = None
    if label_embeddings:
        names = np.stack([label_embeddings[label] for label in classes])
    min_count = min(counts.values())

    layout = layout or RowLayout(embeddings.shape[1])
    rows, embeddings = embeddings, embeddings[:, : layout.embedding_dim]
    depths = 0
    depth_report = None
    chosen = HeadType(DEFAULT_TYPE.kind, DEFAULT_TYPE.c, label_names=names is not None)
    temperature = 1.0
    uncalibrated_ece = None
    unknown_threshold = None
    unknown_kept = None
    compared: list[dict[str, Any]] = []
    held_out: dict[str, Any] = {}
    folds = min(MAX_FOLDS, min_count)
    if min_count >= MIN_EXAMPLES_PER_LABEL_FOR_CV:
        from sklearn.model_selection import StratifiedKFold

        splits = list(
            StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(embeddings, y)
        )
        # Label names are rows of the same width, or there are no depths to choose.
        if layout.depth_widths and (names is None or names.shape[1] == rows.shape[1]):
            depths, depth_report = choose_depths(
                rows, y, layout, lambda x: _scored(DEFAULT_TYPE, x, y, None, splits)[1:]
            )
    x = layout.features(rows, depths)
    if names is not None:
        names = layout.features(names, depths)
    if min_count >= MIN_EXAMPLES_PER_LABEL_FOR_CV:
        best_loss = np.inf
        for head_type in candidates(names is not None):
            logits, loss, accuracy = _scored(head_type, x, y, names, splits)
            compared.append(
                {
                    **head_type.public(),
                    "cv_accuracy": round(accuracy, 4),
                    "cv_log_loss": round(loss, 4),
                }
            )
            if loss < best_loss - SAME_LOSS:
                best_loss, chosen, oof_logits = loss, head_type, logits
        held_out, uncalibrated_ece, temperature = _calibrated(oof_logits, y, splits, classes)
        unknown_threshold, unknown_kept = _unknown_threshold(
            _out_of_fold_similarity(embeddings, y, splits), splits, unknown_keep
        )

    weights, bias = _fit(chosen, x, y, names)
    # Fitted on rows scaled to unit length (RowLayout.features): the scale folds into the
    # weights, which then apply to the row's columns as they are.
    weights = weights / np.sqrt(1 + depths)
    majority = max(counts.values()) / len(labels)
    metrics = {
        "n_examples": len(labels),
        "label_counts": {label: counts[label] for label in classes},
        **chosen.public(),
        **({"depths": depth_report} if depth_report else {}),
        "cv_candidates": compared or None,
        **_held_out_fields(held_out, folds, uncalibrated_ece, unknown_threshold, unknown_kept),
        "unknown_keep": unknown_keep,
        "temperature": round(temperature, 4),
        "majority_baseline": round(majority, 4),
        "warnings": metric_warnings(held_out, len(labels), min_count, majority),
        "train_seconds": round(time.perf_counter() - start, 3),
    }
    # softmax((x W + b) / T): the temperature is folded into the weights, so serving and
    # the exported ONNX model apply it for free.
    return TrainedHead(
        labels=classes,
        weights=(weights / temperature).astype(np.float32),
        bias=(bias / temperature).astype(np.float32),
        prototypes=class_means(embeddings, y, len(classes)).T.astype(np.float32).copy(),
        unknown_threshold=unknown_threshold,
        metrics=metrics,
        depths=depths,
    )


def _fit(
    head_type: HeadType, x: np.ndarray, y: np.ndarray, names: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(weights, bias) with logits = x @ weights + bias, one column per label."""
    n_labels = int(y.max()) + 1
    if not head_type.label_names:
        names = None
    if head_type.kind == "prototype":
        means = class_means(x, y, n_labels)
        if names is not None:
            means = _normalise(means + names)
        return PROTOTYPE_SCALE * means.T, np.zeros(n_labels)
    from sklearn.linear_model import LogisticRegression
    from sklearn.utils.class_weight import compute_sample_weight

    # Balanced weights: every label weighs the same in the loss, however many examples it
    # has, so a rare label is not drowned by a common one.
    sample_weight = compute_sample_weight("balanced", y)
    if names is not None:
        # One row per label name, weighing as much as all of that label's examples.
        x = np.vstack([x, names])
        sample_weight = np.concatenate([sample_weight, np.full(n_labels, len(y) / n_labels)])
        y = np.concatenate([y, np.arange(n_labels)])
    model = LogisticRegression(C=head_type.c, solver=SOLVER, max_iter=1000)
    model.fit(x, y, sample_weight=sample_weight)
    return _assoftmax(model.coef_, model.intercept_)


def _scored(head_type, x, y, names, splits) -> tuple[np.ndarray, float, float]:
    """Out-of-fold logits, log-loss at their best temperature, and accuracy. Candidates
    are chosen by that log-loss: smoother than accuracy, so a choice among few examples
    is less of a coin toss (UCI 8 per label, with label names: 0.83 against 0.80 when
    chosen by accuracy)."""
    logits = _out_of_fold_logits(head_type, x, y, names, splits)
    loss = nll(logits / fit_temperature(logits, y), y)
    return logits, loss, float(np.mean(logits.argmax(axis=1) == y))


def _out_of_fold_logits(head_type, x, y, names, splits) -> np.ndarray:
    """Every row's logits from a head of this type that never saw it."""
    logits = np.empty((len(y), int(y.max()) + 1))
    for fitted, judged in splits:
        weights, bias = _fit(head_type, x[fitted], y[fitted], names)
        logits[judged] = x[judged] @ weights + bias
    return logits


def _out_of_fold_similarity(x, y, splits) -> np.ndarray:
    """Every row's best cosine similarity to class means computed without it."""
    similarity = np.empty(len(y))
    for fitted, judged in splits:
        means = class_means(x[fitted], y[fitted], int(y.max()) + 1)
        similarity[judged] = (x[judged] @ means.T).max(axis=1)
    return similarity


def class_means(x: np.ndarray, y: np.ndarray, n_labels: int) -> np.ndarray:
    """(n_labels, dim): each label's mean embedding, normalised to unit length."""
    return _normalise(np.stack([x[y == k].mean(axis=0) for k in range(n_labels)]))


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def import_training_libraries() -> None:
    """scikit-learn and SciPy are imported where heads are trained, not at module import:
    the BentoML arbiter and the backbone runner import this module but never train, and
    they cost about 100 MiB each per process. An API worker calls this as it starts, so
    that its first training does not wait for them (about 2 s on 2 cores)."""
    import scipy.optimize  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import sklearn.model_selection  # noqa: F401


def _calibrated(
    oof_logits: np.ndarray, y: np.ndarray, splits: list, classes: list[str]
) -> tuple[dict, float, float]:
    """Held-out metrics of calibrated scores, the ECE before calibration, and the
    temperature. The temperature is fitted on held-out scores; the scores it is judged
    on are calibrated by a temperature fitted on the other folds only (cross-fitting)."""
    uncalibrated_ece = round(expected_calibration_error(y, softmax(oof_logits)), 4)
    calibrated = np.empty_like(oof_logits)
    for fitted, judged in splits:
        t = fit_temperature(oof_logits[fitted], y[fitted])
        calibrated[judged] = softmax(oof_logits[judged] / t)
    return (
        held_out_metrics(y, calibrated, classes),
        uncalibrated_ece,
        fit_temperature(oof_logits, y),
    )


def _held_out_fields(
    held_out: dict,
    folds: int,
    uncalibrated_ece: float | None,
    unknown_threshold: float | None,
    unknown_kept: float | None,
) -> dict[str, Any]:
    """A head's held-out metrics as its `metrics` name them (None without held-out rows)."""
    return {
        "cv_accuracy": held_out.get("accuracy"),
        "cv_accuracy_margin": held_out.get("accuracy_margin"),
        "cv_folds": folds if held_out else None,
        "cv_macro_f1": held_out.get("macro_f1"),
        "cv_ece": held_out.get("ece"),
        "cv_ece_uncalibrated": uncalibrated_ece,
        "cv_reliability": held_out.get("reliability"),
        "cv_per_label": held_out.get("per_label"),
        "cv_confusion_matrix": held_out.get("confusion_matrix"),
        "unknown_threshold": None if unknown_threshold is None else round(unknown_threshold, 4),
        "cv_unknown_kept": unknown_kept,
    }


def _unknown_threshold(similarity: np.ndarray, splits: list, keep: float) -> tuple[float, float]:
    """The threshold keeping `keep` of held-out similarities, and the share that a
    threshold set on the other folds keeps of each fold."""
    kept = [
        np.mean(similarity[judged] >= np.quantile(similarity[fitted], 1 - keep))
        for fitted, judged in splits
    ]
    return float(np.quantile(similarity, 1 - keep)), round(float(np.mean(kept)), 4)


def with_held_out_evidence(
    trained: TrainedHead,
    labels: list[str],
    oof_logits: np.ndarray,
    oof_similarity: np.ndarray,
    splits: list,
) -> TrainedHead:
    """`trained` with its held-out metrics, temperature and unknown threshold taken from
    these out-of-fold scores instead of its own cross-validation: for a head fitted on
    embeddings whose backbone top was fine-tuned on every example (adapters/finetune.py),
    where its own folds would hold out rows the top has seen. `oof_logits` come from
    copies trained (top included) without the rows they score; `labels` are the rows'."""
    y = np.array([trained.labels.index(label) for label in labels])
    held_out, uncalibrated_ece, temperature = _calibrated(oof_logits, y, splits, trained.labels)
    keep = trained.metrics.get("unknown_keep", UNKNOWN_KEEP)
    threshold, kept = _unknown_threshold(oof_similarity, splits, keep)
    counts = trained.metrics["label_counts"]
    metrics = {
        **trained.metrics,
        **_held_out_fields(held_out, len(splits), uncalibrated_ece, threshold, kept),
        "warnings": metric_warnings(
            held_out, len(y), min(counts.values()), trained.metrics["majority_baseline"]
        ),
    }
    # The copies' scores already carry their own temperature, as `trained`'s weights do:
    # this one rescales both alike.
    metrics["temperature"] = round(trained.metrics["temperature"] * temperature, 4)
    return TrainedHead(
        labels=trained.labels,
        weights=(trained.weights / temperature).astype(np.float32),
        bias=(trained.bias / temperature).astype(np.float32),
        prototypes=trained.prototypes,
        unknown_threshold=threshold,
        metrics=metrics,
    )


def _assoftmax(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's logistic regression as (weights, bias) of a softmax over all labels.

    With two labels sklearn keeps one logit z for the second label; softmax([0, z]) gives
    exactly sigmoid(z), so the first label gets a zero column.
    """
    if coef.shape[0] == 1:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    return coef.T.astype(np.float32).copy(), intercept.astype(np.float32)


def best_similarity(rows: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Each row's best cosine similarity to a head's class means. They lie on the row's
    leading columns: its embedding (an adapted head's: every column it reads)."""
    return (rows[:, : len(prototypes)] @ prototypes).max(axis=1)


def predict_proba(embeddings: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    logits = embeddings @ weights + bias
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def top_k(probabilities: np.ndarray, labels: list[str], k: int) -> list[list[tuple[str, float]]]:
    """For each row, the k most probable labels with their scores, best first."""
    k = min(k, len(labels))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        [(labels[j], float(row[j])) for j in idx]
        for row, idx in zip(probabilities, order, strict=True)
    ]

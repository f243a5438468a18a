"""The held-out comparison that decides whether a fine-tuned top beats the frozen head.

`compare` runs both candidates on the same stratified folds (each fold's top is tuned
without its held-out rows, `adapters/finetune.py`) and keeps the fine-tuned one unless
the frozen one is significantly more accurate there; the report says what both scored.
`fine_tuned_head` then fits the head on the tuned top, with metrics from those folds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from adapters.calibration import nll
from adapters.finetune import ImageExamples, TextExamples
from adapters.heads import (
    UNKNOWN_KEEP,
    TrainedHead,
    class_means,
    predict_proba,
    train_head,
    with_held_out_evidence,
)

MAX_FOLDS = 3
# `auto` keeps the frozen head only when held-out folds show it more accurate at this
# significance. Folds of a few-shot set (16 examples) cannot show the opposite with any
# confidence: chosen by held-out log-loss or accuracy, `auto` picked wrongly in 4 and 5
# draws of 9, while fine-tuning gained on 7 (BENCHMARKS.md). The test still catches a
# tuning that breaks the head.
SIGNIFICANCE = 0.05
MIN_EXAMPLES_PER_LABEL = 3


@dataclass(frozen=True)
class Comparison:
    fine_tuned: bool  # whether the fine-tuned candidate won
    factors: list[np.ndarray] | None  # the winner's factors (None: frozen)
    report: dict[str, Any]
    # The fine-tuned candidate's held-out evidence: each row's log-probabilities and best
    # similarity to a class mean, from copies tuned and fitted without it; the folds.
    oof_logits: np.ndarray
    oof_similarity: np.ndarray
    splits: list


def compare(
    examples: TextExamples | ImageExamples,
    labels: list[str],
    frozen: np.ndarray,
    *,
    always: bool = False,
    seed: int = 0,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> Comparison:
    """The frozen head's and the fine-tuned one's held-out scores on the same folds, and
    the winner's factors (tuned again on every example when it is the fine-tuned one).
    The fine-tuned candidate wins unless the frozen one is significantly more accurate on
    the held-out rows (`SIGNIFICANCE`), or always with `always`."""
    from sklearn.model_selection import StratifiedKFold

    start = time.perf_counter()
    classes = sorted(set(labels))
    y = np.array([classes.index(label) for label in labels])
    min_count = int(np.bincount(y).min())
    if min_count < MIN_EXAMPLES_PER_LABEL:
        raise ValueError(
            f"a label has {min_count} example(s); fine-tuning is compared on held-out folds,"
            f" which need {MIN_EXAMPLES_PER_LABEL} per label"
        )
    folds = min(MAX_FOLDS, min_count)
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(frozen, y))
    oof = {
        "frozen": np.empty((len(y), len(classes))),
        "fine_tuned": np.empty((len(y), len(classes))),
    }
    similarity = np.empty(len(y))
    for fold, (fitted, judged) in enumerate(splits):
        progress(fold, folds + 1)  # tunings done: the folds', then the final one
        fitted_labels = [labels[i] for i in fitted]
        head = train_head(frozen[fitted], fitted_labels, seed=seed)
        oof["frozen"][judged] = predict_proba(frozen[judged], head.weights, head.bias)
        factors = examples.tune(fitted, fitted_labels, seed=seed + fold)
        tuned = examples.embed(factors)
        head = train_head(tuned[fitted], fitted_labels, seed=seed)
        oof["fine_tuned"][judged] = predict_proba(tuned[judged], head.weights, head.bias)
        means = class_means(tuned[fitted], y[fitted], len(classes))
        similarity[judged] = (tuned[judged] @ means.T).max(axis=1)
    scores = {
        name: {
            "cv_accuracy": round(float(np.mean(p.argmax(axis=1) == y)), 4),
            "cv_log_loss": round(nll(np.log(np.maximum(p, 1e-12)), y), 4),
        }
        for name, p in oof.items()
    }
    p_frozen_better = frozen_significantly_better(
        oof["frozen"].argmax(axis=1) == y, oof["fine_tuned"].argmax(axis=1) == y
    )
    won = always or p_frozen_better >= SIGNIFICANCE
    progress(folds, folds + 1)
    winner = examples.tune(range(len(labels)), labels, seed=seed) if won else None
    report = {
        "chosen": "fine_tuned" if won else "frozen",
        "candidates": scores,
        "cv_folds": folds,
        "p_frozen_better": round(p_frozen_better, 4),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return Comparison(
        won,
        winner,
        report,
        np.log(np.maximum(oof["fine_tuned"], 1e-12)),
        similarity,
        splits,
    )


def frozen_significantly_better(frozen_right: np.ndarray, tuned_right: np.ndarray) -> float:
    """One-sided exact McNemar test on paired held-out predictions: the p-value of the
    frozen head being more accurate, from the rows where exactly one of the two is right
    (1.0 when none are)."""
    from scipy.stats import binomtest

    frozen_only = int(np.sum(frozen_right & ~tuned_right))
    tuned_only = int(np.sum(tuned_right & ~frozen_right))
    if frozen_only + tuned_only == 0:
        return 1.0
    return float(binomtest(frozen_only, frozen_only + tuned_only, alternative="greater").pvalue)


def fine_tuned_head(
    tuned: np.ndarray,
    labels: list[str],
    comparison: Comparison,
    label_embeddings: dict[str, np.ndarray] | None = None,
    unknown_keep: float = UNKNOWN_KEEP,
) -> TrainedHead:
    """The head on the winning top's embeddings of the examples (`tuned`), its metrics
    and calibration taken from the comparison's held-out folds: the top has seen every
    example, so the head's own cross-validation would flatter it. `label_embeddings`:
    text heads' label descriptions through the same top."""
    trained = train_head(
        tuned, labels, label_embeddings=label_embeddings, unknown_keep=unknown_keep
    )
    return with_held_out_evidence(
        trained, labels, comparison.oof_logits, comparison.oof_similarity, comparison.splits
    )

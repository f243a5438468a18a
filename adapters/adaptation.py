"""Domain adaptation of a frozen head to unlabelled examples of the domain it will serve.

A head is fitted on labelled examples (the source). A tenant may also send unlabelled
inputs of the domain the head will serve (the target): sketches where the labels came
with photos, another product's reviews, another hospital's X-rays. What measured best on
frozen features (BENCHMARKS.md; `bench/domain_shift.py`, removed after 03efd04) is, in this order:
1. centring: each domain's mean embedding is subtracted. For an affine head this folds
   into the bias (b − μ_target·W), so it costs nothing when serving or in the ONNX model;
2. self-training: the target rows the centred head is most sure of (a third) join its
   training set with the labels it predicts; three rounds.

Adaptation is never blind. A target that differs only in its label proportions is left
alone: centring would then do harm. Otherwise both heads' accuracy on the target is
estimated without its labels (COT, Lu et al. 2023: the optimal-transport cost between
the head's predicted distributions on the target and one-hot labels in the source's
proportions; unlike the mean confidence it charges a head that piles the target onto
few labels), and the adapted head is served only when its estimate beats the unadapted
one's by more than the estimate's own error (MIN_ESTIMATED_GAIN). Either way the head
reports how far the target lies from its labelled examples (a domain classifier's
held-out balanced accuracy) and warns when the estimate there falls well below its
cross-validated accuracy.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from adapters.heads import (
    UNKNOWN_KEEP,
    TrainedHead,
    best_similarity,
    predict_proba,
    train_head,
)

# Fewer unlabelled examples than this tell too little about a domain to adapt to it.
MIN_UNLABELED = 10
SELF_TRAINING_ROUNDS = 3
CONFIDENT_SHARE = 1 / 3
# The estimates and the domain classifier use at most this many target rows (the
# transport problem is solved as an assignment, cubic in its size).
MAX_ESTIMATE_ROWS = 1000
DOMAIN_FOLDS = 5
# A domain classifier's balanced accuracy from which the target counts as distinct, and
# (with the labelled rows reweighted to the target's label proportions) under which there
# is no shift to adapt to.
DISTINCT_DOMAIN = 0.75
SAME_DOMAIN = 0.6
# An estimated target accuracy this far under the held-out accuracy earns a warning.
ESTIMATE_GAP = 0.05
# The adapted head is served only when its estimated accuracy is this much above the
# unadapted one's: the cross-fitted estimate overstated adapted heads by up to 4.9 points
# where adapting lost (UCI amazon → yelp: +4.9 estimated, −0.8 real; imdb → yelp: +4.1,
# −1.1). Set on the UCI shifts and checked on PACS's 12 with three backbones
# (BENCHMARKS.md, "Adaptation that never hurts"; `bench/adaptation.py`).
MIN_ESTIMATED_GAIN = 0.05


def adapt(
    x: np.ndarray,
    labels: list[str],
    target: np.ndarray,
    unadapted: TrainedHead,
    *,
    label_embeddings: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> TrainedHead:
    """The head to serve on the target domain: `unadapted`, or the centred and
    self-trained head when the target is a shift to adapt to and the adapted head's
    estimated accuracy there is clearly above the unadapted one's. Its metrics gain a `domain`
    report (`decision` says what was done and why) and the warnings that go with it.
    `x`, `target` and `label_embeddings` hold the columns `unadapted` reads (its
    embedding and depths: adapters/depth_choice.py); centring is per column, so per depth."""
    start = time.perf_counter()
    report: dict[str, Any] = {"n_unlabeled": len(target), "adapted": False}
    warnings = list(unadapted.metrics["warnings"])
    if len(target) < MIN_UNLABELED:
        report["decision"] = "too_few_unlabeled"
        warnings.append(
            f"{len(target)} unlabelled example(s): at least {MIN_UNLABELED} are needed to"
            " adapt to their domain or estimate the accuracy there"
        )
        return _with_report(unadapted, unadapted, report, warnings)

    rng = np.random.default_rng(seed)
    sample = target
    if len(target) > MAX_ESTIMATE_ROWS:
        sample = target[rng.choice(len(target), MAX_ESTIMATE_ROWS, replace=False)]
    shares = _label_shares(labels, unadapted.labels)
    p_unadapted = predict_proba(sample, unadapted.weights, unadapted.bias)
    distance = domain_distance(x, sample, seed=seed)
    # Target rows that differ from the labelled ones only in how often each label comes
    # (mostly one product's reviews, say) are no shift to centre away: centring would
    # move every row toward the rare labels (a synthetic case: 0.997 → 0.35). Reweighted
    # to the label proportions the head predicts there, the labelled rows are then hard
    # to tell from the target's; under a real shift (PACS, UCI, X-rays) reweighting
    # changed the distance by at most 0.01.
    predicted_shares = p_unadapted.mean(axis=0)
    row_labels = np.array([unadapted.labels.index(label) for label in labels])
    reweighted = domain_distance(
        x, sample, source_weights=(predicted_shares / shares)[row_labels], seed=seed
    )
    report.update(
        {"domain_distance": round(distance, 4), "domain_distance_reweighted": round(reweighted, 4)}
    )
    if reweighted < SAME_DOMAIN:
        # The head's predicted proportions are then the best guess of the target's.
        served, estimate = unadapted, estimate_accuracy(p_unadapted, predicted_shares)
        report.update(decision="no_shift_beyond_label_proportions")
    else:
        estimate_unadapted = estimate_accuracy(p_unadapted, shares)
        adapted = _centred_self_trained(
            x,
            labels,
            target,
            target.mean(axis=0),
            label_embeddings,
            seed,
            keep=unadapted.metrics.get("unknown_keep", UNKNOWN_KEEP),
        )
        estimate_adapted = _cross_fitted_estimate(
            x, labels, sample, target.mean(axis=0), label_embeddings, shares, rng, seed
        )
        # Adapted only for a gain larger than the estimate's own error (MIN_ESTIMATED_GAIN).
        gain = estimate_adapted - estimate_unadapted
        use_adapted = gain >= MIN_ESTIMATED_GAIN
        served = adapted if use_adapted else unadapted
        estimate = estimate_adapted if use_adapted else estimate_unadapted
        decision = "estimated_gain" if use_adapted else "estimated_gain_too_small"
        report.update(
            {
                "adapted": use_adapted,
                "decision": decision if gain >= 0 else "estimated_harm",
                "estimated_accuracy_unadapted": round(estimate_unadapted, 4),
                "estimated_accuracy_adapted": round(estimate_adapted, 4),
            }
        )
        if not use_adapted:
            warnings.append(
                f"adapting to the unlabelled examples is not clearly better (estimated accuracy"
                f" {estimate_adapted:.2f} against {estimate_unadapted:.2f} without; it must"
                f" gain {MIN_ESTIMATED_GAIN:.2f}): the head is not adapted"
            )
    report["estimated_accuracy"] = round(estimate, 4)
    if served.unknown_threshold is not None:
        similarity = best_similarity(sample, served.prototypes)
        report["unknown_share"] = round(float(np.mean(similarity < served.unknown_threshold)), 4)
    report["adapt_seconds"] = round(time.perf_counter() - start, 3)

    if distance >= DISTINCT_DOMAIN and reweighted >= SAME_DOMAIN:
        warnings.append(
            f"the unlabelled examples come from another domain than the labelled ones: a"
            f" classifier tells them apart {distance:.2f} of the time (0.50: not at all)"
        )
    cv_accuracy = unadapted.metrics["cv_accuracy"]
    if cv_accuracy is not None and estimate < cv_accuracy - ESTIMATE_GAP:
        warnings.append(
            f"estimated accuracy on the unlabelled examples' domain is {estimate:.2f}, against"
            f" {cv_accuracy:.2f} held out on the labelled ones: expect the lower there;"
            " labelled examples from that domain help most"
        )
    return _with_report(served, unadapted, report, warnings)


def _cross_fitted_estimate(
    x: np.ndarray,
    labels: list[str],
    sample: np.ndarray,
    target_mean: np.ndarray,
    label_embeddings: dict[str, np.ndarray] | None,
    shares: np.ndarray,
    rng: np.random.Generator,
    seed: int,
) -> float:
    """The adapted head's estimated accuracy on target rows it did not pseudo-label: two
    halves, each estimated by a head self-trained on the other. A head is surest of the
    rows it trained on; estimated there, the adapted head's accuracy on PACS and the
    X-rays came out 3.3-9.2 points too high, cross-fitted 0.7-9.0 (BENCHMARKS.md)."""
    order = rng.permutation(len(sample))
    halves = np.array_split(order, 2)
    total = 0.0
    for pool, held in (halves, halves[::-1]):
        head = _centred_self_trained(x, labels, sample[pool], target_mean, label_embeddings, seed)
        p = predict_proba(sample[held], head.weights, head.bias)
        total += estimate_accuracy(p, shares) * len(held)
    return total / len(sample)


def _centred_self_trained(
    x: np.ndarray,
    labels: list[str],
    target: np.ndarray,
    target_mean: np.ndarray,
    label_embeddings: dict[str, np.ndarray] | None,
    seed: int,
    keep: float = UNKNOWN_KEEP,
) -> TrainedHead:
    """Trained on centred features (plus confident pseudo-labelled target rows), served on
    raw ones: logits = (x − μ_t)·W + b = x·W + (b − μ_t·W). Its unknown threshold keeps
    `keep` of the labelled and pseudo-labelled rows."""
    source_mean = x.mean(axis=0)
    xs, xt = x - source_mean, target - target_mean
    # Label names are embedded like source examples, so they move with the source.
    names = None
    if label_embeddings:
        names = {label: v - source_mean for label, v in label_embeddings.items()}
    head = train_head(xs, labels, label_embeddings=names, unknown_keep=keep, seed=seed)
    confident: np.ndarray = np.array([], dtype=int)
    pseudo: list[str] = []
    for _ in range(SELF_TRAINING_ROUNDS):
        p = predict_proba(xt, head.weights, head.bias)
        confident = np.argsort(-p.max(axis=1), kind="stable")[: int(len(xt) * CONFIDENT_SHARE)]
        pseudo = [head.labels[k] for k in p[confident].argmax(axis=1)]
        head = train_head(
            np.vstack([xs, xt[confident]]),
            [*labels, *pseudo],
            label_embeddings=names,
            unknown_keep=keep,
            seed=seed,
        )
    # Class means and the unknown threshold in the served (raw) space, over the labelled
    # and the confidently pseudo-labelled rows: the target's inputs are not unknown.
    rows = np.vstack([x, target[confident]])
    row_labels = np.array([head.labels.index(label) for label in [*labels, *pseudo]])
    means = np.stack([rows[row_labels == k].mean(axis=0) for k in range(len(head.labels))])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    threshold = None
    if head.unknown_threshold is not None:
        similarity = (np.vstack([x, target]) @ means.T).max(axis=1)
        threshold = float(np.quantile(similarity, 1 - keep))
    return replace(
        head,
        bias=(head.bias - target_mean @ head.weights).astype(np.float32),
        prototypes=means.T.astype(np.float32).copy(),
        unknown_threshold=threshold,
    )


def estimate_accuracy(probabilities: np.ndarray, label_shares: np.ndarray) -> float:
    """COT (Lu et al. 2023): 1 − the optimal-transport cost between the rows' predicted
    distributions and one-hot labels in the given proportions, with cost ‖p − e_k‖∞, which
    is 1 − p_k. Solved as an assignment of rows to label slots."""
    from scipy.optimize import linear_sum_assignment

    n = len(probabilities)
    counts = np.floor(label_shares * n).astype(int)
    # Slots left by rounding down go to the labels with the largest remainders.
    counts[np.argsort(-(label_shares * n - counts))[: n - counts.sum()]] += 1
    slots = np.repeat(np.arange(len(label_shares)), counts)
    rows, columns = linear_sum_assignment(probabilities[:, slots], maximize=True)
    return float(probabilities[rows, slots[columns]].mean())


def domain_distance(
    source: np.ndarray,
    target: np.ndarray,
    *,
    source_weights: np.ndarray | None = None,
    seed: int = 0,
) -> float:
    """Held-out balanced accuracy of a classifier telling source rows from target rows:
    0.5 when it cannot, 1.0 when the domains never overlap. `source_weights` reweight the
    source rows (to the target's label proportions, say) in fitting and scoring."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold

    x = np.vstack([source, target])
    domain = np.r_[np.zeros(len(source)), np.ones(len(target))]
    weights = np.r_[
        np.ones(len(source)) if source_weights is None else source_weights, np.ones(len(target))
    ]
    folds = min(DOMAIN_FOLDS, len(source), len(target))
    if folds < 2:
        return 0.5
    scores = []
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fitted, judged in splits.split(x, domain):
        model = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced")
        model.fit(x[fitted], domain[fitted], sample_weight=weights[fitted])
        scores.append(
            balanced_accuracy_score(
                domain[judged], model.predict(x[judged]), sample_weight=weights[judged]
            )
        )
    return float(np.mean(scores))


def _label_shares(labels: list[str], classes: list[str]) -> np.ndarray:
    counts = np.array([labels.count(label) for label in classes], dtype=float)
    return counts / counts.sum()


def _with_report(
    served: TrainedHead, unadapted: TrainedHead, report: dict, warnings: list[str]
) -> TrainedHead:
    """The served head with the unadapted head's metrics: cross-validation on labelled
    examples only (the adapted fit's own folds would mix in its pseudo-labels), and the
    depths it reads (an adapted head reads every column it was given: those)."""
    metrics = {**unadapted.metrics, "domain": report, "warnings": warnings}
    return replace(served, metrics=metrics, depths=unadapted.depths)

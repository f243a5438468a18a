"""How good a head's scores are, on held-out predictions: accuracy with its margin,
macro-F1, per-label precision and recall, the confusion matrix, calibration (ECE and a
reliability diagram's bins), the temperature that calibrates them (Guo et al. 2017), and
the warnings a head's metrics come with."""

from __future__ import annotations

import numpy as np

# Equal-width bins of the top score for the ECE and the reliability diagram.
ECE_BINS = 10
# Every label needs this many examples before a cross-validated accuracy means anything.
MIN_EXAMPLES_PER_LABEL_FOR_CV = 3
# Below this many examples of its rarest label, a head's held-out metrics come with a warning.
FEW_EXAMPLES_PER_LABEL = 10


def held_out_metrics(y: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1, per-label precision/recall, confusion matrix (rows: true label,
    columns: predicted, in `classes` order) and expected calibration error, all computed
    on held-out predictions."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    predicted = probabilities.argmax(axis=1)
    accuracy = float(np.mean(predicted == y))
    indices = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, predicted, labels=indices, zero_division=0
    )
    return {
        "accuracy": round(accuracy, 4),
        "accuracy_margin": round(accuracy_margin(accuracy, len(y)), 4),
        "macro_f1": round(float(np.mean(f1)), 4),
        "ece": round(expected_calibration_error(y, probabilities), 4),
        "reliability": reliability_bins(y, probabilities),
        "per_label": {
            label: {
                "precision": round(float(precision[i]), 4),
                "recall": round(float(recall[i]), 4),
                "support": int(support[i]),
            }
            for i, label in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y, predicted, labels=indices).tolist(),
    }


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T that minimises the negative log-likelihood of softmax(logits / T) (Guo et al.
    2017, temperature scaling). Dividing by one scalar keeps every ranking as it was."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(
        lambda log_t: nll(logits / np.exp(log_t), y),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return float(np.exp(result.x))


def nll(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits)."""
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _top_score_bins(y: np.ndarray, probabilities: np.ndarray):
    """Each row's top score, whether its label is right, and its equal-width score bin."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y
    return confidence, correct, np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)


def reliability_bins(y: np.ndarray, probabilities: np.ndarray) -> list[dict]:
    """The top score's equal-width bins that hold predictions: their mean confidence, the
    share of them that is right, and how many (a reliability diagram's points)."""
    confidence, correct, bins = _top_score_bins(y, probabilities)
    return [
        {
            "confidence": round(float(confidence[bins == b].mean()), 4),
            "accuracy": round(float(correct[bins == b].mean()), 4),
            "count": int((bins == b).sum()),
        }
        for b in np.unique(bins)
    ]


def expected_calibration_error(y: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean |accuracy - confidence| over equal-width bins of the top score, weighted by
    how many predictions fall in each bin (Guo et al. 2017)."""
    confidence, correct, bins = _top_score_bins(y, probabilities)
    gap = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        gap += in_bin.sum() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(gap / len(y))


def accuracy_margin(accuracy: float, n: int) -> float:
    """Half the 95% interval of an accuracy measured on n rows (normal approximation,
    never narrower than one row's worth)."""
    return float(1.96 * np.sqrt(max(accuracy * (1 - accuracy), 1 / n) / n))


def metric_warnings(held_out: dict, n: int, min_count: int, majority: float) -> list[str]:
    """What a user should know before trusting the head's metrics."""
    if not held_out:
        return [
            f"no held-out metrics: a label has {min_count} example(s); each needs at least"
            f" {MIN_EXAMPLES_PER_LABEL_FOR_CV}"
        ]
    warnings = []
    accuracy = held_out["accuracy"]
    margin = accuracy_margin(accuracy, n)
    if min_count < FEW_EXAMPLES_PER_LABEL:
        warnings.append(
            f"metrics rest on few examples ({min_count} for the rarest label, {n} in all):"
            f" the accuracy is {accuracy:.2f} ± {margin:.2f}"
        )
    if accuracy < majority + max(0.05, margin):
        warnings.append(
            f"held-out accuracy {accuracy:.2f} is not clearly above always answering the"
            f" most common label ({majority:.2f}): add examples, or the backbone may not suit"
            " the data"
        )
    return warnings

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits, load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from adapters.calibration import accuracy_margin, expected_calibration_error, reliability_bins
from adapters.heads import C_GRID, SOLVER, UNKNOWN_KEEP, predict_proba, top_k, train_head
from graft.schemas import HeadSpec


def _normalised(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_multiclass_head_is_accurate_and_reports_cv() -> None:
    digits = load_digits()
    x, y = _normalised(digits.data), [f"digit {d}" for d in digits.target]
    head = train_head(x[:600], y[:600])
    assert head.labels == sorted(set(y))
    assert head.weights.shape == (64, 10) and head.bias.shape == (10,)
    probabilities = predict_proba(x[600:], head.weights, head.bias)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    accuracy = np.mean([head.labels[i] for i in probabilities.argmax(axis=1)] == np.array(y[600:]))
    assert accuracy > 0.9
    metrics = head.metrics
    assert metrics["n_examples"] == 600 and sum(metrics["label_counts"].values()) == 600
    assert 0.85 < metrics["cv_accuracy"] <= 1.0 and metrics["cv_folds"] == 5
    # The held-out metrics agree with each other.
    matrix = np.array(metrics["cv_confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 600
    assert np.trace(matrix) / 600 == pytest.approx(metrics["cv_accuracy"], abs=1e-4)
    per_label = metrics["cv_per_label"]
    assert [per_label[label]["support"] for label in head.labels] == list(matrix.sum(axis=1))
    recall = np.diag(matrix) / matrix.sum(axis=1)
    assert [per_label[label]["recall"] for label in head.labels] == pytest.approx(recall, abs=1e-4)
    assert 0.8 < metrics["cv_macro_f1"] <= 1.0 and 0 <= metrics["cv_ece"] < 0.2
    assert metrics["majority_baseline"] < 0.15 and metrics["warnings"] == []


def test_binary_head_is_sklearns_model_with_the_temperature_folded_in() -> None:
    iris = load_iris()
    keep = iris.target > 0  # versicolor and virginica overlap: not separable
    x = _normalised(iris.data[keep])
    y = [["versicolor", "virginica"][t - 1] for t in iris.target[keep]]
    head = train_head(x, y)
    reference = LogisticRegression(
        C=head.metrics["regularization_c"], solver=SOLVER, max_iter=1000
    ).fit(x, y)
    t = head.metrics["temperature"]
    assert 0.05 <= t <= 20 and t != 1.0
    expected = reference.predict_proba(x) ** (1 / t)  # softmax(log p / T)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(predict_proba(x, head.weights, head.bias), expected, atol=1e-4)
    # A temperature never changes which label wins.
    winners = predict_proba(x, head.weights, head.bias).argmax(axis=1)
    assert [head.labels[i] for i in winners] == list(reference.predict(x))


def test_temperature_scaling_calibrates_held_out_scores() -> None:
    digits = load_digits()
    x, y = _normalised(digits.data[:500]), [str(d) for d in digits.target[:500]]
    metrics = train_head(x, y, seed=3).metrics
    # Strong L2 leaves logistic regression underconfident here; the temperature sharpens.
    assert metrics["temperature"] < 1
    assert metrics["cv_ece"] < metrics["cv_ece_uncalibrated"]
    assert metrics["cv_ece"] < 0.05


def test_too_few_examples_give_no_cv_accuracy() -> None:
    x = _normalised(np.random.default_rng(0).normal(size=(5, 8)))
    head = train_head(x, ["a", "a", "a", "b", "b"])
    assert head.metrics["cv_accuracy"] is None and head.metrics["cv_confusion_matrix"] is None
    assert head.metrics["label_counts"] == {"a": 3, "b": 2}
    assert "no held-out metrics" in head.metrics["warnings"][0]


def test_features_that_carry_nothing_are_flagged() -> None:
    rng = np.random.default_rng(1)
    x = _normalised(rng.normal(size=(60, 16)))
    head = train_head(x, ["a"] * 30 + ["b"] * 30)  # labels unrelated to the features
    assert head.metrics["majority_baseline"] == 0.5
    warnings = " ".join(head.metrics["warnings"])
    assert "not clearly above always answering the most common label" in warnings


def test_few_examples_come_with_their_uncertainty() -> None:
    digits = load_digits()
    keep = np.concatenate([np.flatnonzero(digits.target == d)[:4] for d in (0, 1)])
    head = train_head(_normalised(digits.data[keep]), [str(d) for d in digits.target[keep]])
    assert head.metrics["cv_folds"] == 4
    assert any("rest on few examples" in w for w in head.metrics["warnings"])


def test_expected_calibration_error() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    # Always 0.6 for the first label while it is right 40% of the time: gap 0.2.
    overconfident = np.tile([0.6, 0.4], (10, 1))
    assert expected_calibration_error(y, overconfident) == pytest.approx(0.2)
    # Always 0.6 for the second label, right 60% of the time: calibrated.
    calibrated = np.tile([0.4, 0.6], (10, 1))
    assert expected_calibration_error(y, calibrated) == pytest.approx(0.0)


def test_reliability_bins_and_accuracy_margin() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    scores = np.array([[0.95, 0.05]] * 4 + [[0.65, 0.35]] * 2 + [[0.32, 0.68]] * 4)
    # Bin 0.9-1: 4 rows, all right; 0.6-0.7: 6 rows (0.65 for 0, 0.68 for 1), 4 right.
    assert reliability_bins(y, scores) == [
        {"confidence": 0.67, "accuracy": 0.6667, "count": 6},
        {"confidence": 0.95, "accuracy": 1.0, "count": 4},
    ]
    assert accuracy_margin(0.5, 100) == pytest.approx(1.96 * 0.05)
    assert accuracy_margin(1.0, 16) == pytest.approx(1.96 / 16)  # never zero


def test_served_metrics_carry_the_margin_and_the_reliability_diagram() -> None:
    digits = load_digits()
    x, y = _normalised(digits.data[:300]), [str(d) for d in digits.target[:300]]
    metrics = train_head(x, y, seed=1).metrics
    assert metrics["cv_accuracy_margin"] == round(accuracy_margin(metrics["cv_accuracy"], 300), 4)
    bins = metrics["cv_reliability"]
    assert sum(b["count"] for b in bins) == 300
    weighted_gap = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / 300
    assert weighted_gap == pytest.approx(metrics["cv_ece"], abs=1e-3)


def test_one_label_is_refused() -> None:
    with pytest.raises(ValueError, match="two labels"):
        train_head(np.eye(3, dtype=np.float32), ["a", "a", "a"])


def test_top_k_orders_and_clamps() -> None:
    probabilities = np.array([[0.2, 0.5, 0.3]])
    assert top_k(probabilities, ["a", "b", "c"], 2) == [[("b", 0.5), ("c", 0.3)]]
    assert len(top_k(probabilities, ["a", "b", "c"], 10)[0]) == 3


def _blobs(rng, n_per_label: list[int], dim: int = 32, spread: float = 1.0, centres=None):
    """Gaussian clusters around unit centres (random unless given), normalised like backbone
    embeddings."""
    if centres is None:
        centres = _normalised(rng.normal(size=(len(n_per_label), dim)))
    x = np.vstack(
        [
            c + spread * rng.normal(size=(n, dim)) / np.sqrt(dim)
            for c, n in zip(centres, n_per_label, strict=True)
        ]
    )
    y = [f"l{k}" for k, n in enumerate(n_per_label) for _ in range(n)]
    return _normalised(x), y, centres


def test_the_chosen_head_type_has_the_lowest_held_out_log_loss() -> None:
    x, y, _ = _blobs(np.random.default_rng(0), [20, 20, 20], spread=1.5)
    metrics = train_head(x, y).metrics
    kinds = {(c["head_type"], c["regularization_c"]) for c in metrics["cv_candidates"]}
    assert kinds == {("logistic_regression", c) for c in C_GRID} | {("prototype", None)}
    key = ("head_type", "regularization_c")
    [chosen] = [c for c in metrics["cv_candidates"] if all(c[k] == metrics[k] for k in key)]
    assert chosen["cv_log_loss"] <= min(c["cv_log_loss"] for c in metrics["cv_candidates"]) + 1e-3


def test_a_rare_label_is_not_drowned_by_a_common_one() -> None:
    x, y, _ = _blobs(np.random.default_rng(2), [200, 15], spread=3.0)
    metrics = train_head(x, y).metrics
    # Unweighted logistic regression on the same folds, for comparison.
    unweighted = cross_val_predict(
        LogisticRegression(C=metrics["regularization_c"] or 10.0, solver=SOLVER, max_iter=1000),
        x,
        y,
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
    )
    unweighted_recall = np.mean(unweighted[np.array(y) == "l1"] == "l1")
    assert metrics["cv_per_label"]["l1"]["recall"] >= unweighted_recall + 0.2


def test_inputs_far_from_every_label_are_unknown() -> None:
    rng = np.random.default_rng(4)
    x, y, _ = _blobs(rng, [40, 40, 40], spread=1.0)
    head = train_head(x[::2], y[::2])
    assert head.prototypes.shape == (32, 3)
    assert 0.9 <= head.metrics["cv_unknown_kept"] <= 1.0
    assert (
        head.metrics["unknown_keep"]
        == UNKNOWN_KEEP
        == HeadSpec.model_fields["unknown_keep"].default
    )
    # Asked to keep less of its own kind, a head sets its threshold higher.
    stricter = train_head(x[::2], y[::2], unknown_keep=0.6)
    assert stricter.unknown_threshold > head.unknown_threshold
    assert 0.4 <= stricter.metrics["cv_unknown_kept"] <= 0.8

    def similarity(v: np.ndarray) -> np.ndarray:
        return (v @ head.prototypes).max(axis=1)

    kept = np.mean(similarity(x[1::2]) >= head.unknown_threshold)
    elsewhere = _normalised(rng.normal(size=(200, 32)))  # random directions: far from all
    rejected = np.mean(similarity(elsewhere) < head.unknown_threshold)
    assert kept >= 0.9 and rejected >= 0.9


def test_too_few_examples_set_no_unknown_threshold() -> None:
    x, y, _ = _blobs(np.random.default_rng(5), [2, 2])
    head = train_head(x, y)
    assert head.unknown_threshold is None and head.metrics["unknown_threshold"] is None


def test_label_names_help_when_examples_are_few() -> None:
    rng = np.random.default_rng(6)
    x, y, centres = _blobs(rng, [4] * 4, spread=3.0)
    test_x, test_y, _ = _blobs(rng, [100] * 4, spread=3.0, centres=centres)
    # Names that point at the true centres: what a good description is to a text backbone.
    names = {f"l{k}": centre for k, centre in enumerate(centres)}

    def accuracy(head) -> float:
        predicted = predict_proba(test_x, head.weights, head.bias).argmax(axis=1)
        return float(np.mean(np.array(head.labels)[predicted] == np.array(test_y)))

    with_names = train_head(x, y, label_embeddings=names)
    without = train_head(x, y)
    assert with_names.metrics["label_names"] is True
    assert accuracy(with_names) >= accuracy(without) + 0.05

"""Adaptation of a head to unlabelled target rows (adapters/adaptation.py), on synthetic
domains whose shift is known: an offset shared by every class (centring undoes it), a
change of label proportions only (centring would do harm), and no shift at all. The real
shifts (PACS, UCI, X-rays) are measured in BENCHMARKS.md (bench/domain_shift.py,
removed after 03efd04)."""

from __future__ import annotations

import numpy as np
import pytest

from adapters.adaptation import MIN_UNLABELED, adapt, domain_distance, estimate_accuracy
from adapters.heads import predict_proba, train_head

DIM, LABELS = 64, ["a", "b", "c"]


def _normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Domains:
    """Three classes around random centres; `draw` adds an offset shared by all of them."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.centres = self.rng.normal(size=(len(LABELS), DIM))

    def draw(self, n: int, offset: np.ndarray | float = 0.0, classes=(0, 1, 2)):
        y = self.rng.choice(classes, n)
        x = self.centres[y] + self.rng.normal(scale=1.5, size=(n, DIM)) + offset
        return _normalised(x), [LABELS[k] for k in y]


def _accuracy(head, x: np.ndarray, y: list[str]) -> float:
    predicted = np.array(head.labels)[predict_proba(x, head.weights, head.bias).argmax(axis=1)]
    return float(np.mean(predicted == np.array(y)))


def test_a_shared_offset_is_adapted_away_and_reported() -> None:
    domains = Domains()
    xs, ys = domains.draw(60)
    # Toward label b's centre: the unadapted head calls most target rows b.
    xt, yt = domains.draw(300, 3 * domains.centres[1])
    unadapted = train_head(xs, ys)
    served = adapt(xs, ys, xt, unadapted)
    report = served.metrics["domain"]
    assert report["decision"] == "estimated_gain" and report["adapted"] is True
    before, after = _accuracy(unadapted, xt, yt), _accuracy(served, xt, yt)
    assert after > before + 0.2, (before, after)
    assert report["domain_distance"] > 0.9 and report["domain_distance_reweighted"] > 0.9
    assert report["estimated_accuracy_adapted"] > report["estimated_accuracy_unadapted"]
    assert report["estimated_accuracy"] == report["estimated_accuracy_adapted"]
    assert abs(report["estimated_accuracy"] - after) < 0.1
    # The target's inputs are what the head serves now, not unknowns.
    assert report["unknown_share"] < 0.05
    # The head's metrics stay those of its labelled examples, and say what changed.
    assert served.metrics["cv_accuracy"] == unadapted.metrics["cv_accuracy"]
    assert any("another domain" in w for w in served.metrics["warnings"])
    # Served on raw inputs: the centring is in the bias, the ONNX export needs nothing else.
    assert served.weights.shape == unadapted.weights.shape
    assert not np.allclose(served.bias, unadapted.bias)


def test_a_change_of_label_proportions_alone_is_not_adapted_to() -> None:
    domains = Domains(1)
    xs, ys = domains.draw(60)
    xt, yt = domains.draw(300, classes=(0,))  # one label only, no offset
    unadapted = train_head(xs, ys)
    served = adapt(xs, ys, xt, unadapted)
    report = served.metrics["domain"]
    assert report["decision"] == "no_shift_beyond_label_proportions"
    assert report["adapted"] is False and served.weights is unadapted.weights
    assert report["domain_distance"] > report["domain_distance_reweighted"]
    assert _accuracy(served, xt, yt) > 0.95
    assert report["estimated_accuracy"] > 0.9  # in the proportions the head predicts


def test_the_same_domain_is_left_alone_without_warnings() -> None:
    domains = Domains(2)
    xs, ys = domains.draw(60)
    xt, _ = domains.draw(200)
    unadapted = train_head(xs, ys)
    served = adapt(xs, ys, xt, unadapted)
    report = served.metrics["domain"]
    assert report["decision"] == "no_shift_beyond_label_proportions"
    assert report["domain_distance"] < 0.65
    assert served.metrics["warnings"] == unadapted.metrics["warnings"]


def test_too_few_unlabelled_examples_change_nothing_but_say_so() -> None:
    domains = Domains(3)
    xs, ys = domains.draw(60)
    xt, _ = domains.draw(MIN_UNLABELED - 1, 4.0)
    unadapted = train_head(xs, ys)
    served = adapt(xs, ys, xt, unadapted)
    assert served.metrics["domain"] == {
        "n_unlabeled": MIN_UNLABELED - 1,
        "adapted": False,
        "decision": "too_few_unlabeled",
    }
    assert served.bias is unadapted.bias
    assert any("unlabelled example(s)" in w for w in served.metrics["warnings"])


def test_cot_charges_a_head_that_piles_everything_onto_one_label() -> None:
    sure_and_right = np.eye(2)[[0, 1] * 50]
    assert estimate_accuracy(sure_and_right, np.array([0.5, 0.5])) == pytest.approx(1.0)
    # 90% sure of label 0 everywhere: its mean confidence says 0.9; half the rows must be
    # label 1 in the source's proportions, where it gives 0.1.
    piled = np.tile([0.9, 0.1], (100, 1))
    assert estimate_accuracy(piled, np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert estimate_accuracy(piled, np.array([1.0, 0.0])) == pytest.approx(0.9)


def test_domain_distance_tells_shifted_rows_from_the_same() -> None:
    domains = Domains(4)
    xs, _ = domains.draw(100)
    same, _ = domains.draw(100)
    shifted, _ = domains.draw(100, 2.0)
    assert domain_distance(xs, same) < 0.65
    assert domain_distance(xs, shifted) > 0.95

"""A head chooses the depths it reads beside the embedding on its own folds
(adapters/depth_choice.py): only where they clearly help, with its weights applying to a
row's columns as served."""

from __future__ import annotations

import numpy as np

from adapters.depth_choice import RowLayout
from adapters.heads import predict_proba, train_head

LAYOUT = RowLayout(embedding_dim=16, depth_widths=(8, 8, 8))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rows(y: np.ndarray, signal_at: int | None, seed: int) -> np.ndarray:
    """Rows laid out as LAYOUT: every part a unit vector of noise, except the part
    `signal_at` (None: the embedding) which also points one way per label."""
    rng = np.random.default_rng(seed)
    parts = []
    for i, width in enumerate([LAYOUT.embedding_dim, *LAYOUT.depth_widths]):
        part = rng.standard_normal((len(y), width))
        if i == (0 if signal_at is None else signal_at + 1):
            part[:, 0] += np.where(y == 1, 3.0, -3.0)
        parts.append(_unit(part))
    return np.hstack(parts).astype(np.float32)


def test_columns_and_features_follow_the_layout() -> None:
    columns = LAYOUT.columns(1)  # the deepest depth
    np.testing.assert_array_equal(columns, [*range(16), *range(32, 40)])
    np.testing.assert_array_equal(LAYOUT.columns(0), range(16))
    rows = _rows(np.array([0, 1]), None, 0)
    features = LAYOUT.features(rows, 2)
    assert features.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-6)
    assert LAYOUT.candidates() == [0, 1, 2]
    # Rows cut to the deepest two depths keep their columns' meaning.
    cut = LAYOUT.deepest(2)
    assert cut == RowLayout(16, (8, 8)) and cut.width == 32
    np.testing.assert_array_equal(
        rows[:, LAYOUT.columns(2)][:, cut.columns(1)], rows[:, LAYOUT.columns(1)]
    )


def test_a_head_reads_the_depth_that_holds_its_labels() -> None:
    y = np.repeat([0, 1], 40)
    rows = _rows(y, signal_at=2, seed=1)  # the top depth tells the labels apart
    labels = [str(v) for v in y]
    head = train_head(rows, labels, layout=LAYOUT)
    assert head.depths >= 1
    report = head.metrics["depths"]
    assert report["chosen"] == head.depths and report["cv_accuracy_gain"] > 0.3
    assert [c["depths"] for c in report["candidates"]] == [0, 1, 2]
    # As served: the weights apply to the row's own columns, no rescaling.
    test = _rows(y, signal_at=2, seed=2)
    columns = LAYOUT.columns(head.depths)
    assert head.weights.shape == (len(columns), 2)
    predicted = predict_proba(test[:, columns], head.weights, head.bias).argmax(axis=1)
    assert np.mean(np.array(head.labels)[predicted] == np.array(labels)) > 0.9
    # Its class means (the unknown score) stay on the embedding.
    assert head.prototypes.shape == (16, 2)


def test_depths_that_do_not_help_are_left_out() -> None:
    y = np.repeat([0, 1], 40)
    rows = _rows(y, signal_at=None, seed=3)  # the embedding holds it all
    head = train_head(rows, [str(v) for v in y], layout=LAYOUT)
    assert head.depths == 0 and head.metrics["depths"]["chosen"] == 0
    assert head.weights.shape == (16, 2)


def test_without_a_layout_or_held_out_folds_a_head_reads_its_embedding() -> None:
    y = np.repeat([0, 1], 40)
    rows = _rows(y, signal_at=2, seed=4)
    plain = train_head(rows[:, :16], [str(v) for v in y])
    assert plain.depths == 0 and "depths" not in plain.metrics
    few = train_head(rows[:4], ["0", "0", "1", "1"], layout=LAYOUT)  # no folds to choose on
    assert few.depths == 0 and few.weights.shape == (16, 2)
    # Label names embedded without depths: nothing to choose with.
    names = {"0": rows[0, :16], "1": rows[-1, :16]}
    named = train_head(rows, [str(v) for v in y], layout=LAYOUT, label_embeddings=names)
    assert named.depths == 0

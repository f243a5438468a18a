"""Fine-tuning a head's top on the shared trunk (adapters/finetune.py), with the real
MiniLM: SetFit pairs pull same-label texts together, and `compare` says on held-out
folds whether that beats the frozen head."""

from __future__ import annotations

import numpy as np
import pytest

from adapters.finetune import TextExamples, embed, hidden_states, tune
from adapters.finetune_compare import compare, fine_tuned_head, frozen_significantly_better
from adapters.heads import predict_proba
from models.preprocess import load_tokenizer, token_ids
from service.settings import get_backbone
from tests.inputs import text_examples

# Fewer pairs than served (20 per example): enough to move the top, and quick.
PAIRS = 6


@pytest.fixture(scope="module")
def minilm_split():
    spec = get_backbone("minilm_l6")
    pre = spec.preprocessing
    trunk, top = spec.build_split()
    tokenizer = load_tokenizer(pre.tokenizer_file(), pre.max_tokens)

    def texts_hidden(texts: list[str]) -> list[np.ndarray]:
        return hidden_states(trunk, token_ids(texts, tokenizer), pre.pad_id())

    return top, texts_hidden


def _separation(x: np.ndarray, labels: list[str]) -> float:
    """Mean cosine similarity within labels minus across them."""
    same = np.equal.outer(labels, labels)
    similarity = x @ x.T
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    return float(similarity[same & off_diagonal].mean() - similarity[~same].mean())


def test_tuning_pulls_each_label_together_and_is_reproducible(minilm_split) -> None:
    top, texts_hidden = minilm_split
    examples = text_examples(8)
    labels = [e["label"] for e in examples]
    hidden = texts_hidden([e["text"] for e in examples])
    factors = tune(top, hidden, labels, seed=0, pairs_per_example=PAIRS)
    assert [f.shape for f in factors] == top.factor_shapes()
    assert all(np.abs(b).max() > 0 for b in factors[1::2])  # B moved from zero
    frozen, tuned = embed(top, hidden, None), embed(top, hidden, factors)
    assert _separation(tuned, labels) > _separation(frozen, labels) + 0.1
    np.testing.assert_allclose(np.linalg.norm(tuned, axis=1), 1.0, atol=1e-5)
    again = tune(top, hidden, labels, seed=0, pairs_per_example=PAIRS)
    for a, b in zip(factors, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_compare_scores_both_candidates_on_the_same_folds(minilm_split) -> None:
    top, texts_hidden = minilm_split
    examples = text_examples(6)
    labels = [e["label"] for e in examples]
    hidden = texts_hidden([e["text"] for e in examples])
    frozen = embed(top, hidden, None)
    result = compare(TextExamples(top, hidden, PAIRS), labels, frozen, seed=0)
    report = result.report
    assert report["cv_folds"] == 3 and set(report["candidates"]) == {"frozen", "fine_tuned"}
    for scores in report["candidates"].values():
        assert 0 <= scores["cv_accuracy"] <= 1 and scores["cv_log_loss"] >= 0
    accuracy = {name: s["cv_accuracy"] for name, s in report["candidates"].items()}
    assert result.fine_tuned == (report["chosen"] == "fine_tuned")
    assert result.fine_tuned == (report["p_frozen_better"] >= 0.05)
    assert (result.factors is not None) == result.fine_tuned
    # The fine-tuned candidate's held-out evidence, row by row, on the reported folds.
    assert len(result.splits) == 3 and result.oof_logits.shape == (len(labels), 2)
    y = np.array([sorted(set(labels)).index(label) for label in labels])
    assert np.mean(result.oof_logits.argmax(axis=1) == y) == accuracy["fine_tuned"]
    assert np.all(result.oof_similarity <= 1 + 1e-5)


def test_a_fine_tuned_head_reports_the_comparisons_held_out_metrics(minilm_split) -> None:
    top, texts_hidden = minilm_split
    examples = text_examples(6)
    labels = [e["label"] for e in examples]
    hidden = texts_hidden([e["text"] for e in examples])
    frozen = embed(top, hidden, None)
    result = compare(TextExamples(top, hidden, PAIRS), labels, frozen, always=True)
    assert result.fine_tuned and result.factors is not None
    tuned = embed(top, hidden, result.factors)
    names = embed(top, texts_hidden(["cooking", "sports"]), result.factors)
    head = fine_tuned_head(tuned, labels, result, {"cooking": names[0], "sports": names[1]})
    assert head.metrics["cv_accuracy"] == result.report["candidates"]["fine_tuned"]["cv_accuracy"]
    assert head.metrics["cv_folds"] == 3
    # Served as trained: the head applied to the tuned top's embeddings.
    predicted = np.array(head.labels)[predict_proba(tuned, head.weights, head.bias).argmax(1)]
    assert np.mean(predicted == np.array(labels)) >= 0.9


def test_the_frozen_head_is_kept_only_when_significantly_more_accurate() -> None:
    right, wrong = np.ones(16, bool), np.zeros(16, bool)
    # Both right or both wrong everywhere: nothing to tell them apart.
    assert frozen_significantly_better(right, right) == 1.0
    # The frozen head alone right on 5 rows, never the other way: p = 0.5 ** 5.
    frozen_right = np.r_[np.ones(5, bool), np.zeros(11, bool)]
    assert frozen_significantly_better(frozen_right, wrong) == pytest.approx(1 / 32)
    # One row either way, or the tuned head better: no evidence for the frozen one.
    one_each = np.r_[True, False, np.ones(14, bool)], np.r_[False, True, np.ones(14, bool)]
    assert frozen_significantly_better(*one_each) == pytest.approx(0.75)
    assert frozen_significantly_better(wrong, right) == 1.0


def test_too_few_examples_cannot_be_compared(minilm_split) -> None:
    top, texts_hidden = minilm_split
    examples = text_examples(2)
    labels = [e["label"] for e in examples]
    hidden = texts_hidden([e["text"] for e in examples])
    with pytest.raises(ValueError, match="2 example"):
        compare(TextExamples(top, hidden), labels, embed(top, hidden, None))

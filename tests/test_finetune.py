"""Fine-tuning a head's top on the shared trunk (adapters/finetune.py), with the real
MiniLM: SetFit pairs pull same-label texts together, and `compare` says on held-out
folds whether that beats the frozen head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.finetune import compare, embed, tune
from models.preprocess import load_tokenizer, pad_tokens, token_ids
from models.registry import get_backbone
from tests.inputs import text_examples

# Fewer pairs than served (20 per example): enough to move the top, and quick.
PAIRS = 6


@pytest.fixture(scope="module")
def minilm_split():
    spec = get_backbone("minilm_l6")
    pre = spec.preprocessing
    trunk, top = spec.build_split()
    tokenizer = load_tokenizer(pre.tokenizer_file(), pre.max_tokens)

    def hidden_states(texts: list[str]) -> list[torch.Tensor]:
        ids = token_ids(texts, tokenizer)
        feeds = pad_tokens(ids, pre.pad_id())
        with torch.inference_mode():
            hidden = trunk(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask")))
        return [hidden[i, : len(row)].clone() for i, row in enumerate(ids)]

    return top, hidden_states


def _separation(x: np.ndarray, labels: list[str]) -> float:
    """Mean cosine similarity within labels minus across them."""
    same = np.equal.outer(labels, labels)
    similarity = x @ x.T
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    return float(similarity[same & off_diagonal].mean() - similarity[~same].mean())


def test_tuning_pulls_each_label_together_and_is_reproducible(minilm_split) -> None:
    top, hidden_states = minilm_split
    examples = text_examples(8)
    labels = [e["label"] for e in examples]
    hidden = hidden_states([e["text"] for e in examples])
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
    top, hidden_states = minilm_split
    examples = text_examples(6)
    labels = [e["label"] for e in examples]
    hidden = hidden_states([e["text"] for e in examples])
    frozen = embed(top, hidden, None)
    result = compare(top, hidden, labels, frozen, seed=0, pairs_per_example=PAIRS)
    report = result.report
    assert report["cv_folds"] == 3 and set(report["candidates"]) == {"frozen", "fine_tuned"}
    for scores in report["candidates"].values():
        assert 0 <= scores["cv_accuracy"] <= 1 and scores["cv_log_loss"] >= 0
    losses = {name: s["cv_log_loss"] for name, s in report["candidates"].items()}
    assert result.fine_tuned == (report["chosen"] == "fine_tuned")
    assert result.fine_tuned == (losses["fine_tuned"] < losses["frozen"] - 1e-3)
    assert (result.factors is not None) == result.fine_tuned


def test_too_few_examples_to_compare_keep_the_frozen_head(minilm_split) -> None:
    top, hidden_states = minilm_split
    examples = text_examples(2)
    labels = [e["label"] for e in examples]
    hidden = hidden_states([e["text"] for e in examples])
    result = compare(top, hidden, labels, embed(top, hidden, None))
    assert not result.fine_tuned and result.factors is None
    assert "2 example(s)" in result.report["reason"]

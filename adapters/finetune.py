"""Fine-tuning a text head's own top on the shared trunk (issue 13), and the held-out
comparison that decides whether it beats the frozen head.

The top (models/split.py) keeps the pretrained weights; a head trains only its LoRA
factors, with SetFit's objective (Tunstall et al. 2022): pairs of its examples, the
cosine similarity of their embeddings regressed onto 1 for the same label and 0 for
different ones. A head is then fitted on the tuned embeddings as on frozen ones
(adapters.heads.train_head). Training starts from the trunk's cached hidden states: the
trunk runs once per example, whatever the number of pairs and folds.

`compare` runs both candidates on the same stratified folds (each fold's top is tuned
without its held-out rows) and keeps the fine-tuned one unless the frozen one is
significantly more accurate there; the report says what both scored. `fine_tuned_head` then fits
the head on the tuned top, with metrics from those folds. PyTorch is imported here, on training's
path only (serving imports no torch).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from adapters.heads import (
    TrainedHead,
    class_means,
    nll,
    predict_proba,
    train_head,
    with_held_out_evidence,
)

PAIRS_PER_EXAMPLE = 20
# At most this many pairs per tuning, fewer per example on larger sets: tuning's time is
# bounded (MiniLM about 11 ms a pair on 2 cores, MPNet about four times that), and few-shot
# sets (up to 32 examples, where fine-tuning helps most) keep their 20 per example.
MAX_PAIRS = 640
PAIR_BATCH = 16
LEARNING_RATE = 1e-3
# LoRA's alpha / rank, folded into B when training ends (Hu et al. 2021: alpha = 2 rank).
LORA_SCALE = 2.0
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


def tune(
    top,
    hidden: list,
    labels: list[str],
    *,
    seed: int = 0,
    rank: int | None = None,
    pairs_per_example: int = PAIRS_PER_EXAMPLE,
) -> list[np.ndarray]:
    """LoRA factors (A, B per linear map of the top, scale folded into B) trained on the
    examples' trunk hidden states with SetFit pairs; one epoch (rank: the served top's)."""
    import torch

    from models.split import RANK

    rank = rank or RANK
    generator = torch.Generator().manual_seed(seed)
    factors = []
    for i, shape in enumerate(top.factor_shapes(rank)):
        if i % 2 == 0:  # A: Kaiming-uniform, as torch.nn.Linear initialises its weights
            bound = 1 / math.sqrt(shape[1])
            factors.append((torch.rand(shape, generator=generator) * 2 - 1) * bound)
        else:  # B: zeros, so training starts from the pretrained top
            factors.append(torch.zeros(shape))
    for f in factors:
        f.requires_grad_(True)
    optimiser = torch.optim.AdamW(factors, lr=LEARNING_RATE, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    per_example = max(2, min(pairs_per_example, MAX_PAIRS // len(labels)))
    pairs = _pairs(labels, per_example, rng)
    for start in range(0, len(pairs), PAIR_BATCH):
        chunk = pairs[start : start + PAIR_BATCH]
        # Both sides of every pair in one pass through the top.
        rows = [hidden[i] for i, _, _ in chunk] + [hidden[j] for _, j, _ in chunk]
        left, right = _embed_rows(top, rows, _scaled(factors)).split(len(chunk))
        target = torch.tensor([same for _, _, same in chunk])
        loss = torch.nn.functional.mse_loss((left * right).sum(dim=1), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return [f.detach().numpy().copy() for f in _scaled(factors)]


def embed(top, hidden: list, factors: list[np.ndarray] | None, batch: int = 64) -> np.ndarray:
    """Embeddings of trunk hidden states through the top with a head's factors."""
    import torch

    tensors = None if factors is None else [torch.from_numpy(f) for f in factors]
    with torch.inference_mode():
        return np.concatenate(
            [
                _embed_rows(top, hidden[s : s + batch], tensors).numpy()
                for s in range(0, len(hidden), batch)
            ]
        )


def compare(
    top,
    hidden: list,
    labels: list[str],
    frozen: np.ndarray,
    *,
    always: bool = False,
    seed: int = 0,
    pairs_per_example: int = PAIRS_PER_EXAMPLE,
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
        fitted_labels = [labels[i] for i in fitted]
        head = train_head(frozen[fitted], fitted_labels, seed=seed)
        oof["frozen"][judged] = predict_proba(frozen[judged], head.weights, head.bias)
        factors = tune(
            top,
            [hidden[i] for i in fitted],
            fitted_labels,
            seed=seed + fold,
            pairs_per_example=pairs_per_example,
        )
        tuned = embed(top, hidden, factors)
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
    factors = (
        tune(top, hidden, labels, seed=seed, pairs_per_example=pairs_per_example) if won else None
    )
    report = {
        "chosen": "fine_tuned" if won else "frozen",
        "candidates": scores,
        "cv_folds": folds,
        "p_frozen_better": round(p_frozen_better, 4),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return Comparison(
        won,
        factors,
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
) -> TrainedHead:
    """The head on the winning top's embeddings of the examples (`tuned`), its metrics
    and calibration taken from the comparison's held-out folds: the top has seen every
    example, so the head's own cross-validation would flatter it. `label_embeddings`:
    text heads' label descriptions through the same top."""
    trained = train_head(tuned, labels, label_embeddings=label_embeddings)
    return with_held_out_evidence(
        trained, labels, comparison.oof_logits, comparison.oof_similarity, comparison.splits
    )


def hidden_states(trunk, token_rows: list[np.ndarray], pad_id: int, batch: int = 32) -> list:
    """The trunk's hidden states of each row of token ids, without its padding: what
    tuning and embedding through the top start from."""
    import torch

    from models.preprocess import pad_tokens

    states = []
    with torch.inference_mode():
        for start in range(0, len(token_rows), batch):
            rows = token_rows[start : start + batch]
            feeds = pad_tokens(rows, pad_id)
            hidden = trunk(
                torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
            ).numpy()
            states += [hidden[i, : len(r)].copy() for i, r in enumerate(rows)]
    return states


def _scaled(factors: list) -> list:
    """B scaled by alpha / rank (a view for training; the stored B carries it)."""
    return [f * LORA_SCALE if i % 2 else f for i, f in enumerate(factors)]


def _embed_rows(top, rows: list, factors):
    import torch

    longest = max(len(r) for r in rows)
    hidden = torch.zeros(len(rows), longest, rows[0].shape[-1])
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        hidden[i, : len(r)] = torch.as_tensor(r)
        mask[i, : len(r)] = 1
    return top(hidden, mask, *(factors or []))


def _pairs(
    labels: list[str], per_example: int, rng: np.random.Generator
) -> list[tuple[int, int, float]]:
    """SetFit's pairs: per example, alternately one with its label and one without."""
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    pairs = []
    for i, label in enumerate(labels):
        same = [j for j in by_label[label] if j != i]
        other = [j for j, lab in enumerate(labels) if lab != label]
        for k in range(per_example):
            if k % 2 == 0 and same:
                pairs.append((i, int(rng.choice(same)), 1.0))
            else:
                pairs.append((i, int(rng.choice(other)), 0.0))
    rng.shuffle(pairs)
    return pairs

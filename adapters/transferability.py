"""How well a backbone's features suit a labelled set, from the features alone.

LogME (You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained Models for
Transfer Learning", ICML 2021): for each label's one-hot target y, the log of the
Bayesian evidence p(y | F) of a linear model y = F w + noise, with a Gaussian prior
w ~ N(0, 1/alpha) and noise ~ N(0, 1/beta), the two precisions set by maximising that
evidence (MacKay's fixed-point iteration). The score is the evidence per example,
averaged over the labels: higher means the labels are a simpler linear function of the
features, which predicts fine-tuned and linear-probe accuracy well across backbones.

One SVD of the (n, d) feature matrix serves every label, so scoring costs about as much
as one logistic-regression fit. Extracting the features with every backbone is what
`auto` really costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from adapters.depth_choice import RowLayout
from adapters.heads import SAME_LOSS, UNKNOWN_KEEP, TrainedHead, train_head

MAX_ITERATIONS = 100
TOLERANCE = 1e-3  # relative change of alpha / beta at which the iteration stops
# `auto` trains heads on this many of the backbones LogME ranks best, and keeps the better.
SHORTLIST = 2


def logme(features: np.ndarray, labels: list[str]) -> float:
    """The mean, over labels, of log p(one-hot label | features) / n."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    u, singular, _ = np.linalg.svd(f, full_matrices=False)
    sigma = singular**2  # eigenvalues of FᵀF; the other d - len(sigma) are 0
    y = np.asarray(labels)
    evidences = []
    for label in sorted(set(labels)):
        target = (y == label).astype(np.float64)
        z = u.T @ target  # the target's coordinates in F's column space
        outside = max(float(target @ target - z @ z), 0.0)  # what no linear map reaches
        alpha, beta = fit_precisions(sigma, z, outside, n)
        evidences.append(log_evidence(sigma, z, outside, n, d, alpha, beta) / n)
    return float(np.mean(evidences))


def fit_precisions(sigma: np.ndarray, z: np.ndarray, outside: float, n: int) -> tuple[float, float]:
    """The prior precision alpha and noise precision beta that maximise the evidence
    (You et al., Algorithm 1), in F's singular basis."""
    alpha, beta = 1.0, 1.0
    for _ in range(MAX_ITERATIONS):
        m_norm, residual, gamma = _posterior(sigma, z, outside, alpha, beta)
        new_alpha = gamma / max(m_norm, 1e-12)
        new_beta = (n - gamma) / max(residual, 1e-12)
        done = abs(new_alpha / alpha - 1) < TOLERANCE and abs(new_beta / beta - 1) < TOLERANCE
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return alpha, beta


def log_evidence(
    sigma: np.ndarray, z: np.ndarray, outside: float, n: int, d: int, alpha: float, beta: float
) -> float:
    """log p(y | F, alpha, beta) for y with coordinates z in F's column space."""
    m_norm, residual, _ = _posterior(sigma, z, outside, alpha, beta)
    # log|alpha I + beta FᵀF|: d eigenvalues, of which d - len(sigma) are 0.
    log_det = float(np.sum(np.log(alpha + beta * sigma))) + (d - len(sigma)) * np.log(alpha)
    return float(
        0.5 * d * np.log(alpha)
        + 0.5 * n * np.log(beta)
        - 0.5 * beta * residual
        - 0.5 * alpha * m_norm
        - 0.5 * log_det
        - 0.5 * n * np.log(2 * np.pi)
    )


def _posterior(
    sigma: np.ndarray, z: np.ndarray, outside: float, alpha: float, beta: float
) -> tuple[float, float, float]:
    """|m|², |F m - y|² and the effective number of parameters gamma, where m is the
    posterior mean of w."""
    shrink = beta * sigma / (alpha + beta * sigma)
    m_norm = float(np.sum(shrink**2 * z**2 / np.maximum(sigma, 1e-300)))
    residual = float(np.sum((z * (1 - shrink)) ** 2)) + outside
    return m_norm, residual, float(shrink.sum())


@dataclass(frozen=True)
class BackboneChoice:
    backbone: str
    trained: TrainedHead
    report: dict[str, Any]


def choose_backbone(
    features: dict[str, np.ndarray],
    labels: list[str],
    label_embeddings: dict[str, dict[str, np.ndarray] | None],
    unknown_keep: float = UNKNOWN_KEEP,
    layouts: dict[str, RowLayout] | None = None,
) -> BackboneChoice:
    """`"backbone": "auto"`: rank the backbones by LogME on the examples' embeddings,
    train a head on the best SHORTLIST of them and keep the one with the lower held-out
    log-loss (LogME's order where there are too few examples to hold any out). With
    `layouts`, a backbone's features are rows that carry depths, which its head may read
    (adapters/depth_choice.py)."""
    layouts = layouts or {}
    scores = {
        backbone: logme(
            x[:, : layouts[backbone].embedding_dim] if backbone in layouts else x, labels
        )
        for backbone, x in features.items()
    }
    shortlist = sorted(scores, key=lambda b: -scores[b])[:SHORTLIST]
    trained = {
        b: train_head(
            features[b],
            labels,
            label_embeddings=label_embeddings.get(b),
            layout=layouts.get(b),
            unknown_keep=unknown_keep,
        )
        for b in shortlist
    }
    losses = {b: _held_out_log_loss(t.metrics) for b, t in trained.items()}
    chosen = shortlist[0]
    for backbone in shortlist[1:]:
        loss, best = losses[backbone], losses[chosen]
        if loss is not None and best is not None and loss < best - SAME_LOSS:
            chosen = backbone
    report = {
        "logme": {b: round(s, 4) for b, s in scores.items()},
        "shortlist": shortlist,
        "cv_log_loss": losses,
        "cv_accuracy": {b: t.metrics["cv_accuracy"] for b, t in trained.items()},
        "chosen": chosen,
    }
    return BackboneChoice(chosen, trained[chosen], report)


def _held_out_log_loss(metrics: dict[str, Any]) -> float | None:
    """The log-loss of the head type the head chose (the lowest of its candidates)."""
    if not metrics["cv_candidates"]:
        return None
    return min(c["cv_log_loss"] for c in metrics["cv_candidates"])

"""LogME: the closed form against the Gaussian marginal likelihood it stands for."""

from __future__ import annotations

import numpy as np

from adapters.transferability import fit_precisions, log_evidence, logme


def _marginal_log_likelihood(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y; 0, I/beta + F Fᵀ/alpha), computed directly: what the evidence is."""
    n = len(y)
    cov = np.eye(n) / beta + f @ f.T / alpha
    _, log_det = np.linalg.slogdet(cov)
    return float(-0.5 * (y @ np.linalg.solve(cov, y) + log_det + n * np.log(2 * np.pi)))


def test_the_evidence_is_the_maximised_marginal_likelihood() -> None:
    rng = np.random.default_rng(0)
    for n, d in ((40, 10), (12, 30)):  # more examples than features, and fewer
        f = rng.normal(size=(n, d))
        y = (f[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(float)
        u, s, _ = np.linalg.svd(f, full_matrices=False)
        z = u.T @ y
        outside = float(y @ y - z @ z)
        alpha, beta = fit_precisions(s**2, z, outside, n)
        evidence = log_evidence(s**2, z, outside, n, d, alpha, beta)
        assert abs(evidence - _marginal_log_likelihood(f, y, alpha, beta)) < 1e-6
        # A maximum: moving either precision does not raise it (with fewer examples than
        # features the fit can be exact; then beta grows large and the evidence is flat).
        for a, b in (
            (alpha * 1.5, beta),
            (alpha / 1.5, beta),
            (alpha, beta * 1.5),
            (alpha, beta / 1.5),
        ):
            assert _marginal_log_likelihood(f, y, a, b) < evidence + 1e-6


def test_features_that_carry_the_labels_score_higher() -> None:
    rng = np.random.default_rng(1)
    labels = [f"l{k}" for k in rng.integers(0, 3, size=150)]
    centres = rng.normal(size=(3, 64))
    informative = np.stack([centres[int(label[1])] for label in labels]) + rng.normal(
        size=(150, 64)
    )
    noise = rng.normal(size=(150, 64)) * np.linalg.norm(informative, axis=1, keepdims=True) / 8
    weaker = informative + noise * 4
    scores = [
        logme(x / np.linalg.norm(x, axis=1, keepdims=True), labels) for x in (informative, weaker)
    ]
    random = logme(rng.normal(size=(150, 64)), labels)
    assert scores[0] > scores[1] > random

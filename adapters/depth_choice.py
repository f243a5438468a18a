"""Which depths of the shared pass a head reads beside the embedding, chosen on its own
held-out folds.

A backbone's row can carry, after its embedding, one pooled and L2-normalised vector per
depth (models/depths.py). Adding the upper depths gained 3 points on AG News (MiniLM, 8
per label) and nothing clear on images; every depth at once lost up to 5 points
(BENCHMARKS.md, "Every depth in the pass"). So a head compares a few candidates, the
embedding alone and it with the top one or two depths, by out-of-fold log-loss, and
takes depths only when they win by a margin: never added blindly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# A candidate with depths must lower the held-out log-loss by this share of the
# embedding alone's to be chosen.
MARGIN = 0.05
# The candidates beside the embedding alone: the top one, and the top two depths.
TOP_DEPTHS = (1, 2)


@dataclass(frozen=True)
class RowLayout:
    """Where the embedding and each depth lie in a backbone's rows."""

    embedding_dim: int
    depth_widths: tuple[int, ...] = ()

    def columns(self, depths: tuple[int, ...]) -> np.ndarray:
        """The columns a head reading these depths takes, embedding first."""
        edges = np.cumsum([self.embedding_dim, *self.depth_widths])
        parts = [np.arange(self.embedding_dim)]
        parts += [np.arange(edges[d], edges[d + 1]) for d in depths]
        return np.concatenate(parts)

    def features(self, rows: np.ndarray, depths: tuple[int, ...]) -> np.ndarray:
        """What a head reading these depths is fitted on: the embedding and each depth
        (unit vectors all), scaled to unit length together."""
        return rows[:, self.columns(depths)] / np.sqrt(1 + len(depths))

    def candidates(self) -> list[tuple[int, ...]]:
        n = len(self.depth_widths)
        return [()] + [tuple(range(n - k, n)) for k in TOP_DEPTHS if k <= n]


def choose_depths(
    rows: np.ndarray, y: np.ndarray, layout: RowLayout, held_out_loss
) -> tuple[tuple[int, ...], dict[str, Any]]:
    """The depths to read, and the comparison as the head's metrics report it.
    `held_out_loss(x)` is (log-loss, accuracy) out of fold of a head fitted on `x`."""
    compared = []
    for depths in layout.candidates():
        loss, accuracy = held_out_loss(layout.features(rows, depths))
        compared.append({"depths": list(depths), "cv_log_loss": loss, "cv_accuracy": accuracy})
    alone = compared[0]
    best = min(compared, key=lambda c: c["cv_log_loss"])
    if best["cv_log_loss"] > alone["cv_log_loss"] * (1 - MARGIN):
        best = alone
    report = {
        "chosen": best["depths"],
        "cv_accuracy_gain": round(best["cv_accuracy"] - alone["cv_accuracy"], 4),
        "candidates": [
            {**c, **{k: round(c[k], 4) for k in ("cv_log_loss", "cv_accuracy")}} for c in compared
        ],
    }
    return tuple(best["depths"]), report

"""Which depths of the shared pass a head reads beside the embedding, chosen on its own
held-out folds.

A backbone's row can carry, after its embedding, one pooled and L2-normalised vector per
depth (models/depths.py), deepest last. Adding the upper depths gained 3 points on AG
News (MiniLM, 8 per label) and nothing clear on images; every depth at once lost up to 5
points (BENCHMARKS.md, "Every depth in the pass"). So a head compares a few candidates,
the embedding alone and it with the deepest one or two depths, by out-of-fold log-loss,
and takes depths only when they win by a margin: never added blindly. A head's choice is
thus one number, how many of the deepest depths it reads, which is also all the runner
needs to send it (`service/batcher.py` cuts the rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# A candidate with depths must lower the held-out log-loss by this share of the
# embedding alone's to be chosen.
MARGIN = 0.05
# The candidates beside the embedding alone: the deepest one, and the deepest two depths.
TOP_DEPTHS = (1, 2)
# How many of the deepest depths a training asks the runner for, and its examples' rows
# keep: all that a candidate reads.
OFFERED_DEPTHS = max(TOP_DEPTHS)


@dataclass(frozen=True)
class RowLayout:
    """Where the embedding and each depth lie in rows: the embedding, then depths of
    these widths, deepest last."""

    embedding_dim: int
    depth_widths: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        return self.embedding_dim + sum(self.depth_widths)

    def deepest(self, k: int) -> RowLayout:
        """The layout of these rows cut to the embedding and the deepest `k` depths."""
        return RowLayout(self.embedding_dim, self.depth_widths[len(self.depth_widths) - k :])

    def columns(self, depths: int) -> np.ndarray:
        """The columns a head reading the deepest `depths` depths takes, embedding first."""
        tail = sum(self.depth_widths[len(self.depth_widths) - depths :]) if depths else 0
        return np.r_[np.arange(self.embedding_dim), np.arange(self.width - tail, self.width)]

    def features(self, rows: np.ndarray, depths: int) -> np.ndarray:
        """What a head reading these depths is fitted on: the embedding and each depth
        (unit vectors all), scaled to unit length together."""
        return rows[:, self.columns(depths)] / np.sqrt(1 + depths)

    def candidates(self) -> list[int]:
        return [0] + [k for k in TOP_DEPTHS if k <= len(self.depth_widths)]


def choose_depths(
    rows: np.ndarray, y: np.ndarray, layout: RowLayout, held_out_loss
) -> tuple[int, dict[str, Any]]:
    """How many of the deepest depths to read, and the comparison as the head's metrics
    report it. `held_out_loss(x)` is (log-loss, accuracy) out of fold of a head fitted
    on `x`."""
    compared = []
    for depths in layout.candidates():
        loss, accuracy = held_out_loss(layout.features(rows, depths))
        compared.append({"depths": depths, "cv_log_loss": loss, "cv_accuracy": accuracy})
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
    return best["depths"], report

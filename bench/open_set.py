"""Open-set recognition: a head fitted on some classes of a set, shown the others.

    python bench/open_set.py                        # about 2 minutes on 2 cores

In-process, on the served ONNX graphs (fp32): a head is trained by the service's own
`adapters.heads.train_head` on the known classes' training rows; its validation rows of
known classes should be kept and those of the other classes rejected as unknown.
- flowers, lite0: 3 known, 2 unknown, all 10 splits (train → val);
- AG News, MiniLM: 3 known, 1 unknown, all 4 splits, 8 and 100 training rows per label,
  validated on 1,000 other rows;
- PACS photos, lite0: 5 known, 2 unknown, all 21 splits, half the photos to train;
- another kind: a head of all 7 PACS photo classes shown flowers.
For each score (higher: more unknown): AUROC, and the share of unknown rows rejected by a
threshold that keeps 95% of the known validation rows (set on them: the same optimism for
every score). For the score served today (cosine to the class means), also what the head
does as served: the share of known rows it keeps and of unknown rows it rejects with its
own threshold (set on its held-out folds, `adapters.heads.UNKNOWN_KEEP`). The other scores
are candidates, computed here: Mahalanobis distance to the nearest class mean under a
shrunk shared covariance kept to its 16 leading directions (what fits a head's memory),
energy (Liu et al. 2020), and the cosine to the nearest training example (Sun et al. 2022).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
from sklearn.covariance import ledoit_wolf_shrinkage
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters.heads import UNKNOWN_KEEP, TrainedHead, best_similarity, train_head
from bench.common import DATA, embedded_folder, embedded_texts, read_texts, served

KEEP = 0.95
DIRECTIONS = 16


def mahalanobis(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Distance to the nearest class mean, under the classes' shared covariance shrunk
    (Ledoit-Wolf) toward a multiple of the identity and kept to its leading directions."""
    classes = sorted(set(y))
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[[classes.index(c) for c in y]]
    shrinkage = ledoit_wolf_shrinkage(centred, assume_centered=True)
    floor = shrinkage * float((centred**2).mean())
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    spread = (1 - shrinkage) * singular[:DIRECTIONS] ** 2 / len(x)
    directions = directions[:DIRECTIONS]
    distances = []
    for mean in means:
        d = rows - mean
        projected = (d @ directions.T) ** 2
        distances.append(
            (d**2).sum(axis=1) / floor - (projected * (1 / floor - 1 / (floor + spread))).sum(1)
        )
    return np.min(distances, axis=0)


def scores(head: TrainedHead, x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> dict:
    logits = rows @ head.weights + head.bias
    return {
        "cosine to class means (served)": -best_similarity(rows, head.prototypes),
        "Mahalanobis, 16 directions": mahalanobis(x, y, rows),
        "energy": -np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) - logits.max(1),
        "nearest training example": -(rows @ x.T).max(axis=1),
    }


def evaluate(x, y, rows, known_rows: np.ndarray) -> dict[str, tuple[float, ...]]:
    """Per score: AUROC, rejected at 95% kept; for the served score also the head's own
    kept and rejected shares."""
    head = train_head(x, list(y))
    out = {}
    for name, score in scores(head, x, y, rows).items():
        known, unknown = score[known_rows], score[~known_rows]
        truth = np.r_[np.zeros(len(known)), np.ones(len(unknown))]
        auroc = roc_auc_score(truth, np.r_[known, unknown])
        rejected = float(np.mean(unknown > np.quantile(known, KEEP)))
        out[name] = (auroc, rejected)
    if head.unknown_threshold is not None:
        similarity = best_similarity(rows, head.prototypes)
        flagged = similarity < head.unknown_threshold
        out["cosine to class means (served)"] += (
            float(np.mean(~flagged[known_rows])),
            float(np.mean(flagged[~known_rows])),
        )
    return out


def report(name: str, results: list[dict]) -> None:
    for score in results[0]:
        values = np.array([r[score] for r in results])
        served = ""
        if values.shape[1] == 4:
            served = (
                f"  as served: kept {values[:, 2].mean():.3f}, rejected {values[:, 3].mean():.3f}"
            )
        print(
            f"{name:26s} {score:32s} AUROC {values[:, 0].mean():.3f}"
            f"  rejected at 95% kept {values[:, 1].mean():.3f}{served}",
            flush=True,
        )


def splits_of(classes: list[str], unknown: int):
    return [
        ([c for c in classes if c not in out], list(out))
        for out in itertools.combinations(classes, unknown)
    ]


def main() -> None:
    images = DATA / "images"
    lite0, _ = served("efficientnet_lite0")
    dim = lite0.spec.embedding_dim
    train, y_train = embedded_folder(lite0, images / "flowers/train")
    val, y_val = embedded_folder(lite0, images / "flowers/val")
    train, val = train[:, :dim], val[:, :dim]
    results = []
    for known, _ in splits_of(sorted(set(y_train)), 2):
        keep = np.isin(y_train, known)
        results.append(evaluate(train[keep], y_train[keep], val, np.isin(y_val, known)))
    report("flowers 3+2", results)

    photos, y_photos = embedded_folder(lite0, images / "pacs/photo")
    photos = photos[:, :dim]
    halves = np.random.default_rng(0).permutation(len(photos))
    fit, held = halves[: len(halves) // 2], halves[len(halves) // 2 :]
    results = []
    for known, _ in splits_of(sorted(set(y_photos)), 2):
        keep = fit[np.isin(y_photos[fit], known)]
        results.append(
            evaluate(photos[keep], y_photos[keep], photos[held], np.isin(y_photos[held], known))
        )
    report("PACS photos 5+2", results)
    rows = np.vstack([photos[held], val])
    known_rows = np.r_[np.ones(len(held), bool), np.zeros(len(val), bool)]
    report("PACS photos shown flowers", [evaluate(photos[fit], y_photos[fit], rows, known_rows)])

    minilm, _ = served("minilm_l6")
    texts = read_texts(DATA / "text/ag_news/test.csv")
    sample = np.random.default_rng(1000).permutation(len(texts))[:1400]
    y = np.array([texts[i][0] for i in sample])
    x = embedded_texts(minilm, [texts[i][1] for i in sample])[:, : minilm.spec.embedding_dim]
    for per_label in (8, 100):
        results = []
        for known, _ in splits_of(sorted(set(y)), 1):
            draw = np.random.default_rng(0)
            fit = np.concatenate(
                [draw.choice(np.flatnonzero(y == c), per_label, replace=False) for c in known]
            )
            rest = np.setdiff1d(np.arange(len(y)), fit)[:1000]
            results.append(evaluate(x[fit], y[fit], x[rest], np.isin(y[rest], known)))
        report(f"AG News 3+1, {per_label} per label", results)
    print(
        f"(a head's own threshold keeps {UNKNOWN_KEEP} of its held-out rows;"
        f" AUROC and 'rejected at 95% kept' are means over the splits)"
    )


if __name__ == "__main__":
    main()

"""Does `"backbone": "auto"` pick the backbone that validates best?

    python bench/backbone_choice.py --images ../shared/data/images/flowers

In-process, on real embeddings of the flowers photos by every image backbone. Tasks made
from the one image set: all 5 classes with all 60 training photos each; few-shot draws
(5, 10 and 20 per class, 5 draws each); and every pair of classes. For each task: a
head per backbone (adapters.heads.train_head) judged on the validation split, and the
choice of `choose_backbone` (LogME, then held-out log-loss of the best two), of LogME
alone, of held-out log-loss alone and of always the same backbone. A choice is good when
its validation accuracy is within 1 point of the best backbone's.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters.heads import predict_proba, train_head
from adapters.transferability import choose_backbone
from bench.accuracy import image_split
from models.export import ensure_onnx
from models.preprocess import decode_image
from models.runtime import Backbone
from service.settings import (
    Settings,
    list_backbones,
)

WITHIN = 0.01


def embed_all(root: Path) -> tuple[dict, dict, list[str], list[str]]:
    train, val = image_split(root / "train"), image_split(root / "val")
    train_x, val_x = {}, {}
    for spec in list_backbones():
        if spec.modality != "image":
            continue
        backbone = Backbone(spec, ensure_onnx(spec, Settings().backbone_dir))
        for items, out in ((train, train_x), (val, val_x)):
            rows = [decode_image(p.read_bytes(), spec.preprocessing, 10**8) for _, p in items]
            out[spec.id] = backbone.embed_images(np.stack(rows))
    return train_x, val_x, [label for label, _ in train], [label for label, _ in val]


def tasks(train_y: list[str], val_y: list[str]):
    """(name, training indices, validation indices)."""
    train_y, val_y = np.array(train_y), np.array(val_y)
    classes = sorted(set(train_y))
    yield "5 classes, 60 each", np.arange(len(train_y)), np.arange(len(val_y))
    for k in (5, 10, 20):
        for seed in range(5):
            rng = np.random.default_rng(seed)
            picked = np.concatenate(
                [rng.choice(np.flatnonzero(train_y == c), k, replace=False) for c in classes]
            )
            yield f"5 classes, {k} each, draw {seed}", picked, np.arange(len(val_y))
    for a, b in itertools.combinations(classes, 2):
        yield (
            f"{a} vs {b}",
            np.flatnonzero(np.isin(train_y, [a, b])),
            np.flatnonzero(np.isin(val_y, [a, b])),
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, required=True)
    args = parser.parse_args()
    train_x, val_x, train_y, val_y = embed_all(args.images)
    good = {"auto": [], "LogME alone": [], "log-loss alone": []}
    good |= {f"always {b}": [] for b in train_x}  # the baselines a choice must beat
    gaps = {name: [] for name in good}
    print(f"{'task':<32} " + " ".join(f"{b[-5:]:>6}" for b in train_x) + "   auto  LogME  loss")
    for name, tr, va in tasks(train_y, val_y):
        y = [train_y[i] for i in tr]
        accuracy, losses = {}, {}
        for backbone in train_x:
            head = train_head(train_x[backbone][tr], y)
            predicted = predict_proba(val_x[backbone][va], head.weights, head.bias).argmax(axis=1)
            accuracy[backbone] = float(
                np.mean(np.array(head.labels)[predicted] == np.array(val_y)[va])
            )
            losses[backbone] = min(c["cv_log_loss"] for c in head.metrics["cv_candidates"])
        choice = choose_backbone({b: x[tr] for b, x in train_x.items()}, y, {})
        logme = choice.report["logme"]
        picks = {
            "auto": choice.backbone,
            "LogME alone": max(logme, key=logme.get),
            "log-loss alone": min(losses, key=losses.get),
        }
        best = max(accuracy.values())
        for method, pick in (picks | {f"always {b}": b for b in train_x}).items():
            gaps[method].append(best - accuracy[pick])
            good[method].append(best - accuracy[pick] <= WITHIN + 1e-9)
        print(
            f"{name:<32} "
            + " ".join(f"{accuracy[b]:>6.3f}" for b in train_x)
            + "   "
            + "  ".join(f"{p[-5:]:>5}" for p in picks.values()),
            flush=True,
        )
    print()
    for method in good:
        print(
            f"{method:<25} within 1 point of the best on {sum(good[method])}/{len(good[method])}"
            f" tasks; mean shortfall {statistics.mean(gaps[method]):.3f},"
            f" worst {max(gaps[method]):.3f}"
        )


if __name__ == "__main__":
    main()

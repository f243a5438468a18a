"""Domain shift on frozen features: which adaptation from unlabelled target data measures
best, and can a head tell how well it will do on the target? (Issue 13 groundwork.)

    python bench/domain_shift.py                       # PACS and the chest X-rays, lite0
    python bench/domain_shift.py --backbone mobilenet_v2
    python bench/domain_shift.py --text                # UCI sentiment across its domains

In-process, on the served fp32 ONNX graphs and the service's own head training
(adapters.heads.train_head). For each shift (labelled source → unlabelled target, whose
labels are used only to score):
- adaptations, each a head trained on the source and applied to the target:
  `none`; `centre` (each domain's mean feature subtracted, then re-normalised);
  `centre (affine)` (the same without re-normalising: it folds into a head's bias);
  `coral` (source features whitened by their covariance and re-coloured by the
  target's, Sun et al. 2016; shrunk to the identity, since dimensions outnumber examples);
  `self-train` (3 rounds: the target examples the head is most sure of, up to a third of
  them, join the training set with their predicted labels); `centre+self-train`;
- how far the target lies: a domain classifier's cross-validated accuracy (0.5: the
  domains cannot be told apart);
- what the service does with the target's inputs (`adapters.adaptation.adapt`): its
  decision, the accuracy of the head it serves, and that head's own estimate of it
  (COT), against the measured accuracy;
- the target accuracy a head can estimate without labels: average thresholded confidence
  (ATC, Garg et al. 2022: the confidence threshold above which the source's out-of-fold
  predictions are as often confident as they are right; the share of target predictions
  above it), and the plain mean confidence, beside the head's cross-validated accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters.adaptation import adapt
from adapters.heads import predict_proba, train_head
from bench.accuracy import image_split, read_texts
from models.export import ensure_onnx
from models.preprocess import decode_image
from models.runtime import Backbone
from service.settings import Settings

DATA = ROOT.parent / "shared" / "data"
PACS = DATA / "images" / "pacs"
XRAY = DATA / "images" / "chest_xray_pneumonia"
UCI = DATA / "text" / "uci_sentiment_labelled_sentences"
SELF_TRAINING_ROUNDS = 3


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def centre(x: np.ndarray) -> np.ndarray:
    return normalise(x - x.mean(axis=0))


def coral(source: np.ndarray, target: np.ndarray, shrink: float = 0.5) -> np.ndarray:
    """Source features with the target's second-order statistics (Sun et al. 2016)."""

    def covariance(x: np.ndarray) -> np.ndarray:
        c = np.cov(x, rowvar=False)
        return (1 - shrink) * c + shrink * np.eye(len(c)) * np.trace(c) / len(c)

    def power(c: np.ndarray, p: float) -> np.ndarray:
        values, vectors = np.linalg.eigh(c)
        return (vectors * np.maximum(values, 1e-12) ** p) @ vectors.T

    mapped = (source - source.mean(0)) @ power(covariance(source), -0.5)
    mapped = mapped @ power(covariance(target), 0.5) + target.mean(0)
    return normalise(mapped)


def fit_predict(x: np.ndarray, y: list[str], target: np.ndarray):
    head = train_head(x, y, seed=0)
    return head, predict_proba(target, head.weights, head.bias)


def self_train(x: np.ndarray, y: list[str], target: np.ndarray):
    head, p = fit_predict(x, y, target)
    for _ in range(SELF_TRAINING_ROUNDS):
        labels = np.array(head.labels)
        confident = np.argsort(-p.max(axis=1))[: len(target) // 3]
        head, p = fit_predict(
            np.vstack([x, target[confident]]), [*y, *labels[p[confident].argmax(1)]], target
        )
    return head, p


def accuracy(head, p: np.ndarray, y: list[str]) -> float:
    return float(np.mean(np.array(head.labels)[p.argmax(1)] == np.array(y)))


def out_of_fold_confidence(x: np.ndarray, y: list[str], folds: int = 5):
    """Each source example's confidence and correctness from a head that did not see it."""
    from sklearn.model_selection import StratifiedKFold

    confidence, correct = np.zeros(len(y)), np.zeros(len(y), bool)
    labels = np.array(y)
    for train, held in StratifiedKFold(folds, shuffle=True, random_state=0).split(x, labels):
        head, p = fit_predict(x[train], list(labels[train]), x[held])
        confidence[held] = p.max(1)
        correct[held] = np.array(head.labels)[p.argmax(1)] == labels[held]
    return confidence, correct


def atc_estimate(source_conf, source_correct, target_conf) -> float:
    """Garg et al. 2022: the threshold t with P_source(conf > t) = source accuracy."""
    t = np.quantile(source_conf, 1 - source_correct.mean())
    return float(np.mean(target_conf > t))


def domain_distance(source: np.ndarray, target: np.ndarray) -> float:
    """Cross-validated accuracy of a classifier telling the two domains apart."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    x = np.vstack([source, target])
    d = np.r_[np.zeros(len(source)), np.ones(len(target))]
    model = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced")
    return float(cross_val_score(model, x, d, cv=5, scoring="balanced_accuracy").mean())


def shift(name: str, xs, ys, xt, yt) -> dict:
    row: dict = {"shift": name}
    head, p = fit_predict(xs, ys, xt)
    p_none = p
    row["none"] = accuracy(head, p, yt)
    row["cv"] = head.metrics.get("cv_accuracy")
    conf, correct = out_of_fold_confidence(xs, ys)
    row["atc"] = atc_estimate(conf, correct, p.max(1))
    row["mean_conf"] = float(p.max(1).mean())
    row["distance"] = domain_distance(xs, xt)
    head, p = fit_predict(centre(xs), ys, centre(xt))
    row["centre"] = accuracy(head, p, yt)
    # Without re-normalising, centring is affine: it folds into the head's bias.
    head, p = fit_predict(xs - xs.mean(0), ys, xt - xt.mean(0))
    row["centre-affine"] = accuracy(head, p, yt)
    head, p = fit_predict(coral(xs, xt), ys, xt)
    row["coral"] = accuracy(head, p, yt)
    head, p = self_train(xs, ys, xt)
    row["self-train"] = accuracy(head, p, yt)
    none_predicted = np.array(fit_predict(xs, ys, xt)[0].labels)[p_none.argmax(1)]
    head, p = self_train(centre(xs), ys, centre(xt))
    row["centre+self-train"] = accuracy(head, p, yt)
    adapted = np.array(head.labels)[p.argmax(1)]
    conf, correct = out_of_fold_confidence(centre(xs), ys)
    row["atc_adapted"] = atc_estimate(conf, correct, p.max(1))
    row["agreement"] = float(np.mean(adapted == none_predicted))
    # What the service does (adapters/adaptation.py): the head it serves, its decision
    # and its estimate of its own accuracy on the target.
    served = adapt(xs, ys, xt, train_head(xs, ys, seed=0))
    report = served.metrics["domain"]
    row["service"] = accuracy(served, predict_proba(xt, served.weights, served.bias), yt)
    row["decision"] = report["decision"]
    row["estimate"] = report["estimated_accuracy"]
    row["estimate_unadapted"] = report.get("estimated_accuracy_unadapted")
    print(
        f"  service: {row['decision']}, serves {row['service']:.3f} (unadapted {row['none']:.3f});"
        f" estimates {row['estimate']:.3f} served, {row['estimate_unadapted']} unadapted;"
        f" {report['adapt_seconds']} s",
        flush=True,
    )
    print(
        f"| {name} | {row['distance']:.2f} | {row['cv'] if row['cv'] is not None else '—'} |"
        f" {row['atc']:.3f} | {row['mean_conf']:.3f} | {row['none']:.3f} | {row['centre']:.3f} |"
        f" {row['centre-affine']:.3f} | {row['coral']:.3f} | {row['self-train']:.3f} |"
        f" {row['centre+self-train']:.3f} |",
        flush=True,
    )
    return row


def embed_images(backbone: Backbone, items) -> np.ndarray:
    pre = backbone.spec.preprocessing
    return backbone.embed_images(
        np.stack([decode_image(p.read_bytes(), pre, 10**8) for _, p in items])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backbone", help="default: efficientnet_lite0, or mpnet_base_v2 with --text"
    )
    parser.add_argument("--text", action="store_true", help="UCI sentiment across domains")
    args = parser.parse_args()
    settings = Settings()
    backbone_id = args.backbone or ("mpnet_base_v2" if args.text else "efficientnet_lite0")
    spec = settings.catalog[backbone_id]
    backbone = Backbone(spec, ensure_onnx(spec, settings.backbone_dir))
    print(f"# bench/domain_shift.py, {backbone_id}")
    print(
        "| shift | domain distance | source CV | ATC estimate | mean confidence | none |"
        " centre | centre (affine) | CORAL | self-train | centre+self-train |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    if args.text:
        domains = {
            d: read_texts(UCI / f"{d}_labelled.txt") for d in ("amazon_cells", "imdb", "yelp")
        }
        data = {
            d: (backbone.embed_texts([t for _, t in r]), [lab for lab, _ in r])
            for d, r in domains.items()
        }
        for source in data:
            for target in data:
                if source != target:
                    rows.append(shift(f"{source} → {target}", *data[source], *data[target]))
    else:
        pacs = {d: image_split(PACS / d) for d in ("photo", "sketch", "cartoon", "art_painting")}
        data = {
            d: (embed_images(backbone, items), [lab for lab, _ in items])
            for d, items in pacs.items()
        }
        for target in ("sketch", "cartoon", "art_painting"):
            rows.append(shift(f"PACS photo → {target}", *data["photo"], *data[target]))
        train, test = image_split(XRAY / "train"), image_split(XRAY / "test")
        rows.append(
            shift(
                "chest X-rays train → test",
                embed_images(backbone, train),
                [lab for lab, _ in train],
                embed_images(backbone, test),
                [lab for lab, _ in test],
            )
        )
    print("\n| shift | unadapted | service | decision | its estimate | estimate error |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shift']} | {r['none']:.3f} | {r['service']:.3f} ({r['service'] - r['none']:+.3f})"
            f" | {r['decision']} | {r['estimate']:.3f} | {abs(r['estimate'] - r['service']):.3f} |"
        )
    gaps = [abs(r["atc"] - r["none"]) for r in rows]
    print(
        f"\nATC's error against the unadapted head's measured accuracy: mean"
        f" {statistics.mean(gaps):.3f}, max {max(gaps):.3f}"
    )


if __name__ == "__main__":
    main()

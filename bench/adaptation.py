"""Domain adaptation as served, over every shift of the shared sets: what keeping or not
keeping the adapted head did to each.

    python bench/adaptation.py                      # about 5 minutes on 2 cores
    python bench/adaptation.py efficientnet_lite0 mobilenet_v2 efficientnet_lite2

In-process, on the served ONNX graphs' embeddings (fp32): a head is trained by
`adapters.heads.train_head` on a source domain's labelled rows, then
`adapters.adaptation.adapt` is given the target domain's rows unlabelled and decides
whether to serve the adapted head. Both heads are scored on the target's labels, which
`adapt` never sees:
- images, lite0 (or the image backbones named): PACS, every ordered pair of its four
  domains (12 shifts each), all rows;
- text, MiniLM: UCI sentiment, every ordered pair of yelp, amazon and imdb (6 shifts),
  100 labelled source rows per label (seed 0), the whole target file.
Prints each shift's unadapted and adapted accuracy, the decision and the change it made
(served − unadapted), and the worst and mean change.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters.adaptation import adapt
from adapters.heads import predict_proba, train_head
from bench.common import DATA, embedded_folder, embedded_texts, read_texts, served

PACS = ("photo", "art_painting", "cartoon", "sketch")
UCI = ("yelp", "amazon_cells", "imdb")
SOURCE_PER_LABEL = 100


def accuracy(head, x: np.ndarray, y: np.ndarray) -> float:
    predicted = predict_proba(x, head.weights, head.bias).argmax(axis=1)
    return float(np.mean(np.array(head.labels)[predicted] == y))


def shift(name: str, xs, ys, xt, yt) -> float:
    unadapted = train_head(xs, list(ys))
    served_head = adapt(xs, list(ys), xt, unadapted)
    report = served_head.metrics["domain"]
    before, after = accuracy(unadapted, xt, yt), accuracy(served_head, xt, yt)
    estimates = ""
    if "estimated_accuracy_adapted" in report:
        estimates = (
            f" (estimated {report['estimated_accuracy_unadapted']:.3f}"
            f" → {report['estimated_accuracy_adapted']:.3f})"
        )
    print(
        f"{name:28s} unadapted {before:.3f}  served {after:.3f}  change {after - before:+.3f}"
        f"  {report['decision']}{estimates}, domain distance {report.get('domain_distance')}",
        flush=True,
    )
    return after - before


def main() -> None:
    changes = []
    for image_backbone in sys.argv[1:] or ["efficientnet_lite0"]:
        backbone, _ = served(image_backbone)
        dim = backbone.spec.embedding_dim
        domains = {d: embedded_folder(backbone, DATA / "images/pacs" / d) for d in PACS}
        for source, target in itertools.permutations(PACS, 2):
            (xs, ys), (xt, yt) = domains[source], domains[target]
            name = f"PACS {source} → {target}"
            if image_backbone != "efficientnet_lite0":
                name = f"{image_backbone}: {name}"
            changes.append(shift(name, xs[:, :dim], ys, xt[:, :dim], yt))

    minilm, _ = served("minilm_l6")
    dim = minilm.spec.embedding_dim
    files = {}
    for name in UCI:
        rows = read_texts(DATA / f"text/uci_sentiment_labelled_sentences/{name}_labelled.txt")
        x = embedded_texts(minilm, [text for _, text in rows])[:, :dim]
        files[name] = (x, np.array([label for label, _ in rows]))
    for source, target in itertools.permutations(UCI, 2):
        (xs, ys), (xt, yt) = files[source], files[target]
        rng = np.random.default_rng(0)
        picked = np.concatenate(
            [rng.choice(np.flatnonzero(ys == c), SOURCE_PER_LABEL, replace=False) for c in "01"]
        )
        changes.append(shift(f"UCI {source} → {target}", xs[picked], ys[picked], xt, yt))
    print(
        f"worst change {min(changes):+.3f}, mean {np.mean(changes):+.3f} over {len(changes)} shifts"
    )


if __name__ == "__main__":
    main()

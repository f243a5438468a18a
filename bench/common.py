"""What the maintained benchmarks share: the shared data sets' splits, a probe of a
backbone's features, photo crops, and the memory of a server's processes.

Each benchmark runs as a script from the checkout (`python bench/NAME.py`); README,
Benchmarks lists them and what each measures.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import psutil
from PIL import Image
from sklearn.datasets import load_sample_image

from adapters.depth_choice import RowLayout
from adapters.heads import predict_proba, train_head
from models.export import ensure_onnx
from models.preprocess import decode_image, token_ids
from models.runtime import Backbone
from service.settings import Settings, get_backbone

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data: real labelled sets for benchmarks (never for the test suite).
DATA = ROOT.parent / "shared" / "data"
YELP = DATA / "text/uci_sentiment_labelled_sentences/yelp_labelled.txt"
FLOWERS = DATA / "images/flowers"


def image_split(root: Path) -> list[tuple[str, Path]]:
    return [
        (label_dir.name, f)
        for label_dir in sorted(p for p in root.iterdir() if p.is_dir())
        for f in sorted(label_dir.iterdir())
    ]


def read_texts(path: Path) -> list[tuple[str, str]]:
    if path.suffix == ".csv":  # AG News: class,title,description
        with open(path, newline="", encoding="utf-8") as f:
            return [
                (row[0], f"{row[1]}. {row[2]}".replace("\\$", "$").replace("\\n", " "))
                for row in csv.reader(f)
            ]
    rows = []
    # Split on \n only: the IMDB file holds U+0085, which str.splitlines() breaks on.
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            text, _, label = line.rpartition("\t")
            rows.append((label.strip(), text.strip()))
    return rows


def text_split(rows, *, seed: int, train_per_label: int | None, val_per_label: int | None):
    """Per label: a random training draw (or 80%); the rest, or `val_per_label` of it,
    for validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted({label for label, _ in rows}):
        items = [r for r in rows if r[0] == label]
        order = rng.permutation(len(items))
        n_train = train_per_label or int(len(items) * 0.8)
        train += [items[i] for i in order[:n_train]]
        val += [items[i] for i in order[n_train:][:val_per_label]]
    return train, val


def served(backbone_id: str) -> tuple[Backbone, RowLayout]:
    """A built-in backbone's served graph (fp32, in-process), and where its rows' depths lie."""
    spec = get_backbone(backbone_id)
    assert spec is not None, backbone_id
    backbone = Backbone(spec, ensure_onnx(spec, Settings().backbone_dir))
    return backbone, RowLayout(spec.embedding_dim, tuple(backbone.depth_widths))


def embedded_folder(backbone: Backbone, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """An ImageFolder's images as rows with their depths, and their labels."""
    items = image_split(folder)
    pre = backbone.spec.image_preprocessing
    images = np.stack([decode_image(p.read_bytes(), pre, 10**8) for _, p in items])
    return backbone.embed_rows(images, depths=True), np.array([label for label, _ in items])


def embedded_texts(backbone: Backbone, texts: list[str]) -> np.ndarray:
    """Texts as rows with their depths."""
    return backbone.embed_rows(token_ids(texts, backbone.tokenizer), depths=True)


def probe_accuracy(x_train, y_train, x_val, y_val, seed: int = 0) -> float:
    """Validation accuracy of a head trained on frozen features, as Graft trains it."""
    head = train_head(x_train, list(y_train), seed=seed)
    predicted = predict_proba(x_val, head.weights, head.bias).argmax(axis=1)
    return float(np.mean(np.array(head.labels)[predicted] == np.array(y_val)))


def crops(name: str, n: int, *, seed: int, fmt: str = "JPEG") -> list[bytes]:
    """Random crops (random size, position and flip) of one of scikit-learn's sample photos
    (`china.jpg`: a temple; `flower.jpg`: a flower), encoded as `fmt`."""
    photo = load_sample_image(name)
    rng = np.random.default_rng(seed)
    height, width = photo.shape[:2]
    out = []
    for _ in range(n):
        side = int(rng.integers(180, min(height, width)))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        patch = photo[top : top + side, left : left + side]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(patch)).save(buffer, fmt)
        out.append(buffer.getvalue())
    return out


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process and its descendants, in bytes (Linux)."""
    top = psutil.Process(pid)
    rss = pss = 0
    for process in [top, *top.children(recursive=True)]:
        fields = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{process.pid}/smaps_rollup").read_text().splitlines()[1:]
        )
        rss += int(fields["Rss"].split()[0]) * 1024
        pss += int(fields["Pss"].split()[0]) * 1024
    return rss, pss

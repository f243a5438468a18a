"""Accuracy, training time and prediction throughput of a head, through the HTTP API.

    python bench/accuracy.py --images ../shared/data/images/flowers
    python bench/accuracy.py --text $UCI/yelp_labelled.txt
    python bench/accuracy.py --text ../shared/data/text/ag_news/test.csv --train-per-label 8 \
        --val-per-label 250 --draws 10
    python bench/accuracy.py --text $UCI/yelp_labelled.txt --train-per-label 8 --draws 10 \
        --describe "0=a negative review" --describe "1=a positive review" \
        --ood ../shared/data/text/ag_news/test.csv
    python bench/accuracy.py --images ../shared/data/images/flowers --ood digits \
        --ood ../shared/data/text/ag_news/test.csv

($UCI = ../shared/data/text/uci_sentiment_labelled_sentences)

--ood adds out-of-distribution inputs: the validation inputs must be kept (`unknown`
false) and these rejected. For a text head: a UCI or AG News file. For an image head:
`digits` (scikit-learn's 8x8 digits, enlarged), an image folder, or a text file whose
lines are rendered as images of text (the other modality's data).

Starts a real server on a free loopback port (or uses --url/--admin-key), creates a
tenant, trains a head on the training split, then predicts the validation split in
batches. Images: an ImageFolder directory with train/ and val/ (posted as a zip, one
folder per label). Texts: `sentence<TAB>label` lines (UCI sentiment) or AG News CSV
(`class,title,description`), split with a fixed seed.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters.calibration import expected_calibration_error
from bench.common import image_split, read_texts, text_split
from deploy.local_server import BENTOML, start_server, stop_server
from graft import Client, Examples

BATCH = 32
OOD_INPUTS = 300  # per --ood source


def create_head(
    client: Client,
    name: str,
    backbone: str,
    examples: Examples,
    descriptions: dict[str, str] | None = None,
) -> tuple[dict, float]:
    """The trained head (as the API's JSON) and the seconds from upload to trained."""
    start = time.perf_counter()
    head = client.create_head(name, examples, backbone=backbone, label_descriptions=descriptions)
    return head.model_dump(mode="json"), time.perf_counter() - start


def _predict(client: Client, head_id: str, items: list, top_k: int = 1) -> list[dict]:
    """Images (bytes) or texts, in one call."""
    kind = "images" if isinstance(items[0], bytes) else "texts"
    answer = client.predict(head_id, **{kind: items}, top_k=top_k)
    return answer.model_dump(mode="json")["predictions"]


def predict_all(client: Client, head: dict, inputs: list) -> tuple[list[dict], float]:
    """Every input's prediction (all labels' scores), in batches; and the seconds spent."""
    predictions, seconds = [], 0.0
    for start in range(0, len(inputs), BATCH):
        t0 = time.perf_counter()
        predictions += _predict(
            client, head["id"], inputs[start : start + BATCH], len(head["labels"])
        )
        seconds += time.perf_counter() - t0
    return predictions, seconds


def evaluate(client: Client, head: dict, inputs: list, labels: list[str]):
    """Validation accuracy, macro-F1, ECE (from the returned scores) and the share of inputs
    kept (not flagged unknown); and inputs/s."""
    predictions, seconds = predict_all(client, head, inputs)
    probabilities = []
    for prediction in predictions:
        scores = {item["label"]: item["score"] for item in prediction["top_k"]}
        probabilities.append([scores[label] for label in head["labels"]])
    y = np.array([head["labels"].index(label) for label in labels])
    probabilities = np.array(probabilities)
    predicted = probabilities.argmax(axis=1)
    quality = {
        "accuracy": float(np.mean(predicted == y)),
        "macro_f1": float(f1_score(y, predicted, average="macro")),
        "ece": expected_calibration_error(y, probabilities),
        "kept": float(np.mean([not p["unknown"] for p in predictions])),
    }
    return quality, len(inputs) / seconds


def rejected(client: Client, head: dict, oods: dict[str, list]) -> dict[str, float]:
    """Share of each out-of-distribution source that the head flags unknown."""
    return {
        name: float(np.mean([p["unknown"] for p in predict_all(client, head, inputs)[0]]))
        for name, inputs in oods.items()
    }


def ood_inputs(sources: list[str], modality: str) -> dict[str, list]:
    """Up to OOD_INPUTS inputs per --ood source, as predict inputs of `modality`."""
    rng = np.random.default_rng(0)
    out = {}
    for source in sources:
        if source == "digits":
            from sklearn.datasets import load_digits

            digits = load_digits().images[:OOD_INPUTS]
            out["digits"] = [_png(_enlarged_digit(d)) for d in digits]
            continue
        path = Path(source)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file())[:OOD_INPUTS]
            out[path.name] = [f.read_bytes() for f in files]
            continue
        rows = read_texts(path)
        texts = [rows[i][1] for i in rng.choice(len(rows), OOD_INPUTS, replace=False)]
        if modality == "text":
            out[path.name] = texts
        else:
            out[f"{path.name} as images"] = [_png(_text_image(t)) for t in texts]
    return out


def _enlarged_digit(digit: np.ndarray):
    from PIL import Image

    grey = (255 - digit * 16).clip(0, 255).astype(np.uint8)  # dark ink on white
    return Image.fromarray(grey).resize((240, 240), Image.Resampling.BILINEAR).convert("RGB")


def _text_image(text: str):
    import textwrap

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(image).multiline_text(
        (8, 8), "\n".join(textwrap.wrap(text, 40)[:12]), fill="black"
    )
    return image


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def unknown_line(kept: float, rejected_share: dict[str, float]) -> str:
    parts = [f"validation kept {kept:.3f}"]
    parts += [f"{name} rejected {share:.3f}" for name, share in rejected_share.items()]
    return ", ".join(parts)


def own_report(metrics: dict) -> str:
    """The head's held-out self-report, to set beside the validation figures."""
    if metrics["cv_accuracy"] is None:
        return "none (too few examples)"
    return (
        f"accuracy {metrics['cv_accuracy']:.3f}, macro-F1 {metrics['cv_macro_f1']:.3f},"
        f" ECE {metrics['cv_ece']:.3f} (before calibration {metrics['cv_ece_uncalibrated']:.3f}),"
        f" unknown keeps {metrics['cv_unknown_kept']:.3f}"
    )


def selection_rows(head: dict) -> list[tuple[str, str]]:
    """How an `auto` head chose its backbone, if it did."""
    selection = head["metrics"].get("backbone_selection")
    if not selection:
        return []
    scores = ", ".join(f"{b} {s:.4f}" for b, s in selection["logme"].items())
    losses = ", ".join(f"{b} {s:.4f}" for b, s in selection["cv_log_loss"].items())
    return [
        ("  LogME", scores),
        ("  held-out loss", losses),
        ("  chosen", selection["chosen"]),
    ]


def head_type(metrics: dict) -> str:
    chosen = metrics["head_type"]
    if metrics["regularization_c"] is not None:
        chosen += f" C={metrics['regularization_c']:g}"
    return chosen + (" with label names" if metrics["label_names"] else "")


def quality_line(q: dict, spread: str = "") -> str:
    return f"accuracy {q['accuracy']:.3f}{spread}, macro-F1 {q['macro_f1']:.3f}, ECE {q['ece']:.3f}"


def single_latency(client: Client, head_id: str, item, n: int = 30) -> tuple[float, float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        _predict(client, head_id, [item])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, float(np.percentile(times, 95)) * 1000


def bench_images(client: Client, root: Path, backbone: str, ood: list[str]) -> None:
    train, val = image_split(root / "train"), image_split(root / "val")
    head, train_seconds = create_head(
        client, root.name, backbone, Examples.from_dir(root / "train")
    )
    inputs = [p.read_bytes() for _, p in val]
    quality, per_second = evaluate(client, head, inputs, [label for label, _ in val])
    p50, p95 = single_latency(client, head["id"], inputs[0])
    metrics = head["metrics"]
    report(
        ("data set", f"{root} ({len(train)} train, {len(val)} val, {len(head['labels'])} labels)"),
        ("backbone", backbone),
        ("head type", head_type(metrics)),
        *selection_rows(head),
        ("validation", quality_line(quality)),
        (
            "unknown",
            unknown_line(quality["kept"], rejected(client, head, ood_inputs(ood, "image"))),
        ),
        ("head's report", own_report(metrics)),
        ("warnings", "; ".join(metrics["warnings"]) or "none"),
        ("create head", f"{train_seconds:.2f} s (upload, decode, embed, CV + fit)"),
        ("  of which fit", f"{metrics['train_seconds']} s (model choice by CV, final fit)"),
        (
            "predict",
            f"{per_second:.1f} images/s (batches of {BATCH}, one client, JPEG files as multipart)",
        ),
        ("single image", f"p50 {p50:.1f} ms, p95 {p95:.1f} ms"),
    )


def bench_texts(
    client: Client,
    path: Path,
    backbone: str,
    train_per_label,
    val_per_label,
    draws: int,
    descriptions: dict[str, str],
    ood: list[str],
) -> None:
    rows = read_texts(path)
    oods = ood_inputs(ood, "text")
    qualities, reports, train_times, rejections = [], [], [], []
    for seed in range(draws):
        train, val = text_split(
            rows, seed=seed, train_per_label=train_per_label, val_per_label=val_per_label
        )
        examples = Examples("text", list(train))
        head, seconds = create_head(
            client, f"{path.stem}-{seed}", backbone, examples, descriptions=descriptions
        )
        inputs = [text for _, text in val]
        quality, per_second = evaluate(client, head, inputs, [label for label, _ in val])
        rejections.append(rejected(client, head, oods))
        qualities.append(quality)
        reports.append(head["metrics"])
        train_times.append(seconds)
    p50, p95 = single_latency(client, head["id"], inputs[0])
    size = f"{train_per_label} per label" if train_per_label else f"{len(train)} (80%)"
    accuracies = [q["accuracy"] for q in qualities]
    spread = f" ± {statistics.stdev(accuracies):.3f} over {draws} draws" if draws > 1 else ""
    mean = {key: statistics.mean(q[key] for q in qualities) for key in qualities[0]}
    mean_rejected = {name: statistics.mean(r[name] for r in rejections) for name in oods}
    chosen = Counter(head_type(m) for m in reports)
    report(
        ("data set", f"{path} (train {size}, val {len(val)}, {len(head['labels'])} labels)"),
        ("backbone", backbone),
        ("descriptions", json.dumps(descriptions) if descriptions else "none (label names)"),
        ("head type", ", ".join(f"{kind} ×{n}" for kind, n in chosen.most_common())),
        ("validation", quality_line(mean, spread)),
        ("unknown", unknown_line(mean["kept"], mean_rejected)),
        ("head's report", f"{own_report(reports[-1])} (last draw)"),
        ("warnings", "; ".join(reports[-1]["warnings"]) or "none"),
        ("create head", f"{statistics.median(train_times):.2f} s median (embed, CV + fit)"),
        ("predict", f"{per_second:.1f} texts/s (batches of {BATCH}, one client)"),
        ("single text", f"p50 {p50:.1f} ms, p95 {p95:.1f} ms"),
    )


def report(*rows: tuple[str, str]) -> None:
    for name, value in rows:
        print(f"{name:<16} {value}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--images", type=Path, help="ImageFolder root with train/ and val/")
    data.add_argument("--text", type=Path, help="UCI sentiment .txt or AG News .csv")
    parser.add_argument("--backbone", help="default: efficientnet_lite0 / minilm_l6")
    parser.add_argument("--train-per-label", type=int, help="text: few-shot training size")
    parser.add_argument("--val-per-label", type=int, help="text: cap the validation split")
    parser.add_argument("--draws", type=int, default=1, help="text: repeat over seeds")
    parser.add_argument(
        "--describe",
        action="append",
        default=[],
        metavar="LABEL=TEXT",
        help="text: a label's description (label_descriptions); repeat per label",
    )
    parser.add_argument(
        "--ood", action="append", default=[], help="out-of-distribution source; repeatable"
    )
    parser.add_argument("--url", help="use a running server instead of starting one")
    parser.add_argument("--admin-key")
    args = parser.parse_args()

    server = None
    if args.url:
        url, admin_key = args.url, args.admin_key
    else:
        scratch = Path(tempfile.mkdtemp(prefix="graft-bench-"))
        env = {
            "GRAFT_MAX_BODY_BYTES": str(512 * 1024 * 1024),
            "GRAFT_SYNC_TRAINING_TIMEOUT_S": "600",
        }
        server = start_server(BENTOML, scratch, ROOT / ".graft" / "backbones", env)
        url, admin_key = server.base_url, server.admin_key
    try:
        with Client(url, admin_key) as admin:
            key = admin.create_tenant("bench").api_key
        with Client(url, key, timeout=600) as client:
            if args.images:
                bench_images(client, args.images, args.backbone or "efficientnet_lite0", args.ood)
            else:
                bench_texts(
                    client,
                    args.text,
                    args.backbone or "minilm_l6",
                    args.train_per_label,
                    args.val_per_label,
                    args.draws,
                    dict(item.split("=", 1) for item in args.describe),
                    args.ood,
                )
    finally:
        if server is not None:
            stop_server(server)


if __name__ == "__main__":
    main()

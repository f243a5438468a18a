"""Choose the image resize/crop by validation accuracy on an ImageFolder data set.

    python bench/image_preprocessing.py ../shared/data/images/flowers

Embeds train/ and val/ with the served backbone under several resize rules and fits the
same logistic-regression head on each; prints validation accuracy per rule.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.export import ensure_onnx
from models.preprocess import decode_image
from models.runtime import Backbone
from service.settings import (
    Settings,
    get_backbone,
)


def load_split(root: Path):
    files, labels = [], []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(label_dir.iterdir()):
            files.append(f.read_bytes())
            labels.append(label_dir.name)
    return files, np.array(labels)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    spec = get_backbone(args.backbone)
    backbone = Backbone(spec, ensure_onnx(spec, Settings().backbone_dir))
    train, y_train = load_split(args.data / "train")
    val, y_val = load_split(args.data / "val")
    side = spec.preprocessing.image_size
    print(f"{'resize shorter side':>20} {'interp':>8} {'C':>6} {'scaled':>6} {'val acc':>8}")
    for resize in (side, round(side / 0.875), round(side / 0.95)):
        for interp in ("bicubic", "bilinear"):
            pre = dataclasses.replace(spec.preprocessing, resize_size=resize, interpolation=interp)
            start = time.perf_counter()
            x_train = backbone.embed_images(np.stack([decode_image(b, pre, 10**9) for b in train]))
            x_val = backbone.embed_images(np.stack([decode_image(b, pre, 10**9) for b in val]))
            elapsed = time.perf_counter() - start
            for scaled in (False, True):
                for c in (0.1, 1.0, 10.0, 100.0):
                    lr = LogisticRegression(C=c, max_iter=2000)
                    head = make_pipeline(StandardScaler(), lr) if scaled else lr
                    head.fit(x_train, y_train)
                    acc = (head.predict(x_val) == y_val).mean()
                    print(f"{resize:>20} {interp:>8} {c:>6} {scaled!s:>6} {acc:>8.3f}")
            print(f"  ({len(train) + len(val)} images embedded in {elapsed:.1f} s)")


if __name__ == "__main__":
    main()

"""What the depths (models/depths.py) cost in the shared pass, per backbone.

    python bench/depth_cost.py                       # about 2 minutes on 2 cores
    python bench/depth_cost.py --backbones efficientnet_lite0,minilm_l6,mpnet_base_v2

For each backbone, the graph as served (whole, and cut into trunk and top where it can be
fine-tuned) is timed giving every row's embedding and depths, against the same graph cut
down to its embedding alone (`models.graph_surgery.without_depths`: the graph before the depths),
taking turns for `--rounds`, batches of 32 (images of noise; yelp sentences), 2 threads,
as the runner runs them. Prints rows/s of each, their ratio (median over rounds), and the
bytes a row takes between processes and per stored example (float32) with and without.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import YELP, read_texts
from models.export import ensure_onnx, ensure_split
from models.graph_surgery import without_depths
from models.preprocess import token_ids
from models.runtime import Backbone
from service.settings import Settings, list_backbones

BATCH = 32


def embedding_only(path: Path, scratch: Path) -> Path:
    """The graph cut down to what its `embedding` (or a trunk's `hidden`) needs."""
    cut = scratch / f"{path.stem}-embedding-only.onnx"
    onnx.save(without_depths(onnx.load(str(path))), str(cut))
    return cut


def rows_per_second(backbone: Backbone, rows, depths: bool, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        backbone.embed_rows(rows, depths=depths)
        done += len(rows)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default="efficientnet_lite0,minilm_l6")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = parser.parse_args()
    cache = Settings().backbone_dir
    sentences = [text for _, text in read_texts(YELP)[:BATCH]]
    print(
        f"{'backbone':20s} {'graph':6s} {'with depths':>12s} {'embedding':>10s} {'ratio':>6s}"
        f" {'bytes/row':>10s} {'without':>8s}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        for spec in list_backbones(args.backbones.split(",")):
            whole = ensure_onnx(spec, cache)
            split = ensure_split(spec, cache)
            graphs = {"whole": (whole, None)}
            if split is not None:
                graphs["split"] = (whole, split)
            for name, (path, parts) in graphs.items():
                served = Backbone(spec, path, intra_op_threads=2, split=parts)
                cut_parts = (
                    None
                    if parts is None
                    else tuple(embedding_only(p, Path(scratch)) for p in parts)
                )
                plain = Backbone(
                    spec, embedding_only(path, Path(scratch)), intra_op_threads=2, split=cut_parts
                )
                if spec.modality == "image":
                    side = spec.image_preprocessing.image_size
                    rows = np.random.default_rng(0).integers(
                        0, 256, (BATCH, side, side, 3), np.uint8
                    )
                else:
                    rows = token_ids(sentences, served.tokenizer)
                ratios, fast, slow = [], [], []
                for _ in range(args.rounds):
                    with_depths = rows_per_second(served, rows, True, args.seconds)
                    without = rows_per_second(plain, rows, False, args.seconds)
                    fast.append(without)
                    slow.append(with_depths)
                    ratios.append(with_depths / without)
                print(
                    f"{spec.id:20s} {name:6s} {statistics.median(slow):12.1f}"
                    f" {statistics.median(fast):10.1f} {statistics.median(ratios):6.3f}"
                    f" {4 * served.feature_dim:10d} {4 * spec.embedding_dim:8d}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

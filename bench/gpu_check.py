"""GPU check of the served path: ONNX Runtime's CUDA provider against the CPU one.

    python bench/gpu_check.py [BACKBONE_DIR]      # default: GRAFT_BACKBONE_DIR
    python bench/gpu_check.py --save-rows rows.npy   # here: the test images, preprocessed
    python bench/gpu_check.py --rows rows.npy        # there: no scikit-learn needed

Prints the providers this onnxruntime has; where CUDA is one, for efficientnet_lite0 in
fp32 and fp16 as Graft exports them (GRAFT_DEVICE=cuda's provider options): the Memcpy
nodes ONNX Runtime inserts (each is an operator that fell back to the CPU), the largest
difference of the embeddings to the CPU provider's, and images/s at batch 1 to 256.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.export import ensure_variant
from models.quantize import calibration_images
from models.runtime import Backbone, available_providers
from service.settings import (
    Settings,
    get_backbone,
)

BATCHES = (1, 8, 32, 128, 256)


def rate(backbone: Backbone, rows: np.ndarray, seconds: float = 3) -> float:
    backbone.embed_images(rows)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        backbone.embed_images(rows)
        done += len(rows)
    return done / (time.perf_counter() - start)


def memcpy_nodes(path: Path) -> int:
    """Memcpy nodes in the graph ONNX Runtime runs under the CUDA provider."""
    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=available_providers("cuda"))
        graph = onnx.load(options.optimized_model_filepath).graph
    return sum(node.op_type.startswith("Memcpy") for node in graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backbone_dir", nargs="?", type=Path)
    parser.add_argument("--rows", type=Path, help="preprocessed images saved by --save-rows")
    parser.add_argument("--save-rows", type=Path, help="write the test images and stop")
    args = parser.parse_args()
    backbone_dir = args.backbone_dir or Settings().backbone_dir
    spec = get_backbone("efficientnet_lite0")
    if args.save_rows:
        # 32 photos are enough: speed does not depend on the pixels, they are tiled.
        np.save(args.save_rows, calibration_images(spec.preprocessing, 32))
        return
    print(f"onnxruntime {ort.__version__}, providers: {ort.get_available_providers()}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("no CUDA provider in this onnxruntime: the GPU path cannot run here")
        return
    photos = np.load(args.rows) if args.rows else calibration_images(spec.preprocessing, 32)
    rows = np.resize(photos, (max(BATCHES), *photos.shape[1:]))  # tiled
    cpu = Backbone(spec, ensure_variant(spec, backbone_dir, "fp32"), device="cpu")
    reference = cpu.embed_images(rows[:32])
    for variant in ("fp32", "fp16"):
        path = ensure_variant(spec, backbone_dir, variant)
        gpu = Backbone(spec, path, device="cuda", max_batch_size=max(BATCHES))
        difference = np.abs(gpu.embed_images(rows[:32]) - reference).max()
        print(f"\n{variant}: {memcpy_nodes(path)} Memcpy nodes; providers {gpu.session.get_providers()}")  # fmt: skip
        print(f"max |gpu - cpu fp32| over 32 embeddings: {difference:.2e}")
        for size in BATCHES:
            print(f"batch {size:>3}: {rate(gpu, rows[:size]):9.1f} images/s")


if __name__ == "__main__":
    main()

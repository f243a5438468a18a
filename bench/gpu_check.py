"""GPU check of the served path: ONNX Runtime's CUDA provider against the CPU one.

    python bench/gpu_check.py PATH/TO/efficientnet_lite0-....onnx

Prints the providers this onnxruntime has; where CUDA is one, runs the backbone with
GRAFT_DEVICE=cuda's provider list and on the CPU, and prints the largest difference of
the embeddings and the throughput of each at batch 1 and 32.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.quantize import calibration_images  # noqa: E402
from models.registry import get_backbone  # noqa: E402
from models.runtime import Backbone  # noqa: E402


def rate(backbone: Backbone, rows: np.ndarray, seconds: float = 3) -> float:
    backbone.embed_images(rows)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        backbone.embed_images(rows)
        done += len(rows)
    return done / (time.perf_counter() - start)


def main() -> None:
    path = Path(sys.argv[1])
    print(f"onnxruntime {ort.__version__}, providers: {ort.get_available_providers()}")
    spec = get_backbone("efficientnet_lite0")
    rows = calibration_images(spec.preprocessing, 32)
    cpu = Backbone(spec, path, device="cpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("no CUDA provider in this onnxruntime: the GPU path cannot run here")
        return
    gpu = Backbone(spec, path, device="cuda")
    print(f"session providers: {gpu.session.get_providers()}")
    difference = np.abs(gpu.embed_images(rows) - cpu.embed_images(rows)).max()
    print(f"max |gpu - cpu| over 32 embeddings: {difference:.2e}")
    for size in (1, 32):
        print(
            f"batch {size:>2}: cpu {rate(cpu, rows[:size]):8.1f}/s   gpu {rate(gpu, rows[:size]):8.1f}/s"
        )


if __name__ == "__main__":
    main()

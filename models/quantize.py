"""Reduced-precision variants of the exported backbones: INT8 for the CPU (ONNX Runtime
quantisation) and fp16 for a GPU.

- Image backbones: static QDQ, per-channel weights, activations calibrated on real
  photographs (random crops of the sample photos that ship with scikit-learn), with
  percentile calibration: on flowers it lost 1.0 point of accuracy where min-max lost 3.5
  and entropy 3.5 (bench/quantization.py, BENCHMARKS.md). Weights take 7 bits
  (`reduce_range`): ONNX Runtime multiplies uint8 activations by int8 weights with
  VPMADDUBSW on CPUs without VNNI (AVX2 only, or AVX-512 without VNNI), which adds two
  products into 16 bits and saturates; with 8-bit weights lite0's embeddings agreed with
  fp32 at a mean cosine of 0.921 there against 0.993 on a VNNI CPU. With 7 bits the
  kernels of every CPU compute the same numbers. The first convolution (3 input channels,
  a small part of the time) stays fp32: at 7 bits it lost the most.
- Text backbones: dynamic quantisation of the weights (activations quantised per batch
  at run time), the usual choice for transformers on CPU. Its results were the same on
  an AVX2-only CPU as on a VNNI one (MiniLM: mean cosine to fp32 0.962 on both).
- Audio backbones: none. ONNX Runtime's dynamically quantised LSTM gave embeddings of
  spoken digits at a mean cosine of 0.42 to fp32 (0.45 with 8-bit weights), so an audio
  backbone's int8 variant is its fp32 graph.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from models.preprocess import decode_image
from models.registry import BackboneSpec, ImagePreprocessing

log = logging.getLogger(__name__)

Variant = Literal["fp32", "int8", "fp16"]
VARIANTS: tuple[str, ...] = get_args(Variant)
CALIBRATION_IMAGES = 128
# Bump when the quantisation recipe changes, so cached INT8 files are made again.
# 3: 7-bit weights, first convolution in fp32 (the same results on every x86-64 CPU).
QUANTIZE_REVISION = 3


def calibration_images(pre: ImagePreprocessing, n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """Real photos, preprocessed as served: random crops and flips of scikit-learn's
    `china.jpg` and `flower.jpg`."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(0)
    photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]
    batch = []
    for i in range(n):
        photo = photos[i % 2]
        height, width = photo.shape[:2]
        side = int(rng.integers(120, min(height, width)))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = photo[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).save(buffer, "PNG")
        batch.append(decode_image(buffer.getvalue(), pre, 10**8))
    return np.stack(batch)


def quantize(spec: BackboneSpec, fp32_path: Path, out_path: Path) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if spec.modality == "audio":
        shutil.copyfile(fp32_path, out_path)  # see the module's docstring
        return
    if not isinstance(spec.preprocessing, ImagePreprocessing):
        quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8)
        return

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            images = calibration_images(spec.image_preprocessing)
            self._batches = iter([{"image": images[i : i + 8]} for i in range(0, len(images), 8)])

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        graph = onnx.load(str(prepared), load_external_data=False).graph
        first_conv = [node.name for node in graph.node if node.op_type == "Conv"][:1]
        quantize_static(
            str(prepared),
            str(out_path),
            Photos(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            reduce_range=True,
            nodes_to_exclude=first_conv,
        )


def to_fp16(spec: BackboneSpec, fp32_path: Path, out_path: Path) -> None:
    """Weights and activations in fp16 (a GPU's tensor cores run them); the input (uint8
    or token ids) and the embedding stay as they are, so callers see no difference."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))


def ensure_int8(spec: BackboneSpec, fp32_path: Path) -> Path:
    """The INT8 variant beside the fp32 export, made once."""
    path = fp32_path.with_name(f"{fp32_path.stem}-int8-q{QUANTIZE_REVISION}.onnx")
    return _made_once(spec, fp32_path, path, quantize)


def ensure_fp16(spec: BackboneSpec, fp32_path: Path) -> Path:
    """The fp16 variant beside the fp32 export, made once."""
    return _made_once(spec, fp32_path, fp32_path.with_name(f"{fp32_path.stem}-fp16.onnx"), to_fp16)


def _made_once(spec: BackboneSpec, fp32_path: Path, path: Path, make) -> Path:
    if path.exists():
        return path
    log.info("making %s of backbone %s", path.name, spec.id)
    # Written beside the target and renamed: a crash never leaves half a model there.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{spec.id}-", suffix=".onnx")
    os.close(fd)
    try:
        make(spec, fp32_path, Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path

"""INT8 and fp16 backbones stay close to fp32 and keep a head's decisions, and INT8 computes
the same on every x86-64 CPU."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from adapters.heads import predict_proba, train_head
from models import cpu
from models.export import ensure_variant
from models.preprocess import decode_image, tokenize
from models.runtime import Backbone
from tests.inputs import COOKING, SPORTS, crops

# Per input the INT8 image embedding can drift (0.92 seen); on average it stays close.
# fp16 (run here by the CPU provider; a GPU's arithmetic differs in the last bits) barely
# moves: cosine 0.9998 and more seen.
CLOSE = {"int8": (0.95, 0.85, 3), "fp16": (0.999, 0.995, 1.9)}


def _feeds(backbone: Backbone) -> dict[str, np.ndarray]:
    """The backbone graph's feeds for 16 inputs: photo crops, or sentences of two topics."""
    if backbone.spec.modality == "image":
        pool = crops("china.jpg", 8, seed=40) + crops("flower.jpg", 8, seed=40)
        pre = backbone.spec.preprocessing
        return {"image": np.stack([decode_image(x, pre, 10**8) for x in pool])}
    return tokenize(SPORTS + COOKING, backbone.tokenizer, backbone.pad_id)


def _embed(path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], feeds)[0]


@pytest.mark.parametrize("variant", ["int8", "fp16"])
@pytest.mark.parametrize("backbone_name", ["image_backbone", "text_backbone"])
def test_variants_keep_the_heads_decisions(request, backbone_name, variant, backbone_dir) -> None:
    fp32 = request.getfixturevalue(backbone_name)
    path = ensure_variant(fp32.spec, backbone_dir, variant)
    mean_cosine, min_cosine, smaller = CLOSE[variant]
    assert path.stat().st_size < fp32.onnx_path.stat().st_size / smaller
    feeds = _feeds(fp32)
    a, b = _embed(fp32.onnx_path, feeds), _embed(path, feeds)
    cosine = (a * b).sum(axis=1)  # both L2-normalised
    assert cosine.mean() > mean_cosine and cosine.min() > min_cosine, cosine
    labels = ["first"] * 8 + ["second"] * 8
    head = train_head(a[::2], labels[::2])  # trained on fp32, applied to both
    decisions_fp32 = predict_proba(a[1::2], head.weights, head.bias).argmax(axis=1)
    decisions_reduced = predict_proba(b[1::2], head.weights, head.bias).argmax(axis=1)
    assert (decisions_fp32 == decisions_reduced).all()


def test_int8_backbones_compute_the_same_on_an_avx2_only_cpu(
    image_backbone, text_backbone, backbone_dir, tmp_path
) -> None:
    """Each INT8 backbone run here and on an emulated AVX2-only CPU, where ONNX Runtime's
    uint8 x int8 kernels add products in 16 bits (an 8-bit image recipe agreed with fp32
    at 0.921 there, 0.993 on a VNNI CPU): a head serves alike wherever it runs."""
    models, here = [], []
    for fp32 in (image_backbone, text_backbone):
        path, feeds = ensure_variant(fp32.spec, backbone_dir, "int8"), _feeds(fp32)
        models.append((path, feeds))
        here.append(_embed(path, feeds))
    emulated = cpu.embed_as(cpu.AVX2_ONLY, models, tmp_path)
    for fp32, a, b in zip((image_backbone, text_backbone), here, emulated, strict=True):
        agreement = (a * b).sum(axis=1)
        assert agreement.min() > 0.999, (fp32.spec.id, agreement)

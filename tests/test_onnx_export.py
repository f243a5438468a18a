from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort

from adapters.heads import predict_proba, train_head
from adapters.onnx_export import combined_model
from adapters.store import Head
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

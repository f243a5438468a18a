"""Backbone + head as one ONNX model: the backbone's graph, then MatMul, Add and Softmax."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from adapters.store import Head
from models.registry import BackboneSpec


def head_graph(weights: np.ndarray, bias: np.ndarray, like: onnx.ModelProto) -> onnx.ModelProto:
    """`embedding` [batch, dim] → `probabilities` [batch, n_labels], in `like`'s opset.

    Names carry a `graft_head_` prefix so they cannot collide with the backbone's.
    """
    dim, n_labels = weights.shape
    graph = helper.make_graph(
        nodes=[
            helper.make_node("MatMul", ["embedding", "graft_head_weights"], ["graft_head_xw"]),
            helper.make_node("Add", ["graft_head_xw", "graft_head_bias"], ["graft_head_logits"]),
            helper.make_node("Softmax", ["graft_head_logits"], ["probabilities"], axis=1),
        ],
        name="graft_head",
        inputs=[helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        outputs=[
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n_labels])
        ],
        initializer=[
            numpy_helper.from_array(weights.astype(np.float32), "graft_head_weights"),
            numpy_helper.from_array(bias.astype(np.float32), "graft_head_bias"),
        ],
    )
    return helper.make_model(graph, opset_imports=like.opset_import, ir_version=like.ir_version)


def combined_model(
    spec: BackboneSpec, backbone_path: Path, head: Head, *, variant: str = "fp32"
) -> bytes:
    """The serialised model a tenant downloads; labels and preprocessing in its metadata."""
    assert head.weights is not None and head.bias is not None
    backbone = onnx.load(str(backbone_path))
    merged = compose.merge_models(
        backbone,
        head_graph(head.weights, head.bias, backbone),
        io_map=[("embedding", "embedding")],
        producer_name="graft",
    )
    merged.graph.name = f"graft_{spec.id}_{head.id}"
    helper.set_model_props(
        merged,
        {
            "graft.head_id": head.id,
            "graft.head_name": head.name,
            "graft.version": str(head.version),
            "graft.backbone": spec.id,
            "graft.variant": variant,
            "graft.labels": json.dumps(head.labels),
            "graft.inputs": json.dumps(list(spec.onnx_inputs)),
            "graft.preprocessing": json.dumps(spec.public()["preprocessing"]),
        },
    )
    onnx.checker.check_model(merged)
    return merged.SerializeToString()

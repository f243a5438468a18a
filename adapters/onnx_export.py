"""Backbone + head as one ONNX model: the backbone's graph, then MatMul, Add and Softmax
for the scores, and the best similarity to the class means for the unknown flag. A head
that reads depths of the pass (adapters/depth_choice.py) takes its embedding and those
depths, concatenated as the runner sends them; the graph computes no other depth. An
audio head's model takes the waveform alone (`models.graph_surgery.with_whole_clips`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from adapters.store import Head
from models.graph_surgery import with_deepest_depths, with_whole_clips, without_depths
from models.registry import BackboneSpec

# Below any cosine similarity: a head without a threshold never flags an input unknown.
NO_THRESHOLD = -2.0


def head_graph(head: Head, like: onnx.ModelProto, embedding_dim: int) -> onnx.ModelProto:
    """`embedding` [batch, embedding_dim] (and `depths` [batch, width] for a head that
    reads some) → `probabilities` [batch, n_labels], plus `similarity` [batch] (best
    cosine similarity to a class mean) and `unknown` [batch] (similarity below the head's
    threshold) for a head version that has class means, in `like`'s opset (ReduceMax
    takes `axes` as an attribute up to opset 17).

    Names carry a `graft_head_` prefix so they cannot collide with the backbone's.
    """
    assert head.weights is not None and head.bias is not None
    columns, n_labels = head.weights.shape
    inputs = [
        helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", embedding_dim])
    ]
    nodes = []
    features = "embedding"
    if columns > embedding_dim:  # the head's depths follow its embedding
        width = columns - embedding_dim
        inputs.append(helper.make_tensor_value_info("depths", TensorProto.FLOAT, ["batch", width]))
        features = "graft_head_features"
        nodes.append(helper.make_node("Concat", ["embedding", "depths"], [features], axis=1))
    nodes += [
        helper.make_node("MatMul", [features, "graft_head_weights"], ["graft_head_xw"]),
        helper.make_node("Add", ["graft_head_xw", "graft_head_bias"], ["graft_head_logits"]),
        helper.make_node("Softmax", ["graft_head_logits"], ["probabilities"], axis=1),
    ]
    outputs = [
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n_labels])
    ]
    initializers = [
        numpy_helper.from_array(head.weights.astype(np.float32), "graft_head_weights"),
        numpy_helper.from_array(head.bias.astype(np.float32), "graft_head_bias"),
    ]
    if head.prototypes is not None:
        threshold = NO_THRESHOLD if head.unknown_threshold is None else head.unknown_threshold
        # Class means on the embedding; an adapted head's on every column it reads.
        on = "embedding" if len(head.prototypes) == embedding_dim else features
        nodes += [
            helper.make_node("MatMul", [on, "graft_head_prototypes"], ["graft_head_cos"]),
            helper.make_node("ReduceMax", ["graft_head_cos"], ["similarity"], axes=[1], keepdims=0),
            helper.make_node("Less", ["similarity", "graft_head_threshold"], ["unknown"]),
        ]
        outputs += [
            helper.make_tensor_value_info("similarity", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("unknown", TensorProto.BOOL, ["batch"]),
        ]
        initializers += [
            numpy_helper.from_array(head.prototypes.astype(np.float32), "graft_head_prototypes"),
            numpy_helper.from_array(np.array(threshold, dtype=np.float32), "graft_head_threshold"),
        ]
    graph = helper.make_graph(
        nodes,
        "graft_head",
        inputs,
        outputs,
        initializers,
    )
    return helper.make_model(graph, opset_imports=like.opset_import, ir_version=like.ir_version)


def fine_tuned_backbone(
    trunk_path: Path, top_path: Path, factors: list[np.ndarray]
) -> onnx.ModelProto:
    """A fine-tuned head's backbone as one graph: the shared trunk, then the top with the
    head's LoRA factors as constants (the inputs they are when served). The whole
    backbone's inputs (token ids and mask, or the image) in, `embedding` out, as its graph."""
    trunk = without_depths(onnx.load(str(trunk_path)))
    top = without_depths(onnx.load(str(top_path)))
    factor_inputs = [i for i in top.graph.input if i.name.startswith("lora_")]
    for value_info, factor in zip(factor_inputs, factors, strict=True):
        top.graph.input.remove(value_info)
        top.graph.initializer.append(
            numpy_helper.from_array(np.asarray(factor, np.float32), value_info.name)
        )
    top = compose.add_prefix(top, "graft_top_")
    io_map = [("hidden", "graft_top_hidden")]
    if any(i.name == "graft_top_attention_mask" for i in top.graph.input):
        # A text top: the mask feeds both parts, the trunk passes it on as an output.
        trunk.graph.node.append(helper.make_node("Identity", ["attention_mask"], ["graft_mask"]))
        trunk.graph.output.append(
            helper.make_tensor_value_info("graft_mask", TensorProto.INT64, ["batch", "tokens"])
        )
        io_map.append(("graft_mask", "graft_top_attention_mask"))
    merged = compose.merge_models(trunk, top, io_map=io_map)
    merged.graph.node.append(helper.make_node("Identity", ["graft_top_embedding"], ["embedding"]))
    [output] = merged.graph.output
    merged.graph.output.remove(output)
    merged.graph.output.append(
        helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", None])
    )
    return merged


def combined_model(
    spec: BackboneSpec,
    backbone: Path | onnx.ModelProto,
    head: Head,
    *,
    variant: str = "fp32",
    fine_tuned: bool = False,
) -> bytes:
    """The serialised model a tenant downloads; labels and preprocessing in its metadata.
    `backbone`: the backbone's ONNX file, or a fine-tuned head's (`fine_tuned_backbone`)."""
    if isinstance(backbone, Path):
        backbone = onnx.load(str(backbone))
    backbone = with_deepest_depths(backbone, head.depths)
    inputs = list(spec.onnx_inputs)
    if spec.modality == "audio":
        backbone = with_whole_clips(backbone)
        inputs = ["waveform"]
    io_map = [("embedding", "embedding")]
    if head.depths:
        io_map.append(("depths", "depths"))
    merged = compose.merge_models(
        backbone,
        head_graph(head, backbone, spec.embedding_dim),
        io_map=io_map,
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
            "graft.fine_tuned": json.dumps(fine_tuned),
            "graft.labels": json.dumps(head.labels),
            "graft.depths": json.dumps(head.depths),
            "graft.unknown_threshold": json.dumps(head.unknown_threshold),
            "graft.inputs": json.dumps(inputs),
            "graft.preprocessing": json.dumps(spec.public()["preprocessing"]),
        },
    )
    onnx.checker.check_model(merged)
    return merged.SerializeToString()

"""Rewrites of an exported graph: what an image graph computes from its fixed input size
folded into constants (`fold_fixed_size`), and a download's graph cut to what its head
reads (`without_depths`, `with_deepest_depths`) or fed whole clips (`with_whole_clips`).
onnx's protobufs, edited in place; no torch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

# Where a graph's metadata holds the widths of its `depths` (a JSON list).
DEPTH_WIDTHS_KEY = "graft.depth_widths"


def fold_fixed_size(path: Path) -> None:
    """Makes constants of what an image graph computes from its input's fixed size.

    TF-style "SAME" padding (EfficientNet-Lite) is exported as arithmetic on the input's
    shape at run time (Shape -> Gather -> Div -> Ceil -> ... -> Pad), in front of every
    strided convolution. Under the CUDA provider those small integer ops run on the CPU,
    with a copy each way: 15 Memcpy nodes in lite0. The side is fixed (224 for lite0), so
    each such tensor is computed once here, at batch 1 and at batch 3, and where both
    agree (it does not depend on the batch) it becomes an initializer; the nodes that
    computed it go.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    static = {i.name for i in graph.initializer}
    derived: set[str] = set()  # tensors computed from shapes and constants only
    for node in graph.node:  # nodes are in topological order
        if node.op_type == "Constant" or (
            node.op_type == "Shape"
            or (node.input and all(x in derived or x in static or not x for x in node.input))
        ):
            if node.op_type == "Constant":
                static.update(node.output)
            else:
                derived.update(node.output)
    # The edge: shape-derived tensors that feed a node computing on the image itself.
    edge = sorted(
        {x for node in graph.node if not set(node.output) <= derived for x in node.input} & derived
    )
    if not edge:
        return
    probe = onnx.load(str(path))
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(x) for x in edge)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    side = graph.input[0].type.tensor_type.shape.dim[1].dim_value
    values = [
        dict(
            zip(
                edge,
                session.run(edge, {graph.input[0].name: np.zeros((n, side, side, 3), np.uint8)}),
                strict=True,
            )
        )
        for n in (1, 3)
    ]
    fixed = {x for x in edge if np.array_equal(values[0][x], values[1][x])}
    graph.initializer.extend(numpy_helper.from_array(values[0][x], x) for x in sorted(fixed))
    computed = [node for node in graph.node if not set(node.output) <= fixed]
    del graph.node[:]
    graph.node.extend(computed)
    prune_unread(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def without_depths(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph (an onnx ModelProto, changed in place) without its `depths` output
    (models/depths.py), what computes only that, and their widths: a head's download, or
    the graph as it was before the depths."""
    kept = [o for o in model.graph.output if o.name != "depths"]
    if len(kept) == len(model.graph.output):
        return model
    del model.graph.output[:]
    model.graph.output.extend(kept)
    metadata = [p for p in model.metadata_props if p.key != DEPTH_WIDTHS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(metadata)
    return prune_unread(model)


def with_deepest_depths(model: onnx.ModelProto, k: int) -> onnx.ModelProto:
    """The graph (changed in place) whose `depths` output holds only the deepest `k`
    depths, with what computed the others pruned: the download of a head that reads
    those. The depths are the inputs of one Concat, which a variant may follow by a cast
    or a (de)quantisation of that one tensor (k=0: `without_depths`)."""
    import json

    if k == 0:
        return without_depths(model)
    graph = model.graph
    [props] = [p for p in model.metadata_props if p.key == DEPTH_WIDTHS_KEY]
    widths = json.loads(props.value)
    producer = {output: node for node in graph.node for output in node.output}
    chain = []  # the tensors from the Concat to `depths`, whose shapes change
    node = producer["depths"]
    while node.op_type != "Concat":
        chain.append(node.output[0])
        node = producer[node.input[0]]
    chain.append(node.output[0])
    if len(node.input) != len(widths):
        raise ValueError(f"`depths` concatenates {len(node.input)} tensors, not {len(widths)}")
    del node.input[: len(widths) - k]
    props.value = json.dumps(widths[len(widths) - k :])
    shapes = [v for v in graph.value_info if v.name not in chain]
    del graph.value_info[:]
    graph.value_info.extend(shapes)
    [output] = [o for o in graph.output if o.name == "depths"]
    output.type.tensor_type.shape.dim[1].dim_value = sum(widths[len(widths) - k :])
    return prune_unread(model)


def with_whole_clips(model: onnx.ModelProto) -> onnx.ModelProto:
    """An audio graph (changed in place) that takes `waveform` alone: each row's `samples`
    is the whole row, so a download is fed a clip as it is (a batch: clips of one length;
    the served graph, fed both, takes clips of any lengths padded together)."""
    from onnx import TensorProto, helper

    graph = model.graph
    [samples] = [i for i in graph.input if i.name == "samples"]
    graph.input.remove(samples)
    nodes = [
        helper.make_node("Shape", ["waveform"], ["graft_batch"], start=0, end=1),
        helper.make_node("Shape", ["waveform"], ["graft_length"], start=1, end=2),
        helper.make_node("Expand", ["graft_length", "graft_batch"], ["samples"]),
    ]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    graph.value_info.append(helper.make_tensor_value_info("samples", TensorProto.INT64, ["batch"]))
    return model


def prune_unread(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drops the nodes and initializers nothing reads any more, from the outputs back."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    nodes = []
    for node in reversed(graph.node):  # nodes are in topological order
        if set(node.output) & needed:
            nodes.append(node)
            needed.update(_reads(node))
    initializers = [i for i in graph.initializer if i.name in needed]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(reversed(nodes))
    graph.initializer.extend(initializers)
    return model


def _reads(node: onnx.NodeProto) -> set[str]:
    """The names a node reads, those its subgraphs (If, Loop) read included."""
    names = {x for x in node.input if x}
    for attribute in node.attribute:
        for graph in [attribute.g, *attribute.graphs]:
            for inner in graph.node:
                names |= _reads(inner)
    return names

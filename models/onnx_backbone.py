"""`kind = "onnx"`: an operator's own ONNX file, wrapped into Graft's backbone interface.

What the file must take and give:
- an image model: one float32 input, NCHW, at the declared `image_size`, already scaled
  as `(pixels / 255 - mean) / std` with the declared mean and std; its output is
  [batch, dim] (or [batch, dim, 1, 1], flattened);
- a text model: int64 inputs `input_ids` and `attention_mask` (and `token_type_ids`, fed
  zeros, if it has one), [batch, tokens]; its output is [batch, dim], or [batch, tokens,
  dim] with a declared `pooling`.
The wrapped graph takes what every Graft backbone takes (uint8 NHWC images, or token ids
and mask) and gives the L2-normalised `embedding`; it is built with onnx.compose, so the
operator's graph runs unchanged inside it. Needs opset 13 or later (ReduceSum's axes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def wrap_onnx(
    source: Path,
    out: Path,
    *,
    modality: str,
    output: str | None,
    pooling: str | None,
    image_size: int = 0,
    mean: tuple[float, ...] = (),
    std: tuple[float, ...] = (),
) -> None:
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    model = onnx.load(str(source))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ValueError(f"{source.name} uses opset {opset}; convert it to 13 or later")
    model = compose.add_prefix(model, "model/")
    weights = {x.name for x in model.graph.initializer}
    declared = {i.name: i for i in model.graph.input if i.name not in weights}
    declared.update({o.name: o for o in model.graph.output})
    inputs = [i.name for i in model.graph.input if i.name not in weights]
    outputs = [o.name for o in model.graph.output]
    chosen = f"model/{output}" if output else outputs[0]
    if chosen not in outputs:
        raise ValueError(f"{source.name} has no output {output!r}; it has {outputs}")

    def graph(nodes, ins, outs, inits=()):
        g = helper.make_graph(nodes, "g", ins, outs, list(inits))
        return helper.make_model(g, opset_imports=model.opset_import, ir_version=model.ir_version)

    def const(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    if modality == "image":
        if len(inputs) != 1:
            raise ValueError(f"{source.name} takes {inputs}; an image model takes one input")
        scale = graph(
            [
                helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
                helper.make_node("Transpose", ["pixels"], ["nchw"], perm=[0, 3, 1, 2]),
                helper.make_node("Sub", ["nchw", "mean255"], ["centred"]),
                helper.make_node("Div", ["centred", "std255"], [inputs[0]]),
            ],
            [
                helper.make_tensor_value_info(
                    "image", TensorProto.UINT8, ["batch", image_size, image_size, 3]
                )
            ],
            [declared[inputs[0]]],
            [
                const("mean255", np.array(mean).reshape(1, 3, 1, 1) * 255),
                const("std255", np.array(std).reshape(1, 3, 1, 1) * 255),
            ],
        )
        model = compose.merge_models(scale, model, io_map=[(inputs[0], inputs[0])])
        pool_nodes = [helper.make_node("Flatten", [chosen], ["vectors"], axis=1)]
        pool_inputs = [declared[chosen]]
    else:
        known = {"model/input_ids", "model/attention_mask", "model/token_type_ids"}
        if not {"model/input_ids", "model/attention_mask"} <= set(inputs) or set(inputs) - known:
            raise ValueError(
                f"{source.name} takes {[i.removeprefix('model/') for i in inputs]}; a text"
                " model takes input_ids and attention_mask (and optionally token_type_ids)"
            )
        feed = [
            helper.make_node("Identity", ["input_ids"], ["model/input_ids"]),
            helper.make_node("Identity", ["attention_mask"], ["model/attention_mask"]),
        ]
        if "model/token_type_ids" in inputs:
            feed.append(helper.make_node("Mul", ["input_ids", "zero"], ["model/token_type_ids"]))
        ids = [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "tokens"])
            for n in ("input_ids", "attention_mask")
        ]
        passthrough = helper.make_node("Identity", ["attention_mask"], ["mask"])
        tokens = graph(
            [*feed, passthrough],
            ids,
            [declared[n] for n in inputs]
            + [helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "tokens"])],
            [const("zero", 0, np.int64)],
        )
        model = compose.merge_models(
            tokens,
            model,
            io_map=[(n, n) for n in inputs],
            outputs=None,
        )
        # merge_models keeps the first graph's unconnected outputs: the mask travels on.
        rank = _output_rank(model, chosen)
        if rank == 3 and pooling is None:
            raise ValueError(f"{source.name} gives one vector per token: declare a pooling")
        pool_nodes, pool_inputs = _text_pooling(declared[chosen], pooling if rank == 3 else None)
    norm = graph(
        [
            *pool_nodes,
            helper.make_node("Mul", ["vectors", "vectors"], ["squares"]),
            helper.make_node("ReduceSum", ["squares", "axis1"], ["sum_squares"], keepdims=1),
            helper.make_node("Sqrt", ["sum_squares"], ["norm"]),
            helper.make_node("Max", ["norm", "eps"], ["safe_norm"]),
            helper.make_node("Div", ["vectors", "safe_norm"], ["embedding"]),
        ],
        pool_inputs,
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", None])],
        [
            const("axis1", [1], np.int64),
            const("eps", 1e-12),
            const("minus_one", [-1], np.int64),
            const("one", 1, np.int64),
            const("zero_index", 0, np.int64),
            const("zero_long", 0, np.int64),
        ],
    )
    io_map = [(chosen, chosen)] + ([("mask", "mask")] if modality == "text" else [])
    wrapped = compose.merge_models(model, norm, io_map=io_map, outputs=["embedding"])
    onnx.checker.check_model(wrapped)
    onnx.save(wrapped, str(out))


def _output_rank(model, name: str) -> int | None:
    for o in model.graph.output:
        if o.name == name and o.type.tensor_type.HasField("shape"):
            return len(o.type.tensor_type.shape.dim)
    return None


def _text_pooling(output, pooling: str | None):
    """Nodes turning the model's `output` (and the int64 `mask`) into `vectors`."""
    from onnx import TensorProto, helper

    hidden = output.name
    ins = [
        output,
        helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "tokens"]),
    ]
    if pooling is None:
        return [helper.make_node("Identity", [hidden], ["vectors"])], ins
    if pooling == "cls":
        return [helper.make_node("Gather", [hidden, "zero_index"], ["vectors"], axis=1)], ins
    if pooling == "mean":
        nodes = [
            helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mask_f", "minus_one"], ["mask_3d"]),
            helper.make_node("Mul", [hidden, "mask_3d"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
            helper.make_node("ReduceSum", ["mask_3d", "axis1"], ["count"], keepdims=0),
            helper.make_node("Max", ["count", "eps"], ["safe_count"]),
            helper.make_node("Div", ["summed", "safe_count"], ["vectors"]),
        ]
        return nodes, ins
    # last: the last real token of each right-padded row.
    nodes = [
        helper.make_node("ReduceSum", ["mask", "axis1"], ["length"], keepdims=1),
        helper.make_node("Sub", ["length", "one"], ["last_index"]),
        helper.make_node("Max", ["last_index", "zero_long"], ["safe_last"]),
        helper.make_node("GatherND", [hidden, "safe_last"], ["vectors"], batch_dims=1),
    ]
    return nodes, ins

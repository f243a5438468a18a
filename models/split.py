"""A backbone cut in two for fine-tuning on a shared trunk (issue 13).

The trunk is frozen and shared by every head: a text encoder's embeddings and every layer
below the cut, or an image network's stem and every stage but the last. The top keeps the
pretrained weights, shared too: the encoder's last `TOP_LAYERS` layers and the pooling,
or the network's last `TOP_STAGES` stage(s), head convolution and pooling. A fine-tuned
head adds its own low-rank update (LoRA, Hu et al. 2021) to every linear map of a text
top, `W x + b + B (A x)`, and to every 1×1 convolution of an image top, `(W + B A) x`;
A (rank × in) and B (out × rank) per head, the LoRA scale folded into B. With B = 0 the
top is the pretrained one, so the trunk and the top together compute the backbone's
embedding.

The factors are inputs of the top, not weights: one top (a torch module here, an ONNX
graph when served) serves every fine-tuned head of a backbone, fed each head's factors
with its rows. `bench/finetune_text.py` measured the choice of 4 layers and rank 8 on
MPNet (UCI sentiment, 8 per label: 0.856 frozen, 0.898 fine-tuned);
`bench/finetune_image.py` the image top on lite0 (BENCHMARKS.md; both scripts removed
after 03efd04).

Supported: the BERT family (BERT, RoBERTa, MiniLM: `encoder.layer`), MPNet (`encoder.layer`
plus a relative position bias computed from the sequence length), and timm's EfficientNet
class (EfficientNet, -Lite, MobileNetV2: `blocks`, `conv_head`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.depths import Outputs, pooled_image_depths, pooled_text_depths

# Layers above the cut: the share of an encoder a fine-tuned head retrains.
TOP_LAYERS = 4
RANK = 8
# Stages of an image network above the cut.
TOP_STAGES = 1


class LoRALinear(torch.nn.Module):
    """A shared linear map plus the low-rank update of whichever head is being run:
    `factors` is set by the top before each call, (A, B) or None for the pretrained map."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.factors: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.factors is None:
            return y
        a, b = self.factors
        return y + (x @ a.T) @ b.T


class TextTrunk(torch.nn.Module):
    """Token ids and mask in; the hidden states entering the top out."""

    def __init__(self, model: Any, cut: int) -> None:
        super().__init__()
        self.model = model
        self.cut = cut

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._layers(input_ids, attention_mask)[-1]

    def depth_widths(self) -> list[int]:
        """The widths of its depths (models/depths.py): each of its layers."""
        return [int(self.model.config.hidden_size)] * self.cut

    def forward_with_depths(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self._layers(input_ids, attention_mask)
        return outputs[-1], pooled_text_depths(outputs, attention_mask)

    def _layers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list:
        embedded = self.model.embeddings(input_ids=input_ids)
        return _run_layers(
            self.model, self.model.encoder.layer[: self.cut], embedded, attention_mask
        )


class TextTop(torch.nn.Module):
    """The trunk's hidden states and mask (and a head's LoRA factors) in; the pooled,
    L2-normalised embedding out."""

    def __init__(self, model: Any, cut: int, pooling: str) -> None:
        super().__init__()
        self.model = model
        self.cut = cut
        self.pooling = pooling
        self.linears: list[LoRALinear] = []
        for layer in model.encoder.layer[cut:]:
            for module in list(layer.modules()):
                for name, child in list(module.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        wrapped = LoRALinear(child)
                        setattr(module, name, wrapped)
                        self.linears.append(wrapped)

    def factor_shapes(self, rank: int = RANK) -> list[tuple[int, ...]]:
        """Shapes of one head's factors, in the order `forward` takes them: A, B per map."""
        shapes: list[tuple[int, ...]] = []
        for linear in self.linears:
            shapes += [(rank, linear.in_features), (linear.out_features, rank)]
        return shapes

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, *factors: torch.Tensor
    ) -> torch.Tensor:
        from models.transformers_backbone import pooled

        outputs = self._layers(hidden, attention_mask, factors)
        return pooled(outputs[-1], attention_mask, self.pooling)

    def depth_widths(self) -> list[int]:
        """The widths of its depths (models/depths.py): each of its layers but the last."""
        layers = len(self.model.encoder.layer) - self.cut
        return [int(self.model.config.hidden_size)] * (layers - 1)

    def forward_with_depths(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, *factors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For a top of two layers or more (with `depth_widths`)."""
        from models.transformers_backbone import pooled

        outputs = self._layers(hidden, attention_mask, factors)
        embedding = pooled(outputs[-1], attention_mask, self.pooling)
        return embedding, pooled_text_depths(outputs[:-1], attention_mask)

    def _layers(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, factors: tuple
    ) -> list[torch.Tensor]:
        for i, linear in enumerate(self.linears):
            linear.factors = (factors[2 * i], factors[2 * i + 1]) if factors else None
        try:
            layers = self.model.encoder.layer[self.cut :]
            return _run_layers(self.model, layers, hidden, attention_mask)
        finally:
            for linear in self.linears:
                linear.factors = None


def _run_layers(
    model: Any, layers, hidden: torch.Tensor, attention_mask: torch.Tensor
) -> list[torch.Tensor]:
    """Each layer's output, in order."""
    # Additive mask: 0 where a token is, a large negative number on padding (every
    # attention implementation of these encoders adds it to the scores).
    mask = attention_mask[:, None, None, :].to(hidden.dtype)
    additive = (1.0 - mask) * torch.finfo(hidden.dtype).min
    extra = {}
    if hasattr(model.encoder, "relative_attention_bias"):  # MPNet
        extra["position_bias"] = model.encoder.compute_position_bias(hidden)
    outputs = []
    for layer in layers:
        out = layer(hidden, additive, **extra)
        hidden = out[0] if isinstance(out, tuple) else out
        outputs.append(hidden)
    return outputs


def split_text_encoder(
    folder: Path, pooling: str = "mean", top_layers: int = TOP_LAYERS
) -> tuple[TextTrunk, TextTop]:
    """The encoder of `folder`, frozen, as (trunk, top) sharing its weights: the top is
    its last `top_layers` layers (all but the first, for an encoder of fewer)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    if model.config.is_encoder_decoder:
        raise ValueError("encoder-decoder models cannot be split yet")
    if not hasattr(model, "embeddings") or not hasattr(getattr(model, "encoder", None), "layer"):
        raise ValueError(f"{type(model).__name__}: only BERT-family and MPNet encoders are split")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers = len(model.encoder.layer)
    if layers < 2:
        raise ValueError(f"an encoder of {layers} layer cannot be cut into a trunk and a top")
    # A shallower encoder than usual keeps at least its first layer in the trunk.
    cut = layers - min(top_layers, layers - 1)
    # Both in eval mode: an ONNX export restores the wrapper's mode to all it holds, and
    # a wrapper made in training mode would switch the encoder's dropout on.
    return TextTrunk(model, cut).eval(), TextTop(model, cut, pooling).eval()


def export_split(trunk, top, trunk_path: Path, top_path: Path, rank: int = RANK) -> None:
    """The trunk and the top as ONNX graphs. The trunk takes the whole backbone's inputs
    (`input_ids` and `attention_mask`, or `image`) and gives `hidden`; the top takes
    `hidden` (and a text top `attention_mask`) and one head's factors (`lora_a_0`,
    `lora_b_0`, … in `factor_shapes` order) and gives `embedding`. Each gives the
    `depths` (models/depths.py) of the layers or stages it holds, where it holds any:
    the trunk's followed by the top's are the whole graph's."""
    from models.export import OPSET, write_depth_widths
    from models.graph_surgery import fold_fixed_size

    factors = [torch.zeros(shape) for shape in top.factor_shapes(rank)]
    names = [f"lora_{'ab'[i % 2]}_{i // 2}" for i in range(len(factors))]
    if isinstance(trunk, TextTrunk):
        ids = torch.ones(2, 8, dtype=torch.int64)
        axes = {0: "batch", 1: "tokens"}
        trunk_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        top_extra = {"attention_mask": torch.ones_like(ids)}
    else:
        side = trunk.embedding.side
        axes = {0: "batch"}
        trunk_inputs = {"image": torch.zeros(2, side, side, 3, dtype=torch.uint8)}
        top_extra = {}
    trunk_widths, top_widths = trunk.depth_widths(), top.depth_widths()
    trunk_outputs = ["hidden", "depths"] if trunk_widths else ["hidden"]
    top_outputs = ["embedding", "depths"] if top_widths else ["embedding"]
    with torch.inference_mode():
        torch.onnx.export(
            Outputs(trunk) if trunk_widths else trunk,
            tuple(trunk_inputs.values()),
            str(trunk_path),
            input_names=list(trunk_inputs),
            output_names=trunk_outputs,
            dynamic_axes={
                **{name: axes for name in [*trunk_inputs, "hidden"]},
                **({"depths": {0: "batch"}} if trunk_widths else {}),
            },
            opset_version=OPSET,
            dynamo=False,
        )
        hidden = trunk(*trunk_inputs.values())
        torch.onnx.export(
            Outputs(top) if top_widths else top,
            (hidden, *top_extra.values(), *factors),
            str(top_path),
            input_names=["hidden", *top_extra, *names],
            output_names=top_outputs,
            dynamic_axes={
                **{name: axes for name in ["hidden", *top_extra]},
                **{name: {0: "batch"} for name in top_outputs},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    if not isinstance(trunk, TextTrunk):
        fold_fixed_size(trunk_path)
    write_depth_widths(trunk_path, trunk_widths)
    write_depth_widths(top_path, top_widths)


class LoRAConv1x1(torch.nn.Module):
    """A shared 1×1 convolution plus the low-rank update of whichever head is being run,
    merged into its weight (`W + B A`) for the call: the update costs one small matrix
    product per call, not per pixel."""

    def __init__(self, base: torch.nn.Conv2d) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_channels, base.out_channels
        self.factors: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factors is None:
            return self.base(x)
        a, b = self.factors
        weight = self.base.weight + (b @ a)[:, :, None, None]
        return torch.nn.functional.conv2d(x, weight, self.base.bias)


class ImageTrunk(torch.nn.Module):
    """uint8 NHWC images in (as the whole backbone takes them); the activations entering
    the network's last stage out."""

    def __init__(self, embedding: Any, cut: int) -> None:
        super().__init__()
        self.embedding = embedding
        self.cut = cut

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self._blocks(image)[0]

    def depth_widths(self) -> list[int]:
        """The widths of its depths (models/depths.py): the stages it ends."""
        return _stage_widths(self.embedding.backbone, range(self.cut))

    def forward_with_depths(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, stages = self._blocks(image)
        return x, pooled_image_depths(stages)

    def _blocks(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        net = self.embedding.backbone
        x = net.bn1(net.conv_stem(self.embedding.scaled(image)))
        return _run_blocks(net, range(self.cut), x)


class ImageTop(torch.nn.Module):
    """The trunk's activations (and a head's LoRA factors) in; the last stage, the head
    convolution and the pooling, L2-normalised, out. Every 1×1 convolution of the top
    (expansion, projection, head) takes a head's update."""

    def __init__(self, embedding: Any, cut: int) -> None:
        super().__init__()
        self.embedding = embedding
        self.cut = cut
        net = embedding.backbone
        targets = [
            (module, name)
            for module in net.blocks[cut:].modules()
            for name, child in module.named_children()
            if _pointwise(child)
        ] + [(net, "conv_head")]
        self.linears: list[LoRAConv1x1] = []
        for module, name in targets:
            wrapped = LoRAConv1x1(getattr(module, name))
            setattr(module, name, wrapped)
            self.linears.append(wrapped)

    factor_shapes = TextTop.factor_shapes

    def forward(self, hidden: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        return self._blocks(hidden, factors)[0]

    def depth_widths(self) -> list[int]:
        """The widths of its depths (models/depths.py): the stages it ends."""
        net = self.embedding.backbone
        return _stage_widths(net, range(self.cut, len(net.blocks)))

    def forward_with_depths(
        self, hidden: torch.Tensor, *factors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, stages = self._blocks(hidden, factors)
        return embedding, pooled_image_depths(stages)

    def _blocks(self, hidden: torch.Tensor, factors: tuple) -> tuple[torch.Tensor, list]:
        """The embedding, and the outputs of the stages the top ends."""
        net = self.embedding.backbone
        for i, linear in enumerate(self.linears):
            linear.factors = (factors[2 * i], factors[2 * i + 1]) if factors else None
        try:
            x, stages = _run_blocks(net, range(self.cut, len(net.blocks)), hidden)
            x = net.bn2(net.conv_head(x))
            embedding = torch.nn.functional.normalize(net.forward_head(x).flatten(1), dim=1)
            return embedding, stages
        finally:
            for linear in self.linears:
                linear.factors = None


def _stage_ends(net: Any) -> set[int]:
    """The blocks whose outputs are the network's stages (timm's `feature_info`)."""
    return {
        int(info["module"].split(".")[1])
        for info in net.feature_info
        if info["module"].startswith("blocks.")
    }


def _stage_widths(net: Any, blocks: range) -> list[int]:
    return [
        int(info["num_chs"])
        for info in net.feature_info
        if info["module"].startswith("blocks.") and int(info["module"].split(".")[1]) in blocks
    ]


def _run_blocks(net: Any, blocks: range, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The blocks' output, and the outputs of the stages they end."""
    ends = _stage_ends(net)
    stages = []
    for i in blocks:
        x = net.blocks[i](x)
        if i in ends:
            stages.append(x)
    return x, stages


def _pointwise(module: torch.nn.Module) -> bool:
    return (
        isinstance(module, torch.nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.groups == 1
        and module.stride == (1, 1)
    )


def split_image_backbone(
    embedding: Any, top_stages: int = TOP_STAGES
) -> tuple[ImageTrunk, ImageTop]:
    """An image embedding module (models.timm_backbone.image_embedding_module), frozen, as
    (trunk, top) sharing its weights: the top is the network's last stage and head
    convolution. For timm's EfficientNet class (EfficientNet, -Lite, MobileNetV2)."""
    net = embedding.backbone
    if not all(hasattr(net, name) for name in ("blocks", "conv_head", "bn2", "forward_head")):
        raise ValueError(f"{type(net).__name__}: only EfficientNet-class networks are split")
    for parameter in embedding.parameters():
        parameter.requires_grad_(False)
    embedding.eval()
    cut = len(net.blocks) - top_stages
    return ImageTrunk(embedding, cut).eval(), ImageTop(embedding, cut).eval()

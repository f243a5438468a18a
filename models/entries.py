"""The entries of a backbones file as pydantic checks them: one table per backbone id,
of one of four kinds (`models/registry.py` says what each declares; `models/kinds.py`
makes each into a `BackboneSpec`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.sources import Source


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImagePreprocessingEntry(_Strict):
    image_size: int = Field(ge=8, le=2048)
    resize_size: int = Field(ge=8, le=4096)
    mean: tuple[float, float, float]
    std: tuple[
        Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]
    ]
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"

    @model_validator(mode="after")
    def _crop_fits(self) -> ImagePreprocessingEntry:
        if self.resize_size < self.image_size:
            raise ValueError("resize_size must be at least image_size (the crop is inside it)")
        return self


class _Entry(_Strict):
    family: str = Field(min_length=1)
    description: str = ""
    license: str = "unknown"
    embedding_dim: int = Field(ge=1, le=65536)


class TimmEntry(_Entry):
    kind: Literal["timm"]
    architecture: str = Field(min_length=1)
    # Keyword arguments of timm.create_model (e.g. a smaller width).
    model_args: dict[str, Any] = {}
    weights: Source
    # "by_name": timm's own tensor names; "by_position": another naming of the same
    # tensors in the same order, matched one to one with every shape checked.
    weights_layout: Literal["by_name", "by_position"] = "by_name"
    preprocessing: ImagePreprocessingEntry


class TransformersEntry(_Entry):
    kind: Literal["transformers"]
    model: Source  # the folder: config.json, weights, tokenizer.json
    pooling: Literal["mean", "cls", "last"]
    max_tokens: int = Field(ge=1, le=65536)


class TextTokenizerEntry(_Strict):
    tokenizer: Source  # a Hugging Face tokenizers JSON file
    max_tokens: int = Field(ge=1, le=65536)
    pad_id: int = Field(0, ge=0)


class AudioPreprocessingEntry(_Strict):
    sample_rate: int = Field(16000, ge=4000, le=96000)
    window_ms: float = Field(25.0, gt=0, le=200)
    hop_ms: float = Field(10.0, gt=0, le=100)
    n_mels: int = Field(40, ge=1, le=512)
    partial_frames: int = Field(160, ge=1, le=10000)
    partials_per_second: float = Field(1.3, gt=0)
    min_coverage: float = Field(0.75, gt=0, le=1)
    target_dbfs: float = Field(-30.0, le=0)

    @model_validator(mode="after")
    def _partials_cover(self) -> AudioPreprocessingEntry:
        # Frames between the starts of two partials (hop_ms apart each).
        step_frames = 1000 / self.partials_per_second / self.hop_ms
        if not 0.5 <= step_frames <= self.partial_frames:
            raise ValueError(
                "partials_per_second must start a partial at most every partial_frames frames"
            )
        return self


class Ge2eEntry(_Entry):
    kind: Literal["ge2e"]
    # A torch state dict (lstm.*, linear.*), or a checkpoint holding one as `model_state`.
    weights: Source
    preprocessing: AudioPreprocessingEntry = AudioPreprocessingEntry()


class OnnxEntry(_Entry):
    kind: Literal["onnx"]
    # Audio models are declared as `ge2e` entries: their graph holds the mel front end.
    modality: Literal["image", "text"]
    model: Source
    output: str | None = None  # default: the graph's first output
    # For a text graph whose output is per token ([batch, tokens, dim]).
    pooling: Literal["mean", "cls", "last"] | None = None
    preprocessing: ImagePreprocessingEntry | None = None
    text: TextTokenizerEntry | None = None

    @model_validator(mode="after")
    def _inputs_declared(self) -> OnnxEntry:
        if self.modality == "image" and self.preprocessing is None:
            raise ValueError("an image model needs [preprocessing]")
        if self.modality == "text" and self.text is None:
            raise ValueError("a text model needs [text] (tokenizer, max_tokens)")
        return self


class BackbonesFile(BaseModel):
    """A whole backbones file: one entry per id."""

    entries: dict[
        Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")],
        Annotated[
            TimmEntry | TransformersEntry | Ge2eEntry | OnnxEntry, Field(discriminator="kind")
        ],
    ]

    @model_validator(mode="after")
    def _auto_is_reserved(self) -> BackbonesFile:
        if "auto" in self.entries:
            raise ValueError("entry 'auto': the id is reserved (a head's backbone: auto)")
        return self

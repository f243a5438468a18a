"""Heads' bodies: inputs and examples, creating a head and adding to it, the head as
answered, its training's progress."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from graft.schemas.common import FineTuneMode, Label, Name, Strict
from graft.schemas.metrics import HeadMetrics

INPUT_FIELDS = ("image", "text", "audio")


def _one_kind_of_input(schema: dict, model: type[BaseModel]) -> None:
    """The document's form of an input: one of three objects, with `image`, `text` or
    `audio`, each a string; what `Input._exactly_one` holds a request to."""
    properties, required = schema.pop("properties"), schema.pop("required", [])
    schema.pop("additionalProperties", None)
    shared = {k: v for k, v in properties.items() if k not in INPUT_FIELDS}
    schema["oneOf"] = [
        {
            "title": f"{field} {model.__name__.lower()}",
            "type": "object",
            "properties": {
                **shared,
                field: {
                    "type": "string",
                    **({"format": "byte", "contentEncoding": "base64"} if field != "text" else {}),
                    "description": properties[field]["description"],
                },
            },
            "required": [*required, field],
            "additionalProperties": False,
        }
        for field in INPUT_FIELDS
    ]


class Input(Strict):
    """One input: an image as base64 of JPEG/PNG/WebP bytes, a text, or a clip as base64
    of WAV/FLAC/OGG/MP3 bytes."""

    model_config = ConfigDict(json_schema_extra=_one_kind_of_input)

    image: str | None = Field(None, description="base64 of JPEG, PNG or WebP bytes")
    text: str | None = Field(None, description="a text (UTF-8)")
    audio: str | None = Field(
        None,
        description="base64 of a WAV, FLAC, OGG or MP3 clip: any sample rate, any channels"
        " (mixed to mono and resampled to the backbone's rate)",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Input:
        given = [field for field in INPUT_FIELDS if field in self.model_fields_set]
        if len(given) != 1:
            raise ValueError("give exactly one of 'image', 'text' or 'audio'")
        if getattr(self, given[0]) is None:
            raise ValueError(f"'{given[0]}' must be a string, not null")
        return self


class Example(Input):
    label: Label


class HeadSpec(Strict):
    """What a head is called and which backbone it sits on (the multipart form fields)."""

    name: Name
    backbone: str = Field(
        description="a backbone id (GET /backbones), or `auto`: every backbone of the"
        " examples' modality is scored by LogME on the examples, the best two are trained"
        " and the one with the lower held-out log-loss is kept (`metrics.backbone_selection`)."
        " With an archive, `auto` means the backbones of its files' modality: audio when"
        " every file is a clip (.wav, .flac, .ogg, .mp3), text when every file is .txt,"
        " images otherwise.",
        examples=["efficientnet_lite0", "auto"],
    )
    fine_tune: FineTuneMode = Field(
        "auto",
        description="whether the head may retrain its own top of the backbone (LoRA on a text"
        " encoder's last 4 layers, or an image network's last stage and head convolution;"
        " the trunk below stays shared): `on` always, `auto` unless held-out folds show the"
        " frozen head significantly more accurate, `off` never. Image heads fine-tune only"
        " with `on` (`auto` keeps them frozen: it gained little on the sets measured)."
        " Costs seconds to minutes of training, up to about 0.9 MB per head and little at"
        " predict time (README, Fine-tuning); needs 3 examples per label",
    )
    unknown_keep: float = Field(
        0.95,
        ge=0.5,
        le=0.999,
        description="the share of the head's own held-out examples that its unknown threshold"
        " keeps (`metrics.unknown_threshold`): lower rejects more inputs unlike its examples,"
        " and more of its own kind. Set on held-out folds; `metrics.cv_unknown_kept` says"
        " what a threshold set on other folds kept",
    )


MAX_DESCRIPTION_CHARS = 500
# In the document: what `HeadCreate._descriptions_fit` checks (some non-space, at most 500).
Description = Annotated[
    str,
    WithJsonSchema(
        {"type": "string", "minLength": 1, "maxLength": MAX_DESCRIPTION_CHARS, "pattern": "\\S"}
    ),
]


class HeadCreate(HeadSpec):
    # A whole request that trains a head: for readers, and for fuzzers' example phase.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "reviews",
                    "backbone": "auto",
                    "examples": [
                        {"label": "pos", "text": "Works great, love it"},
                        {"label": "pos", "text": "Exactly what I needed"},
                        {"label": "neg", "text": "Broke after a day"},
                        {"label": "neg", "text": "Waste of money"},
                    ],
                    "label_descriptions": {"pos": "a positive review", "neg": "a negative review"},
                }
            ]
        }
    )

    examples: list[Example] = Field(min_length=1)
    label_descriptions: dict[str, Description] = Field(
        default_factory=dict,
        description="text backbones only: a short description per label (default: the label"
        " itself), embedded as prior knowledge; cross-validation decides whether it is used",
        examples=[{"0": "a negative review", "1": "a positive review"}],
    )

    @model_validator(mode="after")
    def _descriptions_fit(self) -> HeadCreate:
        for label, description in self.label_descriptions.items():
            if not description.strip() or len(description) > MAX_DESCRIPTION_CHARS:
                raise ValueError(
                    f"the description of {label!r} must have 1 to {MAX_DESCRIPTION_CHARS}"
                    " characters"
                )
        return self


class ExamplesAdd(Strict):
    examples: list[Example] = Field(min_length=1)


class UnlabeledAdd(Strict):
    """Unlabelled examples of the domain the head will serve (its inputs, no labels)."""

    examples: list[Input] = Field(min_length=1)


class TrainingProgress(BaseModel):
    stage: Literal["embedding", "fitting", "fine_tuning", "adapting"] = Field(
        description="`embedding`: the new examples through the backbone (`done` of `total`"
        " rows); `fitting`: the head; `fine_tuning`: its top (`done` of `total` tunings:"
        " the held-out folds', then the final one); `adapting`: to its unlabelled examples"
    )
    done: int = Field(ge=0)
    total: int = Field(ge=0)


class HeadPublic(BaseModel):
    id: str
    name: str
    backbone: str
    labels: list[str]
    label_descriptions: dict[str, str]
    fine_tune: FineTuneMode
    unknown_keep: float = Field(description="as the head was created (HeadSpec)")
    status: Literal["training", "ready", "failed"]
    version: int = Field(description="0 until the first training finishes")
    metrics: HeadMetrics | None
    created_at: str
    updated_at: str
    error: str | None
    progress: TrainingProgress | None = Field(
        None,
        description="while a training runs: how far it is (updated about once a second;"
        " null until it starts, and once it ends). Also on a `ready` head: an `auto` head"
        " serves its frozen version while fine-tuning is compared, and a fine-tuned"
        " version follows if it measures better",
    )


class HeadList(BaseModel):
    heads: list[HeadPublic]

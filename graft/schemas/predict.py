"""Predicts' bodies: options, the request, the answer."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from graft.schemas.common import Strict
from graft.schemas.heads import Input


class PredictOptions(BaseModel):
    """How a predict is answered: in its JSON body, or as query parameters of image bodies."""

    top_k: int = Field(1, ge=1, le=1000, description="labels ranked per input")
    reject_unknown: bool = Field(
        False,
        description="answer `label: null` for inputs the head flags as unknown (far from all"
        " of its labels); `unknown` and the scores are given either way",
    )


class PredictRequest(PredictOptions, Strict):
    # Strict types in JSON, as the document says (`"reject_unknown": 0` is no boolean); the
    # same options as query parameters are strings, converted (PredictOptions).
    model_config = ConfigDict(
        strict=True,
        json_schema_extra={"examples": [{"inputs": [{"text": "Does what it says"}], "top_k": 2}]},
    )

    inputs: list[Input] = Field(min_length=1)

    @field_validator("top_k", mode="before")
    @classmethod
    def _whole_number(cls, value: object) -> object:
        # JSON Schema's integer is any number without a fraction, 2.0 too.
        return int(value) if isinstance(value, float) and value.is_integer() else value


class LabelScore(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    label: str | None = Field(
        description="the most probable label; null when `reject_unknown` and `unknown`"
    )
    score: float = Field(description="calibrated probability of the most probable label")
    unknown: bool = Field(
        description="the input's best similarity to the head's class means is below the"
        " head's `unknown_threshold`"
    )
    similarity: float | None = Field(
        description="best cosine similarity of the input's embedding to a class mean; null"
        " for a head version trained before heads kept class means"
    )
    top_k: list[LabelScore]


class PredictResponse(BaseModel):
    head_id: str
    version: int
    predictions: list[Prediction]

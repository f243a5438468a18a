"""Request and response bodies of the REST API; their types are the OpenAPI schema."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str = Field(examples=["head_not_found"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Tenants -------------------------------------------------------------------------------


class TenantCreate(_Strict):
    name: str = Field(min_length=1, max_length=200)


class TenantPublic(BaseModel):
    id: str
    name: str
    created_at: str


class TenantCreated(TenantPublic):
    api_key: str = Field(description="shown once; only a salted hash is stored")


class TenantKey(BaseModel):
    id: str
    api_key: str = Field(description="shown once; the tenant's previous key no longer works")


class TenantList(BaseModel):
    tenants: list[TenantPublic]


# Backbones -----------------------------------------------------------------------------


class BackbonePublic(BaseModel):
    id: str
    modality: Literal["image", "text"]
    embedding_dim: int
    description: str
    source: str
    license: str
    onnx_inputs: dict
    preprocessing: dict
    variants: list[str] = Field(description="variants model.onnx can be downloaded in")
    served_variant: str = Field(description="the variant this service runs (GRAFT_VARIANT)")


class BackboneList(BaseModel):
    backbones: list[BackbonePublic]


# Heads ---------------------------------------------------------------------------------


class Input(_Strict):
    """One input: an image as base64 of JPEG/PNG/WebP bytes, or a text."""

    image: str | None = Field(None, description="base64 of JPEG, PNG or WebP bytes")
    text: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Input:
        if (self.image is None) == (self.text is None):
            raise ValueError("give exactly one of 'image' or 'text'")
        return self


class Example(Input):
    label: str = Field(min_length=1)


class HeadSpec(_Strict):
    """What a head is called and which backbone it sits on (the multipart form fields)."""

    name: str = Field(min_length=1, max_length=200)
    backbone: str


class HeadCreate(HeadSpec):
    examples: list[Example] = Field(min_length=1)


class ExamplesAdd(_Strict):
    examples: list[Example] = Field(min_length=1)


class LabelMetrics(BaseModel):
    precision: float
    recall: float
    support: int


class HeadMetrics(BaseModel):
    n_examples: int
    label_counts: dict[str, int]
    cv_accuracy: float | None = Field(
        description="stratified k-fold cross-validated accuracy; null when some label has "
        "too few examples to hold any out"
    )
    cv_folds: int | None = None
    cv_macro_f1: float | None = Field(None, description="held-out macro-averaged F1")
    cv_ece: float | None = Field(
        None, description="expected calibration error of held-out scores, as served (10 bins)"
    )
    cv_ece_uncalibrated: float | None = Field(
        None, description="the same before temperature scaling"
    )
    temperature: float | None = Field(
        None, description="fitted on held-out scores and applied to every score; 1 = none"
    )
    cv_per_label: dict[str, LabelMetrics] | None = Field(
        None, description="held-out precision and recall per label"
    )
    cv_confusion_matrix: list[list[int]] | None = Field(
        None, description="held-out counts; rows: true label, columns: predicted, in `labels` order"
    )
    majority_baseline: float | None = Field(
        None, description="accuracy of always answering the most common label"
    )
    regularization_c: float | None = None
    warnings: list[str] = Field(
        default_factory=list, description="what to know before trusting these metrics"
    )
    train_seconds: float | None = None


class HeadPublic(BaseModel):
    id: str
    name: str
    backbone: str
    labels: list[str]
    status: Literal["training", "ready", "failed"]
    version: int = Field(description="0 until the first training finishes")
    metrics: HeadMetrics | None
    created_at: str
    updated_at: str
    error: str | None


class HeadList(BaseModel):
    heads: list[HeadPublic]


class PredictRequest(_Strict):
    inputs: list[Input] = Field(min_length=1)
    top_k: int = Field(1, ge=1, le=1000)


class LabelScore(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    label: str
    score: float
    top_k: list[LabelScore]


class PredictResponse(BaseModel):
    head_id: str
    version: int
    predictions: list[Prediction]


# Operations ------------------------------------------------------------------------------


class HeadCacheStats(BaseModel):
    heads: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int


class BatcherStats(BaseModel):
    batches: int
    rows: int
    mean_batch_size: float | None


class ServingStats(BaseModel):
    head_cache: HeadCacheStats
    batchers: dict[str, BatcherStats]

"""Request and response bodies of the REST API; their types are the OpenAPI schema. The
server validates with them and the client reads with them: pydantic only, so that the
client installs without the server's dependencies."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str = Field(examples=["head_not_found"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


def holds_control_characters(text: str) -> bool:
    """Control characters (NUL among them, which PostgreSQL cannot store) or lone
    surrogates (not UTF-8): refused in names and labels."""
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


def _printable(text: str) -> str:
    if holds_control_characters(text):
        raise ValueError("must not hold control characters")
    return text


# Patterns that say in the document what the server checks: no control characters
# (`_printable`, and labels in service/inputs.check_labels), and for a label some non-space.
_CONTROL = "\\u0000-\\u001f\\u007f-\\u009f"
Name = Annotated[
    str,
    Field(min_length=1, max_length=200, json_schema_extra={"pattern": f"^[^{_CONTROL}]*$"}),
    AfterValidator(_printable),
]
Label = Annotated[
    str,
    Field(
        min_length=1,
        json_schema_extra={
            "maxLength": 200,  # GRAFT_MAX_LABEL_CHARS's default
            "pattern": f"^[^{_CONTROL}]*[^\\s{_CONTROL}][^{_CONTROL}]*$",
        },
    ),
]


# Tenants -------------------------------------------------------------------------------


class TenantCreate(_Strict):
    name: Name


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
    modality: Literal["image", "text", "audio"]
    family: str = Field(description="architecture family: EfficientNet, MobileNet, MPNet, ...")
    embedding_dim: int
    description: str
    source: str = Field(description="where the weights come from: a package, or a local file")
    license: str
    onnx_inputs: dict
    preprocessing: dict
    variants: list[str] = Field(description="variants model.onnx can be downloaded in")
    served_variant: str = Field(description="the variant this service runs (GRAFT_VARIANT)")
    memory_bytes: int | None = Field(
        description="resident memory the runner's session took as it loaded (null until"
        " the runner has answered)"
    )
    ms_per_row: float | None = Field(
        description="a backbone pass over a batch of 4 typical rows (an image, or a sentence"
        " of about 30 tokens), per row, on one of the runner's lanes, measured at load"
    )
    speed_class: Literal["fast", "medium", "slow"] | None = Field(
        description="fast: at most 10 ms per row; medium: at most 40; slow: more"
    )
    depth_widths: list[int] | None = Field(
        None,
        description="the widths of the pooled features of each depth (an image network's"
        " stages, a text encoder's layers but the last) its pass computes beside the"
        " embedding; [] for a declared ONNX model, which gives no stages (null until the"
        " runner has answered)",
    )


class BackboneList(BaseModel):
    backbones: list[BackbonePublic]


# Heads ---------------------------------------------------------------------------------


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


class Input(_Strict):
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


FineTuneMode = Literal["auto", "on", "off"]


class HeadSpec(_Strict):
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


class ExamplesAdd(_Strict):
    examples: list[Example] = Field(min_length=1)


class UnlabeledAdd(_Strict):
    """Unlabelled examples of the domain the head will serve (its inputs, no labels)."""

    examples: list[Input] = Field(min_length=1)


class LabelMetrics(BaseModel):
    precision: float
    recall: float
    support: int


class ReliabilityBin(BaseModel):
    confidence: float = Field(description="mean top score of the held-out rows in this bin")
    accuracy: float = Field(description="share of them whose top label is right")
    count: int


class HeadCandidate(BaseModel):
    head_type: Literal["logistic_regression", "prototype"]
    regularization_c: float | None
    label_names: bool
    cv_accuracy: float
    cv_log_loss: float = Field(description="at its best temperature; the lowest is chosen")


class BackboneSelection(BaseModel):
    logme: dict[str, float] = Field(description="LogME of each backbone on the examples")
    shortlist: list[str] = Field(description="the best by LogME, on which heads were trained")
    cv_log_loss: dict[str, float | None]
    cv_accuracy: dict[str, float | None]
    chosen: str


class DomainReport(BaseModel):
    """How the head meets the domain of its unlabelled examples (POST /heads/{id}/unlabeled)."""

    n_unlabeled: int
    adapted: bool = Field(
        description="whether the served head is adapted to the unlabelled examples' domain"
        " (their mean embedding centred away, then self-trained on its confident predictions)"
    )
    decision: Literal[
        "too_few_unlabeled",
        "no_shift_beyond_label_proportions",
        "estimated_gain",
        "estimated_gain_too_small",
        "estimated_harm",
    ] = Field(
        description="why: too few unlabelled examples to judge; they differ from the labelled"
        " ones in label proportions only (nothing to adapt to); or the adapted head's estimated"
        " accuracy there beats the unadapted one's by 5 points or more (gain: adapted), by"
        " less (too small: the estimate errs by that much; not adapted), or falls below it"
        " (harm: not adapted)"
    )
    domain_distance: float | None = Field(
        None,
        description="held-out balanced accuracy of a classifier telling the unlabelled"
        " examples from the labelled ones: 0.5 when it cannot, 1 when they never overlap",
    )
    domain_distance_reweighted: float | None = Field(
        None,
        description="the same with the labelled examples reweighted to the label proportions"
        " the head predicts on the unlabelled ones: what those proportions do not explain",
    )
    estimated_accuracy: float | None = Field(
        None,
        description="the served head's accuracy on the unlabelled examples, estimated without"
        " their labels (COT, Lu et al. 2023); compare with `cv_accuracy`",
    )
    estimated_accuracy_unadapted: float | None = None
    estimated_accuracy_adapted: float | None = Field(
        None, description="estimated on unlabelled examples the adapted head did not train on"
    )
    unknown_share: float | None = Field(
        None, description="share of the unlabelled examples the served head flags as unknown"
    )
    adapt_seconds: float | None = None


class FineTuningCandidate(BaseModel):
    cv_accuracy: float
    cv_log_loss: float


class FineTuningReport(BaseModel):
    """Whether the head was fine-tuned on its own top, and what decided it."""

    requested: FineTuneMode
    chosen: Literal["fine_tuned", "frozen"]
    reason: str | None = Field(
        None, description="why nothing was compared (e.g. too few examples per label)"
    )
    candidates: dict[Literal["frozen", "fine_tuned"], FineTuningCandidate] | None = Field(
        None,
        description="both candidates' held-out scores on the same folds; each fold's top"
        " was tuned without the examples it is scored on",
    )
    cv_folds: int | None = None
    p_frozen_better: float | None = Field(
        None,
        description="one-sided exact McNemar p-value of the frozen head being more accurate"
        " on the held-out rows; `auto` keeps it frozen below 0.05",
    )
    top_bytes: int | None = Field(None, description="the head's own top: its LoRA factors, fp16")
    seconds: float | None = Field(None, description="time spent comparing and tuning")
    device: Literal["cpu", "cuda"] | None = Field(
        None, description="where the tops were tuned: `cuda` on a server on a GPU"
    )


class DepthCandidate(BaseModel):
    depths: int = Field(description="how many of the deepest depths beside the embedding")
    cv_accuracy: float
    cv_log_loss: float


class DepthsReport(BaseModel):
    """Which depths of the backbone's shared pass the head reads beside its embedding
    (each depth: a stage's or a layer's pooled output), chosen on its held-out folds."""

    chosen: int = Field(
        description="how many of the deepest depths it reads (0: the embedding alone); a"
        " candidate with depths must lower the held-out log-loss by 5% to be chosen"
    )
    cv_accuracy_gain: float = Field(
        description="held-out accuracy of the chosen candidate minus the embedding alone's"
    )
    candidates: list[DepthCandidate]


class HeadMetrics(BaseModel):
    n_examples: int
    label_counts: dict[str, int]
    cv_accuracy: float | None = Field(
        description="stratified k-fold cross-validated accuracy; null when some label has "
        "too few examples to hold any out"
    )
    cv_accuracy_margin: float | None = Field(
        None,
        description="half the 95% interval of `cv_accuracy` (normal approximation): the"
        " accuracy is cv_accuracy ± this",
    )
    cv_folds: int | None = None
    cv_macro_f1: float | None = Field(None, description="held-out macro-averaged F1")
    cv_ece: float | None = Field(
        None, description="expected calibration error of held-out scores, as served (10 bins)"
    )
    cv_ece_uncalibrated: float | None = Field(
        None, description="the same before temperature scaling"
    )
    cv_reliability: list[ReliabilityBin] | None = Field(
        None,
        description="the reliability diagram of held-out scores, as served: the top score's"
        " 10 equal-width bins that hold rows",
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
    head_type: Literal["logistic_regression", "prototype"] | None = Field(
        None, description="the head type chosen by held-out log-loss among `cv_candidates`"
    )
    regularization_c: float | None = Field(None, description="logistic regression's C")
    label_names: bool | None = Field(
        None, description="whether the label names or descriptions were used as prior knowledge"
    )
    cv_candidates: list[HeadCandidate] | None = Field(
        None, description="every head type compared; null when too few examples to compare"
    )
    unknown_threshold: float | None = Field(
        None,
        description="inputs whose best similarity to a class mean is below this are unknown;"
        " set to keep `unknown_keep` of held-out examples; null: too few examples",
    )
    unknown_keep: float | None = Field(
        None, description="the share of held-out examples the threshold was set to keep"
    )
    cv_unknown_kept: float | None = Field(
        None, description="share of held-out examples kept by a threshold set on other folds"
    )
    depths: DepthsReport | None = Field(
        None,
        description="which depths of the shared pass the head reads; null when it had too"
        " few examples to compare, or its backbone's rows carry no depths",
    )
    backbone_selection: BackboneSelection | None = Field(
        None, description="how an `auto` head chose its backbone"
    )
    domain: DomainReport | None = Field(
        None, description="present once the head has unlabelled examples"
    )
    fine_tuning: FineTuningReport | None = Field(
        None, description="present unless the head was created with `fine_tune: off`"
    )
    warnings: list[str] = Field(
        default_factory=list, description="what to know before trusting these metrics"
    )
    train_seconds: float | None = None


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


class PredictOptions(BaseModel):
    """How a predict is answered: in its JSON body, or as query parameters of image bodies."""

    top_k: int = Field(1, ge=1, le=1000, description="labels ranked per input")
    reject_unknown: bool = Field(
        False,
        description="answer `label: null` for inputs the head flags as unknown (far from all"
        " of its labels); `unknown` and the scores are given either way",
    )


class PredictRequest(PredictOptions, _Strict):
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


# Operations ------------------------------------------------------------------------------


class HeadCacheStats(BaseModel):
    heads: int = Field(description="heads held, summed over the API workers")
    bytes: int
    max_bytes: int = Field(description="the bound of each API worker's cache")
    hits: int
    misses: int
    workers: int = Field(description="API worker processes, each with a cache of its own")


class BatcherStats(BaseModel):
    batches: int
    rows: int
    training_rows: int = Field(description="rows of training jobs, run between predict batches")
    mean_batch_size: float | None
    pass_cpu_s: float = Field(
        description="CPU seconds of the threads that ran backbone passes (on the CPU, each"
        " pass runs on one thread: all of the backbone's CPU)"
    )


class ServingStats(BaseModel):
    head_cache: HeadCacheStats = Field(description="this API worker's head cache")
    batchers: dict[str, BatcherStats] = Field(
        description="the backbone runner's batchers, shared by every API worker"
    )

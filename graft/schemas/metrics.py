"""What a head says of itself: its held-out metrics, calibration, backbone choice,
fine-tuning, depths and domain."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from graft.schemas.common import FineTuneMode


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

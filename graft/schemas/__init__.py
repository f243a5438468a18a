"""Request and response bodies of the REST API, one module per resource; their types are
the OpenAPI schema. The server validates with them and the client reads with them:
pydantic only, so that the client installs without the server's dependencies. Every
body is importable from here (`from graft.schemas import HeadPublic`)."""

from __future__ import annotations

from graft.schemas.backbones import (
    BackboneList,
    BackbonePublic,
)
from graft.schemas.common import (
    ErrorDetail,
    ErrorResponse,
    FineTuneMode,
    Label,
    Name,
    Strict,
    holds_control_characters,
)
from graft.schemas.heads import (
    INPUT_FIELDS,
    MAX_DESCRIPTION_CHARS,
    Description,
    Example,
    ExamplesAdd,
    HeadCreate,
    HeadList,
    HeadPublic,
    HeadSpec,
    Input,
    TrainingProgress,
    UnlabeledAdd,
)
from graft.schemas.metrics import (
    BackboneSelection,
    DepthCandidate,
    DepthsReport,
    DomainReport,
    FineTuningCandidate,
    FineTuningReport,
    HeadCandidate,
    HeadMetrics,
    LabelMetrics,
    ReliabilityBin,
)
from graft.schemas.predict import (
    LabelScore,
    Prediction,
    PredictOptions,
    PredictRequest,
    PredictResponse,
)
from graft.schemas.stats import (
    BatcherStats,
    HeadCacheStats,
    ServingStats,
)
from graft.schemas.tenants import (
    TenantCreate,
    TenantCreated,
    TenantKey,
    TenantList,
    TenantPublic,
)

__all__ = [
    "BackboneList",
    "BackbonePublic",
    "BackboneSelection",
    "BatcherStats",
    "DepthCandidate",
    "DepthsReport",
    "Description",
    "DomainReport",
    "ErrorDetail",
    "ErrorResponse",
    "Example",
    "ExamplesAdd",
    "FineTuneMode",
    "FineTuningCandidate",
    "FineTuningReport",
    "HeadCacheStats",
    "HeadCandidate",
    "HeadCreate",
    "HeadList",
    "HeadMetrics",
    "HeadPublic",
    "HeadSpec",
    "INPUT_FIELDS",
    "Input",
    "Label",
    "LabelMetrics",
    "LabelScore",
    "MAX_DESCRIPTION_CHARS",
    "Name",
    "PredictOptions",
    "PredictRequest",
    "PredictResponse",
    "Prediction",
    "ReliabilityBin",
    "ServingStats",
    "Strict",
    "TenantCreate",
    "TenantCreated",
    "TenantKey",
    "TenantList",
    "TenantPublic",
    "TrainingProgress",
    "UnlabeledAdd",
    "holds_control_characters",
]

"""Backbones' bodies: what `GET /v1/backbones` says of each."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


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

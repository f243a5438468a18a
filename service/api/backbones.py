"""/v1/backbones (public): the backbones this server loads, and a text model's tokenizer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from graft.schemas import BackboneList, BackbonePublic
from models.quantize import VARIANTS
from service.api.document import ERRORS
from service.auth import AppDep
from service.core import Application
from service.errors import NotFound

router = APIRouter(prefix="/backbones", tags=["backbones"])


def speed_class(ms_per_row: float) -> str:
    """A backbone's pace on this server, per row on one of its lanes: `fast` keeps up with
    image decoding and HTTP on the same core; `slow` dominates them."""
    if ms_per_row <= 10:
        return "fast"
    return "medium" if ms_per_row <= 40 else "slow"


def _public(graft: Application, backbone_id: str) -> dict:
    """The backbone as declared, with what this server serves of it and measured."""
    measured = graft.backbone_measures().get(backbone_id, {})
    ms_per_row = measured.get("ms_per_row")
    return {
        **graft.backbones[backbone_id].public(),
        "variants": list(VARIANTS),
        "served_variant": graft.settings.variant,
        "memory_bytes": measured.get("memory_bytes"),
        "ms_per_row": ms_per_row,
        "speed_class": None if ms_per_row is None else speed_class(ms_per_row),
        "depth_widths": measured.get("depth_widths"),
    }


@router.get("", response_model=BackboneList)
def list_backbones(graft: AppDep) -> dict:
    return {"backbones": [_public(graft, backbone_id) for backbone_id in graft.backbones]}


@router.get("/{backbone_id}", response_model=BackbonePublic, responses=ERRORS)
def get_backbone(backbone_id: str, graft: AppDep) -> dict:
    graft.backbone_spec(backbone_id)  # 404 for an unknown id
    return _public(graft, backbone_id)


@router.get("/{backbone_id}/tokenizer.json", responses=ERRORS)
def get_tokenizer(backbone_id: str, graft: AppDep) -> FileResponse:
    """The tokenizer (Hugging Face `tokenizers` JSON) that makes a text model's inputs."""
    spec = graft.backbone_spec(backbone_id)
    tokenizer_file = getattr(spec.preprocessing, "tokenizer_file", None)
    if tokenizer_file is None:
        raise NotFound(f"backbone {backbone_id} takes images", code="no_tokenizer")
    return FileResponse(tokenizer_file(), media_type="application/json")

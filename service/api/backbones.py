"""/v1/backbones (public): the backbones this server loads, and a text model's tokenizer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from graft.schemas import BackboneList, BackbonePublic
from service.api.document import ERRORS
from service.auth import AppDep
from service.errors import NotFound

router = APIRouter(prefix="/backbones", tags=["backbones"])


@router.get("", response_model=BackboneList)
def list_backbones(graft: AppDep) -> dict:
    return {"backbones": [graft.backbone_public(backbone_id) for backbone_id in graft.backbones]}


@router.get("/{backbone_id}", response_model=BackbonePublic, responses=ERRORS)
def get_backbone(backbone_id: str, graft: AppDep) -> dict:
    graft.backbone_spec(backbone_id)  # 404 for an unknown id
    return graft.backbone_public(backbone_id)


@router.get("/{backbone_id}/tokenizer.json", responses=ERRORS)
def get_tokenizer(backbone_id: str, graft: AppDep) -> FileResponse:
    """The tokenizer (Hugging Face `tokenizers` JSON) that makes a text model's inputs."""
    spec = graft.backbone_spec(backbone_id)
    tokenizer_file = getattr(spec.preprocessing, "tokenizer_file", None)
    if tokenizer_file is None:
        raise NotFound(f"backbone {backbone_id} takes images", code="no_tokenizer")
    return FileResponse(tokenizer_file(), media_type="application/json")

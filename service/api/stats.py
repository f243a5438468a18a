"""/v1/stats (admin key): what the predict path holds and does."""

from __future__ import annotations

from fastapi import APIRouter

from graft.schemas import ServingStats
from service.api.document import ERRORS
from service.auth import AdminOnly, AppDep

router = APIRouter(prefix="/stats", tags=["operations (admin)"], dependencies=[AdminOnly])


@router.get("", response_model=ServingStats, responses=ERRORS)
def serving_stats(graft: AppDep) -> dict:
    """What the predict path holds and does: the head cache and the batchers."""
    return graft.stats()

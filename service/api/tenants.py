"""/v1/tenants (admin key): tenants and their keys."""

from __future__ import annotations

from fastapi import APIRouter, Response

from graft.schemas import TenantCreate, TenantCreated, TenantKey, TenantList
from service.api.document import ERRORS
from service.auth import AdminOnly, AppDep

router = APIRouter(prefix="/tenants", tags=["tenants (admin)"], dependencies=[AdminOnly])


@router.post("", status_code=201, response_model=TenantCreated, responses=ERRORS)
def create_tenant(body: TenantCreate, graft: AppDep) -> dict:
    tenant, api_key = graft.store.create_tenant(name=body.name)
    return {**tenant.public(), "api_key": api_key}


@router.get("", response_model=TenantList, responses=ERRORS)
def list_tenants(graft: AppDep) -> dict:
    return {"tenants": [t.public() for t in graft.store.list_tenants()]}


@router.delete("/{tenant_id}", status_code=204, responses=ERRORS)
def delete_tenant(tenant_id: str, graft: AppDep) -> Response:
    graft.delete_tenant(tenant_id)
    return Response(status_code=204)


@router.post("/{tenant_id}/key", response_model=TenantKey, responses=ERRORS)
def rotate_key(tenant_id: str, graft: AppDep) -> dict:
    """Issue the tenant a new API key; the old one is refused from now on."""
    return {"id": tenant_id, "api_key": graft.rotate_key(tenant_id)}

"""Tenants' bodies: creating one, its key, the list."""

from __future__ import annotations

from pydantic import BaseModel, Field

from graft.schemas.common import Name, Strict


class TenantCreate(Strict):
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

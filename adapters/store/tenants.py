"""Tenants and their API keys (stored only as salted hashes)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

import sqlalchemy as sa

from adapters.store.engine import Database, utc_now
from adapters.store.records import Tenant
from adapters.store.tables import tenants

KEY_PREFIX = "graft"


def _hash_secret(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


class Tenants(Database):
    def create_tenant(self, *, name: str) -> tuple[Tenant, str]:
        """A new tenant and its API key; the key is returned once and stored only hashed."""
        tenant = Tenant(id=uuid.uuid4().hex, name=name, created_at=utc_now())
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._tx() as db:
            db.execute(
                tenants.insert().values(
                    id=tenant.id,
                    name=name,
                    key_salt=salt,
                    key_hash=_hash_secret(salt, secret),
                    created_at=tenant.created_at,
                )
            )
        return tenant, f"{KEY_PREFIX}_{tenant.id}_{secret}"

    def list_tenants(self) -> list[Tenant]:
        query = sa.select(tenants.c.id, tenants.c.name, tenants.c.created_at).order_by(
            tenants.c.created_at
        )
        with self._read() as db:
            return [Tenant(*row) for row in db.execute(query)]

    def delete_tenant(self, *, tenant_id: str) -> bool:
        """Removes the tenant, its heads, their examples and its cached embeddings."""
        with self._tx() as db:
            deleted = db.execute(tenants.delete().where(tenants.c.id == tenant_id)).rowcount > 0
            if deleted:
                self._changed(db)
            return deleted

    def rotate_key(self, *, tenant_id: str) -> str | None:
        """A new API key for the tenant; the old one stops working at once."""
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._tx() as db:
            result = db.execute(
                tenants.update()
                .where(tenants.c.id == tenant_id)
                .values(key_salt=salt, key_hash=_hash_secret(salt, secret))
            )
            if result.rowcount == 0:
                return None
            self._changed(db)
        return f"{KEY_PREFIX}_{tenant_id}_{secret}"

    def authenticate(self, *, api_key: str) -> Tenant | None:
        prefix, _, rest = api_key.partition("_")
        tenant_id, _, secret = rest.partition("_")
        if prefix != KEY_PREFIX or not tenant_id or not secret:
            return None
        with self._read() as db:
            row = db.execute(_TENANT_KEY, {"tenant_id": tenant_id}).first()
        if row is None or not hmac.compare_digest(_hash_secret(row[3], secret), bytes(row[4])):
            return None
        return Tenant(*row[:3])


_TENANT_KEY = sa.select(
    tenants.c.id, tenants.c.name, tenants.c.created_at, tenants.c.key_salt, tenants.c.key_hash
).where(tenants.c.id == sa.bindparam("tenant_id"))

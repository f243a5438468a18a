"""Bearer-key authentication: the admin key and per-tenant keys."""

from __future__ import annotations

import hmac
import logging
import math
import os
import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from adapters.store import Tenant
from service.core import Application
from service.errors import Forbidden, TooManyRequests, Unauthorized
from service.settings import Settings

log = logging.getLogger(__name__)

bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def resolve_admin_key(settings: Settings) -> str:
    """GRAFT_ADMIN_KEY, else <data_dir>/admin.key, created (mode 0600) when missing."""
    if settings.admin_key:
        return settings.admin_key
    path = settings.admin_key_path
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole to a private temporary file, then linked into place: a crash never
        # leaves an empty key file, and of two processes starting at once one key wins.
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            log.warning("generated an admin key in %s (readable by this user only)", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


# The dependencies are coroutines: FastAPI runs a plain function on a thread of its pool,
# a hop per dependency per request. Their reads (an indexed SQLite read, a rate bucket
# in a local file) take microseconds and never wait on a lock for long (WAL).
async def get_application(request: Request) -> Application:
    return request.app.state.graft


AppDep = Annotated[Application, Depends(get_application)]


def _key(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("send 'Authorization: Bearer <api key>'", code="missing_api_key")
    return credentials.credentials


def _is_admin(request: Request, key: str) -> bool:
    return hmac.compare_digest(key.encode(), request.app.state.admin_key.encode())


async def current_tenant(request: Request, graft: AppDep, credentials: Credentials) -> Tenant:
    key = _key(credentials)
    tenant = graft.keys.authenticate(key)
    if tenant is None:
        if _is_admin(request, key):
            raise Forbidden("the admin key cannot act as a tenant", code="tenant_key_required")
        raise Unauthorized("the API key is not valid", code="invalid_api_key")
    wait = graft.rate_limiter.wait_needed(tenant.id)
    if wait:
        raise TooManyRequests(
            f"over {graft.settings.rate_limit_per_s:g} requests per second for this tenant;"
            f" retry in {wait:.2f} s",
            headers={"Retry-After": str(math.ceil(wait))},
        )
    return tenant


async def require_admin(request: Request, graft: AppDep, credentials: Credentials) -> None:
    key = _key(credentials)
    if _is_admin(request, key):
        return
    if graft.keys.authenticate(key) is not None:
        raise Forbidden("this route needs the admin key", code="admin_key_required")
    raise Unauthorized("the API key is not valid", code="invalid_api_key")


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
AdminOnly = Depends(require_admin)


def main() -> None:
    """`python -m service.auth`: make sure an admin key exists and say where it is."""
    settings = Settings()
    resolve_admin_key(settings)
    where = "GRAFT_ADMIN_KEY" if settings.admin_key else str(settings.admin_key_path)
    print(f"graft: the admin key is in {where}")


if __name__ == "__main__":
    main()

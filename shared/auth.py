"""Staff authentication: API keys stored hashed, with roles, and an audit log of staff actions.

Roles nest: an `admin` may do what a `publisher` may, a `publisher` what an `editor` may.
Requests send `Authorization: Bearer <key>`; no or an unknown/revoked key is 401, a too-weak role 403.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Security, status
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import Database, InfraTables, utcnow

ROLES = ("editor", "publisher", "admin")
KEY_PREFIX = "bp_"


def hash_key(key: str) -> str:
    # Keys are 256-bit random strings, so a plain SHA-256 (no salt, no stretching) is enough
    # and lets a request find its key with one indexed lookup.
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Staff:
    key_id: str
    name: str
    role: str

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


async def register_key(db: Database, infra: InfraTables, key: str, role: str, name: str) -> str:
    """Store a key (hashed); registering the same key again updates its role and name."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    digest = hash_key(key)
    async with db.transaction() as s:
        existing = await s.scalar(select(infra.api_keys.c.id).where(infra.api_keys.c.key_hash == digest))
        if existing:
            await s.execute(update(infra.api_keys).where(infra.api_keys.c.id == existing)
                            .values(role=role, name=name, revoked_at=None))
            return str(existing)
        key_id = "key_" + digest[:16]  # the same id in every service's database
        await s.execute(insert(infra.api_keys).values(
            id=key_id, name=name, role=role, key_hash=digest, prefix=key[:10], created_at=utcnow()))
        return key_id


async def list_keys(db: Database, infra: InfraTables) -> list[dict[str, Any]]:
    t = infra.api_keys
    async with db.sessions() as s:
        rows = (await s.execute(select(t.c.id, t.c.name, t.c.role, t.c.prefix, t.c.created_at, t.c.revoked_at)
                                .order_by(t.c.created_at))).all()
    return [dict(r._mapping) for r in rows]


async def revoke_key(db: Database, infra: InfraTables, key_id_or_prefix: str) -> int:
    t = infra.api_keys
    async with db.transaction() as s:
        result = await s.execute(
            update(t).where((t.c.id == key_id_or_prefix) | (t.c.prefix == key_id_or_prefix))
            .where(t.c.revoked_at.is_(None)).values(revoked_at=utcnow()))
        return result.rowcount or 0


async def authenticate(db: Database, infra: InfraTables, authorization: str | None) -> Staff:
    unauthorized = HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid staff API key is required",
                                 headers={"WWW-Authenticate": "Bearer"})
    if not authorization or not authorization.lower().startswith("bearer "):
        raise unauthorized
    key = authorization[7:].strip()
    t = infra.api_keys
    async with db.sessions() as s:
        row = (await s.execute(select(t.c.id, t.c.name, t.c.role)
                               .where(t.c.key_hash == hash_key(key), t.c.revoked_at.is_(None)))).first()
    if row is None:
        raise unauthorized
    return Staff(key_id=row.id, name=row.name, role=row.role)


# So that OpenAPI shows the scheme on every staff operation, with the role it needs as the requirement's
# scope (OpenAPI 3.1: role names for non-OAuth schemes); `authenticate` reads the header itself.
_bearer = HTTPBearer(auto_error=False, description="A staff API key (`bridgepost api-key create --role …`)")


def require_role(role: str):
    """FastAPI dependency: the authenticated staff member, who must have at least `role`.

    The dependency carries the role as `required_role`, so tests and docs can tell from a route
    which role it needs (see `staff_routes`).
    """
    if role not in ROLES:
        raise ValueError(role)

    async def dependency(request: Request,
                         _scheme: HTTPAuthorizationCredentials | None = Security(_bearer, scopes=[role])) -> Staff:
        state = request.app.state
        staff = await authenticate(state.db, state.infra, request.headers.get("authorization"))
        if not staff.may(role):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this needs the role {role!r}")
        return staff

    dependency.required_role = role  # type: ignore[attr-defined]
    return dependency


def required_role(dependant: Dependant) -> str | None:
    """The role a route (its dependency tree) requires, or None for a public route."""
    roles = [getattr(dependant.call, "required_role", None), *(required_role(d) for d in dependant.dependencies)]
    found = [r for r in roles if r]
    return max(found, key=ROLES.index) if found else None


def _api_routes(routes: Iterable[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif (router := getattr(route, "original_router", None)) is not None:  # newer FastAPI keeps includes
            yield from _api_routes(router.routes)


def staff_routes(app: FastAPI) -> list[tuple[APIRoute, str]]:
    """Every route of `app` that needs a staff key, with the role it needs."""
    return [(route, role) for route in _api_routes(app.routes) if (role := required_role(route.dependant))]


async def audit(session: AsyncSession, infra: InfraTables, staff: Staff, action: str,
                target: str | None = None, **details: Any) -> None:
    """Write one staff action to the audit log, inside the action's own transaction."""
    await session.execute(insert(infra.audit_log).values(
        occurred_at=utcnow(), actor=f"{staff.name} ({staff.key_id})", role=staff.role, action=action,
        target=target, details=details))

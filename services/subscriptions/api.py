"""JSON API: the public sign-up and the staff API for subscribers (admin role: personal data)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import func, select

from services.subscriptions import store
from services.subscriptions.domain import SignupRequest, Status, normalise_email
from services.subscriptions.usecases import RateLimited, RequestContext, Subscriptions
from shared.auth import Staff, audit, require_role
from shared.taxonomy import load_taxonomy
from shared.web import STAFF_ERRORS, client_ip, json_errors

router = APIRouter(prefix="/api/v1")
s_ = store.subscribers
Admin = Annotated[Staff, Depends(require_role("admin"))]
ADMIN_404 = {**STAFF_ERRORS, **json_errors(404)}


class Accepted(BaseModel):
    status: Literal["accepted"] = "accepted"
    message: str = "If the address is valid, a confirmation mail is on its way."


class Subscriber(BaseModel):
    id: str
    email: str | None
    name: str | None
    status: str
    language: str
    topics: list[str]
    regions: list[str]
    audience: str
    groups: list[str]
    hard_bounces: int
    created_at: Any
    updated_at: Any
    confirmed_at: Any | None


class SubscriberPage(BaseModel):
    items: list[Subscriber]
    total: int
    limit: int
    offset: int


class SubscriberPatch(BaseModel):
    groups: list[str] | None = Field(None, description="Partner groups (SPEC §2.4 keys)")
    audience: Literal["public", "partner"] | None = None

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        known = set(load_taxonomy().keys("groups"))
        unknown = [g for g in value if g not in known]
        if unknown:
            raise ValueError(f"unknown partner groups: {', '.join(unknown[:5])}")
        return list(dict.fromkeys(value))


def _subscriptions(request: Request) -> Subscriptions:
    return request.app.state.subscriptions


@router.post("/subscriptions", status_code=202, response_model=Accepted, tags=["public"],
             responses=json_errors(413, 429))
async def subscribe(signup: SignupRequest, request: Request) -> Any:
    """Sign up (double opt-in). The answer is the same whether or not the address is known."""
    settings = request.app.state.settings
    ctx = RequestContext(ip=client_ip(request, settings.trust_forwarded_for),
                         user_agent=request.headers.get("user-agent"), source="api",
                         correlation_id=request.state.correlation_id)
    try:
        await request.app.state.admission.request_subscription(signup, ctx)
    except RateLimited as exc:
        return JSONResponse({"detail": "too many sign-ups, try again later"}, status_code=429,
                            headers={"Retry-After": str(exc.retry_after)})
    return Accepted()


def _subscriber(row) -> Subscriber:
    return Subscriber(**{k: v for k, v in row._mapping.items() if k in Subscriber.model_fields})


async def _row(request: Request, subscriber_id: str):
    async with request.app.state.db.sessions() as s:
        row = (await s.execute(select(s_).where(s_.c.id == subscriber_id))).first()
    if row is None:
        raise HTTPException(404, "no such subscriber")
    return row


@router.get("/subscribers", response_model=SubscriberPage, tags=["staff"], responses=STAFF_ERRORS)
async def list_subscribers(
    request: Request, staff: Admin,
    email: str | None = Query(None, max_length=320), status: Status | None = Query(None),
    group: str | None = Query(None, max_length=64), region: str | None = Query(None, max_length=64),
    topic: str | None = Query(None, max_length=64), language: str | None = Query(None, max_length=8),
    limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0),
) -> SubscriberPage:
    query = select(s_)
    if email:
        try:
            query = query.where(s_.c.email == normalise_email(email))
        except ValueError:
            query = query.where(s_.c.email == email.strip().lower())
    if status:
        query = query.where(s_.c.status == status)
    if language:
        query = query.where(s_.c.language == language)
    rows = []
    async with request.app.state.db.sessions() as s:
        # JSON list membership is filtered here, not in SQL, to work the same on SQLite and PostgreSQL.
        for row in (await s.execute(query.order_by(s_.c.created_at))).all():
            if group and group not in row.groups or region and region not in row.regions \
                    or topic and topic not in row.topics:
                continue
            rows.append(row)
    return SubscriberPage(items=[_subscriber(r) for r in rows[offset:offset + limit]], total=len(rows),
                          limit=limit, offset=offset)


@router.get("/subscribers/{subscriber_id}", response_model=Subscriber, tags=["staff"], responses=ADMIN_404)
async def get_subscriber(subscriber_id: str, request: Request, staff: Admin) -> Subscriber:
    return _subscriber(await _row(request, subscriber_id))


@router.patch("/subscribers/{subscriber_id}", response_model=Subscriber, tags=["staff"], responses=ADMIN_404)
async def patch_subscriber(subscriber_id: str, patch: SubscriberPatch, request: Request, staff: Admin) -> Subscriber:
    """Assign partner groups and the audience kind (staff only; subscribers cannot set these)."""
    subscriptions = _subscriptions(request)
    async with request.app.state.db.transaction() as s:
        row = (await s.execute(select(s_).where(s_.c.id == subscriber_id).with_for_update())).first()
        if row is None or row.status == "erased":
            raise HTTPException(404, "no such subscriber")
        groups = patch.groups if patch.groups is not None else list(row.groups)
        audience = patch.audience or ("partner" if patch.groups else row.audience)
        await subscriptions.set_groups(s, row, audience, groups)
        await audit(s, store.infra, staff, "subscriber.groups", subscriber_id, groups=groups, audience=audience)
    return _subscriber(await _row(request, subscriber_id))


@router.get("/subscribers/{subscriber_id}/export", tags=["staff"], responses=ADMIN_404)
async def export_subscriber(subscriber_id: str, request: Request, staff: Admin) -> JSONResponse:
    """GDPR Art. 15 export: everything stored about one subscriber, including the consent log."""
    row = await _row(request, subscriber_id)
    async with request.app.state.db.transaction() as s:
        consent = (await s.execute(select(store.consent_log).where(store.consent_log.c.subscriber_id == subscriber_id)
                                   .order_by(store.consent_log.c.id))).all()
        await audit(s, store.infra, staff, "subscriber.export", subscriber_id)
    body = {"subscriber": _subscriber(row).model_dump(mode="json"),
            "consent_log": [{k: (v.isoformat() if hasattr(v, "isoformat") else v)
                             for k, v in c._mapping.items()} for c in consent]}
    disposition = f'attachment; filename="subscriber-{subscriber_id}.json"'
    return JSONResponse(body, headers={"Content-Disposition": disposition})


@router.delete("/subscribers/{subscriber_id}", status_code=200, tags=["staff"], responses=ADMIN_404)
async def erase_subscriber(subscriber_id: str, request: Request, staff: Admin) -> dict[str, str]:
    """GDPR erasure: personal data removed, the address hash kept on the suppression list."""
    subscriptions = _subscriptions(request)
    async with request.app.state.db.transaction() as s:
        row = (await s.execute(select(s_).where(s_.c.id == subscriber_id).with_for_update())).first()
        if row is None:
            raise HTTPException(404, "no such subscriber")
        if row.status != "erased":
            await subscriptions.erase(s, row, RequestContext(None, None, "staff",
                                                             request.state.correlation_id))
            await audit(s, store.infra, staff, "subscriber.erase", subscriber_id)
    return {"id": subscriber_id, "status": "erased"}


@router.get("/suppressions/count", tags=["staff"], responses=STAFF_ERRORS)
async def suppression_count(request: Request, staff: Admin) -> dict[str, int]:
    async with request.app.state.db.sessions() as s:
        return {"count": int(await s.scalar(select(func.count()).select_from(store.suppressions)) or 0)}

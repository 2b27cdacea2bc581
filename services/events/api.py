"""JSON API of the events service: staff (create, change, publish, cancel, registrations) and public."""

from __future__ import annotations

import csv
import io
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, field_validator
from pydantic_core import PydanticCustomError
from sqlalchemy import func, select

from services.events import store
from services.events.domain import EventCreate, EventPatch, RegistrationIn, texts
from services.events.usecases import Conflict, Events, NotFound, RegistrationRefused
from shared.auth import Staff, audit, authenticate, require_role
from shared.messages import EventSnapshot
from shared.web import STAFF_ERRORS, client_ip, json_errors

router = APIRouter(prefix="/api/v1")
Editor = Annotated[Staff, Depends(require_role("editor"))]
Publisher = Annotated[Staff, Depends(require_role("publisher"))]
e_ = store.events
r_ = store.registrations


class EventOut(EventSnapshot):
    capacity: int | None
    registration_deadline: Any | None
    announce: bool
    segment: dict[str, Any]
    confirmed: int
    waitlisted: int
    places_left: int | None


class CancelIn(BaseModel):
    message: dict[str, str] = Field(default_factory=dict, description="Note to registrants by language")

    @field_validator("message")
    @classmethod
    def _message(cls, value: dict[str, str]) -> dict[str, str]:
        return texts(value, required_de=False, limit=2000)


class RegistrationOut(BaseModel):
    status: Literal["confirmed", "waitlisted"]
    registration_id: str
    position: int | None = Field(None, description="Place on the waiting list (1 = next)")


class RegistrationItem(BaseModel):
    id: str
    email: str
    name: str | None
    language: str
    status: str
    waitlist_position: int | None
    registered_at: str
    newsletter: bool


class RegistrationList(BaseModel):
    items: list[RegistrationItem]
    confirmed: int
    waitlisted: int


def _events(request: Request) -> Events:
    return request.app.state.events


def _unprocessable(exc: PydanticCustomError | ValueError) -> HTTPException:
    kind = exc.type if isinstance(exc, PydanticCustomError) else "value_error"
    return HTTPException(422, [{"loc": ["body"], "msg": str(exc), "type": kind}])


async def event_out(request: Request, row) -> EventOut:
    async with request.app.state.db.sessions() as s:
        counts = dict((await s.execute(select(r_.c.status, func.count()).where(r_.c.event_id == row.id)
                                       .group_by(r_.c.status))).all())
    snapshot = _events(request).snapshot(row)
    confirmed = counts.get("confirmed", 0)
    return EventOut(**snapshot.model_dump(), capacity=row.capacity, registration_deadline=row.registration_deadline,
                    announce=row.announce, segment=row.segment, confirmed=confirmed,
                    waitlisted=counts.get("waitlisted", 0),
                    places_left=None if row.capacity is None else max(0, row.capacity - confirmed))


async def _row(request: Request, event_id: str, staff_view: bool):
    async with request.app.state.db.sessions() as s:
        row = (await s.execute(select(e_).where(e_.c.id == event_id))).first()
    if row is None or (row.status == "draft" and not staff_view):
        raise HTTPException(404, "no such event")
    return row


async def _is_staff(request: Request) -> bool:
    if not request.headers.get("authorization"):
        return False
    try:
        await authenticate(request.app.state.db, store.infra, request.headers.get("authorization"))
        return True
    except HTTPException:
        return False


# --- staff ---------------------------------------------------------------------------------------------

@router.post("/events", status_code=201, response_model=EventOut, tags=["staff"], responses=STAFF_ERRORS)
async def create_event(data: EventCreate, request: Request, staff: Editor) -> EventOut:
    """Create a draft (invisible to the public until published)."""
    async with request.app.state.db.transaction() as s:
        event_id = await _events(request).create(s, data)
        await audit(s, store.infra, staff, "event.create", event_id, title=data.title.get("de"))
    return await event_out(request, await _row(request, event_id, True))


@router.patch("/events/{event_id}", response_model=EventOut, tags=["staff"],
              responses={**STAFF_ERRORS, **json_errors(404, 409)})
async def change_event(event_id: str, patch: EventPatch, request: Request, staff: Editor) -> EventOut:
    """Change an event. Editors change drafts; changing a published event needs a publisher."""
    row = await _row(request, event_id, True)
    if row.status != "draft" and not staff.may("publisher"):
        raise HTTPException(403, "changing a published event needs the role 'publisher'")
    try:
        async with request.app.state.db.transaction() as s:
            changes = await _events(request).patch(s, event_id, patch, request.state.correlation_id)
            if changes:
                await audit(s, store.infra, staff, "event.change", event_id, fields=sorted(changes))
    except (PydanticCustomError, ValueError) as exc:
        raise _unprocessable(exc) from exc
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from exc
    return await event_out(request, await _row(request, event_id, True))


@router.post("/events/{event_id}/publish", response_model=EventOut, tags=["staff"],
             responses={**STAFF_ERRORS, **json_errors(404, 409)})
async def publish_event(event_id: str, request: Request, staff: Publisher) -> EventOut:
    try:
        async with request.app.state.db.transaction() as s:
            await _events(request).publish(s, event_id, request.state.correlation_id)
            await audit(s, store.infra, staff, "event.publish", event_id)
    except NotFound as exc:
        raise HTTPException(404, "no such event") from exc
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from exc
    return await event_out(request, await _row(request, event_id, True))


@router.post("/events/{event_id}/cancel", response_model=EventOut, tags=["staff"],
             responses={**STAFF_ERRORS, **json_errors(404)})
async def cancel_event(event_id: str, request: Request, staff: Publisher, body: CancelIn | None = None) -> EventOut:
    """Cancel: registrants get a cancellation notice with METHOD:CANCEL."""
    message = (body or CancelIn()).message
    try:
        async with request.app.state.db.transaction() as s:
            await _events(request).cancel(s, event_id, message, request.state.correlation_id)
            await audit(s, store.infra, staff, "event.cancel", event_id)
    except NotFound as exc:
        raise HTTPException(404, "no such event") from exc
    return await event_out(request, await _row(request, event_id, True))


@router.get("/events/{event_id}/registrations", response_model=RegistrationList, tags=["staff"],
            responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
                       **STAFF_ERRORS, **json_errors(404)})
async def list_registrations(event_id: str, request: Request, staff: Publisher,
                             format: Literal["json", "csv"] = "json") -> Any:
    """Attendees and the waiting list in order; `?format=csv` for a spreadsheet."""
    await _row(request, event_id, True)
    async with request.app.state.db.transaction() as s:
        rows = (await s.execute(select(r_).where(r_.c.event_id == event_id).order_by(r_.c.seq))).all()
        await audit(s, store.infra, staff, "event.registrations", event_id, format=format)
    items, position = [], 0
    for r in rows:
        if r.status == "waitlisted":
            position += 1
        items.append({"id": r.id, "email": r.email, "name": r.name, "language": r.language, "status": r.status,
                      "waitlist_position": position if r.status == "waitlisted" else None,
                      "registered_at": r.created_at.isoformat(), "newsletter": r.newsletter})
    if format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(items[0]) if items else ["id"])
        writer.writeheader()
        for item in items:
            # Formula injection: a cell starting with = + - @ is text, not a formula, in spreadsheets.
            writer.writerow({k: ("'" + v if isinstance(v, str) and v[:1] in "=+-@" else v) for k, v in item.items()})
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers={
            "Content-Disposition": f'attachment; filename="registrations-{event_id}.csv"'})
    return {"items": items, "confirmed": sum(i["status"] == "confirmed" for i in items),
            "waitlisted": position}


# --- public ----------------------------------------------------------------------------------------------

@router.get("/events", response_model=list[EventOut], tags=["public"])
async def list_events(request: Request, region: str | None = Query(None, max_length=64),
                      topic: str | None = Query(None, max_length=64), kind: str | None = Query(None, max_length=64),
                      include_past: bool = False) -> list[EventOut]:
    """Upcoming published events (and cancelled ones, marked), soonest first."""
    rows = await request.app.state.listing(region=region, topic=topic, kind=kind, include_past=include_past)
    return [await event_out(request, r) for r in rows]


@router.get("/events/{event_id}", response_model=EventOut, tags=["public"], responses=json_errors(404))
async def get_event(event_id: str, request: Request) -> EventOut:
    return await event_out(request, await _row(request, event_id, await _is_staff(request)))


@router.post("/events/{event_id}/registrations", status_code=201, response_model=RegistrationOut, tags=["public"],
             responses={200: {"model": RegistrationOut, "description": "Registered before: that registration"},
                        **json_errors(404, 409, 413)})
async def register_json(event_id: str, data: RegistrationIn, request: Request) -> Any:
    """Register (JSON). The same as POST /events/{id}/register with a JSON body."""
    return await register(request, event_id, data)


async def register(request: Request, event_id: str, data: RegistrationIn) -> Any:
    if data.website:  # honeypot
        return JSONResponse({"status": "waitlisted", "registration_id": "", "position": None}, status_code=201)
    settings = request.app.state.settings
    try:
        result = await _events(request).register(
            event_id, data.email, data.name, data.language, data.newsletter,
            client_ip(request, settings.trust_forwarded_for), request.headers.get("user-agent"),
            request.state.correlation_id)
    except NotFound as exc:
        raise HTTPException(404, "no such event") from exc
    except RegistrationRefused as exc:
        raise HTTPException(409, {"reason": exc.reason, "message": REFUSALS[exc.reason]}) from exc
    body = RegistrationOut(status=result.status, registration_id=result.registration_id, position=result.position)
    return JSONResponse(body.model_dump(), status_code=201 if result.created else 200)


REFUSALS = {
    "not_published": "this event is not open for registration",
    "cancelled": "this event has been cancelled",
    "closed": "registration for this event has closed",
}

"""Public pages: the calendar, event pages with the registration form, the iCal feed, cancel links.

Server-rendered, seven languages, right-to-left for ar/fa, no JavaScript needed. GET changes nothing.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import func, select

from services.events import store
from services.events.api import REFUSALS, RegistrationOut, register
from services.events.domain import RegistrationIn, registration_open
from services.events.usecases import Events, NotFound, RegistrationRefused
from shared import ics
from shared.dates import when
from shared.db import utcnow
from shared.taxonomy import load_taxonomy
from shared.web import Pages, client_ip, form_body, json_errors, page_errors, read_form

router = APIRouter()
MAX_FORM_VALUES = 20
_HTML = {"text/html": {"schema": {"type": "string"}}}
# The event page's form gets pages; a JSON body gets JSON (the same as POST /api/v1/events/{id}/registrations).
REGISTER_RESPONSES: dict[int | str, dict[str, Any]] = {
    201: {"description": "Registered (a place or the waiting list)", "content": _HTML},
    200: {"description": "Registered before: that registration", "model": RegistrationOut, "content": _HTML},
    **{code: {**error, "content": _HTML} for code, error in json_errors(404, 409, 422).items()},
    **json_errors(413),
}
REGISTER_BODY = form_body(RegistrationIn)
REGISTER_BODY["requestBody"]["content"]["application/json"] = {"schema": RegistrationIn.model_json_schema()}


class CalendarResponse(Response):
    media_type = "text/calendar"  # Starlette adds the charset


def _state(request: Request) -> tuple[Events, Pages]:
    return request.app.state.events, request.app.state.pages


def view(events: Events, row, lang: str, counts: dict[str, int] | None = None) -> dict[str, Any]:
    taxonomy = load_taxonomy()
    confirmed = (counts or {}).get("confirmed", 0)
    return {
        "id": row.id, "title": row.title.get(lang) or row.title["de"],
        "title_lang": lang if row.title.get(lang) else "de",
        "description": row.description.get(lang) or row.description.get("de") or "",
        "kind": taxonomy.label("event_kinds", row.kind, lang), "region": taxonomy.label("regions", row.region, lang),
        "topics": [taxonomy.label("topics", t, lang) for t in row.topics],
        "when": when(row.starts_at, row.ends_at, lang, events.settings.timezone),
        "starts_iso": row.starts_at.isoformat(), "location_name": row.location_name,
        "location_address": row.location_address, "online_url": row.online_url, "status": row.status,
        "capacity": row.capacity,
        "places_left": None if row.capacity is None else max(0, row.capacity - confirmed),
    }


async def _counts(request: Request, event_id: str) -> dict[str, int]:
    async with request.app.state.db.sessions() as s:
        return dict((await s.execute(select(store.registrations.c.status, func.count())
                                     .where(store.registrations.c.event_id == event_id)
                                     .group_by(store.registrations.c.status))).all())


@router.get("/", include_in_schema=False)
async def home() -> Response:
    return RedirectResponse("/events", status_code=303)


@router.get("/events", response_class=HTMLResponse, tags=["public pages"])
async def calendar(request: Request, region: str = "", topic: str = "", kind: str = "") -> HTMLResponse:
    events, pages = _state(request)
    lang = pages.language(request)
    rows = await request.app.state.listing(region=region or None, topic=topic or None, kind=kind or None)
    items = [view(events, r, lang, await _counts(request, r.id)) for r in rows]
    return pages.render(request, "events.html", lang, items=items,
                        filters={"region": region, "topic": topic, "kind": kind})


@router.get("/events.ics", response_class=CalendarResponse, tags=["public pages"])
async def feed(request: Request, region: str = "", topic: str = "", lang: str = "de") -> Response:
    """iCalendar feed of upcoming events (subscribe to it in a calendar application)."""
    events, pages = _state(request)
    language = pages.tr.supported(lang) or "de"
    rows = await request.app.state.listing(region=region or None, topic=topic or None, kind=None)
    body = ics.feed([events.snapshot(r) for r in rows], language, request.app.state.domain,
                    request.app.state.settings.organisation_name)
    return CalendarResponse(body, headers={"Content-Disposition": 'inline; filename="events.ics"',
                                           "Cache-Control": "max-age=300"})


async def _event_row(request: Request, event_id: str):
    async with request.app.state.db.sessions() as s:
        row = (await s.execute(select(store.events).where(store.events.c.id == event_id))).first()
    if row is None or row.status == "draft":
        return None
    return row


def _not_found(request: Request, pages: Pages, lang: str) -> HTMLResponse:
    return pages.render(request, "message.html", lang, status_code=404,
                        title=pages.tr.gettext(lang, "events.not_found"),
                        text=pages.tr.gettext(lang, "events.not_found_text"), link="/events?lang=" + lang,
                        link_text=pages.tr.gettext(lang, "events.back"))


@router.get("/events/{event_id}", response_class=HTMLResponse, tags=["public pages"], responses=page_errors(404))
async def event_page(request: Request, event_id: str) -> HTMLResponse:
    events, pages = _state(request)
    lang = pages.language(request)
    row = await _event_row(request, event_id)
    if row is None:
        return _not_found(request, pages, lang)
    refused = registration_open(row.status, row.registration_deadline, row.starts_at, utcnow())
    return pages.render(request, "event.html", lang, event=view(events, row, lang, await _counts(request, row.id)),
                        refused=refused, form={"language": lang}, errors={})


@router.post("/events/{event_id}/register", status_code=201, response_model=RegistrationOut, tags=["public pages"],
             responses=REGISTER_RESPONSES, openapi_extra=REGISTER_BODY)
async def register_page(request: Request, event_id: str) -> Response:
    """Register from the event page's form, or with a JSON body (then the answer is JSON)."""
    events, pages = _state(request)
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = RegistrationIn.model_validate_json(await request.body())
        except ValidationError as exc:
            raise HTTPException(422, exc.errors(include_url=False, include_input=False)) from exc
        return await register(request, event_id, data)
    form = await read_form(request, MAX_FORM_VALUES)
    data = {k: v for k, v in (form or {}).items() if isinstance(v, str)}
    data["newsletter"] = data.get("newsletter") in ("true", "on", "yes", "1")
    lang = pages.language(request, data.get("language"))
    row = await _event_row(request, event_id)
    if row is None:
        return _not_found(request, pages, lang)
    event = view(events, row, lang, await _counts(request, row.id))
    if form is None:
        return pages.render(request, "event.html", lang, status_code=422, event=event, refused=None,
                            form={"language": lang}, errors={"form": pages.tr.gettext(lang, "errors.invalid")})
    try:
        reg = RegistrationIn.model_validate(data)
    except ValidationError as exc:
        errors = {}
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "form"
            key = {"email_invalid": "errors.email_invalid", "email_required": "errors.email_required",
                   "unknown_language": "errors.unknown_language"}.get(err["type"], "errors.invalid")
            errors.setdefault(field, pages.tr.gettext(lang, key))
        return pages.render(request, "event.html", lang, status_code=422, event=event, refused=None, form=data,
                            errors=errors)
    if reg.website:
        return pages.render(request, "registered.html", lang, event=event, status="waitlisted", position=None)
    try:
        result = await events.register(event_id, reg.email, reg.name, reg.language, reg.newsletter,
                                       client_ip(request, request.app.state.settings.trust_forwarded_for),
                                       request.headers.get("user-agent"), request.state.correlation_id)
    except NotFound:
        return _not_found(request, pages, lang)
    except RegistrationRefused as exc:
        return pages.render(request, "event.html", lang, status_code=409, event=event, refused=exc.reason,
                            form=data, errors={})
    return pages.render(request, "registered.html", lang, status_code=201 if result.created else 200, event=event,
                        status=result.status, position=result.position)


def _invalid_link(request: Request, pages: Pages, lang: str) -> HTMLResponse:
    return pages.render(request, "message.html", lang, status_code=404,
                        title=pages.tr.gettext(lang, "token.invalid_title"),
                        text=pages.tr.gettext(lang, "events.cancel.invalid"), link="/events?lang=" + lang,
                        link_text=pages.tr.gettext(lang, "events.back"))


@router.get("/registrations/cancel", response_class=HTMLResponse, tags=["public pages"], responses=page_errors(404))
async def cancel_page(request: Request, token: str = "") -> HTMLResponse:
    """Shows what would be cancelled and a button; changes nothing."""
    events, pages = _state(request)
    row, event = await events.registration_for_link(token)
    lang = pages.language(request, row.language if row else None)
    if row is None or event is None:
        return _invalid_link(request, pages, lang)
    return pages.render(request, "cancel.html", lang, event=view(events, event, lang), token=token,
                        already=row.status == "cancelled")


@router.post("/registrations/cancel", response_class=HTMLResponse, tags=["public pages"],
             responses={**page_errors(404), **json_errors(413, page=True)},
             openapi_extra=form_body(fields={"token": {"type": "string", "description": "From the link in the mail"}}))
async def cancel_submit(request: Request, token: str = "") -> HTMLResponse:
    events, pages = _state(request)
    form = await read_form(request, MAX_FORM_VALUES)
    token = token or str((form or {}).get("token") or "")
    ok, row = await events.cancel_registration(token, request.state.correlation_id)
    lang = pages.language(request, row.language if row else None)
    if not ok:
        return _invalid_link(request, pages, lang)
    return pages.render(request, "message.html", lang, title=pages.tr.gettext(lang, "events.cancel.done_title"),
                        text=pages.tr.gettext(lang, "events.cancel.done_text"), link="/events?lang=" + lang,
                        link_text=pages.tr.gettext(lang, "events.back"))


__all__ = ["router", "REFUSALS"]

"""Public pages: sign-up form, confirmation, unsubscribe (incl. RFC 8058 one-click), preferences.

GET never changes state (mail scanners follow links); every change is a POST.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from services.subscriptions.domain import Preferences, SignupRequest
from services.subscriptions.usecases import TRUSTED_SOURCES, RateLimited, RequestContext, Subscriptions
from shared.web import Pages, client_ip, form_body, json_errors, page_errors, read_form

router = APIRouter()
MAX_FORM_VALUES = 100
TOKEN = {"type": "string", "description": "The token from the link in the mail"}


def _state(request: Request) -> tuple[Subscriptions, Pages]:
    return request.app.state.subscriptions, request.app.state.pages


def _ctx(request: Request, source: str) -> RequestContext:
    settings = request.app.state.settings
    return RequestContext(ip=client_ip(request, settings.trust_forwarded_for),
                          user_agent=request.headers.get("user-agent"), source=source,
                          correlation_id=request.state.correlation_id)


async def _form(request: Request) -> dict[str, Any] | None:
    """The form's values (lists for topics and regions), or None when it cannot be read."""
    form = await read_form(request, MAX_FORM_VALUES)
    if form is None:
        return None
    data: dict[str, Any] = {}
    for key in set(form.keys()):
        values = [v for v in form.getlist(key) if isinstance(v, str)]
        data[key] = values if key in ("topics", "regions") else (values[0] if values else "")
    return data


def _source(data: dict[str, Any]) -> str:
    """The form's `source` label (where the form is embedded), as it goes into the consent log: printable
    characters only (a NUL would fail in PostgreSQL), at most 64."""
    value = data.get("source")
    return "".join(c for c in value if c.isprintable())[:64] or "form" if isinstance(value, str) else "form"


def field_errors(exc: ValidationError, pages: Pages, language: str) -> dict[str, str]:
    """Validation errors as messages in the visitor's language, one per field."""
    errors: dict[str, str] = {}
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "form"
        kind = err["type"]
        ctx = err.get("ctx") or {}
        if field == "consent":
            key, values = "errors.consent_required", {}
        elif field == "email" and kind in ("missing", "email_required"):
            key, values = "errors.email_required", {}
        elif kind in ("email_invalid", "unknown_language", "consent_required"):
            key, values = f"errors.{kind}", {}
        elif kind in ("unknown_topic", "unknown_region"):
            key, values = f"errors.{kind}", {"value": ctx.get("value", "")}
        elif kind in ("too_long", "string_too_long", "too_long_list"):
            key, values = "errors.too_long", {"max": ctx.get("max", ctx.get("max_length", ""))}
        else:
            key, values = "errors.invalid", {}
        errors.setdefault(field, pages.tr.gettext(language, key, **values))
    return errors


@router.get("/", include_in_schema=False)
async def home() -> Response:
    return RedirectResponse("/subscribe", status_code=303)


@router.get("/subscribe", response_class=HTMLResponse, tags=["public pages"])
async def subscribe_form(request: Request, source: str = "form") -> HTMLResponse:
    _, pages = _state(request)
    lang = pages.language(request)
    return pages.render(request, "subscribe.html", lang, form={"language": lang}, errors={}, source=source[:64])


@router.post("/subscribe", response_class=HTMLResponse, tags=["public pages"],
             responses={**page_errors(422, 429), **json_errors(413, page=True)},
             openapi_extra=form_body(SignupRequest, {"source": {"type": "string", "maxLength": 64}}))
async def subscribe_submit(request: Request) -> HTMLResponse:
    _, pages = _state(request)
    data = await _form(request)
    if data is None:
        lang = pages.language(request)
        return pages.render(request, "subscribe.html", lang, status_code=422, form={"language": lang},
                            errors={"form": pages.tr.gettext(lang, "errors.invalid")}, source="form")
    lang = pages.language(request, data.get("language") if isinstance(data.get("language"), str) else None)
    data["consent"] = str(data.get("consent", "")).lower() in ("true", "on", "yes", "1")
    try:
        signup = SignupRequest.model_validate(data)
    except ValidationError as exc:
        return pages.render(request, "subscribe.html", lang, status_code=422, form=data,
                            errors=field_errors(exc, pages, lang), source=_source(data))
    try:
        source = _source(data)
        # The form's source is only a label; the sources gated elsewhere skip the per-IP limit.
        await request.app.state.admission.request_subscription(
            signup, _ctx(request, "form" if source in TRUSTED_SOURCES else source))
    except RateLimited as exc:
        response = _message(request, pages, lang, "subscribe.limited", status_code=429)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    return _message(request, pages, signup.language, "subscribe.done", status_code=200)


def _message(request: Request, pages: Pages, lang: str, prefix: str, status_code: int = 200,
             title_key: str = "title", text_key: str = "text", link: bool = False) -> HTMLResponse:
    return pages.render(request, "message.html", lang, status_code=status_code,
                        title=pages.tr.gettext(lang, f"{prefix}.{title_key}"),
                        text=pages.tr.gettext(lang, f"{prefix}.{text_key}"),
                        link="/subscribe?lang=" + lang if link else None,
                        link_text=pages.tr.gettext(lang, "common.back_to_form"))


def _invalid_token(request: Request, pages: Pages, lang: str | None) -> HTMLResponse:
    lang = pages.language(request, lang)
    return _message(request, pages, lang, "token", status_code=404, title_key="invalid_title",
                    text_key="invalid_text", link=True)


@router.get("/confirm", response_class=HTMLResponse, tags=["public pages"], responses=page_errors(404))
async def confirm_page(request: Request, token: str = "") -> HTMLResponse:
    """Shows the confirmation button; changes nothing (mail scanners open links)."""
    subscriptions, pages = _state(request)
    state, language = await subscriptions.token_language(token)
    if state != "valid":
        return _invalid_token(request, pages, language)
    lang = pages.language(request, request.query_params.get("lang"), language)
    return pages.render(request, "confirm.html", lang, token=token)


@router.post("/confirm", response_class=HTMLResponse, tags=["public pages"],
             responses={**page_errors(404), **json_errors(413, page=True)},
             openapi_extra=form_body(fields={"token": TOKEN}))
async def confirm_submit(request: Request) -> HTMLResponse:
    subscriptions, pages = _state(request)
    data = await _form(request) or {}
    token = str(data.get("token") or request.query_params.get("token") or "")
    result = await subscriptions.confirm(token, _ctx(request, "confirm-page"))
    if not result.ok:
        return _invalid_token(request, pages, result.language)
    lang = pages.language(request, request.query_params.get("lang"), result.language)
    return _message(request, pages, lang, "confirm", title_key="done_title", text_key="done_text")


@router.get("/unsubscribe", response_class=HTMLResponse, tags=["public pages"], responses=page_errors(404))
async def unsubscribe_page(request: Request, token: str = "") -> HTMLResponse:
    subscriptions, pages = _state(request)
    row = await subscriptions.subscriber_for_link(token)
    if row is None:
        return _invalid_token(request, pages, None)
    lang = pages.language(request, request.query_params.get("lang"), row.language)
    return pages.render(request, "unsubscribe.html", lang, token=token)


@router.post("/unsubscribe", response_class=HTMLResponse, tags=["public pages"],
             responses={**page_errors(404), **json_errors(413, page=True)}, openapi_extra=form_body(fields={
                 "token": TOKEN, "List-Unsubscribe": {"type": "string", "enum": ["One-Click"]}}))
async def unsubscribe_submit(request: Request, token: str = "") -> HTMLResponse:
    """Unsubscribes; also the RFC 8058 one-click POST (`List-Unsubscribe=One-Click`, no cookies)."""
    subscriptions, pages = _state(request)
    data = await _form(request) or {}
    one_click = data.get("List-Unsubscribe") == "One-Click"
    ok, language = await subscriptions.unsubscribe(token or str(data.get("token") or ""),
                                                   _ctx(request, "one-click" if one_click else "unsubscribe-page"))
    if not ok:
        return _invalid_token(request, pages, None)
    lang = pages.language(request, request.query_params.get("lang"), language)
    return _message(request, pages, lang, "unsubscribe", title_key="done_title", text_key="done_text", link=True)


@router.get("/preferences", response_class=HTMLResponse, tags=["public pages"], responses=page_errors(404))
async def preferences_page(request: Request, token: str = "") -> HTMLResponse:
    subscriptions, pages = _state(request)
    row = await subscriptions.subscriber_for_link(token)
    if row is None:
        return _invalid_token(request, pages, None)
    lang = pages.language(request, request.query_params.get("lang"), row.language)
    if row.status != "active":
        return pages.render(request, "message.html", lang, title=pages.tr.gettext(lang, "preferences.title"),
                            text=pages.tr.gettext(lang, "preferences.inactive"), link="/subscribe?lang=" + lang,
                            link_text=pages.tr.gettext(lang, "common.back_to_form"))
    form = {"language": row.language, "topics": row.topics, "regions": row.regions}
    return pages.render(request, "preferences.html", lang, token=token, form=form, errors={}, saved=False)


@router.post("/preferences", response_class=HTMLResponse, tags=["public pages"],
             responses={**page_errors(404, 422), **json_errors(413, page=True)},
             openapi_extra=form_body(Preferences, {"action": {"type": "string", "enum": ["save", "withdraw"]}}))
async def preferences_submit(request: Request, token: str = "") -> HTMLResponse:
    subscriptions, pages = _state(request)
    row = await subscriptions.subscriber_for_link(token)
    if row is None:
        return _invalid_token(request, pages, None)
    data = await _form(request)
    if data is None:
        lang = pages.language(request, row.language)
        form = {"language": row.language, "topics": row.topics, "regions": row.regions}
        return pages.render(request, "preferences.html", lang, status_code=422, token=token, form=form,
                            errors={"form": pages.tr.gettext(lang, "errors.invalid")}, saved=False)
    if data.get("action") == "withdraw":
        await subscriptions.unsubscribe(token, _ctx(request, "preferences"))
        lang = pages.language(request, request.query_params.get("lang"), row.language)
        return _message(request, pages, lang, "unsubscribe", title_key="done_title", text_key="done_text",
                        link=True)
    lang = pages.language(request, data.get("language") if isinstance(data.get("language"), str) else None,
                          row.language)
    try:
        prefs = Preferences.model_validate(data)
    except ValidationError as exc:
        return pages.render(request, "preferences.html", lang, status_code=422, token=token, form=data,
                            errors=field_errors(exc, pages, lang), saved=False)
    if not await subscriptions.change_preferences(token, prefs, _ctx(request, "preferences")):
        return pages.render(request, "message.html", lang, title=pages.tr.gettext(lang, "preferences.title"),
                            text=pages.tr.gettext(lang, "preferences.inactive"))
    return pages.render(request, "preferences.html", prefs.language, token=token,
                        form=prefs.model_dump(), errors={}, saved=True)

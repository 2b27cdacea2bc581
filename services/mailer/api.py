"""Staff API of the mailer: campaigns (write, preview, test, send, pause/resume/cancel) and delivery statistics."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from sqlalchemy import func, insert, select, update

from services.mailer import store
from services.mailer.campaigns import Campaigns, CampaignStateError
from services.mailer.staff_text import UnsafeTemplate, check_subject, check_template
from services.mailer.transactional import enqueue_mail
from shared.addresses import normalise_email
from shared.auth import Staff, audit, require_role
from shared.db import utcnow
from shared.ids import new_id
from shared.segment import SegmentIn
from shared.taxonomy import load_taxonomy
from shared.web import STAFF_ERRORS, json_errors, unprocessable

router = APIRouter(prefix="/api/v1", responses=STAFF_ERRORS)  # all of it is staff API
Editor = Annotated[Staff, Depends(require_role("editor"))]


class DeliveryStats(BaseModel):
    by_status: dict[str, int]
    by_kind: dict[str, dict[str, int]]


@router.get("/deliveries/stats", response_model=DeliveryStats, tags=["staff"])
async def delivery_stats(request: Request, staff: Editor) -> DeliveryStats:
    """Counts of transactional mails by state (pending, sending, sent, retry, failed, ambiguous, cancelled)."""
    m = store.outgoing_mail
    async with request.app.state.db.sessions() as s:
        rows = (await s.execute(select(m.c.kind, m.c.status, func.count()).group_by(m.c.kind, m.c.status))).all()
    by_status: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    for kind, status, count in rows:
        by_status[status] = by_status.get(status, 0) + count
        by_kind.setdefault(kind, {})[status] = count
    return DeliveryStats(by_status=by_status, by_kind=by_kind)


# --- campaigns ------------------------------------------------------------------------------------------

Publisher = Annotated[Staff, Depends(require_role("publisher"))]


def _texts(value: dict[str, str], field: str, check, limit: int) -> dict[str, str]:
    languages = load_taxonomy().languages
    clean = {}
    for lang, text in value.items():
        if lang not in languages:
            raise PydanticCustomError("unknown_language", "unknown language {value!r}", {"value": lang[:20]})
        if len(text) > limit:
            raise PydanticCustomError("too_long", "at most {max} characters", {"max": limit})
        # A subject goes into a header: not even a tab (the renderer refuses it when sending, too late).
        allowed = "" if field == "subject" else "\r\n\t"
        if any((ord(c) < 32 or ord(c) == 127) and c not in allowed for c in text):
            raise PydanticCustomError("control_characters", "{lang}: control characters are not allowed",
                                      {"lang": lang})
        try:
            check(text)
        except UnsafeTemplate as exc:
            raise PydanticCustomError("unsafe_template", "{lang}: {reason}", {"lang": lang, "reason": str(exc)}) \
                from exc
        if text.strip():
            clean[lang] = text
    if not clean.get("de"):
        raise PydanticCustomError("german_required", "a German text (\"de\") is required")
    return clean


class CampaignFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("subject", check_fields=False)
    @classmethod
    def _subject(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else _texts(v, "subject", check_subject, 200)

    @field_validator("body_markdown", check_fields=False)
    @classmethod
    def _body(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else _texts(v, "body_markdown", check_template, 100_000)

    @field_validator("scheduled_at", check_fields=False)
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            v = v.replace(tzinfo=ZoneInfo("Europe/Berlin"))
        return v.astimezone(UTC) if v else None


class CampaignIn(CampaignFields):
    subject: dict[str, str] = Field(description="Subject by language; German required; placeholders allowed",
                                    examples=[{"de": "Neuigkeiten für {{ name | default('Sie') }}"}])
    body_markdown: dict[str, str] = Field(description="Markdown by language (no raw HTML); German required",
                                          examples=[{"de": "Hallo {{ name }},\n\n**Neu:** …"}])
    segment: SegmentIn = Field(default_factory=SegmentIn)
    scheduled_at: datetime | None = Field(None, description="Send at this time (ISO 8601; Europe/Berlin if no zone)")


class CampaignPatch(CampaignFields):
    subject: dict[str, str] | None = None
    body_markdown: dict[str, str] | None = None
    segment: SegmentIn | None = Field(None, description="null: unchanged")
    scheduled_at: datetime | None = Field(None, description="null: no schedule (send when told to)")

    @model_validator(mode="after")
    def _texts_not_null(self) -> CampaignPatch:
        nulls = sorted(f for f in self.model_fields_set & {"subject", "body_markdown"} if getattr(self, f) is None)
        if nulls:
            raise PydanticCustomError("null_not_allowed", "cannot be null: {fields}", {"fields": ", ".join(nulls)})
        return self


class CampaignOut(BaseModel):
    id: str
    kind: str
    status: str
    subject: dict[str, str]
    body_markdown: dict[str, str]
    segment: dict[str, Any]
    scheduled_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    counts: dict[str, int]


class SegmentCount(BaseModel):
    segment: SegmentIn = Field(default_factory=SegmentIn)


class TestSend(BaseModel):
    email: str = Field(max_length=254)
    language: str = "de"
    name: str | None = Field("Test", max_length=200, description="Shown in the To header: one line")

    @field_validator("name")
    @classmethod
    def _one_line(cls, v: str | None) -> str | None:
        if v is not None and any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise PydanticCustomError("control_characters", "control characters (CR/LF and others) are not allowed")
        return v


class Count(BaseModel):
    count: int


class Preview(BaseModel):
    subject: str
    language: str
    html: str
    text: str
    falls_back: bool = Field(description="This language has no text of its own: the German one is shown")
    fallback_languages: list[str]


class Queued(BaseModel):
    mail_id: str
    status: Literal["queued"]


def _campaigns(request: Request) -> Campaigns:
    return request.app.state.campaigns


async def _campaign(request: Request, campaign_id: str):
    async with request.app.state.db.sessions() as s:
        row = (await s.execute(select(store.campaigns).where(store.campaigns.c.id == campaign_id))).first()
    if row is None:
        raise HTTPException(404, "no such campaign")
    return row


async def _out(request: Request, row) -> CampaignOut:
    return CampaignOut(**{k: v for k, v in row._mapping.items() if k in CampaignOut.model_fields},
                       counts=await _campaigns(request).counts(row.id))


@router.post("/campaigns", status_code=201, response_model=CampaignOut, tags=["campaigns"])
async def create_campaign(data: CampaignIn, request: Request, staff: Editor) -> CampaignOut:
    now = utcnow()
    campaign_id = new_id()
    async with request.app.state.db.transaction() as s:
        await s.execute(insert(store.campaigns).values(
            id=campaign_id, kind="newsletter", subject=data.subject, body_markdown=data.body_markdown,
            segment=data.segment.model_dump(), status="draft", scheduled_at=data.scheduled_at,
            created_by=staff.name, created_at=now, updated_at=now))
        await audit(s, store.infra, staff, "campaign.create", campaign_id)
    return await _out(request, await _campaign(request, campaign_id))


@router.patch("/campaigns/{campaign_id}", response_model=CampaignOut, tags=["campaigns"],
              responses=json_errors(404, 409))
async def change_campaign(campaign_id: str, patch: CampaignPatch, request: Request, staff: Editor) -> CampaignOut:
    values = patch.model_dump(exclude_unset=True)
    if "segment" in values and values["segment"] is None:
        values.pop("segment")
    async with request.app.state.db.transaction() as s:
        result = await s.execute(update(store.campaigns).where(
            store.campaigns.c.id == campaign_id, store.campaigns.c.status == "draft")
            .values(updated_at=utcnow(), **values))
        if not result.rowcount:
            # In this transaction's session: SQLite has one connection, a second session would wait for it.
            if await s.scalar(select(store.campaigns.c.id).where(store.campaigns.c.id == campaign_id)) is None:
                raise HTTPException(404, "no such campaign")
            raise HTTPException(409, "only a draft can be changed")
        await audit(s, store.infra, staff, "campaign.change", campaign_id, fields=sorted(values))
    return await _out(request, await _campaign(request, campaign_id))


@router.get("/campaigns", response_model=list[CampaignOut], tags=["campaigns"])
async def list_campaigns(request: Request, staff: Editor, limit: int = Query(50, ge=1, le=500)) -> list[CampaignOut]:
    async with request.app.state.db.sessions() as s:
        rows = (await s.execute(select(store.campaigns).order_by(store.campaigns.c.created_at.desc())
                                .limit(limit))).all()
    return [await _out(request, r) for r in rows]


@router.get("/campaigns/{campaign_id}", response_model=CampaignOut, tags=["campaigns"], responses=json_errors(404))
async def get_campaign(campaign_id: str, request: Request, staff: Editor) -> CampaignOut:
    """Status and counts (pending, sending, sent, retrying, failed, ambiguous, skipped, cancelled)."""
    return await _out(request, await _campaign(request, campaign_id))


@router.post("/segments/count", response_model=Count, tags=["campaigns"])
async def count_segment(body: SegmentCount, request: Request, staff: Editor) -> dict[str, int]:
    """How many active subscribers a segment reaches right now."""
    async with request.app.state.db.sessions() as s:
        return {"count": len(await _campaigns(request).recipients(s, body.segment))}


@router.get("/campaigns/{campaign_id}/preview", response_model=Preview, tags=["campaigns"],
            responses=json_errors(404))
async def preview_campaign(campaign_id: str, request: Request, staff: Editor,
                           language: str = Query("de", max_length=8)) -> dict[str, Any]:
    """The mail as a recipient in `language` gets it, and which languages fall back to German."""
    campaign = await _campaign(request, campaign_id)
    if language not in load_taxonomy().languages:
        raise unprocessable(f"unknown language {language!r}", "unknown_language", ("query", "language"))
    rendered = _campaigns(request).render_for(campaign, "erika@example.org", "Erika Beispiel", language,
                                               "preview.token")
    msg = rendered.message
    missing = [lang for lang in load_taxonomy().languages if _campaigns(request).content(campaign, lang)[2]]
    return {"subject": msg["Subject"], "language": msg["Content-Language"],
            "html": msg.get_body(("html",)).get_content(), "text": msg.get_body(("plain",)).get_content(),
            "falls_back": language in missing, "fallback_languages": missing}


@router.post("/campaigns/{campaign_id}/test", status_code=202, response_model=Queued, tags=["campaigns"],
             responses=json_errors(404))
async def test_send(campaign_id: str, body: TestSend, request: Request, staff: Editor) -> dict[str, str]:
    """Send the campaign once to one address (e.g. your own) to see it in a mail client."""
    campaign = await _campaign(request, campaign_id)
    try:
        email = normalise_email(body.email)
    except ValueError as exc:
        raise unprocessable(str(exc), "email_invalid", ("body", "email")) from exc
    rendered = _campaigns(request).render_for(campaign, email, body.name, body.language, "test.link")
    async with request.app.state.db.transaction() as s:
        mail_id = await enqueue_mail(s, rendered, dedupe_key=f"test:{new_id()}", kind="test", recipient=email,
                                     subscriber_id=None, correlation_id=request.state.correlation_id)
        await audit(s, store.infra, staff, "campaign.test", campaign_id)
    return {"mail_id": mail_id, "status": "queued"}


@router.post("/campaigns/{campaign_id}/send", response_model=CampaignOut, tags=["campaigns"],
             responses=json_errors(404, 409))
async def send_campaign(campaign_id: str, request: Request, staff: Publisher) -> CampaignOut:
    """Send now, or at `scheduled_at` if that is in the future."""
    campaign = await _campaign(request, campaign_id)
    if campaign.status not in ("draft",):
        raise HTTPException(409, f"the campaign is {campaign.status}")
    async with request.app.state.db.transaction() as s:
        await audit(s, store.infra, staff, "campaign.send", campaign_id)
        if campaign.scheduled_at and campaign.scheduled_at > utcnow():
            await s.execute(update(store.campaigns).where(store.campaigns.c.id == campaign_id,
                                                          store.campaigns.c.status == "draft")
                            .values(status="scheduled", updated_at=utcnow()))
    if not (campaign.scheduled_at and campaign.scheduled_at > utcnow()):
        await _campaigns(request).start(campaign_id, request.state.correlation_id)
    return await _out(request, await _campaign(request, campaign_id))


@router.post("/campaigns/{campaign_id}/{action}", response_model=CampaignOut, tags=["campaigns"],
             responses=json_errors(404, 409))
async def control_campaign(campaign_id: str, action: Literal["pause", "resume", "cancel"], request: Request,
                           staff: Publisher) -> CampaignOut:
    """Pause (stops within seconds), resume (continues where it stopped), cancel (stops for good)."""
    try:
        await _campaigns(request).set_status(campaign_id, action)
    except KeyError as exc:
        raise HTTPException(404, "no such campaign") from exc
    except CampaignStateError as exc:
        raise HTTPException(409, str(exc)) from exc
    async with request.app.state.db.transaction() as s:
        await audit(s, store.infra, staff, f"campaign.{action}", campaign_id)
    return await _out(request, await _campaign(request, campaign_id))


@router.post("/digests", response_model=CampaignOut, status_code=201, tags=["campaigns"])
async def send_digest_now(request: Request, staff: Publisher) -> CampaignOut:
    """Send a digest of upcoming events now (besides the monthly one)."""
    campaign_id = await _campaigns(request).start_digest(f"manual-{utcnow():%Y%m%dT%H%M%S.%f}")
    async with request.app.state.db.transaction() as s:
        await audit(s, store.infra, staff, "digest.send", campaign_id)
    return await _out(request, await _campaign(request, campaign_id))

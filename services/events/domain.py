"""Rules of events without I/O: what a valid event is, who gets a place, time-zone display."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, UrlConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

from shared.addresses import normalise_email
from shared.messages import Place
from shared.segment import SegmentIn
from shared.taxonomy import load_taxonomy

BERLIN = ZoneInfo("Europe/Berlin")
TIME_OR_PLACE = ("starts_at", "ends_at", "location", "online_url")


def aware(value: datetime, zone: ZoneInfo = BERLIN) -> datetime:
    """A datetime without zone is meant in Europe/Berlin (what staff see); stored as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone)
    return value.astimezone(UTC).replace(microsecond=0)  # calendars know seconds, not less


def plain_text(value: str, one_line: bool) -> str:
    """Refuses control characters (a title ends up in mail subjects: CR/LF there would add headers);
    line breaks only where the text may have several lines."""
    allowed = "" if one_line else "\n\r\t"
    if any((ord(c) < 32 or ord(c) == 127) and c not in allowed for c in value):
        raise PydanticCustomError("control_characters", "control characters are not allowed" +
                                  (" (it must be one line)" if one_line else ""))
    return value


def texts(value: dict[str, str], required_de: bool, limit: int, one_line: bool = False) -> dict[str, str]:
    taxonomy = load_taxonomy()
    clean: dict[str, str] = {}
    for lang, text in value.items():
        if lang not in taxonomy.languages:
            raise PydanticCustomError("unknown_language", "unknown language {value!r}", {"value": lang[:20]})
        text = plain_text(text.strip(), one_line)
        if len(text) > limit:
            raise PydanticCustomError("too_long", "at most {max} characters", {"max": limit})
        if text:
            clean[lang] = text
    if required_de and not clean.get("de"):
        raise PydanticCustomError("german_required", "a German text (\"de\") is required")
    return clean


def _known(dimension: str, values: list[str], code: str) -> list[str]:
    known = set(load_taxonomy().keys(dimension))
    for value in values:
        if value not in known:
            raise PydanticCustomError(code, "unknown key {value!r}", {"value": value[:50]})
    return list(dict.fromkeys(values))


class PlaceIn(Place):
    name: str = Field(min_length=1, max_length=300)
    address: str = Field("", max_length=500)

    @field_validator("name", "address")
    @classmethod
    def _plain(cls, v: str) -> str:
        return plain_text(v, one_line=True)


# The column holds 1000 characters; longer is refused here rather than by the database (a 500).
OnlineUrl = Annotated[HttpUrl, UrlConstraints(max_length=1000)]
# May be given as null in a patch: it removes the place or link, the limit, the deadline (or keeps the segment).
NULLABLE = frozenset({"location", "online_url", "capacity", "registration_deadline", "segment"})


class EventFields(BaseModel):
    """Fields staff set; shared by create (all required) and patch (all optional)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @field_validator("kind", check_fields=False)
    @classmethod
    def _kind(cls, v: str | None) -> str | None:
        if v is not None and v not in load_taxonomy().keys("event_kinds"):
            raise PydanticCustomError("unknown_kind", "unknown event kind {value!r}", {"value": v[:50]})
        return v

    @field_validator("region", check_fields=False)
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is not None:
            _known("regions", [v], "unknown_region")
        return v

    @field_validator("topics", check_fields=False)
    @classmethod
    def _topics(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _known("topics", v, "unknown_topic")

    @field_validator("title", check_fields=False)
    @classmethod
    def _title(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else texts(v, required_de=True, limit=200, one_line=True)

    @field_validator("description", check_fields=False)
    @classmethod
    def _description(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else texts(v, required_de=False, limit=10000)

    @field_validator("starts_at", "ends_at", "registration_deadline", check_fields=False)
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        return None if v is None else aware(v)


class EventCreate(EventFields):
    kind: str = Field(description="Event kind (SPEC §2.4)", examples=["forum"])
    title: dict[str, str] = Field(description="Title by language; German required", examples=[{"de": "Dialogforum"}])
    description: dict[str, str] = Field(default_factory=dict, examples=[{"de": "Wir sprechen über …"}])
    starts_at: datetime = Field(description="ISO 8601; without zone it is Europe/Berlin")
    ends_at: datetime
    location: PlaceIn | None = None
    online_url: OnlineUrl | None = None
    region: str = Field(examples=["stendal"])
    topics: list[str] = Field(default_factory=list, max_length=20)
    segment: SegmentIn = Field(default_factory=SegmentIn, description="Who an announcement is for (SPEC §2.3)")
    capacity: int | None = Field(None, ge=0, le=100000, description="Places; null = unlimited")
    registration_deadline: datetime | None = Field(None, description="Default: the start of the event")
    announce: bool = Field(False, description="Publishing sends an announcement campaign")

    @model_validator(mode="after")
    def _consistent(self) -> EventCreate:
        check(self.starts_at, self.ends_at, self.registration_deadline, self.location, self.online_url)
        return self


class EventPatch(EventFields):
    kind: str | None = None
    title: dict[str, str] | None = None
    description: dict[str, str] | None = None
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    location: PlaceIn | None = None
    online_url: OnlineUrl | None = None
    region: str | None = None
    topics: list[str] | None = Field(None, max_length=20)
    segment: SegmentIn | None = None
    capacity: int | None = Field(None, ge=0, le=100000)
    registration_deadline: datetime | None = None
    announce: bool | None = None

    @model_validator(mode="after")
    def _null_only_where_meaningful(self) -> EventPatch:
        nulls = sorted(f for f in self.model_fields_set - NULLABLE if getattr(self, f) is None)
        if nulls:
            raise PydanticCustomError("null_not_allowed", "cannot be null: {fields}", {"fields": ", ".join(nulls)})
        return self


def check(starts_at: datetime, ends_at: datetime, deadline: datetime | None, location, online_url) -> None:
    if ends_at <= starts_at:
        raise PydanticCustomError("end_before_start", "the event must end after it starts")
    if deadline is not None and deadline > starts_at:
        raise PydanticCustomError("deadline_after_start", "registration must close by the start of the event")
    if location is None and online_url is None:
        raise PydanticCustomError("place_required", "give a location or an online link")


def place_for(capacity: int | None, confirmed: int) -> Literal["confirmed", "waitlisted"]:
    """A new registration gets a place while there are free places, else the waiting list."""
    return "confirmed" if capacity is None or confirmed < capacity else "waitlisted"


def promotions(capacity: int | None, confirmed: int, waiting: int) -> int:
    """How many from the head of the waiting list move up when places free (or capacity grows)."""
    if capacity is None:
        return waiting
    return max(0, min(waiting, capacity - confirmed))


def registration_open(status: str, deadline: datetime | None, starts_at: datetime, now: datetime) -> str | None:
    """None when registration is open, else why not: not_published, cancelled, closed."""
    if status == "cancelled":
        return "cancelled"
    if status != "published":
        return "not_published"
    if now >= (deadline or starts_at):
        return "closed"
    return None


class RegistrationIn(BaseModel):
    """A registration from the event page's form or as JSON."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    email: str = Field(max_length=254, examples=["amira@example.org"])
    name: str | None = Field(None, max_length=200)
    language: str = Field("de", examples=["ar"])
    newsletter: bool = Field(False, description="Also subscribe to the newsletter (starts the double opt-in)")
    website: str = Field("", description="Honeypot: leave empty")

    @field_validator("email")
    @classmethod
    def _email(cls, v: str) -> str:
        if not v:
            raise PydanticCustomError("email_required", "an email address is required")
        try:
            return normalise_email(v)
        except ValueError as exc:
            raise PydanticCustomError("email_invalid", "not a valid email address") from exc

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v and any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise PydanticCustomError("control_characters", "control characters are not allowed")
        return v or None

    @field_validator("language")
    @classmethod
    def _language(cls, v: str) -> str:
        if v not in load_taxonomy().languages:
            raise PydanticCustomError("unknown_language", "unknown language {value!r}", {"value": v[:20]})
        return v

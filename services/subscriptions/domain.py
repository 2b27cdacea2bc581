"""Rules of subscribing without I/O: addresses, tokens, signed manage links, sign-up validation."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from shared.addresses import email_hash, normalise_email  # noqa: F401 - part of this module's rules
from shared.signing import LinkSigner
from shared.taxonomy import load_taxonomy

Status = Literal["pending", "active", "unsubscribed", "suppressed", "erased"]
STATUSES: tuple[str, ...] = get_args(Status)
# Times given without a zone (in an imported file) are the organisation's local time.
LOCAL_ZONE = ZoneInfo("Europe/Berlin")
MAX_EMAIL = 254
MAX_NAME = 200


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_state(expires_at: datetime, used_at: datetime | None, now: datetime) -> Literal["valid", "used", "expired"]:
    if used_at is not None:
        return "used"
    if now >= expires_at:
        return "expired"
    return "valid"


def expiry(now: datetime, hours: int) -> datetime:
    return now + timedelta(hours=hours)


class ManageLinks(LinkSigner):
    """Signed tokens for unsubscribe and preference links: no login, no expiry, unforgeable."""

    def __init__(self, secret: str) -> None:
        super().__init__(secret, "manage")

    def subscriber_id(self, token: str | None) -> str | None:
        """The subscriber a token was made for, or None for anything forged or malformed."""
        return self.verify(token)


def _clean_text(value: str, limit: int) -> str:
    value = unicodedata.normalize("NFC", value).strip()
    if any(unicodedata.category(c) in ("Cc", "Cf") and c not in "\u200c\u200d" for c in value):
        raise PydanticCustomError("control_characters", "control characters are not allowed")
    if len(value) > limit:
        raise PydanticCustomError("too_long", "at most {max} characters", {"max": limit})
    return value


def _known(dimension: str, values: list[str]) -> list[str]:
    taxonomy = load_taxonomy()
    known = taxonomy.labels[dimension]  # key -> labels: a lookup each, no set built per request
    for value in values:
        if value not in known:
            code = {"topics": "unknown_topic", "regions": "unknown_region", "groups": "unknown_group"}[dimension]
            raise PydanticCustomError(code, "unknown key '{value}'", {"value": value[:50]})
    return list(dict.fromkeys(values))


class Preferences(BaseModel):
    """What a subscriber chooses: language, topics, regions (empty = all)."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    language: str = Field("de", description="One of the seven languages", examples=["ar"])
    topics: list[str] = Field(default_factory=list, max_length=50, examples=[["arbeitsmarkt", "bildung"]])
    regions: list[str] = Field(default_factory=list, max_length=50, examples=[["halle", "magdeburg"]])

    @field_validator("language")
    @classmethod
    def _language(cls, value: str) -> str:
        if value not in load_taxonomy().languages:
            raise PydanticCustomError("unknown_language", "unknown language '{value}'", {"value": value[:20]})
        return value

    @field_validator("topics")
    @classmethod
    def _topics(cls, value: list[str]) -> list[str]:
        return _known("topics", value)

    @field_validator("regions")
    @classmethod
    def _regions(cls, value: list[str]) -> list[str]:
        return _known("regions", value)


class SignupRequest(Preferences):
    """A sign-up from the form or the JSON API."""

    email: str = Field(description="The address to subscribe", examples=["amira@example.org"])
    name: str | None = Field(None, description="Optional name used in greetings", examples=["Amira"])
    consent: bool = Field(description="The person agreed to the consent text; must be true")
    website: str = Field("", description="Honeypot: leave empty (bots fill it in)")

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("email_required", "an email address is required")
        if len(value) > MAX_EMAIL:
            raise PydanticCustomError("too_long", "at most {max} characters", {"max": MAX_EMAIL})
        try:
            return normalise_email(value)
        except ValueError as exc:
            raise PydanticCustomError("email_invalid", "not a valid email address: {reason}",
                                      {"reason": str(exc)}) from exc

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return _clean_text(value, MAX_NAME) or None if value is not None else None

    @field_validator("consent")
    @classmethod
    def _consent(cls, value: bool) -> bool:
        if value is not True:
            raise PydanticCustomError("consent_required", "consent must be given")
        return value


class ImportedSubscriber(SignupRequest):
    """One subscriber from a staff import. With proof of consent (`consent_at` and `consent_source`) it
    becomes active at once; without, it gets the double opt-in like a sign-up on the form."""

    consent: bool = Field(True, description="Not asked: the proof fields (or the double opt-in) are the consent")
    groups: list[str] = Field(default_factory=list, max_length=50, examples=[["wirtschaft"]])
    audience: Literal["public", "partner"] | None = Field(None, description="Default: partner when groups are set")
    consent_at: datetime | None = Field(None, description="When the person consented (zone-less: Europe/Berlin)")
    consent_source: str | None = Field(None, description="How: e.g. 'paper form, forum Stendal 2025-03-04'")
    consent_text_version: str | None = Field(None, description="Version of the consent text the person agreed to")
    consent_ip: str | None = Field(None, description="IP address the consent was given from, if known")

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: list[str]) -> list[str]:
        return _known("groups", value)

    @field_validator("consent_at", mode="before")
    @classmethod
    def _consent_at_zone(cls, value: object) -> object:
        if isinstance(value, str) and value.strip():
            try:
                value = datetime.fromisoformat(value.strip())
            except ValueError as exc:
                raise PydanticCustomError("datetime_invalid", "not an ISO 8601 time (e.g. 2025-03-04T18:30)") from exc
        if isinstance(value, datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=LOCAL_ZONE)
        return value or None

    @field_validator("consent_at")
    @classmethod
    def _consent_at_past(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        if value > datetime.now(UTC) + timedelta(minutes=5):
            raise PydanticCustomError("in_future", "consent cannot be given in the future")
        return value

    @field_validator("consent_source")
    @classmethod
    def _proof_source(cls, value: str | None) -> str | None:
        return _clean_text(value, MAX_NAME) or None if value is not None else None

    @field_validator("consent_text_version")
    @classmethod
    def _proof_version(cls, value: str | None) -> str | None:
        return _clean_text(value, 64) or None if value is not None else None

    @field_validator("consent_ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError as exc:
            raise PydanticCustomError("ip_invalid", "not an IP address") from exc

    @model_validator(mode="after")
    def _whole_proof(self) -> ImportedSubscriber:
        # Half a proof is more likely a mistake in the file than a request for the double opt-in.
        given = [self.consent_at, self.consent_source, self.consent_text_version, self.consent_ip]
        if any(v is not None for v in given) and (self.consent_at is None or self.consent_source is None):
            raise PydanticCustomError(
                "consent_proof_incomplete", "proof of consent needs both consent_at and consent_source")
        return self

    @property
    def has_proof(self) -> bool:
        return self.consent_at is not None

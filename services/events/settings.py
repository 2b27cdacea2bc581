"""Settings of the events service (env prefix EVENTS_, shared ones unprefixed)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import SigningSettings


class EventsSettings(SigningSettings):
    model_config = SettingsConfigDict(env_prefix="EVENTS_", extra="ignore", populate_by_name=True)

    database_url: str = Field(
        "sqlite+aiosqlite:///var/events.db",
        description="SQLAlchemy async URL of the service's own database; production: "
                    "`postgresql+asyncpg://user:password@host:5432/events`.")
    port: int = Field(8002, description="Port of `bridgepost serve events` (overridden by `--port`).")
    public_url: str = Field(
        "http://127.0.0.1:8002",
        description="Base URL of the public event pages (never taken from a request's Host header): the event URL "
                    "in `events.*` messages, the event and cancel links in mails, and the feed. Its host is part "
                    "of every calendar UID (`<event id>@<host>`): changing the host makes calendars that imported "
                    "invitations see new events.")
    reminder_hours_before: float = Field(
        24.0, description="How many hours before an event starts its reminder goes out. A registration confirmed "
                          "(or promoted) inside this window gets its reminder at the scheduler's next pass.")
    scheduler_interval_seconds: float = Field(
        30.0, description="How often the reminder scheduler looks for due reminders, in seconds. Every instance "
                          "runs it; a conditional update still makes each reminder once.")
    timezone: str = Field(
        "Europe/Berlin",
        description="Time zone in which event times are shown on the pages and in mails (it travels in the event "
                    "messages). Times that staff give without a zone are read as Europe/Berlin whatever this "
                    "says; calendars get UTC times.")
    trust_forwarded_for: bool = Field(
        False, description="Take the client IP from `X-Forwarded-For` (only behind a trusted reverse proxy). The "
                           "IP is recorded only as the consent IP of a \"also subscribe to the newsletter\" opt-in.")

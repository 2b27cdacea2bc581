"""Settings of the events service (env prefix EVENTS_, shared ones unprefixed)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import SigningSettings


class EventsSettings(SigningSettings):
    model_config = SettingsConfigDict(env_prefix="EVENTS_", extra="ignore", populate_by_name=True)

    database_url: str = "sqlite+aiosqlite:///var/events.db"
    port: int = 8002
    public_url: str = Field("http://127.0.0.1:8002",
                                 description="Base URL of the public event pages (links in mails and the feed)")
    reminder_hours_before: float = Field(24.0, description="When the reminder goes out before an event starts")
    scheduler_interval_seconds: float = Field(30.0, description="How often the reminder scheduler looks")
    timezone: str = Field("Europe/Berlin", description="Time zone in which events are shown")
    trust_forwarded_for: bool = Field(
        False, description="Take the client IP from X-Forwarded-For (only behind a trusted reverse proxy)")

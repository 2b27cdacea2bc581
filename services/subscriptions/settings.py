"""Settings of the subscriptions service (env prefix SUBSCRIPTIONS_, shared ones unprefixed)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import SigningSettings


class SubscriptionsSettings(SigningSettings):
    model_config = SettingsConfigDict(env_prefix="SUBSCRIPTIONS_", extra="ignore", populate_by_name=True)

    database_url: str = "sqlite+aiosqlite:///var/subscriptions.db"
    confirm_token_hours: int = Field(72, description="How long a confirmation link stays valid")
    confirmations_per_address_per_day: int = Field(3, description="Confirmation mails per address per 24 h")
    signups_per_ip: int = Field(30, description="Sign-up requests per client IP per `signups_per_ip_window_seconds`")
    signups_per_ip_window_seconds: int = Field(600)
    trust_forwarded_for: bool = Field(
        False, description="Take the client IP from X-Forwarded-For (only behind a trusted reverse proxy)")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed to POST the JSON API")
    consent_text_version: str = Field("2026-11", description="Version of the consent text shown on the form")
    hard_bounces_to_suppress: int = Field(1, description="Hard bounces after which an address is suppressed")
    port: int = 8001

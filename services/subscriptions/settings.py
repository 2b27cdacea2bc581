"""Settings of the subscriptions service (env prefix SUBSCRIPTIONS_, shared ones unprefixed)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import SigningSettings


class SubscriptionsSettings(SigningSettings):
    model_config = SettingsConfigDict(env_prefix="SUBSCRIPTIONS_", extra="ignore", populate_by_name=True)

    database_url: str = Field(
        "sqlite+aiosqlite:///var/subscriptions.db",
        description="SQLAlchemy async URL of the service's own database; production: "
                    "`postgresql+asyncpg://user:password@host:5432/subscriptions`. A relative SQLite path is "
                    "relative to the working directory.")
    confirm_token_hours: int = Field(72, description="How long a confirmation link stays valid, in hours.")
    confirmations_per_address_per_day: int = Field(
        3, description="Confirmation mails per address per 24 h; further sign-ups get the same answer but no mail.")
    signups_per_ip: int = Field(
        30, description="Sign-up requests per client IP per `SUBSCRIPTIONS_SIGNUPS_PER_IP_WINDOW_SECONDS`; beyond "
                        "it: 429 with `Retry-After`.")
    signups_per_ip_window_seconds: int = Field(600, description="Window of the per-IP limit, in seconds.")
    trust_forwarded_for: bool = Field(
        False, description="Take the client IP from `X-Forwarded-For` (only behind a trusted reverse proxy; "
                           "otherwise clients can choose their IP for the limit and the consent log).")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed to call the JSON API from a browser (JSON list, e.g. "
                    "`[\"https://www.example.org\"]`), so the organisation's website can embed the form.")
    consent_text_version: str = Field(
        "2026-11", description="Version of the consent text shown on the form; recorded in the consent log with "
                               "each sign-up.")
    hard_bounces_to_suppress: int = Field(
        1, description="Hard bounces (SMTP 5xx) after which an address is suppressed.")
    port: int = Field(8001, description="Port of `bridgepost serve subscriptions` (overridden by `--port`).")

"""Settings of the mailer (env prefix MAILER_; SMTP and shared ones unprefixed, as in SPEC §4)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings, env


class MailerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MAILER_", extra="ignore", populate_by_name=True)

    database_url: str = "sqlite+aiosqlite:///var/mailer.db"
    port: int = 8003
    smtp_host: str = Field("127.0.0.1", validation_alias=env("SMTP_HOST"))
    smtp_port: int = Field(1025, validation_alias=env("SMTP_PORT"))
    smtp_tls: Literal["none", "starttls", "tls"] = Field(
        "none", validation_alias=env("SMTP_TLS"),
        description="none (dev inbox), starttls (required upgrade, usually port 587), tls (implicit, port 465)")
    smtp_username: str | None = Field(None, validation_alias=env("SMTP_USERNAME"))
    smtp_password: SecretStr | None = Field(None, validation_alias=env("SMTP_PASSWORD"))
    smtp_validate_certs: bool = Field(True, validation_alias=env("SMTP_VALIDATE_CERTS"))
    smtp_ca_file: str | None = Field(None, validation_alias=env("SMTP_CA_FILE"),
                                     description="CA bundle for a relay with a private certificate authority")
    smtp_timeout_seconds: float = Field(30.0, validation_alias=env("SMTP_TIMEOUT_SECONDS"))
    smtp_pool_size: int = Field(4, validation_alias=env("SMTP_POOL_SIZE"),
                                description="SMTP connections kept open and reused")
    mail_from: str = Field("bridgepost <newsletter@bridgepost.example>", validation_alias=env("MAIL_FROM"))
    reply_to: str = Field("kontakt@bridgepost.example", validation_alias=env("MAIL_REPLY_TO"))
    dkim_private_key_file: str | None = Field(
        None, validation_alias=env("DKIM_PRIVATE_KEY_FILE"),
        description="RSA private key (PEM) for DKIM signatures; unset = mails are not signed")
    dkim_selector: str = Field("bridgepost", validation_alias=env("DKIM_SELECTOR"),
                               description="DKIM selector: the public key is at <selector>._domainkey.<domain>")
    dkim_domain: str | None = Field(None, validation_alias=env("DKIM_DOMAIN"),
                                    description="Signing domain (d=); default: the domain of MAIL_FROM")
    send_rate_per_second: float = Field(50.0, description="Global send rate of this instance; 0 = unlimited")
    send_rate_per_domain: float = Field(
        0.0, description="Sends per second to one recipient domain (e.g. gmail.com) per instance; 0 = unlimited")
    campaign_batch_size: int = Field(200, ge=1, le=10000,
                                     description="Recipients per job on mailer.jobs.v1 (the unit instances share)")
    campaign_handover_size: int = Field(
        25, ge=1, le=1000,
        description="Campaign mails one SMTP connection takes per hand-over: they are marked in flight together, "
                    "so a crash leaves at most SMTP_POOL_SIZE × this many mails ambiguous (never resent)")
    digest_enabled: bool = Field(True, description="Send the periodic digest of upcoming events")
    digest_weekday: int = Field(0, ge=0, le=6, description="Weekday of the digest (0 = Monday)")
    digest_hour: int = Field(9, ge=0, le=23, description="Hour (Europe/Berlin) of the digest, on the first such "
                                                          "weekday of each month")
    digest_days_ahead: int = Field(35, ge=1, le=365, description="How far ahead the digest looks for events")
    retry_base_seconds: float = Field(30.0, description="First retry after a temporary failure; doubles each time")
    retry_max_seconds: float = Field(3600.0)
    max_attempts: int = Field(8, description="Attempts before a temporarily failing mail counts as failed")
    ambiguous_after_seconds: float = Field(
        120.0, description="A mail handed to SMTP but not recorded for this long is counted as ambiguous")

    @field_validator("smtp_username", "smtp_password", "smtp_ca_file", "dkim_private_key_file", "dkim_domain",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # SMTP_USERNAME= (empty) means "no login", not a login with an empty name.
        return None if value == "" else value

"""Settings of the mailer (env prefix MAILER_; SMTP and shared ones unprefixed, as in SPEC §4)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings, env


class MailerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MAILER_", extra="ignore", populate_by_name=True)

    database_url: str = Field(
        "sqlite+aiosqlite:///var/mailer.db",
        description="SQLAlchemy async URL of the mailer's own database; production: "
                    "`postgresql+asyncpg://user:password@host:5432/mailer`.")
    port: int = Field(8003, description="Port of `bridgepost serve mailer` (overridden by `--port`).")
    smtp_host: str = Field("127.0.0.1", validation_alias=env("SMTP_HOST"),
                           description="SMTP server (dev inbox, Mailpit or a real relay).")
    smtp_port: int = Field(1025, validation_alias=env("SMTP_PORT"),
                           description="SMTP port (the dev inbox and Mailpit listen on 1025; relays usually 587 "
                                       "or 465).")
    smtp_tls: Literal["none", "starttls", "tls"] = Field(
        "none", validation_alias=env("SMTP_TLS"),
        description="`none` (dev inbox, Mailpit), `starttls` (required upgrade, usually port 587) or `tls` "
                    "(implicit TLS, usually port 465).")
    smtp_username: str | None = Field(None, validation_alias=env("SMTP_USERNAME"),
                                      description="Login for the relay. Unset or empty: no login.")
    smtp_password: SecretStr | None = Field(None, validation_alias=env("SMTP_PASSWORD"),
                                            description="Password for the relay (empty = unset).")
    smtp_validate_certs: bool = Field(True, validation_alias=env("SMTP_VALIDATE_CERTS"),
                                      description="Verify the relay's TLS certificate.")
    smtp_ca_file: str | None = Field(
        None, validation_alias=env("SMTP_CA_FILE"),
        description="Path of a CA bundle (PEM) for a relay whose certificate comes from a private certificate "
                    "authority; its CAs are trusted in addition to the system's. Only with `SMTP_TLS` `starttls` "
                    "or `tls` and `SMTP_VALIDATE_CERTS=true`. Unset or empty: the system's CAs only.")
    smtp_timeout_seconds: float = Field(
        30.0, validation_alias=env("SMTP_TIMEOUT_SECONDS"),
        description="Timeout of SMTP connections and commands, in seconds; a timeout is a temporary failure "
                    "(retried).")
    smtp_pool_size: int = Field(4, validation_alias=env("SMTP_POOL_SIZE"),
                                description="SMTP connections kept open and reused; the sender claims at most "
                                            "8 × this many mails at a time.")
    mail_from: str = Field("bridgepost <newsletter@bridgepost.example>", validation_alias=env("MAIL_FROM"),
                           description="`From` header; its address is also the envelope sender and the "
                                       "`ORGANIZER` of calendar invitations.")
    reply_to: str = Field("kontakt@bridgepost.example", validation_alias=env("MAIL_REPLY_TO"),
                          description="`Reply-To` header.")
    dkim_private_key_file: str | None = Field(
        None, validation_alias=env("DKIM_PRIVATE_KEY_FILE"),
        description="PEM file of the RSA private key; when set, every mail is DKIM-signed (rsa-sha256, "
                    "relaxed/relaxed), covering the List-Unsubscribe headers. Unset: mails are not signed.")
    dkim_selector: str = Field("bridgepost", validation_alias=env("DKIM_SELECTOR"),
                               description="DKIM selector: the public key is published as TXT at "
                                           "`<selector>._domainkey.<domain>`.")
    dkim_domain: str | None = Field(None, validation_alias=env("DKIM_DOMAIN"),
                                    description="The signing domain (`d=`). Unset: the domain of `MAIL_FROM`.")
    send_rate_per_second: float = Field(
        50.0, description="Send rate of this instance in mails per second (token bucket); `0` = unlimited. With "
                          "several instances the total is the sum.")
    send_rate_per_domain: float = Field(
        0.0, description="Sends per second to one recipient domain (e.g. `gmail.com`) per instance; `0` = "
                         "unlimited.")
    campaign_batch_size: int = Field(200, ge=1, le=10000,
                                     description="Recipients per job on `mailer.jobs.v1`: the unit of work "
                                                 "instances share.")
    campaign_handover_size: int = Field(
        25, ge=1, le=1000,
        description="Campaign mails one SMTP connection takes per hand-over: they are marked in flight together, "
                    "so a crash leaves at most SMTP_POOL_SIZE × this many mails ambiguous (never resent)")
    transactional_handover_size: int = Field(
        8, ge=1, le=100,
        description="Confirmation, welcome and event mails one SMTP connection takes per hand-over when many "
                    "are waiting (one at a time when few are): they are marked in flight together, so a crash "
                    "leaves at most SMTP_POOL_SIZE × this many of them ambiguous (never resent).")
    digest_enabled: bool = Field(True, description="Send the monthly digest of upcoming events.")
    digest_weekday: int = Field(0, ge=0, le=6, description="Weekday of the digest (0 = Monday); it goes out on "
                                                            "the first such day of each month.")
    digest_hour: int = Field(9, ge=0, le=23, description="Hour (Europe/Berlin) of the digest. A day missed (the "
                                                          "mailer was down) is skipped, not sent late.")
    digest_days_ahead: int = Field(35, ge=1, le=365, description="How many days ahead the digest looks for "
                                                                  "events.")
    retry_base_seconds: float = Field(
        30.0, description="First retry after a temporary failure (4xx, connection error, timeout), in seconds; "
                          "doubles with each attempt.")
    retry_max_seconds: float = Field(3600.0, description="Longest wait between two attempts, in seconds.")
    max_attempts: int = Field(8, description="Attempts before a temporarily failing mail counts as failed.")
    ambiguous_after_seconds: float = Field(
        120.0, description="A mail handed to SMTP but not recorded for this many seconds is counted as "
                           "`ambiguous` (never resent). Keep it well above `SMTP_TIMEOUT_SECONDS` plus the time a "
                           "claimed batch waits for the rate limit.")

    @field_validator("smtp_username", "smtp_password", "smtp_ca_file", "dkim_private_key_file", "dkim_domain",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # SMTP_USERNAME= (empty) means "no login", not a login with an empty name.
        return None if value == "" else value

"""Settings shared by every service; each service adds its own with an env prefix.

Shared settings use their plain names (`KAFKA_BOOTSTRAP_SERVERS`, `PUBLIC_BASE_URL`, ...); a service's
own use its prefix (`SUBSCRIPTIONS_DATABASE_URL`). Nothing reads the environment at import time:
settings objects are built by the CLI or by tests and handed to `create_app`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET = "dev-only-secret-change-me"


def env(name: str) -> AliasChoices:
    """Read a shared setting from its unprefixed environment variable (or its field name)."""
    return AliasChoices(name, name.lower())


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    environment: Literal["dev", "test", "production"] = Field(
        "production", validation_alias=env("BRIDGEPOST_ENV"),
        description="`dev` and `test` allow the built-in development secret; `production` refuses to start the "
                    "subscriptions and events services with it (see `SUBSCRIPTIONS_SECRET_KEY`, "
                    "`EVENTS_SECRET_KEY`). `bridgepost dev` sets `dev`.",
    )
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092", validation_alias=env("KAFKA_BOOTSTRAP_SERVERS"),
        description="Kafka brokers, `host:port[,host:port…]`. `bridgepost dev` starts an embedded broker unless "
                    "this is set.",
    )
    kafka_enable_idempotence: bool = Field(
        True, validation_alias=env("KAFKA_ENABLE_IDEMPOTENCE"),
        description="Idempotent producer. The embedded dev broker does not support it, so `bridgepost dev` sets "
                    "`false`; keep `true` with Apache Kafka.",
    )
    kafka_fetch_max_wait_ms: int = Field(
        500, validation_alias=env("KAFKA_FETCH_MAX_WAIT_MS"),
        description="Longest a consumer's fetch waits for new messages, in milliseconds. Apache Kafka answers a "
                    "waiting fetch as soon as a message arrives; the embedded broker does not (it answers after up "
                    "to half of this wait), so there it adds up to half of it to every hop: lower it (e.g. `20`) "
                    "for latency, at the price of more idle polling (see `docs/performance.md`).",
    )
    kafka_session_timeout_ms: int = Field(
        10_000, ge=1_000, le=300_000, validation_alias=env("KAFKA_SESSION_TIMEOUT_MS"),
        description="How long the broker waits for a consumer's heartbeat (sent every third of this) before it "
                    "gives the consumer's partitions to another group member: a crashed process's partitions wait "
                    "this long. The embedded broker also lets every consumer's join to its group wait half of "
                    "it, at each start and restart, so `bridgepost dev` and the tests set `2000`. Keep the default "
                    "with Apache Kafka (its brokers refuse less than 6000 unless configured otherwise).",
    )
    kafka_consumers_per_topic: int = Field(
        1, ge=1, le=32, validation_alias=env("KAFKA_CONSUMERS_PER_TOPIC"),
        description="Consumers per topic in one process (FastStream `max_workers`): partitions are handled in "
                    "parallel, each in order. Raise it for throughput on Apache Kafka; each is one more group "
                    "member. (Batch consumers have one per process.)",
    )
    kafka_topic_prefix: str = Field(
        "", validation_alias=env("KAFKA_TOPIC_PREFIX"),
        description="Prefix for every topic name (and its `.dlq`), and of every consumer group, so several "
                    "stacks can share one broker.",
    )
    public_base_url: str = Field(
        "http://127.0.0.1:8001", validation_alias=env("PUBLIC_BASE_URL"),
        description="Base URL of the public subscription pages; every subscription link in a mail (confirm, "
                    "unsubscribe, preferences) starts with it (never taken from a request's Host header). Must be "
                    "the same for every service. Links to event pages start with `EVENTS_PUBLIC_URL` instead.",
    )
    organisation_name: str = Field(
        "bridgepost", validation_alias=env("ORGANISATION_NAME"),
        description="Organisation name shown on the pages and in mails; also the organiser's name (`CN`) in "
                    "calendar invitations and the name of the `/events.ics` calendar.",
    )
    organisation_address: str = Field(
        "Musterstraße 1, 39104 Magdeburg, Deutschland", validation_alias=env("ORGANISATION_ADDRESS"),
        description="Postal address shown in every mail's footer (and on the pages). The default is a "
                    "placeholder.",
    )
    log_level: str = Field(
        "INFO", validation_alias=env("LOG_LEVEL"),
        description="Log level of `bridgepost serve` (Kafka client libraries stay at `WARNING`).",
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", validation_alias=env("LOG_FORMAT"),
        description="`json` (one object per line: time, level, logger, service, correlation id, message) or "
                    "readable `text`; `auto` means JSON when `BRIDGEPOST_ENV=production`, text otherwise. Either "
                    "way e-mail addresses are masked (`email:` and the first 10 hex digits of their SHA-256 hash).",
    )
    outbox_poll_seconds: float = Field(
        1.0, validation_alias=env("OUTBOX_POLL_SECONDS"),
        description="Fallback poll of the outbox, in seconds; a commit wakes the relay at once. The relay's "
                    "lease lasts `max(10, 5 × this)` seconds.",
    )
    consumer_max_attempts: int = Field(
        3, validation_alias=env("CONSUMER_MAX_ATTEMPTS"),
        description="Attempts for a message whose handler fails with a non-transient error before it goes to "
                    "the DLQ. Transient errors (database or broker away) are retried without limit and never "
                    "dead-lettered.",
    )
    consumer_batch_size: int = Field(
        200, ge=1, le=10000, validation_alias=env("CONSUMER_BATCH_SIZE"),
        description="Most messages a batch consumer (subscriber events in the mailer, delivery reports in "
                    "subscriptions) handles in one transaction: what one fetch brings, up to this. Larger batches "
                    "cost fewer commits under load and hold the database longer.",
    )


class ServiceSettings(CommonSettings):
    """Every service has its own database."""

    database_url: str = Field(
        "sqlite+aiosqlite:///var/service.db",
        description="SQLAlchemy async URL of the service's own database.",
    )


class SigningSettings(ServiceSettings):
    """A service that signs links (unsubscribe, preferences, cancel a registration) has a secret."""

    secret_key: SecretStr = Field(
        SecretStr(DEV_SECRET),
        description="Signs the tokens of the links in mails that need no login (subscriptions: unsubscribe and "
                    "preferences links; events: cancel links of registrations). Required when "
                    "`BRIDGEPOST_ENV=production`; changing it invalidates the links in mails already sent.",
    )

    @model_validator(mode="after")
    def _no_dev_secret_in_production(self) -> SigningSettings:
        if self.environment == "production" and self.secret_key.get_secret_value() == DEV_SECRET:
            raise ValueError("secret_key must be set outside development (the built-in one is public)")
        return self

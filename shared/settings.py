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
        description="dev and test allow the built-in development secret; production refuses it",
    )
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", validation_alias=env("KAFKA_BOOTSTRAP_SERVERS"))
    kafka_enable_idempotence: bool = Field(
        True, validation_alias=env("KAFKA_ENABLE_IDEMPOTENCE"),
        description="Idempotent producer; the embedded dev broker does not support it (dev turns it off)",
    )
    kafka_fetch_max_wait_ms: int = Field(
        500, validation_alias=env("KAFKA_FETCH_MAX_WAIT_MS"),
        description="Longest a consumer's fetch waits for new messages (lower: less latency, more requests)",
    )
    kafka_consumers_per_topic: int = Field(
        1, ge=1, le=32, validation_alias=env("KAFKA_CONSUMERS_PER_TOPIC"),
        description="Consumers per topic in one process: partitions are handled in parallel, each in order",
    )
    kafka_topic_prefix: str = Field(
        "", validation_alias=env("KAFKA_TOPIC_PREFIX"),
        description="Prefix for every topic name, so several stacks can share one broker",
    )
    public_base_url: str = Field(
        "http://127.0.0.1:8001", validation_alias=env("PUBLIC_BASE_URL"),
        description="Base URL of the public subscription pages; every link in a mail starts with it",
    )
    organisation_name: str = Field("bridgepost", validation_alias=env("ORGANISATION_NAME"))
    organisation_address: str = Field(
        "Musterstraße 1, 39104 Magdeburg, Deutschland", validation_alias=env("ORGANISATION_ADDRESS"),
        description="Postal address shown in every mail's footer",
    )
    log_level: str = Field("INFO", validation_alias=env("LOG_LEVEL"))
    outbox_poll_seconds: float = Field(
        1.0, validation_alias=env("OUTBOX_POLL_SECONDS"),
        description="Fallback poll of the outbox; commits wake the relay at once",
    )
    consumer_max_attempts: int = Field(
        3, validation_alias=env("CONSUMER_MAX_ATTEMPTS"),
        description="Attempts for a message whose handler fails with a non-transient error before DLQ",
    )


class ServiceSettings(CommonSettings):
    """Every service has its own database."""

    database_url: str = "sqlite+aiosqlite:///var/service.db"


class SigningSettings(ServiceSettings):
    """A service that signs links (unsubscribe, preferences, cancel a registration) has a secret."""

    secret_key: SecretStr = SecretStr(DEV_SECRET)

    @model_validator(mode="after")
    def _no_dev_secret_in_production(self) -> SigningSettings:
        if self.environment == "production" and self.secret_key.get_secret_value() == DEV_SECRET:
            raise ValueError("secret_key must be set outside development (the built-in one is public)")
        return self

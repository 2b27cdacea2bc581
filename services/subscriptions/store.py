"""Tables of the subscriptions service: subscribers, tokens, the consent log, suppressions, rate limits."""

from __future__ import annotations

from sqlalchemy import JSON, Column, Index, Integer, MetaData, String, Table, Text

from shared.db import BigId, InfraTables, UTCDateTime

metadata = MetaData()
infra = InfraTables(metadata)

subscribers = Table(
    "subscribers", metadata,
    Column("id", String(36), primary_key=True),
    Column("email", String(320), nullable=True, unique=True),  # NULL once erased
    Column("name", String(200), nullable=True),
    Column("language", String(8), nullable=False),
    Column("topics", JSON, nullable=False),
    Column("regions", JSON, nullable=False),
    Column("audience", String(16), nullable=False, default="public"),
    Column("groups", JSON, nullable=False),
    Column("status", String(16), nullable=False),  # pending, active, unsubscribed, suppressed, erased
    Column("hard_bounces", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("confirmed_at", UTCDateTime, nullable=True),
    Index("ix_subscribers_status", "status"),
)

confirmation_tokens = Table(
    "confirmation_tokens", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("subscriber_id", String(36), nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("used_at", UTCDateTime, nullable=True),
    # Preferences asked for by an already active subscriber; applied only once confirmed.
    Column("requested_profile", JSON, nullable=True),
)

# Append-only proof of consent (GDPR Art. 7): who agreed to what text, when, from where.
consent_log = Table(
    "consent_log", metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("subscriber_id", String(36), nullable=False, index=True),
    Column("action", String(32), nullable=False),  # requested, confirmed, preferences_changed, withdrawn, ...
    Column("occurred_at", UTCDateTime, nullable=False),
    Column("ip", String(64), nullable=True),
    Column("user_agent", String(400), nullable=True),
    Column("source", String(64), nullable=False),
    Column("consent_text_version", String(64), nullable=True),
    Column("consent_text", Text, nullable=True),
    Column("language", String(8), nullable=True),
    Column("details", JSON, nullable=False),
)

# Addresses never to be mailed again, as SHA-256 of the normalised address (erasure, hard bounces).
suppressions = Table(
    "suppressions", metadata,
    Column("email_hash", String(64), primary_key=True),
    Column("reason", String(32), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# Sliding-window rate limits in the database, so they hold across instances.
rate_limit_hits = Table(
    "rate_limit_hits", metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("bucket", String(100), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Index("ix_rate_limit_bucket_at", "bucket", "at"),
)

"""Tables of the mailer: the audience projection and the ledger of outgoing mail."""

from __future__ import annotations

from sqlalchemy import JSON, Column, Index, Integer, MetaData, String, Table, Text

from shared.db import InfraTables, UTCDateTime

metadata = MetaData()
infra = InfraTables(metadata)

# Who may be mailed, built only from subscriptions.subscriber.v1 (the mailer never reads their DB).
audience = Table(
    "audience", metadata,
    Column("subscriber_id", String(36), primary_key=True),
    Column("email", String(320), nullable=False),
    Column("name", String(200), nullable=True),
    Column("language", String(8), nullable=False),
    Column("topics", JSON, nullable=False),
    Column("regions", JSON, nullable=False),
    Column("audience", String(16), nullable=False),
    Column("groups", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("manage_token", String(200), nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_audience_status", "status"),
)

# One row per mail to send. States: pending → sending → sent | retry → … | failed; `ambiguous` when a
# process died after handing the mail to SMTP and before recording the answer (never resent).
outgoing_mail = Table(
    "outgoing_mail", metadata,
    Column("id", String(36), primary_key=True),
    Column("dedupe_key", String(200), nullable=False, unique=True),
    Column("subscriber_id", String(36), nullable=True, index=True),
    Column("kind", String(40), nullable=False),
    Column("recipient", String(320), nullable=True),
    Column("message", Text, nullable=True),
    Column("message_id", String(200), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("last_error", String(500), nullable=True),
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("sent_at", UTCDateTime, nullable=True),
    Column("correlation_id", String(64), nullable=True),
    Index("ix_outgoing_mail_due", "status", "next_attempt_at"),
)

# The events the mailer knows, from events.event.v1 (newest SEQUENCE wins).
event_projection = Table(
    "event_projection", metadata,
    Column("event_id", String(36), primary_key=True),
    Column("snapshot", JSON, nullable=False),
    Column("sequence", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# Who is registered for what, from events.registration.v1: the recipients of change notices.
registration_projection = Table(
    "registration_projection", metadata,
    Column("registration_id", String(36), primary_key=True),
    Column("event_id", String(36), nullable=False, index=True),
    Column("email", String(320), nullable=False),
    Column("name", String(200), nullable=True),
    Column("language", String(8), nullable=False),
    Column("status", String(16), nullable=False),  # confirmed, waitlisted, cancelled
    Column("cancel_token", String(200), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# Newsletter issues, event announcements and digests written for a segment.
campaigns = Table(
    "campaigns", metadata,
    Column("id", String(36), primary_key=True),
    Column("kind", String(16), nullable=False),  # newsletter, announcement, digest
    Column("subject", JSON, nullable=False),  # language -> text; "de" always present
    Column("body_markdown", JSON, nullable=False),
    Column("segment", JSON, nullable=False),
    Column("status", String(16), nullable=False),  # draft, scheduled, sending, paused, done, cancelled
    Column("scheduled_at", UTCDateTime, nullable=True),
    Column("event_id", String(36), nullable=True, unique=True),  # the event an announcement is for
    Column("created_by", String(200), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Index("ix_campaigns_status", "status"),
)

# The delivery ledger: one row per (campaign, recipient), created when sending starts. States:
# pending → sending → sent | retry → … | failed; skipped (no longer active); cancelled; ambiguous.
campaign_deliveries = Table(
    "campaign_deliveries", metadata,
    Column("campaign_id", String(36), primary_key=True),
    Column("subscriber_id", String(36), primary_key=True),
    Column("batch", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("last_error", String(500), nullable=True),
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_at", UTCDateTime, nullable=True),
    Column("sent_at", UTCDateTime, nullable=True),
    Column("message_id", String(200), nullable=True),
    Index("ix_campaign_deliveries_batch", "campaign_id", "batch", "status"),
    Index("ix_campaign_deliveries_due", "status", "next_attempt_at"),
)

"""Tables of the events service: events and registrations (with the waiting list)."""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Column, Index, Integer, MetaData, String, Table, Text, UniqueConstraint

from shared.db import BigId, InfraTables, UTCDateTime

metadata = MetaData()
infra = InfraTables(metadata)

events = Table(
    "events", metadata,
    Column("id", String(36), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("title", JSON, nullable=False),  # language -> text; "de" always present
    Column("description", JSON, nullable=False),
    Column("starts_at", UTCDateTime, nullable=False),
    Column("ends_at", UTCDateTime, nullable=False),
    Column("location_name", String(300), nullable=True),
    Column("location_address", String(500), nullable=True),
    Column("online_url", String(1000), nullable=True),
    Column("region", String(64), nullable=False),
    Column("topics", JSON, nullable=False),
    Column("segment", JSON, nullable=False),
    Column("capacity", Integer, nullable=True),  # NULL = unlimited
    Column("registration_deadline", UTCDateTime, nullable=True),
    Column("announce", Boolean, nullable=False, default=False),
    Column("status", String(16), nullable=False),  # draft, published, cancelled
    Column("sequence", Integer, nullable=False, default=0),  # iCalendar SEQUENCE
    Column("cancel_message", JSON, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("published_at", UTCDateTime, nullable=True),
    Index("ix_events_status_starts", "status", "starts_at"),
)

registrations = Table(
    "registrations", metadata,
    Column("id", String(36), primary_key=True),
    Column("seq", BigId, nullable=False),  # order of arrival: the waiting list is served in this order
    Column("event_id", String(36), nullable=False),
    Column("email", String(320), nullable=False),
    Column("name", String(200), nullable=True),
    Column("language", String(8), nullable=False),
    Column("status", String(16), nullable=False),  # confirmed, waitlisted, cancelled
    Column("newsletter", Boolean, nullable=False, default=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("cancelled_at", UTCDateTime, nullable=True),
    Column("promoted_at", UTCDateTime, nullable=True),
    Column("reminder_due_at", UTCDateTime, nullable=True),  # set once the reminder event was emitted
    Column("note", Text, nullable=True),
    UniqueConstraint("event_id", "email", name="uq_registration_event_email"),
    Index("ix_registrations_event_status_seq", "event_id", "status", "seq"),
)

# Source of `registrations.seq` that works the same on SQLite and PostgreSQL.
registration_counter = Table(
    "registration_counter", metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
)

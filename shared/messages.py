"""Message schemas of the Kafka topics (SPEC §2.1): the envelope and each topic's event types.

Each topic carries several event types told apart by `type`; consumers validate with the topic's
discriminated union, so an unknown type or a schema mismatch is an error (and goes to the DLQ).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shared.ids import uuid7

CORRELATION_HEADER = "x-correlation-id"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """Fields every message carries. `event_id` is the idempotency key of consumers."""

    model_config = ConfigDict(extra="ignore")

    event_id: UUID = Field(default_factory=uuid7, description="Unique id; consumers deduplicate by it")
    type: str
    occurred_at: datetime = Field(default_factory=utcnow, description="When it happened (UTC)")
    schema_version: int = Field(default=1, description="Version of this event type's schema")


# --- subscriptions.subscriber.v1 (key: subscriber id) -------------------------------------------


class SubscriberProfile(BaseModel):
    subscriber_id: str = Field(description="Subscriber id (the message key)")
    email: str = Field(examples=["amira@example.org"])
    name: str | None = None
    language: str = Field(examples=["ar"])
    topics: list[str] = Field(default_factory=list, examples=[["arbeitsmarkt"]])
    regions: list[str] = Field(default_factory=list, examples=[["halle"]])


class SubscriptionRequested(Envelope, SubscriberProfile):
    """Someone asked to subscribe; the mailer sends the double opt-in confirmation mail."""

    type: Literal["subscription_requested"] = "subscription_requested"
    confirm_token: str = Field(description="The raw, single-use confirmation token (stored hashed)")
    expires_at: datetime
    manage_token: str = Field(description="Signed token: lets the recipient refuse further mail in one click")


class SubscriptionConfirmed(Envelope, SubscriberProfile):
    """The address is confirmed; the subscriber is active. Carries the full profile."""

    type: Literal["subscription_confirmed"] = "subscription_confirmed"
    audience: Literal["public", "partner"] = "public"
    groups: list[str] = Field(default_factory=list)
    status: str = "active"
    confirmed_at: datetime
    manage_token: str = Field(description="Signed token for unsubscribe and preference links")
    welcome: bool = Field(True, description="Send the welcome mail; false for addresses imported with proof of "
                                            "consent (an existing list moving in is not greeted again)")


class PreferencesChanged(Envelope, SubscriberProfile):
    type: Literal["preferences_changed"] = "preferences_changed"
    status: str = "active"
    manage_token: str


class GroupsChanged(Envelope):
    """Staff changed the partner groups or audience kind of a subscriber."""

    type: Literal["groups_changed"] = "groups_changed"
    subscriber_id: str
    audience: Literal["public", "partner"]
    groups: list[str]


class Unsubscribed(Envelope):
    type: Literal["unsubscribed"] = "unsubscribed"
    subscriber_id: str
    source: str = Field(description="one-click, page, preferences or staff", examples=["one-click"])


class SubscriberSuppressed(Envelope):
    type: Literal["subscriber_suppressed"] = "subscriber_suppressed"
    subscriber_id: str
    reason: str = Field(examples=["hard-bounce"])


class SubscriberErased(Envelope):
    """GDPR erasure: no personal data in this event; consumers delete theirs."""

    type: Literal["subscriber_erased"] = "subscriber_erased"
    subscriber_id: str


SubscriberEvent = Annotated[
    SubscriptionRequested
    | SubscriptionConfirmed
    | PreferencesChanged
    | GroupsChanged
    | Unsubscribed
    | SubscriberSuppressed
    | SubscriberErased,
    Field(discriminator="type"),
]

# --- mailer.delivery.v1 (key: subscriber id) -----------------------------------------------------


class DeliveryEvent(Envelope):
    subscriber_id: str
    mail_id: str = Field(description="Id of the mail in the mailer's ledger")
    kind: str = Field(examples=["confirmation", "welcome"])


class MailSent(DeliveryEvent):
    type: Literal["mail_sent"] = "mail_sent"
    message_id: str


class MailFailed(DeliveryEvent):
    """A temporary failure (SMTP 4xx or connection); the mailer retries unless `final`."""

    type: Literal["mail_failed"] = "mail_failed"
    attempt: int
    final: bool = Field(False, description="True when the mailer gave up retrying (not a bounce)")
    smtp_code: int | None = None
    error: str = ""


class MailBounced(DeliveryEvent):
    """A permanent failure (SMTP 5xx): counts towards suppression."""

    type: Literal["mail_bounced"] = "mail_bounced"
    smtp_code: int | None = None
    error: str = ""


DeliveryEventUnion = Annotated[MailSent | MailFailed | MailBounced, Field(discriminator="type")]

SUBSCRIBER_EVENTS: TypeAdapter[SubscriberEvent] = TypeAdapter(SubscriberEvent)
DELIVERY_EVENTS: TypeAdapter[DeliveryEventUnion] = TypeAdapter(DeliveryEventUnion)

# --- events.event.v1 and events.registration.v1 (key: event id) ----------------------------------


class Place(BaseModel):
    name: str = Field(examples=["Bürgerhaus Stendal"])
    address: str = Field("", examples=["Markt 1, 39576 Stendal"])


class EventSnapshot(BaseModel):
    """What a mail about an event needs to know about it, as of `sequence`."""

    event_id: str
    kind: str = Field(examples=["forum"])
    title: dict[str, str] = Field(description="Title by language; `de` always present")
    description: dict[str, str] = Field(default_factory=dict)
    starts_at: datetime
    ends_at: datetime
    timezone: str = "Europe/Berlin"
    location: Place | None = None
    online_url: str | None = None
    region: str = Field(examples=["stendal"])
    topics: list[str] = Field(default_factory=list)
    status: Literal["draft", "published", "cancelled"] = "published"
    sequence: int = Field(0, description="iCalendar SEQUENCE: grows with every change of time or place")
    url: str = Field(description="The public event page")


class Segment(BaseModel):
    """Who a mailing is for (SPEC §2.3): AND across dimensions, OR within one; empty = all."""

    model_config = ConfigDict(extra="forbid")

    audiences: list[Literal["public", "partner"]] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    regions: list[str] = Field(default_factory=list)
    topics: list[str] = Field(default_factory=list)
    languages: list[str] = Field(default_factory=list)


class EventPublished(Envelope):
    type: Literal["event_published"] = "event_published"
    event: EventSnapshot
    segment: Segment = Field(default_factory=Segment)
    announce: bool = Field(False, description="Whether publication sends an announcement campaign")


class EventUpdated(Envelope):
    """A published event changed; `changes` names what changed (old and new values)."""

    type: Literal["event_updated"] = "event_updated"
    event: EventSnapshot
    changes: dict[str, dict[str, object]] = Field(
        description="field -> {'old': ..., 'new': ...}", examples=[{"starts_at": {"old": "…", "new": "…"}}])
    notify: bool = Field(True, description="True when time or place changed: registrants get a notice")


class EventCancelled(Envelope):
    type: Literal["event_cancelled"] = "event_cancelled"
    event: EventSnapshot
    message: dict[str, str] = Field(default_factory=dict, description="Optional note to registrants by language")


EventEvent = Annotated[EventPublished | EventUpdated | EventCancelled, Field(discriminator="type")]


class RegistrationEvent(Envelope):
    registration_id: str
    event: EventSnapshot
    email: str
    name: str | None = None
    language: str = "de"
    cancel_token: str = Field(description="Signed token for the cancel link in mails")


class RegistrationConfirmed(RegistrationEvent):
    type: Literal["registration_confirmed"] = "registration_confirmed"
    newsletter: bool = Field(False, description="Also asked for the newsletter (starts the double opt-in)")
    consent_ip: str | None = None
    consent_user_agent: str | None = None
    topics: list[str] = Field(default_factory=list)
    regions: list[str] = Field(default_factory=list)


class RegistrationWaitlisted(RegistrationEvent):
    type: Literal["registration_waitlisted"] = "registration_waitlisted"
    position: int = Field(description="Place on the waiting list, 1 = next")
    newsletter: bool = False
    consent_ip: str | None = None
    consent_user_agent: str | None = None
    topics: list[str] = Field(default_factory=list)
    regions: list[str] = Field(default_factory=list)


class RegistrationPromoted(RegistrationEvent):
    type: Literal["registration_promoted"] = "registration_promoted"


class RegistrationCancelled(RegistrationEvent):
    type: Literal["registration_cancelled"] = "registration_cancelled"
    was: Literal["confirmed", "waitlisted"]


class RegistrationReminderDue(RegistrationEvent):
    type: Literal["registration_reminder_due"] = "registration_reminder_due"


RegistrationEventUnion = Annotated[
    RegistrationConfirmed | RegistrationWaitlisted | RegistrationPromoted | RegistrationCancelled
    | RegistrationReminderDue,
    Field(discriminator="type"),
]

EVENT_EVENTS: TypeAdapter[EventEvent] = TypeAdapter(EventEvent)
REGISTRATION_EVENTS: TypeAdapter[RegistrationEventUnion] = TypeAdapter(RegistrationEventUnion)

# --- mailer.jobs.v1 (key: batch id) --------------------------------------------------------------


class CampaignBatch(Envelope):
    """Internal work of the mailer: send one batch of a campaign's ledger. Spread over partitions, so
    every mailer instance takes a share of a campaign."""

    type: Literal["campaign_batch"] = "campaign_batch"
    campaign_id: str
    batch: int


JobEvent = Annotated[CampaignBatch, Field(discriminator="type")]
JOB_EVENTS: TypeAdapter[JobEvent] = TypeAdapter(JobEvent)

"""Use cases of the events service; each runs in one transaction: state + outbox.

Capacity holds under concurrency because every registration, cancellation and capacity change of
an event first locks that event's row (`SELECT … FOR UPDATE` on PostgreSQL; SQLite has one writer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.events import store
from services.events.domain import (
    EventCreate,
    EventPatch,
    check,
    place_for,
    promotions,
    registration_open,
)
from services.events.settings import EventsSettings
from shared import messages, topics
from shared.db import Database, utcnow
from shared.ids import new_id
from shared.outbox import add_to_outbox
from shared.signing import LinkSigner

log = logging.getLogger(__name__)
e_ = store.events
r_ = store.registrations


class NotFound(Exception):
    pass


class Conflict(Exception):
    """The request does not fit the event's state (e.g. publishing a cancelled event)."""


class RegistrationRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # not_published, cancelled, closed


@dataclass(frozen=True)
class RegistrationResult:
    registration_id: str
    status: str  # confirmed, waitlisted
    created: bool
    position: int | None = None


def place_of(row) -> messages.Place | None:
    return messages.Place(name=row.location_name, address=row.location_address or "") if row.location_name else None


class Events:
    def __init__(self, db: Database, settings: EventsSettings) -> None:
        self.db, self.settings = db, settings
        self.cancel_links = LinkSigner(settings.secret_key.get_secret_value(), "registration")

    def url(self, event_id: str) -> str:
        return f"{self.settings.public_url.rstrip('/')}/events/{event_id}"

    def snapshot(self, row) -> messages.EventSnapshot:
        return messages.EventSnapshot(
            event_id=row.id, kind=row.kind, title=row.title, description=row.description, starts_at=row.starts_at,
            ends_at=row.ends_at, timezone=self.settings.timezone, location=place_of(row), online_url=row.online_url,
            region=row.region, topics=list(row.topics), status=row.status, sequence=row.sequence, url=self.url(row.id))

    async def _emit(self, s: AsyncSession, topic: str, event_id: str, event: messages.Envelope,
                    correlation_id: str | None) -> None:
        await add_to_outbox(s, store.infra, topic, event_id, event, correlation_id)

    async def _locked(self, s: AsyncSession, event_id: str):
        row = (await s.execute(select(e_).where(e_.c.id == event_id).with_for_update())).first()
        if row is None:
            raise NotFound(event_id)
        return row

    # --- staff ---------------------------------------------------------------------------------------

    async def create(self, s: AsyncSession, data: EventCreate) -> str:
        now = utcnow()
        event_id = new_id()
        await s.execute(insert(e_).values(id=event_id, status="draft", sequence=0, created_at=now, updated_at=now,
                                          **self._columns(data.model_dump(exclude_unset=False))))
        return event_id

    @staticmethod
    def _columns(values: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in values.items() if k not in ("location", "online_url", "segment")}
        if "location" in values:
            place = values["location"]
            out["location_name"] = place["name"] if place else None
            out["location_address"] = place.get("address", "") if place else None
        if "online_url" in values:
            out["online_url"] = str(values["online_url"]) if values["online_url"] else None
        if "segment" in values and values["segment"] is not None:
            out["segment"] = values["segment"]
        return out

    async def patch(self, s: AsyncSession, event_id: str, patch: EventPatch, correlation_id: str | None) -> dict:
        """Change an event. On a published event a change of time or place raises SEQUENCE and
        emits `event_updated` with what changed; other changes are emitted without a notice."""
        row = await self._locked(s, event_id)
        if row.status == "cancelled":
            raise Conflict("a cancelled event cannot be changed")
        given = patch.model_dump(exclude_unset=True)
        if "segment" in given and given["segment"] is None:
            given.pop("segment")
        columns = self._columns(given)
        current = dict(row._mapping)
        merged = {**current, **columns}
        check(merged["starts_at"], merged["ends_at"], merged.get("registration_deadline"),
              merged.get("location_name"), merged.get("online_url"))
        changes = {k: {"old": _plain(current.get(k)), "new": _plain(v)} for k, v in columns.items()
                   if _plain(current.get(k)) != _plain(v)}
        if not changes:
            return {}
        time_or_place = any(k in changes for k in ("starts_at", "ends_at", "location_name", "location_address",
                                                   "online_url"))
        sequence = row.sequence + (1 if row.status == "published" and time_or_place else 0)
        await s.execute(update(e_).where(e_.c.id == event_id).values(updated_at=utcnow(), sequence=sequence,
                                                                       **columns))
        if row.status == "published":
            fresh = (await s.execute(select(e_).where(e_.c.id == event_id))).first()
            await self._emit(s, topics.EVENT, event_id, messages.EventUpdated(
                event=self.snapshot(fresh), changes=changes, notify=time_or_place), correlation_id)
            if "capacity" in changes:
                await self._promote(s, fresh, correlation_id)
            if time_or_place:  # a reminder already sent for the old time is due again for the new one
                await s.execute(update(r_).where(r_.c.event_id == event_id).values(reminder_due_at=None))
        return changes

    async def publish(self, s: AsyncSession, event_id: str, correlation_id: str | None) -> None:
        row = await self._locked(s, event_id)
        if row.status == "published":
            return
        if row.status == "cancelled":
            raise Conflict("a cancelled event cannot be published")
        await s.execute(update(e_).where(e_.c.id == event_id).values(status="published", published_at=utcnow(),
                                                                       updated_at=utcnow()))
        fresh = (await s.execute(select(e_).where(e_.c.id == event_id))).first()
        await self._emit(s, topics.EVENT, event_id, messages.EventPublished(
            event=self.snapshot(fresh), segment=messages.Segment(**row.segment), announce=row.announce),
            correlation_id)

    async def cancel(self, s: AsyncSession, event_id: str, message: dict[str, str], correlation_id: str | None) -> None:
        row = await self._locked(s, event_id)
        if row.status == "cancelled":
            return
        was_published = row.status == "published"
        await s.execute(update(e_).where(e_.c.id == event_id).values(
            status="cancelled", sequence=row.sequence + 1, cancel_message=message, updated_at=utcnow()))
        if was_published:
            fresh = (await s.execute(select(e_).where(e_.c.id == event_id))).first()
            await self._emit(s, topics.EVENT, event_id, messages.EventCancelled(
                event=self.snapshot(fresh), message=message), correlation_id)

    # --- registration ----------------------------------------------------------------------------------

    async def register(self, event_id: str, email: str, name: str | None, language: str, newsletter: bool,
                       ip: str | None, user_agent: str | None, correlation_id: str | None) -> RegistrationResult:
        for attempt in range(3):
            try:
                return await self._register(event_id, email, name, language, newsletter, ip, user_agent,
                                            correlation_id)
            except IntegrityError:
                if attempt == 2:  # the same address raced itself: the other request's answer stands
                    raise
        raise AssertionError("unreachable")

    async def _register(self, event_id: str, email: str, name: str | None, language: str, newsletter: bool,
                        ip: str | None, user_agent: str | None, correlation_id: str | None) -> RegistrationResult:
        now = utcnow()
        async with self.db.transaction() as s:
            event = await self._locked(s, event_id)
            refused = registration_open(event.status, event.registration_deadline, event.starts_at, now)
            existing = (await s.execute(select(r_).where(r_.c.event_id == event_id, r_.c.email == email))).first()
            if existing is not None and existing.status in ("confirmed", "waitlisted"):
                # Registering twice does not take a second place; the answer is the first one's.
                position = await self._position(s, existing) if existing.status == "waitlisted" else None
                return RegistrationResult(existing.id, existing.status, False, position)
            if refused:
                raise RegistrationRefused(refused)
            confirmed = await self._count(s, event_id, "confirmed")
            status = place_for(event.capacity, confirmed)
            seq = (await s.execute(insert(store.registration_counter).values())).inserted_primary_key[0]
            if existing is None:
                registration_id = new_id()
                await s.execute(insert(r_).values(
                    id=registration_id, seq=seq, event_id=event_id, email=email, name=name, language=language,
                    status=status, newsletter=newsletter, created_at=now, updated_at=now))
            else:  # cancelled before, registering again: back of the queue
                registration_id = existing.id
                await s.execute(update(r_).where(r_.c.id == existing.id).values(
                    seq=seq, name=name, language=language, status=status, newsletter=newsletter, updated_at=now,
                    cancelled_at=None, promoted_at=None, reminder_due_at=None))
            row = (await s.execute(select(r_).where(r_.c.id == registration_id))).first()
            common = self._registration_fields(event, row)
            consent = dict(newsletter=newsletter, consent_ip=ip if newsletter else None,
                           consent_user_agent=(user_agent or "")[:400] or None if newsletter else None,
                           topics=list(event.topics) if newsletter else [],
                           regions=[event.region] if newsletter else [])
            position = None
            if status == "confirmed":
                evt: messages.Envelope = messages.RegistrationConfirmed(**common, **consent)
            else:
                position = await self._position(s, row)
                evt = messages.RegistrationWaitlisted(**common, position=position, **consent)
            await self._emit(s, topics.REGISTRATION, event_id, evt, correlation_id)
            return RegistrationResult(registration_id, status, True, position)

    def _registration_fields(self, event, row) -> dict[str, Any]:
        return dict(registration_id=row.id, event=self.snapshot(event), email=row.email, name=row.name,
                    language=row.language, cancel_token=self.cancel_links.token(row.id))

    async def _count(self, s: AsyncSession, event_id: str, status: str) -> int:
        return int(await s.scalar(select(func.count()).select_from(r_)
                                  .where(r_.c.event_id == event_id, r_.c.status == status)) or 0)

    async def _position(self, s: AsyncSession, row) -> int:
        ahead = await s.scalar(select(func.count()).select_from(r_).where(
            r_.c.event_id == row.event_id, r_.c.status == "waitlisted", r_.c.seq < row.seq))
        return int(ahead or 0) + 1

    async def registration_for_link(self, token: str | None):
        registration_id = self.cancel_links.verify(token)
        if registration_id is None:
            return None, None
        async with self.db.sessions() as s:
            row = (await s.execute(select(r_).where(r_.c.id == registration_id))).first()
            event = (await s.execute(select(e_).where(e_.c.id == row.event_id))).first() if row else None
        return row, event

    async def cancel_registration(self, token: str | None, correlation_id: str | None) -> tuple[bool, Any]:
        """Cancel through the signed link; frees the place and promotes the head of the waiting list."""
        registration_id = self.cancel_links.verify(token)
        if registration_id is None:
            return False, None
        async with self.db.transaction() as s:
            row = (await s.execute(select(r_).where(r_.c.id == registration_id))).first()
            if row is None:
                return False, None
            event = await self._locked(s, row.event_id)
            row = (await s.execute(select(r_).where(r_.c.id == registration_id))).first()  # after the lock
            if row.status == "cancelled":
                return True, row
            await s.execute(update(r_).where(r_.c.id == row.id).values(
                status="cancelled", cancelled_at=utcnow(), updated_at=utcnow()))
            await self._emit(s, topics.REGISTRATION, row.event_id, messages.RegistrationCancelled(
                **self._registration_fields(event, row), was=row.status), correlation_id)
            if row.status == "confirmed" and event.status == "published":
                await self._promote(s, event, correlation_id)
            return True, row

    async def _promote(self, s: AsyncSession, event, correlation_id: str | None) -> int:
        confirmed = await self._count(s, event.id, "confirmed")
        waiting = await self._count(s, event.id, "waitlisted")
        n = promotions(event.capacity, confirmed, waiting)
        if n <= 0 or event.starts_at <= utcnow():
            return 0
        heads = (await s.execute(select(r_).where(r_.c.event_id == event.id, r_.c.status == "waitlisted")
                                 .order_by(r_.c.seq).limit(n))).all()
        for head in heads:
            await s.execute(update(r_).where(r_.c.id == head.id).values(
                status="confirmed", promoted_at=utcnow(), updated_at=utcnow()))
            await self._emit(s, topics.REGISTRATION, event.id, messages.RegistrationPromoted(
                **self._registration_fields(event, head)), correlation_id)
        return len(heads)

    # --- reminders -------------------------------------------------------------------------------------

    async def emit_due_reminders(self, now: datetime | None = None, limit: int = 500) -> int:
        """Emit `registration_reminder_due` for confirmed registrations whose event starts within the
        reminder window. The conditional UPDATE makes it exactly once, whatever the number of instances."""
        now = now or utcnow()
        window = now + timedelta(hours=self.settings.reminder_hours_before)
        emitted = 0
        async with self.db.sessions() as s:
            due = (await s.execute(
                select(r_.c.id, r_.c.event_id).join(e_, e_.c.id == r_.c.event_id)
                .where(e_.c.status == "published", e_.c.starts_at > now, e_.c.starts_at <= window,
                       r_.c.status == "confirmed", r_.c.reminder_due_at.is_(None))
                .order_by(e_.c.starts_at).limit(limit))).all()
        for registration_id, event_id in due:
            async with self.db.transaction() as s:
                claimed = await s.execute(update(r_).where(r_.c.id == registration_id, r_.c.status == "confirmed",
                                                           r_.c.reminder_due_at.is_(None)).values(reminder_due_at=now))
                if not claimed.rowcount:
                    continue  # another instance was first
                event = (await s.execute(select(e_).where(e_.c.id == event_id))).first()
                row = (await s.execute(select(r_).where(r_.c.id == registration_id))).first()
                await self._emit(s, topics.REGISTRATION, event_id, messages.RegistrationReminderDue(
                    **self._registration_fields(event, row)), None)
                emitted += 1
        return emitted


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value

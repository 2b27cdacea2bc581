"""Subscriber events → audience projection and transactional mails (double opt-in confirmation, welcome).

Each event's effect is stored in one transaction with its processed-event marker (projection change +
ledger row), so a redelivered or replayed event changes nothing and sends nothing twice. Under load the
consumer hands over what one fetch brought (`handle_batch`): one transaction for all of them, each
seeing the ones before it, as if handled one by one.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.mailer import store
from services.mailer.composer import TransactionalLetters
from services.mailer.render import MailRenderer, Recipient, Rendered
from shared import messages, topics
from shared.db import Database, utcnow, wake_after_commit
from shared.ids import new_id
from shared.kafka import first_handlings, mark_processed

log = logging.getLogger(__name__)
a_ = store.audience
m_ = store.outgoing_mail
CONSUMER = "mailer.subscriber"
# Not handed to SMTP yet: an unsubscribe or erasure cancels these. A mail a sender has claimed but not yet
# handed over is among them: the hand-over then finds it no longer claimed and leaves it out.
UNSENT = ("pending", "retry", "claimed")


class Written(NamedTuple):
    """A mail as the ledger stores it: the whole message as text, and its Message-ID."""

    source: str
    message_id: str


async def enqueue_mail(s: AsyncSession, mail: Rendered | Written, *, dedupe_key: str, kind: str, recipient: str,
                       subscriber_id: str | None, correlation_id: str | None) -> str:
    """A ledger row for the mail, due now."""
    row = mail_row(mail, dedupe_key=dedupe_key, kind=kind, recipient=recipient, subscriber_id=subscriber_id,
                   correlation_id=correlation_id)
    wake_after_commit(s, "mail")
    await s.execute(insert(m_).values(**row))
    return row["id"]


def mail_row(mail: Rendered | Written, *, dedupe_key: str, kind: str, recipient: str, subscriber_id: str | None,
             correlation_id: str | None) -> dict[str, Any]:
    """The values of a mail's ledger row, `pending` and due now."""
    now = utcnow()
    source, message_id = (mail.message.as_string(), mail.message_id) if isinstance(mail, Rendered) else mail
    return dict(id=new_id(), dedupe_key=dedupe_key, subscriber_id=subscriber_id, kind=kind,
                recipient=recipient, message=source, message_id=message_id, status="pending", attempts=0,
                next_attempt_at=now, created_at=now, correlation_id=(correlation_id or "")[:64] or None)


class TransactionalMail:
    def __init__(self, db: Database, renderer: MailRenderer) -> None:
        self.db, self.renderer = db, renderer
        self.letters = TransactionalLetters(renderer)

    def _labels(self, dimension: str, keys: list[str], lang: str) -> str:
        taxonomy = self.renderer.tr.taxonomy
        if not keys:
            return self.renderer.tr.gettext(lang, "mail.welcome.all")
        return ", ".join(taxonomy.label(dimension, k, lang) for k in keys)

    async def _upsert(self, s: AsyncSession, subscriber_id: str, exists: bool | None = None, **values: Any) -> None:
        values["updated_at"] = utcnow()
        if exists is None:
            exists = await s.scalar(select(a_.c.subscriber_id).where(a_.c.subscriber_id == subscriber_id)) is not None
        if exists:
            await s.execute(update(a_).where(a_.c.subscriber_id == subscriber_id).values(**values))
        else:
            defaults = dict(name=None, topics=[], regions=[], audience="public", groups=[], manage_token=None)
            await s.execute(insert(a_).values(subscriber_id=subscriber_id, **{**defaults, **values}))

    async def _cancel_unsent(self, s: AsyncSession, subscriber_id: str) -> None:
        await s.execute(update(m_).where(m_.c.subscriber_id == subscriber_id, m_.c.status.in_(UNSENT))
                        .values(status="cancelled"))

    async def handle(self, event: Any, correlation_id: str | None) -> None:
        # Written before the transaction: the connection is not held while the mail is rendered.
        mail = self._mail(event)
        async with self.db.transaction() as s:
            await mark_processed(s, store.infra, CONSUMER, event.event_id)
            await self._apply(s, event, mail, correlation_id)

    async def handle_batch(self, events: list[tuple[Any, str | None]]) -> int:
        """Several events in one transaction, in order, with the effect of handling them one by one; returns
        how many were handled before (left out). Consecutive sign-up requests (what load brings) are written
        together: a few statements for all of them instead of a few each."""
        mails = [self._mail(event) for event, _ in events]
        async with self.db.transaction() as s:
            new = await first_handlings(s, store.infra, CONSUMER, [event.event_id for event, _ in events])
            fresh = []  # (event, mail, correlation id) of the events not handled before, in order
            for (event, correlation_id), mail in zip(events, mails, strict=True):
                if str(event.event_id) in new:
                    new.discard(str(event.event_id))  # (the same event twice in one batch: once)
                    fresh.append((event, mail, correlation_id))
            requests: list[tuple[Any, Written, str | None]] = []
            for event, mail, correlation_id in fresh:
                if isinstance(event, messages.SubscriptionRequested):
                    requests.append((event, mail, correlation_id))
                    continue
                if requests:  # the requests before this event first
                    await self._requested_together(s, requests)
                    requests = []
                await self._apply(s, event, mail, correlation_id)
            if requests:
                await self._requested_together(s, requests)
        return len(events) - len(fresh)

    async def _requested_together(self, s: AsyncSession, requests: list[tuple[Any, Written, str | None]]) -> None:
        """`_requested` for several sign-up requests, in order, in five statements at most."""
        ids = list({event.subscriber_id for event, _, _ in requests})
        status = dict((await s.execute(select(a_.c.subscriber_id, a_.c.status)
                                       .where(a_.c.subscriber_id.in_(ids)))).all())
        now = utcnow()
        new_rows, changed_rows, mails = [], [], []
        for event, mail, correlation_id in requests:
            current = status.get(event.subscriber_id)
            if current != "active":  # an active subscriber asking to change choices stays active meanwhile
                values = dict(email=event.email, name=event.name, language=event.language, topics=event.topics,
                              regions=event.regions, status="pending", updated_at=now)
                if event.subscriber_id in status:
                    changed_rows.append({f"v_{key}": value for key, value in values.items()}
                                        | {"v_subscriber_id": event.subscriber_id})
                else:
                    new_rows.append(dict(subscriber_id=event.subscriber_id, audience="public", groups=[],
                                         manage_token=None, **values))
                status[event.subscriber_id] = "pending"
            mails.append(mail_row(mail, dedupe_key=f"{event.event_id}:confirmation", kind="confirmation",
                                  recipient=event.email, subscriber_id=event.subscriber_id,
                                  correlation_id=correlation_id))
        # Inserts before updates: a subscriber new in this batch and changed later in it is inserted first.
        if new_rows:
            await s.execute(insert(a_), new_rows)
        if changed_rows:
            columns = ("email", "name", "language", "topics", "regions", "status", "updated_at")
            await s.execute(update(a_).where(a_.c.subscriber_id == bindparam("v_subscriber_id"))
                            .values({column: bindparam(f"v_{column}") for column in columns}), changed_rows)
        wake_after_commit(s, "mail")
        await s.execute(insert(m_), mails)

    async def _apply(self, s: AsyncSession, event: Any, mail: Written | None, correlation_id: str | None) -> None:
        match event:
            case messages.SubscriptionRequested():
                await self._requested(s, event, mail, correlation_id)
            case messages.SubscriptionConfirmed():
                await self._confirmed(s, event, mail, correlation_id)
            case messages.PreferencesChanged():
                await self._upsert(s, event.subscriber_id, email=event.email, name=event.name,
                                   language=event.language, topics=event.topics, regions=event.regions,
                                   status=event.status, manage_token=event.manage_token)
            case messages.GroupsChanged():
                await s.execute(update(a_).where(a_.c.subscriber_id == event.subscriber_id)
                                .values(audience=event.audience, groups=event.groups, updated_at=utcnow()))
            case messages.Unsubscribed() | messages.SubscriberSuppressed():
                status = "unsubscribed" if isinstance(event, messages.Unsubscribed) else "suppressed"
                await s.execute(update(a_).where(a_.c.subscriber_id == event.subscriber_id)
                                .values(status=status, updated_at=utcnow()))
                await self._cancel_unsent(s, event.subscriber_id)
            case messages.SubscriberErased():
                await s.execute(delete(a_).where(a_.c.subscriber_id == event.subscriber_id))
                await self._cancel_unsent(s, event.subscriber_id)
                # The ledgers keep that a mail existed (for counts), not to whom or what it said, nor the
                # server's answer beyond its code (a refusal names the address); nor do delivery reports
                # waiting in the outbox, which quote that answer (no use for an erased subscriber).
                d_ = store.campaign_deliveries
                await s.execute(update(m_).where(m_.c.subscriber_id == event.subscriber_id).values(
                    recipient=None, message=None, last_error=func.substr(m_.c.last_error, 1, 4)))
                await s.execute(update(d_).where(d_.c.subscriber_id == event.subscriber_id)
                                .values(last_error=func.substr(d_.c.last_error, 1, 4)))
                await s.execute(delete(store.infra.outbox).where(store.infra.outbox.c.key == event.subscriber_id,
                                                                 store.infra.outbox.c.topic == topics.DELIVERY))

    def _mail(self, event: Any) -> Written | None:
        """The confirmation or welcome mail an event asks for (filled in from a form letter)."""
        match event:
            case messages.SubscriptionRequested():
                hours = max(1, round((event.expires_at - event.occurred_at).total_seconds() / 3600))
                confirm_url = self.renderer.link("/confirm", token=event.confirm_token, lang=event.language)
                # The links let someone signed up by a stranger refuse further mail with one click (RFC 8058).
                return self._write("confirmation", event, "mail.confirmation.subject", {"hours": hours},
                                   {"confirm_url": confirm_url})
            case messages.SubscriptionConfirmed(welcome=True):
                lang = event.language
                return self._write("welcome", event, "mail.welcome.subject", {},
                                   {"topics_text": self._labels("topics", event.topics, lang),
                                    "regions_text": self._labels("regions", event.regions, lang)})
        return None  # imported with proof of consent: in the audience, not greeted

    def _write(self, kind: str, event: Any, subject_key: str, shared: dict[str, Any], own: dict[str, str]) -> Written:
        recipient = Recipient(event.email, event.name, event.language)
        composed = self.letters.compose(kind, recipient, subject_key, shared, own, event.manage_token)
        if composed is not None:
            data, message_id = composed
            return Written(data.decode("ascii"), message_id)
        rendered = self.renderer.render(kind, recipient, subject_key, {**shared, **own},
                                        manage_token=event.manage_token)
        return Written(rendered.message.as_string(), rendered.message_id)

    async def _requested(self, s: AsyncSession, event: messages.SubscriptionRequested, mail: Written,
                         cid: str | None) -> None:
        current = await s.scalar(select(a_.c.status).where(a_.c.subscriber_id == event.subscriber_id))
        if current != "active":  # an active subscriber asking to change choices stays active meanwhile
            await self._upsert(s, event.subscriber_id, exists=current is not None, email=event.email,
                               name=event.name, language=event.language, topics=event.topics,
                               regions=event.regions, status="pending")
        await enqueue_mail(s, mail, dedupe_key=f"{event.event_id}:confirmation", kind="confirmation",
                           recipient=event.email, subscriber_id=event.subscriber_id, correlation_id=cid)

    async def _confirmed(self, s: AsyncSession, event: messages.SubscriptionConfirmed, mail: Written | None,
                         cid: str | None) -> None:
        await self._upsert(s, event.subscriber_id, email=event.email, name=event.name, language=event.language,
                           topics=event.topics, regions=event.regions, audience=event.audience,
                           groups=event.groups, status="active", manage_token=event.manage_token)
        if mail is not None:
            await enqueue_mail(s, mail, dedupe_key=f"{event.event_id}:welcome", kind="welcome",
                               recipient=event.email, subscriber_id=event.subscriber_id, correlation_id=cid)

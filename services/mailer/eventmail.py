"""Events and registrations → projections and event mails with calendar invitations (SPEC §2.5).

Registration mails carry an .ics (METHOD:REQUEST, the event's stable UID and current SEQUENCE; a
cancellation METHOD:CANCEL). A change of time or place, and a cancellation, notify every registrant
the mailer knows of. If a registration event is handled after a newer version of its event, the mail
shows the newer version: whoever reads it has the current time and place.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlencode, urlparse

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.mailer import store
from services.mailer.render import MailRenderer, Recipient
from services.mailer.transactional import enqueue_mail
from shared import ics, messages
from shared.dates import when
from shared.db import Database, utcnow, wake_after_commit
from shared.ids import new_id
from shared.kafka import mark_processed

log = logging.getLogger(__name__)
ev_ = store.event_projection
rg_ = store.registration_projection
ACTIVE = ("confirmed", "waitlisted")


def literal(text: str) -> str:
    """Staff text inside a generated campaign body: shown as written, never read as placeholders.

    Every `{` becomes an expression that prints it. (A `{% raw %}` block can be ended from inside the
    text — `{%endraw%}`, `{% endr{% endraw %}aw %}` — and what Markdown keeps from a placeholder it
    would not escape.)
    """
    return text.replace("{", "{{ '{' }}")


class EventMail:
    def __init__(self, db: Database, renderer: MailRenderer, organizer: str) -> None:
        self.db, self.renderer, self.organizer = db, renderer, organizer

    # --- projections ---------------------------------------------------------------------------------

    async def _freshest(self, s: AsyncSession, snapshot: messages.EventSnapshot) -> messages.EventSnapshot:
        row = (await s.execute(select(ev_).where(ev_.c.event_id == snapshot.event_id))).first()
        if row is not None and row.sequence > snapshot.sequence:
            return messages.EventSnapshot.model_validate(row.snapshot)
        return snapshot

    async def _store_event(self, s: AsyncSession, snapshot: messages.EventSnapshot) -> None:
        row = (await s.execute(select(ev_.c.sequence).where(ev_.c.event_id == snapshot.event_id))).first()
        values = dict(snapshot=snapshot.model_dump(mode="json"), sequence=snapshot.sequence,
                      status=snapshot.status, updated_at=utcnow())
        if row is None:
            await s.execute(insert(ev_).values(event_id=snapshot.event_id, **values))
        elif snapshot.sequence >= row.sequence:
            await s.execute(update(ev_).where(ev_.c.event_id == snapshot.event_id).values(**values))

    async def _store_registration(self, s: AsyncSession, e: messages.RegistrationEvent, status: str) -> None:
        values = dict(event_id=e.event.event_id, email=e.email, name=e.name, language=e.language, status=status,
                      cancel_token=e.cancel_token, updated_at=utcnow())
        if await s.scalar(select(rg_.c.registration_id).where(rg_.c.registration_id == e.registration_id)):
            await s.execute(update(rg_).where(rg_.c.registration_id == e.registration_id).values(**values))
        else:
            await s.execute(insert(rg_).values(registration_id=e.registration_id, **values))

    # --- mail ----------------------------------------------------------------------------------------

    def _mail(self, kind: str, snapshot: messages.EventSnapshot, email: str, name: str | None, language: str,
              cancel_token: str | None, calendar: str | None, **extra: Any):
        lang = language if language in self.renderer.tr.taxonomy.languages else "de"
        title = snapshot.title.get(lang) or snapshot.title["de"]
        place = ", ".join(p for p in (snapshot.location.name, snapshot.location.address) if p) \
            if snapshot.location else None
        parsed = urlparse(snapshot.url)
        base = f"{parsed.scheme}://{parsed.netloc}"
        cancel_url = f"{base}/registrations/cancel?{urlencode({'token': cancel_token, 'lang': lang})}" \
            if cancel_token else None
        attachments = []
        if calendar:
            data = ics.invitation(snapshot, lang, self.organizer, self.renderer.organisation, email, name,
                                  parsed.hostname or "bridgepost.local", cancel=calendar == "cancel",
                                  tentative=calendar == "tentative")
            method = "CANCEL" if calendar == "cancel" else "REQUEST"
            attachments.append(("invite.ics", f"text/calendar; method={method}", data))
        context = dict(title=title, title_lang=lang if snapshot.title.get(lang) else "de",
                       when=when(snapshot.starts_at, snapshot.ends_at, lang, snapshot.timezone), place=place,
                       online_url=snapshot.online_url, event_url=f"{snapshot.url}?lang={lang}",
                       cancel_url=cancel_url, has_calendar=bool(calendar), position=extra.get("position"),
                       note=extra.get("note"))
        return self.renderer.render(kind, Recipient(email, name, lang), f"mail.{kind}.subject", context,
                                    attachments=attachments, template="event", subject_values={"title": title})

    async def _enqueue(self, s: AsyncSession, dedupe: str, kind: str, snapshot, email, name, language, token,
                       calendar, cid: str | None, **extra: Any) -> None:
        rendered = self._mail(kind, snapshot, email, name, language, token, calendar, **extra)
        await enqueue_mail(s, rendered, dedupe_key=dedupe, kind=kind, recipient=email, subscriber_id=None,
                           correlation_id=cid)

    # --- handlers ------------------------------------------------------------------------------------

    async def handle_event(self, event: Any, correlation_id: str | None) -> None:
        async with self.db.transaction() as s:
            await mark_processed(s, store.infra, "mailer.event", event.event_id)
            await self._store_event(s, event.event)
            if isinstance(event, messages.EventPublished):
                if event.announce:
                    await self._announce(s, event)
                return
            if isinstance(event, messages.EventUpdated) and not event.notify:
                return
            snapshot = await self._freshest(s, event.event)
            registrants = (await s.execute(select(rg_).where(rg_.c.event_id == snapshot.event_id,
                                                             rg_.c.status.in_(ACTIVE)))).all()
            for r in registrants:
                if isinstance(event, messages.EventCancelled):
                    note = event.message.get(r.language) or event.message.get("de")
                    await self._enqueue(s, f"{event.event_id}:{r.registration_id}", "event_cancelled", snapshot,
                                        r.email, r.name, r.language, None, "cancel", correlation_id, note=note)
                else:
                    await self._enqueue(s, f"{event.event_id}:{r.registration_id}", "event_changed", snapshot,
                                        r.email, r.name, r.language, r.cancel_token,
                                        "tentative" if r.status == "waitlisted" else "request", correlation_id)

    async def _announce(self, s: AsyncSession, event: messages.EventPublished) -> None:
        """An announcement campaign for the event's segment, in every language. Scheduled for now in
        this transaction (the campaign sweep starts it), so it exists exactly once per event."""
        snapshot = event.event
        if await s.scalar(select(store.campaigns.c.id).where(store.campaigns.c.event_id == snapshot.event_id)):
            return
        subjects, bodies = {}, {}
        for lang in self.renderer.tr.taxonomy.languages:
            subjects[lang] = literal(self.renderer.tr.gettext(
                lang, "mail.announcement.subject", title=snapshot.title.get(lang) or snapshot.title["de"]))
            bodies[lang] = self.announcement_body(snapshot, lang)
        now = utcnow()
        await s.execute(insert(store.campaigns).values(
            id=new_id(), kind="announcement", subject=subjects, body_markdown=bodies,
            segment=event.segment.model_dump(), status="scheduled", scheduled_at=now, event_id=snapshot.event_id,
            created_by="event publication", created_at=now, updated_at=now))
        wake_after_commit(s, "campaigns")  # the sweep starts it right after this commit, not on its next round

    def announcement_body(self, snapshot: messages.EventSnapshot, lang: str) -> str:
        tr = self.renderer.tr
        title = snapshot.title.get(lang) or snapshot.title["de"]
        description = snapshot.description.get(lang) or snapshot.description.get("de") or ""
        place = ", ".join(p for p in (snapshot.location.name, snapshot.location.address) if p) \
            if snapshot.location else snapshot.online_url or ""
        lines = [f"## {literal(title)}", "",
                 f"**{tr.gettext(lang, 'mail.event.when')}:** {when(snapshot.starts_at, snapshot.ends_at, lang)}  ",
                 f"**{tr.gettext(lang, 'mail.event.where')}:** {literal(place)}", "", literal(description), "",
                 f"[{tr.gettext(lang, 'mail.announcement.details')}]({snapshot.url}?lang={lang})"]
        return "\n".join(lines)

    async def handle_registration(self, event: Any, correlation_id: str | None) -> None:
        async with self.db.transaction() as s:
            await mark_processed(s, store.infra, "mailer.registration", event.event_id)
            await self._store_event(s, event.event)
            snapshot = await self._freshest(s, event.event)
            dedupe = f"{event.event_id}:{event.registration_id}"
            args = (snapshot, event.email, event.name, event.language)
            match event:
                case messages.RegistrationConfirmed():
                    await self._store_registration(s, event, "confirmed")
                    await self._enqueue(s, dedupe, "registration_confirmed", *args, event.cancel_token, "request",
                                        correlation_id)
                case messages.RegistrationWaitlisted():
                    await self._store_registration(s, event, "waitlisted")
                    await self._enqueue(s, dedupe, "registration_waitlisted", *args, event.cancel_token,
                                        "tentative", correlation_id, position=event.position)
                case messages.RegistrationPromoted():
                    await self._store_registration(s, event, "confirmed")
                    await self._enqueue(s, dedupe, "registration_promoted", *args, event.cancel_token, "request",
                                        correlation_id)
                case messages.RegistrationCancelled():
                    await self._store_registration(s, event, "cancelled")
                    await self._enqueue(s, dedupe, "registration_cancelled", *args, None, "cancel", correlation_id)
                case messages.RegistrationReminderDue():
                    current = await s.scalar(select(rg_.c.status)
                                             .where(rg_.c.registration_id == event.registration_id))
                    if snapshot.status == "cancelled" or current not in (None, "confirmed"):
                        return  # cancelled since: no reminder
                    await self._enqueue(s, dedupe, "event_reminder", *args, event.cancel_token, "request",
                                        correlation_id)

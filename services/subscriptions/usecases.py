"""Use cases of the subscriptions service; each runs in one transaction: state + consent log + outbox.

This is where a sign-up becomes a Kafka event (`request_subscription` → `subscription_requested`).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import delete, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.subscriptions import store
from services.subscriptions.domain import (
    ImportedSubscriber,
    ManageLinks,
    Preferences,
    SignupRequest,
    email_hash,
    expiry,
    new_token,
    token_hash,
    token_state,
)
from services.subscriptions.settings import SubscriptionsSettings
from shared import messages, topics
from shared.db import Database, utcnow
from shared.kafka import AlreadyProcessed, mark_processed
from shared.outbox import add_to_outbox

log = logging.getLogger(__name__)
s_ = store.subscribers


# Sources whose requests were already gated elsewhere (no per-IP limit here).
TRUSTED_SOURCES = ("import", "event-registration")


class RateLimited(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after}s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class RequestContext:
    """Where a request came from: what the consent log records."""

    ip: str | None
    user_agent: str | None
    source: str  # form, api, import, ...
    correlation_id: str | None = None


@dataclass(frozen=True)
class ConfirmResult:
    ok: bool
    language: str | None = None
    subscriber_id: str | None = None


@dataclass(frozen=True)
class ImportOutcome:
    """What an import did with one subscriber: made it `active`, asked for a `confirmation`, or `skipped` it."""

    result: Literal["active", "confirmation", "skipped"]
    reason: str = ""
    groups_added: bool = False


class Subscriptions:
    def __init__(self, db: Database, settings: SubscriptionsSettings, links: ManageLinks, consent_text) -> None:
        self.db, self.settings, self.links = db, settings, links
        self.consent_text = consent_text  # language -> the consent sentence shown on the form

    # --- helpers ---------------------------------------------------------------------------------

    async def _emit(self, s: AsyncSession, subscriber_id: str, event: messages.Envelope, ctx_cid: str | None) -> None:
        await add_to_outbox(s, store.infra, topics.SUBSCRIBER, subscriber_id, event, ctx_cid)

    async def _consent(self, s: AsyncSession, subscriber_id: str, action: str, ctx: RequestContext | None,
                       language: str | None = None, with_text: bool = False, **details: Any) -> None:
        await s.execute(insert(store.consent_log).values(
            subscriber_id=subscriber_id, action=action, occurred_at=utcnow(),
            ip=ctx.ip if ctx else None, user_agent=ctx.user_agent[:400] if ctx and ctx.user_agent else None,
            source=ctx.source if ctx else "system",
            consent_text_version=self.settings.consent_text_version if with_text else None,
            consent_text=self.consent_text(language) if with_text and language else None,
            language=language, details=details))

    @staticmethod
    def _recent(bucket: str, window: timedelta):
        t = store.rate_limit_hits
        return select(func.count()).select_from(t).where(t.c.bucket == bucket, t.c.at > utcnow() - window)

    async def _hits(self, s: AsyncSession, bucket: str, window: timedelta) -> int:
        return int(await s.scalar(self._recent(bucket, window)) or 0)

    async def _hit(self, s: AsyncSession, *buckets: str) -> None:
        if buckets:  # one statement for all of them: a sign-up's round trips to the database are its cost
            now = utcnow()
            await s.execute(insert(store.rate_limit_hits), [{"bucket": b, "at": now} for b in buckets])

    async def _suppress(self, s: AsyncSession, email: str, reason: str) -> None:
        digest = email_hash(email)
        t = store.suppressions
        if not await s.scalar(select(t.c.email_hash).where(t.c.email_hash == digest)):
            await s.execute(insert(t).values(email_hash=digest, reason=reason, created_at=utcnow()))

    def _profile(self, row) -> dict[str, Any]:
        return dict(subscriber_id=row.id, email=row.email, name=row.name, language=row.language,
                    topics=list(row.topics), regions=list(row.regions))

    # --- sign-up ---------------------------------------------------------------------------------

    async def request_subscription(self, req: SignupRequest, ctx: RequestContext,
                                   processed_event: tuple[str, Any] | None = None,
                                   groups: list[str] | None = None, audience: str | None = None) -> bool:
        """Accept a sign-up. The caller answers the same whatever happens here (no enumeration).

        `processed_event` (consumer, event id) marks a Kafka event as handled in the same transaction.
        `groups` and `audience` (staff imports only) are given to a subscriber this creates.
        Returns whether a confirmation mail was asked for (False: suppressed, limit reached, a bot).
        """
        if req.website:  # honeypot filled in: a bot. Same answer, nothing stored.
            log.info("honeypot sign-up ignored (source %s)", ctx.source)
            return False
        for attempt in range(2):
            try:
                return await self._request(req, ctx, processed_event, groups or [], audience)
            except IntegrityError:
                if attempt:  # the concurrent insert of the same new address won twice: give up quietly
                    raise
                # Two requests for one new address raced on the unique index: now it is known.

    async def _request(self, req: SignupRequest, ctx: RequestContext,
                       processed_event: tuple[str, Any] | None, groups: list[str], audience: str | None) -> bool:
        now = utcnow()
        digest = email_hash(req.email)
        async with self.db.transaction() as s:
            if processed_event:
                await mark_processed(s, store.infra, *processed_event)
            ip_bucket = f"ip:{ctx.ip}" if ctx.ip and ctx.source not in TRUSTED_SOURCES else None
            addr_bucket, day = f"addr:{digest}", timedelta(days=1)
            # The suppression list and both limits in one query (each statement is a round trip).
            checks = [exists().where(store.suppressions.c.email_hash == digest),
                      self._recent(addr_bucket, day).scalar_subquery()]
            if ip_bucket:
                window = timedelta(seconds=self.settings.signups_per_ip_window_seconds)
                checks.append(self._recent(ip_bucket, window).scalar_subquery())
            suppressed, addr_hits, *ip_hits = (await s.execute(select(*checks))).one()
            if ip_bucket and ip_hits[0] >= self.settings.signups_per_ip:
                raise RateLimited(self.settings.signups_per_ip_window_seconds)
            hits = [ip_bucket] if ip_bucket else []
            if suppressed:
                log.info("sign-up for a suppressed address %s… ignored", digest[:10])
                await self._hit(s, *hits)
                return False
            row = (await s.execute(select(s_).where(s_.c.email == req.email).with_for_update())).first()
            # Counted again now that the row is locked: concurrent sign-ups of a known address (on
            # PostgreSQL) cannot all pass the per-address limit. A new address has no row to lock; two
            # sign-ups of it race on the unique index instead, and the loser retries as a known one. It is
            # counted again all the same: the same round trips for both, so timing does not tell them apart.
            addr_hits = await self._hits(s, addr_bucket, day)
            if addr_hits >= self.settings.confirmations_per_address_per_day:
                log.info("confirmation limit reached for %s…", digest[:10])
                await self._hit(s, *hits)
                return False
            await self._hit(s, *hits, addr_bucket)
            prefs = dict(language=req.language, topics=req.topics, regions=req.regions)
            requested_profile = None
            if row is None:
                subscriber_id = str(uuid.uuid4())
                await s.execute(insert(s_).values(
                    id=subscriber_id, email=req.email, name=req.name,
                    audience=audience or ("partner" if groups else "public"), groups=groups,
                    status="pending", hard_bounces=0, created_at=now, updated_at=now, **prefs))
                profile = dict(subscriber_id=subscriber_id, email=req.email, name=req.name, **prefs)
            elif row.status == "active":
                # Already subscribed: the new choices apply only once this request is confirmed.
                subscriber_id = row.id
                requested_profile = dict(name=req.name, **prefs)
                profile = dict(subscriber_id=row.id, email=row.email, name=req.name or row.name, **prefs)
            else:  # pending or unsubscribed: the new choices apply now; an empty name keeps the stored one
                subscriber_id = row.id
                name = req.name or row.name
                await s.execute(update(s_).where(s_.c.id == row.id).values(
                    name=name, status="pending", updated_at=now, **prefs))
                profile = dict(subscriber_id=row.id, email=row.email, name=name, **prefs)
            raw = new_token()
            expires = expiry(now, self.settings.confirm_token_hours)
            await s.execute(insert(store.confirmation_tokens).values(
                token_hash=token_hash(raw), subscriber_id=subscriber_id, created_at=now, expires_at=expires,
                requested_profile=requested_profile))
            # An imported address never saw the form's consent text: its consent is the confirmation.
            await self._consent(s, subscriber_id, "requested", ctx, req.language, with_text=ctx.source != "import",
                                topics=req.topics, regions=req.regions)
            await self._emit(s, subscriber_id, messages.SubscriptionRequested(
                **profile, confirm_token=raw, expires_at=expires, manage_token=self.links.token(subscriber_id)),
                ctx.correlation_id)
            return True

    async def token_language(self, token: str | None) -> tuple[str, str | None]:
        """(state, language) of a confirmation token, for the GET page; changes nothing."""
        if not token or len(token) > 200:
            return "unknown", None
        async with self.db.sessions() as s:
            row = (await s.execute(
                select(store.confirmation_tokens, s_.c.language, s_.c.status)
                .join(s_, s_.c.id == store.confirmation_tokens.c.subscriber_id)
                .where(store.confirmation_tokens.c.token_hash == token_hash(token)))).first()
        if row is None or row.status in ("erased", "suppressed"):
            return "unknown", None
        return token_state(row.expires_at, row.used_at, utcnow()), row.language

    async def confirm(self, token: str | None, ctx: RequestContext) -> ConfirmResult:
        if not token or len(token) > 200:
            return ConfirmResult(False)
        now = utcnow()
        t = store.confirmation_tokens
        async with self.db.transaction() as s:
            subscriber_id = await s.scalar(select(t.c.subscriber_id).where(t.c.token_hash == token_hash(token)))
            if subscriber_id is None:
                return ConfirmResult(False)
            # The subscriber is locked before its tokens, as every other change of a subscriber does
            # (unsubscribe, erasure, a new sign-up): the other order deadlocks on PostgreSQL when two
            # links are clicked at once, or a click meets an unsubscription.
            row = (await s.execute(select(s_).where(s_.c.id == subscriber_id).with_for_update())).first()
            if row is None or row.status in ("erased", "suppressed"):
                return ConfirmResult(False)
            # Read again under the lock: a confirmation that just committed has used it up.
            tok = (await s.execute(select(t).where(t.c.token_hash == token_hash(token)).with_for_update())).first()
            if tok is None or token_state(tok.expires_at, tok.used_at, now) != "valid":
                return ConfirmResult(False, row.language)
            # Single use, and one confirmation closes every other open link of this subscriber.
            await s.execute(update(t).where(t.c.subscriber_id == row.id, t.c.used_at.is_(None)).values(used_at=now))
            manage = self.links.token(row.id)
            if row.status == "active":
                changes = dict(tok.requested_profile or {})
                if changes.get("name") is None:
                    changes.pop("name", None)
                await s.execute(update(s_).where(s_.c.id == row.id).values(updated_at=now, **changes))
                new = {**self._profile(row), **{k: v for k, v in changes.items()}}
                await self._consent(s, row.id, "preferences_confirmed", ctx, new["language"], choices=changes)
                await self._emit(s, row.id, messages.PreferencesChanged(**new, manage_token=manage),
                                 ctx.correlation_id)
                return ConfirmResult(True, new["language"], row.id)
            await s.execute(update(s_).where(s_.c.id == row.id).values(
                status="active", confirmed_at=now, updated_at=now))
            await self._consent(s, row.id, "confirmed", ctx, row.language)
            await self._emit(s, row.id, messages.SubscriptionConfirmed(
                **self._profile(row), audience=row.audience, groups=list(row.groups), confirmed_at=now,
                manage_token=manage), ctx.correlation_id)
            return ConfirmResult(True, row.language, row.id)

    # --- manage links ----------------------------------------------------------------------------

    async def subscriber_for_link(self, token: str | None):
        subscriber_id = self.links.subscriber_id(token)
        if subscriber_id is None:
            return None
        async with self.db.sessions() as s:
            row = (await s.execute(select(s_).where(s_.c.id == subscriber_id))).first()
        return None if row is None or row.status == "erased" else row

    async def unsubscribe(self, token: str | None, ctx: RequestContext) -> tuple[bool, str | None]:
        """Unsubscribe the link's subscriber; doing it twice is fine. (ok, language)."""
        subscriber_id = self.links.subscriber_id(token)
        if subscriber_id is None:
            return False, None
        async with self.db.transaction() as s:
            row = (await s.execute(select(s_).where(s_.c.id == subscriber_id).with_for_update())).first()
            if row is None or row.status == "erased":
                return False, None
            if row.status in ("active", "pending"):
                await s.execute(update(s_).where(s_.c.id == row.id).values(status="unsubscribed", updated_at=utcnow()))
                await s.execute(update(store.confirmation_tokens).where(
                    store.confirmation_tokens.c.subscriber_id == row.id,
                    store.confirmation_tokens.c.used_at.is_(None)).values(used_at=utcnow()))
                await self._consent(s, row.id, "withdrawn", ctx, row.language)
                await self._emit(s, row.id, messages.Unsubscribed(subscriber_id=row.id, source=ctx.source),
                                 ctx.correlation_id)
            return True, row.language

    async def change_preferences(self, token: str | None, prefs: Preferences, ctx: RequestContext) -> bool:
        subscriber_id = self.links.subscriber_id(token)
        if subscriber_id is None:
            return False
        async with self.db.transaction() as s:
            row = (await s.execute(select(s_).where(s_.c.id == subscriber_id).with_for_update())).first()
            if row is None or row.status != "active":
                return False
            values = prefs.model_dump(include={"language", "topics", "regions"})
            await s.execute(update(s_).where(s_.c.id == row.id).values(updated_at=utcnow(), **values))
            await self._consent(s, row.id, "preferences_changed", ctx, prefs.language, choices=values)
            await self._emit(s, row.id, messages.PreferencesChanged(
                **{**self._profile(row), **values}, manage_token=self.links.token(row.id)), ctx.correlation_id)
            return True

    # --- staff -------------------------------------------------------------------------------------

    async def set_groups(self, s: AsyncSession, row, audience: str, groups: list[str]) -> None:
        await s.execute(update(s_).where(s_.c.id == row.id)
                        .values(audience=audience, groups=groups, updated_at=utcnow()))
        await self._emit(s, row.id, messages.GroupsChanged(subscriber_id=row.id, audience=audience, groups=groups),
                         None)

    async def erase(self, s: AsyncSession, row, ctx: RequestContext) -> None:
        """GDPR erasure: personal data gone, the address hash suppressed, `subscriber_erased` emitted."""
        if row.email:
            await self._suppress(s, row.email, "erased")
        await s.execute(update(s_).where(s_.c.id == row.id).values(
            email=None, name=None, topics=[], regions=[], groups=[], status="erased", updated_at=utcnow()))
        await s.execute(delete(store.confirmation_tokens).where(store.confirmation_tokens.c.subscriber_id == row.id))
        await s.execute(update(store.consent_log).where(store.consent_log.c.subscriber_id == row.id)
                        .values(ip=None, user_agent=None, details={}))
        # Events still waiting in the outbox carry the address: they must not leave any more.
        await s.execute(delete(store.infra.outbox).where(store.infra.outbox.c.key == row.id))
        await self._consent(s, row.id, "erased", ctx)
        await self._emit(s, row.id, messages.SubscriberErased(subscriber_id=row.id), ctx.correlation_id)

    # --- staff imports ---------------------------------------------------------------------------

    async def import_subscriber(self, sub: ImportedSubscriber, ctx: RequestContext) -> ImportOutcome:
        """One subscriber of a staff import: active at once with proof of consent, else the double opt-in.

        Importing again changes nothing: an address that is active or has an open confirmation link is
        left alone (only partner groups from the file are added). Suppressed, erased and unsubscribed
        addresses are never brought back by an import; they can sign up again themselves.
        """
        now = utcnow()
        added = False
        async with self.db.transaction() as s:
            if await s.scalar(select(store.suppressions.c.reason)
                              .where(store.suppressions.c.email_hash == email_hash(sub.email))):
                return ImportOutcome("skipped", "suppressed or erased")
            row = (await s.execute(select(s_).where(s_.c.email == sub.email).with_for_update())).first()
            if row is None and sub.has_proof:
                subscriber_id = str(uuid.uuid4())
                await s.execute(insert(s_).values(
                    id=subscriber_id, email=sub.email, name=sub.name, language=sub.language, topics=sub.topics,
                    regions=sub.regions, audience=sub.audience or ("partner" if sub.groups else "public"),
                    groups=sub.groups, status="active", hard_bounces=0, created_at=now, updated_at=now,
                    confirmed_at=sub.consent_at))
                await self._imported_consent(s, subscriber_id, sub, ctx)
                return ImportOutcome("active")
            if row is not None:
                if row.status == "unsubscribed":
                    return ImportOutcome("skipped", "unsubscribed")
                if row.status in ("suppressed", "erased"):
                    return ImportOutcome("skipped", "suppressed or erased")
                groups = list(dict.fromkeys([*row.groups, *sub.groups]))
                audience = sub.audience or ("partner" if groups else row.audience)
                added = (groups, audience) != (list(row.groups), row.audience)
                if row.status == "pending" and sub.has_proof:
                    # The proof confirms what the file says; open confirmation links are no longer needed.
                    await s.execute(update(store.confirmation_tokens).where(
                        store.confirmation_tokens.c.subscriber_id == row.id,
                        store.confirmation_tokens.c.used_at.is_(None)).values(used_at=now))
                    await s.execute(update(s_).where(s_.c.id == row.id).values(
                        name=sub.name or row.name, language=sub.language, topics=sub.topics, regions=sub.regions,
                        audience=audience, groups=groups, status="active", confirmed_at=sub.consent_at,
                        updated_at=now))
                    await self._imported_consent(s, row.id, sub, ctx)
                    return ImportOutcome("active", groups_added=added)
                if added:
                    await self.set_groups(s, row, audience, groups)
                if row.status == "active":
                    return ImportOutcome("skipped", "already active", added)
                t = store.confirmation_tokens
                if await s.scalar(select(func.count()).select_from(t).where(
                        t.c.subscriber_id == row.id, t.c.used_at.is_(None), t.c.expires_at > now)):
                    return ImportOutcome("skipped", "confirmation pending", added)
        # No proof: the same double opt-in as a sign-up on the form (and its per-address limit).
        if await self.request_subscription(sub, ctx, groups=sub.groups, audience=sub.audience):
            return ImportOutcome("confirmation", groups_added=added)
        return ImportOutcome("skipped", "confirmation limit reached", added)

    async def _imported_consent(self, s: AsyncSession, subscriber_id: str, sub: ImportedSubscriber,
                                ctx: RequestContext) -> None:
        """The file's proof of consent into the consent log (at the time it was given), and the subscriber
        to the mailer's audience."""
        assert sub.consent_at is not None
        await s.execute(insert(store.consent_log).values(
            subscriber_id=subscriber_id, action="imported", occurred_at=sub.consent_at, ip=sub.consent_ip,
            user_agent=None, source=ctx.source, consent_text_version=sub.consent_text_version, consent_text=None,
            language=sub.language, details={"consent_source": sub.consent_source, "imported_at": utcnow().isoformat(),
                                            "topics": sub.topics, "regions": sub.regions}))
        row = (await s.execute(select(s_).where(s_.c.id == subscriber_id))).one()
        await self._emit(s, row.id, messages.SubscriptionConfirmed(
            **self._profile(row), audience=row.audience, groups=list(row.groups), confirmed_at=sub.consent_at,
            manage_token=self.links.token(row.id), welcome=False), ctx.correlation_id)

    # --- deliveries (from the mailer) ------------------------------------------------------------

    async def record_delivery(self, event: messages.MailSent | messages.MailFailed | messages.MailBounced,
                              correlation_id: str | None) -> None:
        async with self.db.transaction() as s:
            await mark_processed(s, store.infra, "subscriptions.delivery", event.event_id)
            if not isinstance(event, messages.MailBounced):
                return
            row = (await s.execute(select(s_).where(s_.c.id == event.subscriber_id).with_for_update())).first()
            if row is None or row.status in ("erased", "suppressed"):
                return
            bounces = row.hard_bounces + 1
            await s.execute(update(s_).where(s_.c.id == row.id).values(hard_bounces=bounces, updated_at=utcnow()))
            if bounces >= self.settings.hard_bounces_to_suppress:
                await s.execute(update(s_).where(s_.c.id == row.id).values(status="suppressed"))
                if row.email:
                    await self._suppress(s, row.email, "hard-bounce")
                await self._consent(s, row.id, "suppressed", None, reason="hard-bounce", smtp_code=event.smtp_code)
                await self._emit(s, row.id, messages.SubscriberSuppressed(subscriber_id=row.id, reason="hard-bounce"),
                                 correlation_id)

    async def newsletter_from_registration(self, event: Any, correlation_id: str | None) -> None:
        """Someone registering for an event ticked "also the newsletter": start the double opt-in."""
        newsletter = getattr(event, "newsletter", False)
        if not newsletter:
            return
        try:
            req = SignupRequest(email=event.email, name=event.name, language=event.language, topics=event.topics,
                                regions=event.regions, consent=True)
        except ValueError:
            log.warning("registration %s: newsletter request not valid as a sign-up", event.registration_id)
            return
        ctx = RequestContext(ip=event.consent_ip, user_agent=event.consent_user_agent, source="event-registration",
                             correlation_id=correlation_id)
        try:
            await self.request_subscription(req, ctx, ("subscriptions.registration", event.event_id))
        except AlreadyProcessed:
            return

    async def prune_rate_limits(self) -> None:
        async with self.db.transaction() as s:
            cutoff = utcnow() - timedelta(days=1)
            await s.execute(delete(store.rate_limit_hits).where(store.rate_limit_hits.c.at < cutoff))


def build_subscriptions(db: Database, settings: SubscriptionsSettings) -> Subscriptions:
    """The use cases wired from settings, for the app and for the command line alike."""
    from shared.i18n import load_translations
    translations = load_translations()
    return Subscriptions(db, settings, ManageLinks(settings.secret_key.get_secret_value()),
                         consent_text=lambda lang: translations.gettext(lang, "subscribe.consent"))

"""Use cases of the subscriptions service; each runs in one transaction: state + consent log + outbox.

This is where a sign-up becomes a Kafka event (`admit` → `subscription_requested`): one at a time for
imports and Kafka consumers (`request_subscription`), many concurrent ones in one transaction for the
public form and API (`admission.SignupAdmission`), by the same rules (`_decide`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import bindparam, delete, func, insert, literal, or_, select, union_all, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
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
from shared.ids import new_id
from shared.kafka import AlreadyProcessed, first_handling, mark_processed
from shared.logs import log_context
from shared.outbox import add_all_to_outbox, add_to_outbox, outbox_row

log = logging.getLogger(__name__)
s_ = store.subscribers


# Sources whose requests were already gated elsewhere (no per-IP limit here).
TRUSTED_SOURCES = ("import", "event-registration")
DELIVERY_CONSUMER = "subscriptions.delivery"  # its processed-event marker
# The database is away: every sign-up of a batch fails alike (each request answers 503).
OUTAGES = (OperationalError, InterfaceError)


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
class Signup:
    """One sign-up to admit: the request, where it came from, and what only trusted callers add."""

    req: SignupRequest
    ctx: RequestContext
    processed_event: tuple[str, Any] | None = None  # (consumer, event id) of a Kafka event it handles
    groups: list[str] = field(default_factory=list)  # staff imports only
    audience: str | None = None


# What admitting one sign-up came to: a confirmation mail asked for or not, or its own error.
Admitted = bool | RateLimited | Exception


@dataclass
class SignupBatch:
    """One admission transaction: what it found, and what its sign-ups, in order, leave to be written.
    Each sign-up sees the effects of the ones before it (hits counted, a subscriber created)."""

    now: datetime
    subscribers: dict[str, dict[str, Any]]  # address -> the row as stored, or as the batch leaves it
    suppressed: set[str] = field(default_factory=set)  # address hashes
    hits: Counter[str] = field(default_factory=Counter)  # rate-limit bucket -> hits within its window
    new: dict[str, dict[str, Any]] = field(default_factory=dict)  # address -> subscriber to insert
    changed: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> stored subscriber to update
    hit_rows: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)
    consents: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # outbox rows

    def hit(self, *buckets: str) -> None:
        for bucket in buckets:
            self.hits[bucket] += 1
            self.hit_rows.append({"bucket": bucket, "at": self.now})

    def create(self, row: dict[str, Any]) -> dict[str, Any]:
        self.subscribers[row["email"]] = self.new[row["email"]] = row
        return row

    def change(self, row: dict[str, Any], **values: Any) -> None:
        row.update(values)  # a subscriber this batch creates is inserted as the last change left it
        if row["email"] not in self.new:
            self.changed[row["id"]] = row


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
            **self._consent_row(subscriber_id, action, ctx, language, with_text, **details)))

    def _consent_row(self, subscriber_id: str, action: str, ctx: RequestContext | None, language: str | None = None,
                     with_text: bool = False, **details: Any) -> dict[str, Any]:
        return dict(
            subscriber_id=subscriber_id, action=action, occurred_at=utcnow(),
            ip=ctx.ip if ctx else None, user_agent=ctx.user_agent[:400] if ctx and ctx.user_agent else None,
            source=ctx.source if ctx else "system",
            consent_text_version=self.settings.consent_text_version if with_text else None,
            consent_text=self.consent_text(language) if with_text and language else None,
            language=language, details=details)

    async def _suppress(self, s: AsyncSession, email: str, reason: str) -> None:
        digest = email_hash(email)
        t = store.suppressions
        if not await s.scalar(select(t.c.email_hash).where(t.c.email_hash == digest)):
            await s.execute(insert(t).values(email_hash=digest, reason=reason, created_at=utcnow()))

    def _profile(self, row) -> dict[str, Any]:
        return dict(subscriber_id=row.id, email=row.email, name=row.name, language=row.language,
                    topics=list(row.topics), regions=list(row.regions))

    # --- sign-up ---------------------------------------------------------------------------------

    @staticmethod
    def is_bot(req: SignupRequest, ctx: RequestContext) -> bool:
        """The honeypot was filled in: the same answer as for anyone, and nothing is stored."""
        if req.website:
            log.info("honeypot sign-up ignored (source %s)", ctx.source)
        return bool(req.website)

    async def request_subscription(self, req: SignupRequest, ctx: RequestContext,
                                   processed_event: tuple[str, Any] | None = None,
                                   groups: list[str] | None = None, audience: str | None = None) -> bool:
        """Accept one sign-up in a transaction of its own. The caller answers the same whatever happens
        here (no enumeration). The public form and API go through `admission.SignupAdmission` instead,
        which admits concurrent sign-ups together, by the same rules (`admit`).

        `processed_event` (consumer, event id) marks a Kafka event as handled in the same transaction.
        `groups` and `audience` (staff imports only) are given to a subscriber this creates.
        Returns whether a confirmation mail was asked for (False: suppressed, limit reached, a bot);
        raises RateLimited when the client IP is over its limit.
        """
        if self.is_bot(req, ctx):
            return False
        (outcome,) = await self.admit([Signup(req, ctx, processed_event, groups or [], audience)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def admit(self, signups: Sequence[Signup]) -> list[Admitted]:
        """Admit sign-ups (honeypots already sorted out) in one transaction, each seeing the ones before
        it as if they had come one by one. Per sign-up: whether a confirmation mail was asked for, or
        RateLimited for one whose client IP is over its limit (or, see below, its own error).

        A database that is away fails them all (each request answers 503). Whatever else one sign-up
        may cause must not fail the others: the batch is tried again, then each sign-up alone.
        """
        for attempt in range(2):
            try:
                return await self._admit(signups)
            except IntegrityError:
                # Another instance inserted one of these new addresses meanwhile: now it is known.
                if not attempt:
                    log.info("a new address of %d sign-up(s) was inserted meanwhile; admitting again", len(signups))
                    continue
                if len(signups) == 1:
                    raise  # the concurrent insert of the same new address won twice: give up quietly
            except DBAPIError as exc:
                if len(signups) == 1 or exc.connection_invalidated or isinstance(exc, OUTAGES):
                    raise
            break
        # Rare (a deadlock, or data one sign-up brought that the database refuses): each on its own.
        log.warning("a batch of %d sign-ups failed; admitting them one by one", len(signups))
        return [await self._admit_alone(signup) for signup in signups]

    async def _admit_alone(self, signup: Signup) -> Admitted:
        try:
            return (await self.admit([signup]))[0]
        except Exception as exc:  # noqa: BLE001 - this sign-up's own failure, answered to it alone
            return exc

    async def _admit(self, signups: Sequence[Signup]) -> list[Admitted]:
        emails = sorted({signup.req.email for signup in signups})
        async with self.db.transaction() as s:
            for signup in signups:
                if signup.processed_event:
                    await mark_processed(s, store.infra, *signup.processed_event)
            # The subscribers are locked first, in id order (two batches lock the ones they share in the
            # same order, so they cannot deadlock); the limits are counted after, so they include what
            # committed meanwhile:
            # concurrent sign-ups of a known address (on PostgreSQL) cannot all pass the per-address
            # limit. A new address has no row to lock; two sign-ups of it race on the unique index
            # instead, and the loser's batch is tried again with the address known.
            rows = (await s.execute(select(s_).where(s_.c.email.in_(emails)).order_by(s_.c.id)
                                    .with_for_update())).all()
            batch = SignupBatch(utcnow(), {row.email: dict(row._mapping) for row in rows})
            await self._limits(s, batch, signups)
            outcomes = [self._decide(batch, signup) for signup in signups]
            await self._write(s, batch)
        return outcomes

    async def _limits(self, s: AsyncSession, batch: SignupBatch, signups: Sequence[Signup]) -> None:
        """The suppressed addresses and the rate-limit counts of every bucket involved, in one query."""
        digests = sorted({email_hash(signup.req.email) for signup in signups})
        ips = sorted({bucket for signup in signups if (bucket := self._ip_bucket(signup.ctx))})
        t, sup = store.rate_limit_hits, store.suppressions
        windows = [t.c.bucket.in_([f"addr:{d}" for d in digests]) & (t.c.at > batch.now - timedelta(days=1))]
        if ips:
            ip_window = timedelta(seconds=self.settings.signups_per_ip_window_seconds)
            windows.append(t.c.bucket.in_(ips) & (t.c.at > batch.now - ip_window))
        query = union_all(
            select(sup.c.email_hash, literal(-1)).where(sup.c.email_hash.in_(digests)),
            select(t.c.bucket, func.count()).where(or_(*windows)).group_by(t.c.bucket))
        for key, hits in (await s.execute(query)).all():
            if hits < 0:
                batch.suppressed.add(key)
            else:
                batch.hits[key] = int(hits)

    @staticmethod
    def _ip_bucket(ctx: RequestContext) -> str | None:
        return f"ip:{ctx.ip}" if ctx.ip and ctx.source not in TRUSTED_SOURCES else None

    def _decide(self, batch: SignupBatch, signup: Signup) -> bool | RateLimited:
        """The rules of one sign-up, on what the batch found and what the sign-ups before it did."""
        req, ctx, now = signup.req, signup.ctx, batch.now
        digest = email_hash(req.email)
        ip_bucket, addr_bucket = self._ip_bucket(ctx), f"addr:{digest}"
        if ip_bucket and batch.hits[ip_bucket] >= self.settings.signups_per_ip:
            return RateLimited(self.settings.signups_per_ip_window_seconds)
        hits = [ip_bucket] if ip_bucket else []
        if digest in batch.suppressed:
            with log_context(correlation_id=ctx.correlation_id):
                log.info("sign-up for a suppressed address %s… ignored", digest[:10])
            batch.hit(*hits)
            return False
        if batch.hits[addr_bucket] >= self.settings.confirmations_per_address_per_day:
            with log_context(correlation_id=ctx.correlation_id):
                log.info("confirmation limit reached for %s…", digest[:10])
            batch.hit(*hits)
            return False
        batch.hit(*hits, addr_bucket)
        prefs = dict(language=req.language, topics=req.topics, regions=req.regions)
        requested_profile = None
        row = batch.subscribers.get(req.email)
        if row is None:
            name = req.name
            row = batch.create(dict(
                id=new_id(), email=req.email, name=name, status="pending", hard_bounces=0,
                audience=signup.audience or ("partner" if signup.groups else "public"), groups=signup.groups,
                created_at=now, updated_at=now, confirmed_at=None, **prefs))
        elif row["status"] == "active":
            # Already subscribed: the new choices apply only once this request is confirmed.
            requested_profile = dict(name=req.name, **prefs)
            name = req.name or row["name"]
        else:  # pending or unsubscribed: the new choices apply now; an empty name keeps the stored one
            name = req.name or row["name"]
            batch.change(row, name=name, status="pending", updated_at=now, **prefs)
        subscriber_id = row["id"]
        raw = new_token()
        expires = expiry(now, self.settings.confirm_token_hours)
        batch.tokens.append(dict(token_hash=token_hash(raw), subscriber_id=subscriber_id, created_at=now,
                                 expires_at=expires, used_at=None, requested_profile=requested_profile))
        # An imported address never saw the form's consent text: its consent is the confirmation.
        batch.consents.append(self._consent_row(subscriber_id, "requested", ctx, req.language,
                                                with_text=ctx.source != "import", topics=req.topics,
                                                regions=req.regions))
        batch.events.append(outbox_row(topics.SUBSCRIBER, subscriber_id, messages.SubscriptionRequested(
            subscriber_id=subscriber_id, email=row["email"], name=name, **prefs, confirm_token=raw,
            expires_at=expires, manage_token=self.links.token(subscriber_id)), ctx.correlation_id))
        return True

    async def _write(self, s: AsyncSession, batch: SignupBatch) -> None:
        """What a batch decided, one statement per table (each statement is a round trip)."""
        if batch.hit_rows:
            await s.execute(insert(store.rate_limit_hits), batch.hit_rows)
        if batch.new:
            # In address order: two instances inserting the same new addresses wait for each other in
            # the same order, never in a cycle.
            await s.execute(insert(s_), [batch.new[email] for email in sorted(batch.new)])
        if batch.changed:
            columns = ("name", "status", "updated_at", "language", "topics", "regions")
            await s.execute(
                update(s_).where(s_.c.id == bindparam("b_id"))
                .values({c: bindparam(f"b_{c}", type_=s_.c[c].type) for c in columns}),
                [{"b_id": row["id"], **{f"b_{c}": row[c] for c in columns}} for row in batch.changed.values()])
        if batch.tokens:
            await s.execute(insert(store.confirmation_tokens), batch.tokens)
        if batch.consents:
            await s.execute(insert(store.consent_log), batch.consents)
        await add_all_to_outbox(s, store.infra, batch.events)

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
                subscriber_id = new_id()
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

    # Only a hard bounce changes anything here. Sent and failed (will retry) reports are acknowledged and
    # nothing else: no transaction, and no processed-event marker, since handling one twice changes nothing
    # either. (That was a write transaction per confirmation mail under load, about 6 % of this service's
    # CPU at 1,000 sign-ups/s.)

    async def record_delivery(self, event: messages.MailSent | messages.MailFailed | messages.MailBounced,
                              correlation_id: str | None) -> None:
        if not isinstance(event, messages.MailBounced):
            return
        async with self.db.transaction() as s:
            await mark_processed(s, store.infra, DELIVERY_CONSUMER, event.event_id)
            await self._delivered(s, event, correlation_id)

    async def record_deliveries(self, events: list[tuple[Any, str | None]]) -> int:
        """Several delivery reports, the bounces among them in one transaction, in order; returns how many
        bounces were recorded before (left out)."""
        bounces = [(event, cid) for event, cid in events if isinstance(event, messages.MailBounced)]
        if not bounces:
            return 0
        duplicates = 0
        async with self.db.transaction() as s:
            for event, correlation_id in bounces:
                if await first_handling(s, store.infra, DELIVERY_CONSUMER, event.event_id):
                    await self._delivered(s, event, correlation_id)
                else:
                    duplicates += 1
        return duplicates

    async def _delivered(self, s: AsyncSession, event: messages.MailBounced, correlation_id: str | None) -> None:
        """A hard bounce counts towards suppression."""
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

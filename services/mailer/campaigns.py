"""Campaigns: newsletter issues sent to a segment, each recipient exactly once (SPEC §2.2, §2.5).

Sending starts by writing the ledger (one row per recipient, in batches) and one job per batch to
`mailer.jobs.v1` — through the outbox, in the same transaction. Every mailer instance consumes a
share of the job partitions. A job claims its batch's pending rows (`claimed`, committed); a row
becomes `sending` (committed) only once an SMTP connection is in hand, just before the hand-over,
and then `sent`, `retry` or `failed` when the answer is recorded. A process that dies leaves rows
`claimed` (never left: the sweep puts them back to `pending` and hands their batch out again) or
`sending` (handed over, answer unknown: the sweep counts them `ambiguous` — never resent), so the
ambiguous are at most the mails that were really in flight. A job's offset is committed only when
its batch is done, so a killed instance's batch is picked up by another (or by itself on restart).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parseaddr
from typing import Any
from urllib.parse import urlparse

import aiosmtplib
from sqlalchemy import and_, bindparam, func, insert, literal_column, or_, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.mailer import digest, store
from services.mailer.composer import Skeleton
from services.mailer.render import MailRenderer, Recipient, Rendered
from services.mailer.segments import matches, member
from services.mailer.sending import RateLimiter, without_address
from services.mailer.settings import MailerSettings
from services.mailer.smtp import Session, SmtpPool
from services.mailer.staff_text import NotSplittable, render_html, render_text
from shared import ics, messages, topics
from shared.db import Database, utcnow
from shared.outbox import add_to_outbox

log = logging.getLogger(__name__)
c_ = store.campaigns
d_ = store.campaign_deliveries
a_ = store.audience
UNFINISHED = ("pending", "claimed", "sending", "retry")
IN_FLIGHT = ("claimed", "sending", "ambiguous")
COUNT_NAMES = {"retry": "retrying"}

# The rows a drain takes: a batch's pending rows (its job), or the retries that are due (the sweep).
# Written with bound parameters, so that the statements taking and recording them are built once: a
# hand-over per group of mails then costs executing them, not constructing them (see `_take`).
SELECTIONS = {
    "batch": and_(d_.c.campaign_id == bindparam("w_campaign"), d_.c.batch == bindparam("w_batch"),
                  d_.c.status == "pending"),
    "retry": and_(d_.c.status == "retry", d_.c.next_attempt_at <= bindparam("w_due")),
}

# A group's mails that the server accepted (executed once per mail, in one executemany).
RECORD_SENT = (
    update(d_)
    .where(d_.c.campaign_id == bindparam("r_campaign"), d_.c.subscriber_id == bindparam("r_subscriber"),
           d_.c.claimed_by == bindparam("r_claim"),
           or_(*(d_.c.status == status for status in IN_FLIGHT)))  # not IN: no expanding list in executemany
    .values(status="sent", sent_at=bindparam("r_now"), attempts=d_.c.attempts + 1, last_error=None,
            message_id=bindparam("r_message_id")))


@dataclass
class Outcome:
    """What happened to one group of campaign mails, recorded in one transaction."""

    sent: list[tuple[Any, str]] = field(default_factory=list)  # (row, Message-ID)
    failed: list[tuple[Any, int | None, str]] = field(default_factory=list)  # (row, SMTP code, error)
    settled: list[tuple[Any, str, str | None]] = field(default_factory=list)  # (row, final status, note)
    unsent: list = field(default_factory=list)  # not tried: the connection broke before them
    returned: list = field(default_factory=list)  # not tried: the campaign was paused or cancelled

    def __bool__(self) -> bool:
        return bool(self.sent or self.failed or self.settled or self.unsent or self.returned)


class CampaignStateError(Exception):
    """The action does not fit the campaign's status (e.g. editing one that is sending)."""


class Campaigns:
    def __init__(self, db: Database, renderer: MailRenderer, settings: MailerSettings, pool: SmtpPool,
                 limiter: RateLimiter) -> None:
        self.db, self.renderer, self.settings, self.pool, self.limiter = db, renderer, settings, pool, limiter
        self.envelope_from = parseaddr(settings.mail_from)[1]
        self._domain_limits: dict[str, RateLimiter] = defaultdict(lambda: RateLimiter(settings.send_rate_per_domain))
        self.instance = uuid.uuid4().hex[:12]
        self.in_flight = 0
        self._ics_cache: dict[tuple[str, str], bytes] = {}
        self._skeletons: dict[tuple, Skeleton | None] = {}
        self._take_statements: dict[tuple[str, str], Any] = {}  # (selection, status) → built once
        # Campaigns this instance knows to be paused or cancelled (its own actions at once, the others'
        # from the sweep within a second): a connection stops between two mails, not after its group.
        self._halted: dict[str, str] = {}
        self.wake = asyncio.Event()  # set after a commit that scheduled a campaign: the sweep runs at once
        self._first_batches: set[asyncio.Task] = set()

    # --- content -----------------------------------------------------------------------------------

    def content(self, campaign, language: str) -> tuple[str, str, bool]:
        """(subject, body) in `language`, else German; and whether it fell back."""
        if campaign.subject.get(language) and campaign.body_markdown.get(language):
            return campaign.subject[language], campaign.body_markdown[language], False
        return campaign.subject["de"], campaign.body_markdown["de"], language != "de"

    def render_for(self, campaign, email: str, name: str | None, language: str, manage_token: str,
                   attachments: list[tuple[str, str, bytes]] = (), body: str | None = None) -> Rendered:
        """One recipient's mail. `body` replaces the campaign's (a digest is written per recipient)."""
        language = language if language in self.renderer.tr.taxonomy.languages else "de"
        subject_src, body_src, fell_back = self.content(campaign, language)
        if body is not None:
            subject_src, body_src, fell_back = campaign.subject.get(language) or campaign.subject["de"], body, False
        mail_language = "de" if fell_back else language
        links = self.renderer.manage_links(manage_token, mail_language)
        values = {"name": name or "", "email": email, "organisation": self.renderer.organisation, **links}
        return self.renderer.render(
            "campaign", Recipient(email, name, mail_language), "", {
                "body_html": render_html(body_src, values), "body_text": render_text(body_src, values)},
            manage_token=manage_token, subject=render_text(subject_src, values), attachments=attachments)

    async def _attachments(self, campaign, language: str) -> list[tuple[str, str, bytes]]:
        """An announcement carries its event as .ics (METHOD:PUBLISH: add it to the calendar)."""
        if campaign.kind != "announcement" or not campaign.event_id:
            return []
        key = (campaign.event_id, language)
        if key not in self._ics_cache:
            async with self.db.sessions() as s:
                snap = await s.scalar(select(store.event_projection.c.snapshot)
                                      .where(store.event_projection.c.event_id == campaign.event_id))
            if snap is None:
                return []
            event = messages.EventSnapshot.model_validate(snap)
            host = urlparse(event.url).hostname or "bridgepost.local"
            self._ics_cache[key] = ics.feed([event], language, host, self.renderer.organisation)
        return [("event.ics", "text/calendar; method=PUBLISH", self._ics_cache[key])]

    # --- lifecycle ---------------------------------------------------------------------------------

    async def recipients(self, s: AsyncSession, segment: messages.Segment) -> list[str]:
        rows = (await s.execute(select(a_).where(a_.c.status == "active"))).all()
        return [r.subscriber_id for r in rows if matches(segment, member(r))]

    async def start(self, campaign_id: str, correlation_id: str | None = None,
                    from_statuses: tuple[str, ...] = ("draft", "scheduled")) -> int:
        """Write the ledger and the jobs; returns the number of recipients (0 if not startable).

        This instance then sends the first batch at once (see `_send_first_batch`)."""
        async with self.db.transaction() as s:
            recipients = await self._start(s, campaign_id, correlation_id, from_statuses)
        if recipients:
            self._send_first_batch(campaign_id)
        return recipients

    async def _start(self, s: AsyncSession, campaign_id: str, correlation_id: str | None,
                     from_statuses: tuple[str, ...]) -> int:
        started = await s.execute(update(c_).where(c_.c.id == campaign_id, c_.c.status.in_(from_statuses))
                                  .values(status="sending", started_at=utcnow(), updated_at=utcnow()))
        if not started.rowcount:
            return 0
        campaign = (await s.execute(select(c_).where(c_.c.id == campaign_id))).first()
        if campaign.kind == "digest":
            ids = await self.digest_recipients(s)
        else:
            ids = await self.recipients(s, messages.Segment(**campaign.segment))
        size = self.settings.campaign_batch_size
        now = utcnow()
        for offset in range(0, len(ids), 1000):
            await s.execute(insert(d_), [
                {"campaign_id": campaign_id, "subscriber_id": sid, "batch": (offset + i) // size,
                 "status": "pending", "attempts": 0, "next_attempt_at": now}
                for i, sid in enumerate(ids[offset:offset + 1000])])
        for batch in range((len(ids) + size - 1) // size):
            await self._job(s, campaign_id, batch, correlation_id)
        if not ids:
            await s.execute(update(c_).where(c_.c.id == campaign_id).values(status="done", finished_at=now))
        return len(ids)

    def _send_first_batch(self, campaign_id: str) -> None:
        """The instance that starts a campaign sends its first batch without waiting for that batch's job
        to come back from Kafka: a broker round trip less before the first mail (for an announcement to
        a small segment, before every mail). The job still goes out and finds nothing, or what is left;
        other instances take the other batches from their jobs as before."""
        task = asyncio.get_running_loop().create_task(self._drain("batch", {"w_campaign": campaign_id, "w_batch": 0}))
        self._first_batches.add(task)
        task.add_done_callback(self._first_batch_done)

    def _first_batch_done(self, task: asyncio.Task) -> None:
        self._first_batches.discard(task)
        if not task.cancelled() and task.exception() is not None:  # its job on Kafka sends what is left
            log.warning("first batch not sent at once: %r", task.exception())

    async def stop(self) -> None:
        """Stop the first batches still being sent here (what is answered is recorded; the rest is left to
        the batch's job, or counted as ambiguous when it was in flight)."""
        for task in list(self._first_batches):
            task.cancel()
        await asyncio.gather(*self._first_batches, return_exceptions=True)

    # --- the digest --------------------------------------------------------------------------------

    async def upcoming_events(self, s: AsyncSession) -> list[messages.EventSnapshot]:
        now = utcnow()
        horizon = now + timedelta(days=self.settings.digest_days_ahead)
        snaps = (await s.scalars(select(store.event_projection.c.snapshot)
                                 .where(store.event_projection.c.status == "published"))).all()
        events = [messages.EventSnapshot.model_validate(x) for x in snaps]
        return sorted((e for e in events if now < e.starts_at <= horizon), key=lambda e: e.starts_at)

    async def digest_recipients(self, s: AsyncSession) -> list[str]:
        events = await self.upcoming_events(s)
        rows = (await s.execute(select(a_).where(a_.c.status == "active"))).all()
        return [r.subscriber_id for r in rows if digest.wants_events(r.topics)
                and any(digest.relevant(e, r.regions, r.topics) for e in events)]

    async def start_digest(self, period: str) -> str | None:
        """Create and start the digest of `period`; None if that period's digest exists already."""
        campaign_id = digest.period_id(period)
        tr = self.renderer.tr
        now = utcnow()
        try:
            async with self.db.transaction() as s:
                await s.execute(insert(c_).values(
                    id=campaign_id, kind="digest", status="draft", segment={}, created_by=f"digest {period}",
                    subject={lang: tr.gettext(lang, "mail.digest.subject") for lang in tr.taxonomy.languages},
                    body_markdown={"de": "(written for each recipient)"}, created_at=now, updated_at=now))
        except IntegrityError:
            return None
        await self.start(campaign_id)
        return campaign_id

    async def maybe_digest(self, now: datetime) -> None:
        if not self.settings.digest_enabled:
            return
        local = now.astimezone(digest.BERLIN)
        due = digest.due_time(local.year, local.month, self.settings.digest_weekday, self.settings.digest_hour)
        if due <= local < due + timedelta(days=1):  # a missed day is skipped, not sent late
            await self.start_digest(f"{local:%Y-%m}")

    async def _job(self, s: AsyncSession, campaign_id: str, batch: int, correlation_id: str | None) -> None:
        await add_to_outbox(s, store.infra, topics.JOBS, f"{campaign_id}:{batch}",
                            messages.CampaignBatch(campaign_id=campaign_id, batch=batch), correlation_id)

    async def set_status(self, campaign_id: str, action: str) -> str:
        """pause, resume or cancel; returns the new status."""
        status = await self._change_status(campaign_id, action)
        self._note_status(campaign_id, status)  # committed: this instance's connections stop at once
        return status

    async def _change_status(self, campaign_id: str, action: str) -> str:
        allowed = {"pause": (("sending",), "paused"), "resume": (("paused",), "sending"),
                   "cancel": (("draft", "scheduled", "sending", "paused"), "cancelled")}
        before, after = allowed[action]
        async with self.db.transaction() as s:
            campaign = (await s.execute(select(c_).where(c_.c.id == campaign_id).with_for_update())).first()
            if campaign is None:
                raise KeyError(campaign_id)
            if campaign.status == after:
                return after
            if campaign.status not in before:
                raise CampaignStateError(f"cannot {action} a campaign that is {campaign.status}")
            await s.execute(update(c_).where(c_.c.id == campaign_id).values(status=after, updated_at=utcnow()))
            if action == "cancel":
                await s.execute(update(d_).where(d_.c.campaign_id == campaign_id,
                                                 d_.c.status.in_(("pending", "claimed", "retry")))
                                .values(status="cancelled"))
            if action == "resume":  # the paused jobs returned early: hand out the unfinished batches again
                batches = (await s.scalars(select(d_.c.batch).where(d_.c.campaign_id == campaign_id,
                                                                     d_.c.status == "pending").distinct())).all()
                for batch in sorted(batches):
                    await self._job(s, campaign_id, batch, None)
            return after

    async def counts(self, campaign_id: str) -> dict[str, int]:
        async with self.db.sessions() as s:
            rows = (await s.execute(select(d_.c.status, func.count()).where(d_.c.campaign_id == campaign_id)
                                    .group_by(d_.c.status))).all()
        counts = {name: 0 for name in ("pending", "sending", "sent", "retrying", "failed", "ambiguous", "skipped",
                                       "cancelled")}
        for status, n in rows:
            name = "pending" if status == "claimed" else COUNT_NAMES.get(status, status)
            counts[name] += n
        counts["total"] = sum(n for _, n in rows)
        return counts

    # --- the engine ----------------------------------------------------------------------------------

    async def handle_job(self, job: messages.CampaignBatch, correlation_id: str | None) -> None:
        """Send one batch; returns when it is done, or at once while the campaign is not sending."""
        await self._drain("batch", {"w_campaign": job.campaign_id, "w_batch": job.batch})

    async def _drain(self, selection: str, params: dict[str, Any]) -> None:
        """Every connection of the pool takes groups of the rows of `selection` (a key of SELECTIONS, with
        its parameters) until none are left."""
        campaigns: dict[str, Any] = {}
        async with asyncio.TaskGroup() as workers:  # one fails: the others stop too (the job is retried)
            for _ in range(self.pool.size):
                workers.create_task(self._connection_worker(selection, params, campaigns))

    async def _connection_worker(self, selection: str, params: dict[str, Any], campaigns: dict[str, Any]) -> None:
        """One SMTP connection's loop: in one transaction, record the last group's answers and take the
        next group (`sending`, committed: with the connection in hand); then send that group."""
        size = self.settings.campaign_handover_size
        outcome = Outcome()
        try:
            async with self.pool.connection() as session:
                while True:
                    async with self.db.transaction() as s:
                        await self._record(s, outcome)
                        outcome = Outcome()
                        rows = await self._take(s, selection, params, size, "sending") if session.is_open else []
                    if not rows:
                        return
                    await self._load_campaigns(rows, campaigns)
                    outcome = await self._send_group(session, rows, campaigns)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # No connection: the next group is not handed over but counted as a failed attempt (retried
            # with backoff by the sweep), so a relay that is down does not stall the batch for ever.
            async with self.db.transaction() as s:
                await self._record(s, outcome)
                outcome = Outcome()
                rows = await self._take(s, selection, params, size, "claimed")
                for row in rows:
                    await self._failed(s, row, None, f"{type(exc).__name__}: {exc}")
        finally:
            if outcome:  # cancelled mid-group: what was answered is still recorded
                async with self.db.transaction() as s:
                    await self._record(s, outcome)

    async def _take(self, s: AsyncSession, selection: str, params: dict[str, Any], limit: int, status: str) -> list:
        """Claim up to `limit` rows of `selection` in sending campaigns (as `status`) and return them with
        their recipients' data, in one statement (built once per selection and status)."""
        statement = self._take_statements.get((selection, status))
        if statement is None:
            statement = self._take_statements[selection, status] = self._take_statement(SELECTIONS[selection], status)
        taken = await s.execute(statement, {**params, "t_limit": limit, "t_now": utcnow(),
                                            "t_claim": f"{self.instance}:{uuid.uuid4().hex[:12]}"})
        return taken.all()

    def _take_statement(self, where, status: str):
        """The UPDATE that picks its rows by a subquery and returns them together with the recipient's
        current data (SQLite ≥ 3.35 and PostgreSQL both take subqueries in RETURNING)."""
        sending = select(c_.c.id).where(c_.c.status == "sending").scalar_subquery()
        pick = (select(d_.c.campaign_id, d_.c.subscriber_id).where(where, d_.c.campaign_id.in_(sending))
                .limit(bindparam("t_limit")))
        if self.db.engine.dialect.name == "postgresql":  # instances claim different rows, no waiting
            pick = pick.with_for_update(skip_locked=True)
        # A CTE is evaluated once; as a subquery in IN, PostgreSQL may run a locking LIMIT query per row.
        picked = pick.cte("picked")

        # The ledger row's subscriber, named with its table: SQLite's RETURNING is written without table
        # names, and an unqualified `subscriber_id` inside the subquery would be the audience's own.
        ledger_subscriber = literal_column(f"{d_.name}.subscriber_id")

        def recipient(column, label: str):  # the audience row of the ledger row (none once erased)
            return select(column).where(a_.c.subscriber_id == ledger_subscriber).scalar_subquery().label(label)

        # `where` again on the UPDATE: a row another instance claimed meanwhile is not taken twice.
        return (
            update(d_).where(tuple_(d_.c.campaign_id, d_.c.subscriber_id).in_(select(picked.c.campaign_id,
                                                                                     picked.c.subscriber_id)),
                             where)
            .values(status=status, claimed_by=bindparam("t_claim"), claimed_at=bindparam("t_now"))
            .returning(d_.c.campaign_id, d_.c.subscriber_id, d_.c.claimed_by, d_.c.attempts,
                       recipient(a_.c.email, "email"), recipient(a_.c.name, "name"),
                       recipient(a_.c.language, "language"), recipient(a_.c.manage_token, "manage_token"),
                       recipient(a_.c.regions, "regions"), recipient(a_.c.topics, "topics"),
                       recipient(a_.c.status, "audience")))

    async def _load_campaigns(self, rows: list, campaigns: dict[str, Any]) -> None:
        missing = {r.campaign_id for r in rows} - campaigns.keys()
        if missing:
            async with self.db.sessions() as s:
                for row in (await s.execute(select(c_).where(c_.c.id.in_(missing)))).all():
                    campaigns[row.id] = row

    def _mine(self, row):
        return and_(d_.c.campaign_id == row.campaign_id, d_.c.subscriber_id == row.subscriber_id,
                    d_.c.claimed_by == row.claimed_by, d_.c.status.in_(IN_FLIGHT))

    def _message(self, campaign, row, attachments) -> tuple[bytes | Any, str]:
        """The recipient's mail: composed from the language's skeleton, or rendered in full."""
        language = row.language if row.language in self.renderer.tr.taxonomy.languages else "de"
        skeleton = self._skeleton(campaign, language, attachments) if row.email.isascii() else None
        if skeleton is None:
            rendered = self.render_for(campaign, row.email, row.name, row.language, row.manage_token, attachments)
            return rendered.message, rendered.message_id
        return skeleton.compose(row.email, row.name, row.manage_token)

    def _skeleton(self, campaign, language: str, attachments) -> Skeleton | None:
        if campaign.kind == "digest":  # written for each recipient
            return None
        key = (campaign.id, campaign.updated_at, language)
        if key not in self._skeletons:
            if len(self._skeletons) > 256:
                self._skeletons.clear()
            subject, body, fell_back = self.content(campaign, language)
            try:
                self._skeletons[key] = Skeleton(self.renderer, "de" if fell_back else language, subject, body,
                                                attachments)
            except NotSplittable:
                self._skeletons[key] = None
        return self._skeletons[key]

    async def _send_group(self, session: Session, rows: list, campaigns: dict[str, Any]) -> Outcome:
        """Send the rows over `session`, in order; stops at the first broken connection."""
        outcome = Outcome()
        ready: list[tuple[Any, bytes, str]] = []  # (row, wire bytes, Message-ID), all written before sending
        for row in rows:
            if row.audience != "active" or not row.email or not row.manage_token:
                # Unsubscribed, suppressed or erased since the campaign started: not mailed.
                outcome.settled.append((row, "skipped", None))
                continue
            try:
                message, message_id = await self._compose(campaigns[row.campaign_id], row)
            except ValueError as exc:  # e.g. a name with a line break: this mail cannot be written
                outcome.settled.append((row, "failed", f"not sent: {exc}"[:480]))
                continue
            if message is None:  # a digest with nothing in it for them any more: no empty digest
                outcome.settled.append((row, "skipped", None))
                continue
            ready.append((row, self.pool.prepare(message, wire_ready=isinstance(message, bytes)), message_id))
        for index, (row, data, message_id) in enumerate(ready):
            if row.campaign_id in self._halted and await self._halted_now(row.campaign_id):
                outcome.returned = [r for r, _, _ in ready[index:]]  # paused or cancelled: not sent
                break
            await self.limiter.wait()
            await self._domain_limits[row.email.rpartition("@")[2]].wait()
            # The next mail's envelope rides with this one's content (one write, one round trip each),
            # unless a rate limit spaces them out.
            following = ready[index + 1][0].email if index + 1 < len(ready) else None
            then = (self.envelope_from, following) if following and self.limiter.rate <= 0 \
                and self._domain_limits[following.rpartition("@")[2]].rate <= 0 else None
            self.in_flight += 1
            try:
                await session.send(self.envelope_from, row.email, data, then=then)
            except aiosmtplib.SMTPResponseException as exc:
                outcome.failed.append((row, exc.code, exc.message))
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                if session.content_sent:  # handed over, answer lost: counted, never resent
                    outcome.settled.append((row, "ambiguous", f"{type(exc).__name__}: {exc}"[:480]))
                else:
                    outcome.failed.append((row, None, f"{type(exc).__name__}: {exc}"))
                outcome.unsent = [r for r, _, _ in ready[index + 1:]]  # the connection is gone: back, untried
                break
            else:
                outcome.sent.append((row, message_id))
            finally:
                self.in_flight -= 1
        return outcome

    async def _compose(self, campaign, row) -> tuple[Any, str | None]:
        attachments = await self._attachments(campaign, row.language)
        if campaign.kind != "digest":
            return self._message(campaign, row, attachments)
        async with self.db.sessions() as s:
            events = [e for e in await self.upcoming_events(s) if digest.relevant(e, row.regions, row.topics)]
        if not events:
            return None, None
        body = digest.body(events, row.language if row.language in self.renderer.tr.taxonomy.languages else "de",
                           self.renderer.tr)
        rendered = self.render_for(campaign, row.email, row.name, row.language, row.manage_token, attachments,
                                   body=body)
        return rendered.message, rendered.message_id

    async def _record(self, s: AsyncSession, outcome: Outcome) -> None:
        """The answers of one group (inside the caller's transaction)."""
        if outcome.sent:  # one executemany of a statement built once
            now = utcnow()
            await s.execute(RECORD_SENT, [
                {"r_campaign": row.campaign_id, "r_subscriber": row.subscriber_id, "r_claim": row.claimed_by,
                 "r_now": now, "r_message_id": message_id} for row, message_id in outcome.sent])
        for row, status, error in outcome.settled:
            await s.execute(update(d_).where(self._mine(row)).values(status=status, last_error=error))
        for row, code, error in outcome.failed:
            await self._failed(s, row, code, error)
        for row in outcome.unsent:  # never handed to SMTP: due again at once, no attempt counted
            await s.execute(update(d_).where(self._mine(row)).values(status="retry", next_attempt_at=utcnow()))
        for row in outcome.returned:  # never handed to SMTP: pending for a resume, or cancelled with the rest
            halted = self._halted.get(row.campaign_id)
            await s.execute(update(d_).where(self._mine(row)).values(
                status="cancelled" if halted == "cancelled" else "pending", claimed_by=None))

    def _note_status(self, campaign_id: str, status: str) -> None:
        if status in ("paused", "cancelled"):
            self._halted[campaign_id] = status
        else:
            self._halted.pop(campaign_id, None)

    async def _halted_now(self, campaign_id: str) -> bool:
        """Is the campaign still paused or cancelled? (A resume on another instance may be newer.)"""
        async with self.db.sessions() as s:
            status = await s.scalar(select(c_.c.status).where(c_.c.id == campaign_id))
        self._note_status(campaign_id, status)
        return campaign_id in self._halted

    async def _failed(self, s: AsyncSession, row, code: int | None, error: str) -> None:
        attempts = row.attempts + 1
        permanent = code is not None and 500 <= code < 600
        gave_up = not permanent and attempts >= self.settings.max_attempts
        error = without_address(error, row.email)[:480]  # stored and published without the address
        if permanent or gave_up:
            await s.execute(update(d_).where(self._mine(row)).values(
                status="failed", attempts=attempts, last_error=f"{code} {error}"))
        else:
            delay = min(self.settings.retry_base_seconds * 2 ** (attempts - 1), self.settings.retry_max_seconds)
            await s.execute(update(d_).where(self._mine(row)).values(
                status="retry", attempts=attempts, last_error=f"{code} {error}",
                next_attempt_at=utcnow() + timedelta(seconds=delay)))
        mail_id = f"{row.campaign_id}:{row.subscriber_id}"
        event = (messages.MailBounced(subscriber_id=row.subscriber_id, mail_id=mail_id, kind="campaign",
                                      smtp_code=code, error=error) if permanent else
                 messages.MailFailed(subscriber_id=row.subscriber_id, mail_id=mail_id, kind="campaign",
                                     attempt=attempts, final=gave_up, smtp_code=code, error=error))
        await add_to_outbox(s, store.infra, topics.DELIVERY, row.subscriber_id, event, None)

    async def sweep(self, now: datetime | None = None) -> None:
        """Periodic: start due scheduled campaigns, retry due rows, count the ambiguous, finish."""
        now = now or utcnow()
        await self.maybe_digest(now)
        async with self.db.sessions() as s:  # what other instances paused or cancelled, within a second
            halted = dict((await s.execute(select(c_.c.id, c_.c.status).where(
                c_.c.status.in_(("paused", "cancelled")), c_.c.updated_at > now - timedelta(days=1)))).all())
        self._halted = halted
        async with self.db.sessions() as s:
            due = (await s.scalars(select(c_.c.id).where(c_.c.status == "scheduled", c_.c.scheduled_at <= now))).all()
        for campaign_id in due:
            await self.start(campaign_id, from_statuses=("scheduled",))
        cutoff = now - timedelta(seconds=self.settings.ambiguous_after_seconds)
        async with self.db.transaction() as s:
            # Claimed by a process that died before handing them over: never sent. Back to pending,
            # and their batches handed out again (the batch's first job may be done already).
            abandoned = (await s.execute(select(d_.c.campaign_id, d_.c.batch).where(
                d_.c.status == "claimed", d_.c.claimed_at < cutoff).distinct())).all()
            if abandoned:
                await s.execute(update(d_).where(d_.c.status == "claimed", d_.c.claimed_at < cutoff)
                                .values(status="pending", claimed_by=None))
                for campaign_id, batch in abandoned:
                    await self._job(s, campaign_id, batch, None)
            stuck = await s.execute(update(d_).where(d_.c.status == "sending", d_.c.claimed_at < cutoff)
                                    .values(status="ambiguous"))
        if stuck.rowcount:
            log.warning("%d campaign mail(s) were in flight when a mailer stopped: counted as ambiguous",
                        stuck.rowcount)
        await self._drain("retry", {"w_due": now})
        async with self.db.transaction() as s:
            open_ids = (await s.scalars(select(c_.c.id).where(c_.c.status == "sending"))).all()
            for campaign_id in open_ids:
                left = await s.scalar(select(func.count()).select_from(d_).where(
                    d_.c.campaign_id == campaign_id, d_.c.status.in_(UNFINISHED)))
                if not left:
                    await s.execute(update(c_).where(c_.c.id == campaign_id, c_.c.status == "sending")
                                    .values(status="done", finished_at=utcnow(), updated_at=utcnow()))

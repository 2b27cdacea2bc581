"""The sending loop: claims due mails from the ledger, sends them through the SMTP pool, records the
answer (SPEC §2.2). 4xx and connection errors are retried with backoff; 5xx is a bounce.

Each connection of the pool takes its share of the claimed mails in groups (one mail at a time when few
are waiting, at most MAILER_TRANSACTIONAL_HANDOVER_SIZE under load): in one transaction it records the
answers to its last group and marks the next group `sending` (committed, with the connection in hand),
then sends that group, each mail's content written together with the next one's envelope. A crash
leaves the mails of the groups in flight `ambiguous`, never resent (at most SMTP_POOL_SIZE × the hand-over
size), while claimed mails that never left are put back to `pending`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from email.utils import parseaddr
from typing import Any

import aiosmtplib
from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.mailer import store
from services.mailer.settings import MailerSettings
from services.mailer.smtp import Session, SmtpPool
from shared import messages, topics
from shared.db import Database, utcnow
from shared.outbox import add_all_to_outbox, add_to_outbox, outbox_row

log = logging.getLogger(__name__)
m_ = store.outgoing_mail


# Groups per connection one claim takes under load: fewer claims, and fewer waits for the slowest
# connection before the next claim (the connections of one claim finish together).
CLAIMED_GROUPS = 4


def mine(row):
    """The ledger row as this sender claimed it."""
    return and_(m_.c.id == row.id, m_.c.claimed_by == row.claimed_by,
                m_.c.status.in_(("claimed", "sending", "ambiguous")))


# The statements of every group, built once with bound parameters: building them anew per group (the
# expressions, their coercions, their cache keys) cost as much Python as running them.
_GROUP = and_(m_.c.id.in_(bindparam("ids", expanding=True)), m_.c.claimed_by == bindparam("claim"))
HAND_OVER = (update(m_).where(_GROUP, m_.c.status == "claimed")
             .values(status="sending", claimed_at=bindparam("now")))
STILL_HANDED = select(m_.c.id).where(_GROUP, m_.c.status == "sending")
RECORD_SENT = (update(m_).where(_GROUP, or_(*(m_.c.status == status for status in ("claimed", "sending", "ambiguous"))))
               .values(status="sent", sent_at=bindparam("now"), attempts=m_.c.attempts + 1, last_error=None))
PUT_BACK = (update(m_).where(_GROUP, m_.c.status.in_(("claimed", "sending")))
            .values(status="pending", claimed_by=None, next_attempt_at=bindparam("now")))


class RateLimiter:
    """Token bucket: at most `rate` sends per second on average (0 = unlimited)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = 0.0

    async def wait(self) -> None:
        if self.rate <= 0:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot = max(now, self._next)
        self._next = slot + 1.0 / self.rate
        if slot > now:
            await asyncio.sleep(slot - now)


def without_address(answer: str, address: str | None) -> str:
    """An SMTP server's answer with the recipient's address replaced by the word "recipient".

    Servers often quote the address ("<amira@…>: Recipient address rejected"); what we store and
    publish (Kafka keeps what it is given beyond any erasure) must not carry it.
    """
    return re.sub(re.escape(address), "recipient", answer, flags=re.IGNORECASE) if address else answer


@dataclass
class Outcome:
    """What happened to one group of mails on one connection, recorded in one transaction."""

    sent: list = field(default_factory=list)
    failed: list[tuple[Any, int | None, str]] = field(default_factory=list)  # (row, SMTP code, error)
    ambiguous: list[tuple[Any, str]] = field(default_factory=list)  # (row, error): handed over, no answer
    unsent: list = field(default_factory=list)  # never handed to SMTP: due again at once

    def __bool__(self) -> bool:
        return bool(self.sent or self.failed or self.ambiguous or self.unsent)


class Sender:
    def __init__(self, db: Database, settings: MailerSettings, pool: SmtpPool) -> None:
        self.db, self.settings, self.pool = db, settings, pool
        self.instance = f"mailer-{uuid.uuid4().hex[:12]}"
        self.envelope_from = parseaddr(settings.mail_from)[1]
        self.limiter = RateLimiter(settings.send_rate_per_second)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.counts = {"sent": 0, "retry": 0, "failed": 0, "bounced": 0}

    def notify(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mail-sender")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.pool.close()

    async def _run(self) -> None:
        await self.mark_ambiguous()
        while True:
            try:
                sent = await self.send_due()
                if sent:
                    continue
                await self.mark_ambiguous()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the database may be briefly away; keep the loop alive
                log.exception("sending loop failed; retrying")
                await asyncio.sleep(1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()

    async def claim(self, limit: int) -> list:
        now = utcnow()
        claim = uuid.uuid4().hex
        due = and_(m_.c.status.in_(("pending", "retry")), m_.c.next_attempt_at <= now)
        async with self.db.transaction() as s:
            ids = select(m_.c.id).where(due).order_by(m_.c.next_attempt_at).limit(limit)
            # `due` repeated on the outer UPDATE: under concurrency PostgreSQL re-checks it per row,
            # so two instances never claim the same mail.
            await s.execute(update(m_).where(m_.c.id.in_(ids.scalar_subquery()), due)
                            .values(status="claimed", claimed_by=claim, claimed_at=now))
            rows = (await s.execute(select(m_).where(m_.c.claimed_by == claim, m_.c.status == "claimed"))).all()
        return rows

    def batch_size(self) -> int:
        # Claim no more than can be handed to SMTP within a few seconds: a claimed mail waiting for
        # the rate limiter longer than `ambiguous_after_seconds` would otherwise look abandoned.
        size = max(1, self.settings.smtp_pool_size) * self.settings.transactional_handover_size * CLAIMED_GROUPS
        if self.settings.send_rate_per_second > 0:
            size = min(size, max(1, int(self.settings.send_rate_per_second * 5)))
        return size

    async def send_due(self) -> int:
        """Claim due mails and send them over the pool's connections; returns how many were claimed."""
        rows = await self.claim(self.batch_size())
        if not rows:
            return 0
        queue = deque(rows)
        workers = min(self.pool.size, len(rows))
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(self._connection_worker(queue, workers))
        finally:
            if queue:  # a worker failed (the database?): what it never took is due again
                left = list(queue)
                async with self.db.transaction() as s:
                    await self._record(s, Outcome(unsent=left))
        return len(rows)

    def _group(self, queue: deque, workers: int) -> list:
        """The next group for one connection: an equal share of what is waiting, at most the hand-over size
        (one mail at a time when little is waiting: the connections send in parallel)."""
        size = min(self.settings.transactional_handover_size, max(1, -(-len(queue) // workers)))
        return [queue.popleft() for _ in range(min(size, len(queue)))]

    async def _connection_worker(self, queue: deque, workers: int) -> None:
        """One SMTP connection's loop: in one transaction, record the last group's answers and hand over
        the next group (`sending`, committed: with the connection in hand); then send that group."""
        outcome = Outcome()
        try:
            async with self.pool.connection() as session:
                reused = session.mails > 0
                while True:
                    group = self._group(queue, workers) if session.is_open else []
                    ready = [(row, self.pool.prepare(row.message)) for row in group]
                    async with self.db.transaction() as s:
                        await self._record(s, outcome)
                        outcome = Outcome()
                        ready = await self._hand_over(s, ready)
                    if not group:
                        return
                    outcome = await self._send_group(session, ready, reused)
                    reused = False
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # No connection: what is waiting counts as a failed attempt (retried with backoff), so a relay
            # that is down is not asked again at once for every mail.
            taken = [queue.popleft() for _ in range(len(queue))]
            outcome.failed.extend((row, None, f"{type(exc).__name__}: {exc}") for row in taken)
            async with self.db.transaction() as s:
                await self._record(s, outcome)
            outcome = Outcome()
        finally:
            if outcome:  # cancelled mid-group: what was answered is still recorded
                async with self.db.transaction() as s:
                    await self._record(s, outcome)

    async def _hand_over(self, s: AsyncSession, ready: list) -> list:
        """Mark the group `sending` (from now on a crash leaves them ambiguous); the ones still claimed."""
        if not ready:
            return ready
        group = {"ids": [row.id for row, _data in ready], "claim": ready[0][0].claimed_by}
        handed = await s.execute(HAND_OVER, {**group, "now": utcnow()})
        if handed.rowcount == len(ready):
            return ready
        still = set((await s.scalars(STILL_HANDED, group)).all())
        return [(row, data) for row, data in ready if row.id in still]

    async def _send_group(self, session: Session, ready: list, reused: bool) -> Outcome:
        """Send the group over `session`, in order; stops at the first broken connection."""
        outcome = Outcome()
        for index, (row, data) in enumerate(ready):
            await self.limiter.wait()
            # The next mail's envelope rides with this one's content (one write, one round trip each),
            # unless the rate limit spaces them out.
            following = ready[index + 1][0].recipient if index + 1 < len(ready) else None
            then = (self.envelope_from, following) if following and self.limiter.rate <= 0 else None
            try:
                await session.send(self.envelope_from, row.recipient, data, then=then)
            except aiosmtplib.SMTPResponseException as exc:
                outcome.failed.append((row, exc.code, exc.message))
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                if session.content_sent:  # handed over, answer lost: counted, never resent
                    outcome.ambiguous.append((row, f"{type(exc).__name__}: {exc}"[:480]))
                elif index == 0 and reused and isinstance(exc, aiosmtplib.SMTPServerDisconnected):
                    outcome.unsent.append(row)  # an idle connection the server had closed: again, at once
                else:
                    outcome.failed.append((row, None, f"{type(exc).__name__}: {exc}"))
                outcome.unsent.extend(r for r, _ in ready[index + 1:])  # the connection is gone: back, untried
                break
            else:
                outcome.sent.append(row)
        return outcome

    async def _record(self, s: AsyncSession, outcome: Outcome) -> None:
        """The answers of one group (inside the caller's transaction). Each update is guarded by the claim:
        only the instance that handed a mail to SMTP records it (the real outcome wins even if a slow send
        was meanwhile counted as ambiguous)."""
        if outcome.sent:
            # One statement for the group (a group shares its claim): each row guarded as in `mine`.
            await s.execute(RECORD_SENT, {"ids": [r.id for r in outcome.sent], "claim": outcome.sent[0].claimed_by,
                                          "now": utcnow()})
            await add_all_to_outbox(s, store.infra, [
                outbox_row(topics.DELIVERY, r.subscriber_id, messages.MailSent(
                    subscriber_id=r.subscriber_id, mail_id=r.id, kind=r.kind, message_id=r.message_id),
                    r.correlation_id)
                for r in outcome.sent if r.subscriber_id])
            self.counts["sent"] += len(outcome.sent)
        for row, code, error in outcome.failed:
            await self._failed(s, row, code, error)
        for row, error in outcome.ambiguous:
            await s.execute(update(m_).where(mine(row)).values(status="ambiguous", last_error=error))
        if outcome.ambiguous:
            log.warning("%d mail(s) handed to SMTP without an answer: counted as ambiguous", len(outcome.ambiguous))
        if outcome.unsent:  # never handed to SMTP: due again at once, no attempt counted
            await s.execute(PUT_BACK, {"ids": [r.id for r in outcome.unsent], "claim": outcome.unsent[0].claimed_by,
                                       "now": utcnow()})

    async def _failed(self, s: AsyncSession, row, code: int | None, error: str) -> None:
        attempts = row.attempts + 1
        permanent = code is not None and 500 <= code < 600
        gave_up = not permanent and attempts >= self.settings.max_attempts
        error = without_address(error, row.recipient)[:480]
        if permanent or gave_up:
            await s.execute(update(m_).where(mine(row)).values(
                status="failed", attempts=attempts, last_error=f"{code} {error}"))
        else:
            delay = min(self.settings.retry_base_seconds * 2 ** (attempts - 1), self.settings.retry_max_seconds)
            await s.execute(update(m_).where(mine(row)).values(
                status="retry", attempts=attempts, last_error=f"{code} {error}",
                next_attempt_at=utcnow() + timedelta(seconds=delay)))
        if row.subscriber_id:
            event = (messages.MailBounced(subscriber_id=row.subscriber_id, mail_id=row.id, kind=row.kind,
                                          smtp_code=code, error=error) if permanent else
                     messages.MailFailed(subscriber_id=row.subscriber_id, mail_id=row.id, kind=row.kind,
                                         attempt=attempts, final=gave_up, smtp_code=code, error=error))
            await add_to_outbox(s, store.infra, topics.DELIVERY, row.subscriber_id, event, row.correlation_id)
        self.counts["bounced" if permanent else "failed" if gave_up else "retry"] += 1
        log.info("mail %s %s after attempt %d: %s %s", row.id,
                 "bounced" if permanent else "gave up" if gave_up else "will retry", attempts, code, error[:120])

    async def mark_ambiguous(self) -> int:
        """Mails stuck in `sending` (their process died mid-send) become `ambiguous`: counted, not resent."""
        cutoff = utcnow() - timedelta(seconds=self.settings.ambiguous_after_seconds)
        async with self.db.transaction() as s:
            # Claimed by a process that died before handing them over: never sent, send them.
            await s.execute(update(m_).where(m_.c.status == "claimed", m_.c.claimed_at < cutoff)
                            .values(status="pending", claimed_by=None))
            result = await s.execute(update(m_).where(m_.c.status == "sending", or_(
                m_.c.claimed_at < cutoff, m_.c.claimed_at.is_(None))).values(status="ambiguous"))
        if result.rowcount:
            log.warning("%d mail(s) were in flight when a mailer stopped: counted as ambiguous", result.rowcount)
        return result.rowcount or 0

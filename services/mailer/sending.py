"""The sending loop: claims due mails from the ledger, sends them through the SMTP pool, records the
answer (SPEC §2.2). 4xx and connection errors are retried with backoff; 5xx is a bounce. A claimed mail
is marked `sending` (committed) just before it is handed to SMTP, so a crash leaves it `ambiguous`,
never resent, while claimed mails that never left are put back to `pending`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from datetime import timedelta
from email.utils import parseaddr

import aiosmtplib
from sqlalchemy import and_, or_, select, update

from services.mailer import store
from services.mailer.settings import MailerSettings
from services.mailer.smtp import SmtpPool
from shared import messages, topics
from shared.db import Database, utcnow
from shared.outbox import add_to_outbox

log = logging.getLogger(__name__)
m_ = store.outgoing_mail


def mine(row):
    """The ledger row as this sender claimed it."""
    return and_(m_.c.id == row.id, m_.c.claimed_by == row.claimed_by,
                m_.c.status.in_(("claimed", "sending", "ambiguous")))


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
        size = max(1, self.settings.smtp_pool_size) * 8
        if self.settings.send_rate_per_second > 0:
            size = min(size, max(1, int(self.settings.send_rate_per_second * 5)))
        return size

    async def send_due(self) -> int:
        rows = await self.claim(self.batch_size())
        if rows:
            await asyncio.gather(*(self._send_one(row) for row in rows))
        return len(rows)

    async def _send_one(self, row) -> None:
        await self.limiter.wait()

        async def hand_over() -> bool:
            # With an SMTP connection in hand: from here on, a crash leaves the mail ambiguous.
            async with self.db.transaction() as s:
                handed = await s.execute(update(m_).where(mine(row), m_.c.status == "claimed")
                                         .values(status="sending", claimed_at=utcnow()))
            return bool(handed.rowcount)

        try:
            if await self.pool.send(row.message, self.envelope_from, row.recipient, on_handover=hand_over) is None:
                return
        except aiosmtplib.SMTPRecipientsRefused as exc:
            code = min((r.code for r in exc.recipients), default=None)
            # The server's answer, not the exception's text (which lists the recipient's address).
            await self._failed(row, code, "; ".join(r.message for r in exc.recipients))
        except aiosmtplib.SMTPResponseException as exc:
            await self._failed(row, exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self._failed(row, None, f"{type(exc).__name__}: {exc}")
        else:
            await self._sent(row)

    async def _sent(self, row) -> None:
        async with self.db.transaction() as s:
            # Guarded by the claim: only the instance that handed this mail to SMTP records it (the
            # real outcome wins even if a slow send was meanwhile counted as ambiguous).
            await s.execute(update(m_).where(mine(row)).values(
                status="sent", sent_at=utcnow(), attempts=row.attempts + 1, last_error=None))
            if row.subscriber_id:
                await add_to_outbox(s, store.infra, topics.DELIVERY, row.subscriber_id, messages.MailSent(
                    subscriber_id=row.subscriber_id, mail_id=row.id, kind=row.kind, message_id=row.message_id),
                    row.correlation_id)
        self.counts["sent"] += 1

    async def _failed(self, row, code: int | None, error: str) -> None:
        attempts = row.attempts + 1
        permanent = code is not None and 500 <= code < 600
        gave_up = not permanent and attempts >= self.settings.max_attempts
        error = without_address(error, row.recipient)[:480]
        async with self.db.transaction() as s:
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

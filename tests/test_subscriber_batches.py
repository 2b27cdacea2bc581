"""The mailer's consumer of subscriber events handles a batch as if it handled its events one by one.

Under load `TransactionalMail.handle_batch` gets what one fetch brought and writes runs of sign-up requests
together. Here the same mixed stream of events (the same subscriber asking again, confirming, changing,
leaving, coming back, erased; events delivered twice) goes once through `handle` event by event and once
through `handle_batch` in batches of every size, each into its own real database (SQLite and PostgreSQL):
the audience projection and the ledger of mail must come out the same, and each event's effect once.
"""

from __future__ import annotations

import contextlib
import random
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from services.mailer import store
from services.mailer.app import MIGRATIONS
from services.mailer.render import MailRenderer
from services.mailer.transactional import TransactionalMail
from shared import messages
from shared.db import Database, migrate, utcnow
from shared.i18n import load_translations
from shared.kafka import AlreadyProcessed
from tests.conftest import BACKENDS, postgres_available, postgres_databases

LANGUAGES = ["de", "en", "ar", "uk", "fa", "ru", "tr"]


def stream(seed: int, subscribers: int = 12, length: int = 160) -> list[messages.Envelope]:
    """A plausible order of events on the subscriber topic, some delivered twice."""
    rng = random.Random(seed)
    ids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(subscribers)]
    events: list[messages.Envelope] = []
    for n in range(length):
        sid = rng.choice(ids)
        profile = dict(subscriber_id=sid, email=f"p{ids.index(sid)}-{n % 3}@example.org",
                       name=rng.choice([None, "Amira <b>", "Jörg"]), language=rng.choice(LANGUAGES),
                       topics=rng.sample(["arbeitsmarkt", "bildung", "gesundheit"], rng.randint(0, 2)),
                       regions=rng.sample(["halle", "magdeburg", "boerde"], rng.randint(0, 2)))
        kind = rng.choices(["requested", "confirmed", "preferences", "groups", "unsubscribed", "suppressed",
                            "erased", "again"], weights=[10, 4, 2, 1, 1, 1, 1, 2])[0]
        match kind:
            case "requested":
                event = messages.SubscriptionRequested(**profile, confirm_token=f"t{n}" * 8,
                                                       expires_at=utcnow() + timedelta(hours=48),
                                                       manage_token=f"m{n}")
            case "confirmed":
                event = messages.SubscriptionConfirmed(**profile, confirmed_at=utcnow(), manage_token=f"m{n}",
                                                       welcome=rng.random() < 0.8)
            case "preferences":
                event = messages.PreferencesChanged(**profile, manage_token=f"m{n}")
            case "groups":
                event = messages.GroupsChanged(subscriber_id=sid, audience="partner", groups=["verwaltung"])
            case "unsubscribed":
                event = messages.Unsubscribed(subscriber_id=sid, source="one-click")
            case "suppressed":
                event = messages.SubscriberSuppressed(subscriber_id=sid, reason="hard-bounce")
            case "erased":
                event = messages.SubscriberErased(subscriber_id=sid)
            case _:  # redelivered: an event seen before, again
                event = rng.choice(events) if events else messages.Unsubscribed(subscriber_id=sid, source="page")
        events.append(event)
    return events


async def state(db: Database) -> tuple[list, list]:
    a, m = store.audience, store.outgoing_mail
    async with db.transaction() as s:
        audience = (await s.execute(select(a.c.subscriber_id, a.c.email, a.c.name, a.c.language, a.c.topics,
                                           a.c.regions, a.c.audience, a.c.groups, a.c.status, a.c.manage_token)
                                    .order_by(a.c.subscriber_id))).all()
        mail = (await s.execute(select(m.c.dedupe_key, m.c.subscriber_id, m.c.kind, m.c.recipient, m.c.status,
                                       m.c.message.is_(None)).order_by(m.c.dedupe_key))).all()
    return [tuple(r) for r in audience], [tuple(r) for r in mail]


def mailer(url: str) -> TransactionalMail:
    renderer = MailRenderer(load_translations(), "http://subscriptions.test", "bridgepost <news@example.org>",
                            "news@example.org", "bridgepost", "Musterstraße 1, 39104 Magdeburg")
    return TransactionalMail(Database(url), renderer)


@pytest.fixture(params=BACKENDS)
async def three_databases(request, tmp_path: Path):
    if request.param == "sqlite":
        yield [f"sqlite+aiosqlite:///{tmp_path / f'mailer-{n}.db'}" for n in range(3)]
        return
    if not await postgres_available():
        pytest.skip("PostgreSQL not reachable")
    async with postgres_databases(["one", "batched", "small"]) as urls:
        yield list(urls.values())


async def test_a_batch_has_the_effect_of_its_events_one_by_one(three_databases: list[str]) -> None:
    for url in three_databases:
        await migrate(url, MIGRATIONS)
    one, batched, small = (mailer(url) for url in three_databases)
    try:
        for seed in (1, 2, 3):
            events = stream(seed)
            for event in events:
                with contextlib.suppress(AlreadyProcessed):  # (what the consumer does with it)
                    await one.handle(event, "cid")
            duplicates = 0
            for start in range(0, len(events), 64):  # large batches, as under load
                duplicates += await batched.handle_batch([(e, "cid") for e in events[start:start + 64]])
            rng = random.Random(seed)
            start = 0
            while start < len(events):  # and every small size, a batch starting anywhere
                size = rng.randint(1, 7)
                await small.handle_batch([(e, "cid") for e in events[start:start + size]])
                start += size
            expected = await state(one.db)
            assert await state(batched.db) == expected
            assert await state(small.db) == expected
            assert duplicates == len(events) - len({str(e.event_id) for e in events})
            assert any(kind == "confirmation" for _, _, kind, *_ in expected[1])
            # Everything again (a replay): nothing changes.
            assert await batched.handle_batch([(e, "cid") for e in events]) == len(events)
            assert await state(batched.db) == expected
    finally:
        for transactional in (one, batched, small):
            await transactional.db.dispose()



async def test_an_unsubscribe_cancels_a_confirmation_the_sender_has_claimed_but_not_yet_handed_over(
        tmp_path: Path) -> None:
    """Between the sender's claim and its hand-over to SMTP, an unsubscribe still stops the mail: it is
    cancelled in the ledger, and the hand-over's guard leaves it out of the group."""
    from collections import deque

    from services.mailer.sending import Sender
    from services.mailer.settings import MailerSettings
    from services.mailer.smtp import SmtpPool
    from tests.smtp_sink import SmtpSink

    url = f"sqlite+aiosqlite:///{tmp_path / 'mailer.db'}"
    await migrate(url, MIGRATIONS)
    sink = SmtpSink()
    await sink.start()
    settings = MailerSettings(environment="test", database_url=url, smtp_host="127.0.0.1", smtp_port=sink.port,
                              send_rate_per_second=0)
    transactional = mailer(url)
    db = transactional.db
    sender = Sender(db, settings, SmtpPool(settings))
    signups = [messages.SubscriptionRequested(
        subscriber_id=str(uuid.uuid4()), email=f"claimed-{n}@example.org", name=None, language="de", topics=[],
        regions=[], confirm_token=f"token-{n}-" * 4, expires_at=utcnow() + timedelta(hours=48),
        manage_token=f"m{n}") for n in range(5)]
    m = store.outgoing_mail
    try:
        await transactional.handle_batch([(event, None) for event in signups])
        rows = await sender.claim(10)
        assert len(rows) == 5
        await transactional.handle_batch([(messages.Unsubscribed(subscriber_id=signups[2].subscriber_id,
                                                                 source="one-click"), None)])
        await sender._connection_worker(deque(rows), 1)
        async with db.transaction() as s:
            status = dict((await s.execute(select(m.c.recipient, m.c.status))).all())
        assert status.pop("claimed-2@example.org") == "cancelled"
        assert set(status.values()) == {"sent"}
        assert sorted(to for tos, _msg in sink.messages for to in tos) == sorted(status)
    finally:
        await sender.stop()
        await sink.stop()
        await db.dispose()

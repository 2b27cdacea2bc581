"""The reliability contract (SPEC §2.2) through the real broker: outages, poison messages, replays, SMTP errors."""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import select

from services.mailer import store as mailer_store
from shared import topics
from tests.conftest import Stack, manage_token
from tests.kafka_tools import publish_raw, read_all, wait_caught_up


async def test_signups_during_a_broker_outage_are_mailed_exactly_once_afterwards(stack: Stack) -> None:
    if stack.kafka.process is None:
        pytest.skip("needs the embedded broker (it is frozen to simulate an outage)")
    addresses = [stack.address("outage") for _ in range(8)]
    stack.kafka.freeze()
    try:
        for addr in addresses:  # accepted at once: the outbox holds them while Kafka is away
            r = await asyncio.wait_for(stack.signup(addr), 10)
            assert r.status_code == 202
        await asyncio.sleep(2)
    finally:
        stack.kafka.thaw()
    for addr in addresses:
        await stack.smtp.wait_for(addr, 1, timeout=90)
    canary = stack.address("canary")
    await stack.signup(canary)
    await stack.smtp.wait_for(canary, 1, timeout=60)
    assert [len(stack.smtp.to(a)) for a in addresses] == [1] * len(addresses)


async def _dlq_records(stack: Stack, topic: str, count: int) -> list:
    async def enough():
        records = await read_all(stack.kafka.bootstrap, f"{stack.topic_prefix}{topics.dlq(topic)}")
        return records if len(records) >= count else None
    return await stack.until(enough, timeout=60, what=f"{count} record(s) on {topic}.dlq")


POISON = [
    b"this is not json",
    json.dumps({"type": "no_such_event", "event_id": "3f0c2f3e-6c1e-4a36-9a3c-8a1e2a3b4c5d"}).encode(),
    json.dumps({"type": "subscription_confirmed", "subscriber_id": 42}).encode(),  # schema mismatch
]


async def test_poison_messages_go_to_the_dlq_and_the_consumers_go_on(stack: Stack) -> None:
    consumed = (topics.SUBSCRIBER, topics.DELIVERY, topics.EVENT, topics.REGISTRATION)
    for topic in consumed:
        await publish_raw(stack.kafka.bootstrap, f"{stack.topic_prefix}{topic}",
                          [(b"poison-key", value, [("x-test", b"poison")]) for value in POISON])
    for topic in consumed:
        # events.registration.v1 has two consumers (mailer, subscriptions): each dead-letters its copy
        copies = 2 if topic == topics.REGISTRATION else 1
        records = await _dlq_records(stack, topic, len(POISON) * copies)
        assert sorted(r.value for r in records) == sorted(POISON * copies)
        for r in records:
            headers = {k: v.decode() for k, v in r.headers}
            assert r.key == b"poison-key" and headers["x-test"] == "poison"
            assert headers["x-original-topic"] == f"{stack.topic_prefix}{topic}"
            assert headers["x-original-offset"].isdigit() and headers["x-dlq-error"]
    # Both consumers went on: a new sign-up is mailed (mailer), a bounce suppresses (subscriptions).
    await _bounce_suppresses(stack)
    for service, topic in (("mailer", topics.SUBSCRIBER), ("subscriptions", topics.DELIVERY)):
        await wait_caught_up(stack.kafka.bootstrap, f"{stack.topic_prefix}{service}.{topic}",
                             f"{stack.topic_prefix}{topic}")


async def _bounce_suppresses(stack: Stack) -> None:
    addr = stack.address("bounce")
    await stack.signup(addr)
    await stack.confirm(addr)
    stack.smtp.permanent[addr] = "550 5.1.1 mailbox does not exist"
    try:
        welcome_row = await _ledger(stack, addr, "welcome", "failed")
        assert welcome_row.attempts == 1 and welcome_row.last_error.startswith("550")
        await stack.until(lambda: _status(stack, addr, "suppressed"), what="suppression after a hard bounce")
        # a suppressed address is not mailed again, whoever signs it up
        await stack.signup(addr)
        canary = stack.address("canary")
        await stack.signup(canary)
        await stack.smtp.wait_for(canary)
        assert len(stack.smtp.to(addr)) == 1  # only the confirmation mail got through
    finally:
        stack.smtp.permanent.pop(addr, None)


async def _status(stack: Stack, addr: str, status: str) -> bool:
    return (await stack.subscriber(addr))["status"] == status


async def _ledger(stack: Stack, addr: str, kind: str, status: str):
    m = mailer_store.outgoing_mail

    async def row():
        async with stack.mail_app.state.db.sessions() as s:
            r = (await s.execute(select(m).where(m.c.recipient == addr, m.c.kind == kind))).first()
        return r if r is not None and r.status == status else None

    return await stack.until(row, what=f"{kind} mail to be {status}")


async def test_temporary_smtp_failures_are_retried_and_delivered_once(stack: Stack) -> None:
    addr = stack.address("greylisted")
    stack.smtp.script[addr] = ["451 4.7.1 greylisted, try again later", "421 4.3.2 service not available"]
    await stack.signup(addr)
    (mail,) = await stack.smtp.wait_for(addr, 1, timeout=30)
    row = await _ledger(stack, addr, "confirmation", "sent")
    assert row.attempts == 3 and stack.smtp.attempts[addr] == 3
    await asyncio.sleep(0.5)
    assert len(stack.smtp.to(addr)) == 1


async def test_a_replayed_topic_changes_nothing_and_sends_nothing(stack: Stack) -> None:
    addr = stack.address("replay")
    await stack.signup(addr, topics=["teilhabe"])
    await stack.confirm(addr)
    welcome = (await stack.smtp.wait_for(addr, 2))[1]
    await stack.subscriptions.post(f"/unsubscribe?token={manage_token(welcome)}", data={"confirm": "yes"})
    # an event with a registration, so the events topics have something to replay too
    created = await stack.events.post("/api/v1/events", headers=stack.staff(), json={
        "kind": "info", "title": {"de": "Replay"}, "starts_at": "2030-01-01T10:00", "ends_at": "2030-01-01T11:00",
        "online_url": "https://meet.example.org/replay", "region": "halle"})
    event_id = created.json()["event_id"]
    await stack.events.post(f"/api/v1/events/{event_id}/publish", headers=stack.staff())
    guest = stack.address("replay-guest")
    await stack.events.post(f"/events/{event_id}/register", json={"email": guest, "newsletter": True})
    await stack.smtp.wait_for(guest, 2)
    consumers = [("mailer", topics.SUBSCRIBER), ("subscriptions", topics.DELIVERY), ("mailer", topics.EVENT),
                 ("mailer", topics.REGISTRATION), ("subscriptions", topics.REGISTRATION)]

    async def caught_up() -> None:
        for service, topic in consumers:
            await wait_caught_up(stack.kafka.bootstrap, f"{stack.topic_prefix}{service}.{topic}",
                                 f"{stack.topic_prefix}{topic}")

    await caught_up()
    before_mails = len(stack.smtp.messages)
    before = await stack.subscriber(addr)
    before_guest = await stack.subscriber(guest)

    for topic in {t for _, t in consumers}:
        records = await read_all(stack.kafka.bootstrap, f"{stack.topic_prefix}{topic}")
        assert records
        await publish_raw(stack.kafka.bootstrap, f"{stack.topic_prefix}{topic}",
                          [(r.key, r.value, list(r.headers)) for r in records])
    await caught_up()
    await asyncio.sleep(1.0)  # let the sending loop look at its ledger once more
    assert len(stack.smtp.messages) == before_mails
    assert await stack.subscriber(addr) == before
    assert await stack.subscriber(guest) == before_guest


def test_dlq_error_text_holds_no_message_content() -> None:
    from pydantic import ValidationError

    from shared.kafka import describe
    from shared.messages import SUBSCRIBER_EVENTS

    secret = json.dumps({"type": "subscription_requested", "email": "secret.person@example.org", "name": 7})
    with pytest.raises(ValidationError) as info:
        SUBSCRIBER_EVENTS.validate_json(secret)
    text = describe(info.value)
    assert "secret.person" not in text
    assert "subscription_requested" in text  # still says where the problem is


async def test_health_readiness_and_metrics(stack: Stack) -> None:
    # (tests/test_observability.py has the metrics in detail, the logs, and readiness during outages)
    for client in (stack.subscriptions, stack.mailer, stack.events):
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
        assert ready.json()["failing"] == []
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert "bridgepost_outbox_backlog" in metrics.text and "bridgepost_http_requests_total" in metrics.text
        assert "bridgepost_messages_published_total" in metrics.text
    text = (await stack.mailer.get("/metrics")).text
    assert f'bridgepost_messages_consumed_total{{topic="{topics.SUBSCRIBER}"}}' in text

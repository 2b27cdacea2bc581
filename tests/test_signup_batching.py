"""Group commit of the public sign-ups (services/subscriptions/admission.py) through the real stack:
concurrent sign-ups admitted in one transaction keep every rule a sign-up on its own has."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import func, select

from services.subscriptions import store
from services.subscriptions.app import create_app as create_subscriptions
from shared.messages import CORRELATION_HEADER
from tests.conftest import Stack


async def _signup(client: httpx.AsyncClient, email: str, ip: str, form: bool = False, **fields) -> httpx.Response:
    body = {"email": email, "name": "Test", "language": "de", "topics": [], "regions": [], "consent": True,
            **fields}
    headers = {"X-Forwarded-For": ip}
    if form:
        data = {k: ("true" if v is True else v) for k, v in body.items() if v is not None}
        return await client.post("/subscribe", data=data, headers=headers)
    return await client.post("/api/v1/subscriptions", json=body, headers=headers)


async def _stored(stack: Stack, email: str) -> dict:
    """What the subscriptions database holds about one address: its subscribers, confirmation links,
    consent rows and the correlation ids of its `subscription_requested` events."""
    async with stack.sub_app.state.db.sessions() as s:
        rows = (await s.execute(select(store.subscribers).where(store.subscribers.c.email == email))).all()
        ids = [r.id for r in rows]
        tokens = await s.scalar(select(func.count()).select_from(store.confirmation_tokens)
                                .where(store.confirmation_tokens.c.subscriber_id.in_(ids)))
        consents = (await s.execute(select(store.consent_log).where(store.consent_log.c.subscriber_id.in_(ids))
                                    .where(store.consent_log.c.action == "requested"))).all()
        outbox = store.infra.outbox
        events = (await s.execute(select(outbox.c.payload, outbox.c.headers).where(outbox.c.key.in_(ids)))).all()
    requested = [e for e in events if json.loads(e.payload)["type"] == "subscription_requested"]
    return {"subscribers": rows, "tokens": tokens, "consents": consents,
            "correlation_ids": [e.headers[CORRELATION_HEADER] for e in requested]}


async def _mailer_caught_up(stack: Stack) -> None:
    """A sign-up made now is mailed: everything before it was handled by then."""
    canary = stack.address("batch-canary")
    assert (await stack.signup(canary)).status_code == 202
    await stack.smtp.wait_for(canary, timeout=60)


async def test_concurrent_signups_are_admitted_together_and_keep_every_limit(stack: Stack) -> None:
    admission = stack.sub_app.state.admission
    batches, admitted = admission.batches, admission.admitted
    limit = stack.sub_settings.confirmations_per_address_per_day
    per_ip = stack.sub_settings.signups_per_ip
    repeated = stack.address("batch-repeated")  # more sign-ups than its daily limit of confirmation mails
    twice = stack.address("batch-twice")  # a new address twice in one go: one subscriber, the first name kept
    shared_ip = stack.ip()
    from_one_ip = [stack.address("batch-one-ip") for _ in range(per_ip + 3)]
    bot = stack.address("batch-bot")
    others = [stack.address("batch-other") for _ in range(100 - (limit + 3) - len(from_one_ip) - 3)]
    plan = ([(repeated, stack.ip(), {}) for _ in range(limit + 3)]
            + [(twice, stack.ip(), {"name": "Erste"}), (twice, stack.ip(), {"name": None})]
            + [(a, shared_ip, {}) for a in from_one_ip] + [(bot, stack.ip(), {"website": "http://spam.example"})]
            + [(a, stack.ip(), {}) for a in others])
    answers = await asyncio.gather(*(_signup(stack.subscriptions, a, ip, form=i % 2 == 1, **fields)
                                     for i, (a, ip, fields) in enumerate(plan)))
    assert len(answers) == 100
    codes = {a: [] for a, _, _ in plan}
    for (a, _, _), r in zip(plan, answers, strict=True):
        codes[a].append(r.status_code)
    ok = {202, 200}
    assert all(c in ok for a, cs in codes.items() if a not in from_one_ip for c in cs), codes
    limited = [a for a in from_one_ip if codes[a] == [429]]
    assert len(limited) == 3 and all(codes[a][0] in ok for a in from_one_ip if a not in limited), codes
    assert admission.admitted - admitted == 100 - 1  # (the honeypot is not even queued)
    assert admission.batches - batches < admission.admitted - admitted  # some went in together

    accepted_ids = {r.headers["x-correlation-id"] for (a, _, _), r in zip(plan, answers, strict=True)
                    if a not in limited and a != bot and r.status_code in ok}
    expected = {repeated: limit, twice: 2, bot: 0, **{a: 0 if a in limited else 1 for a in from_one_ip},
                **{a: 1 for a in others}}
    correlation_ids: set[str] = set()
    for address, count in expected.items():
        stored = await _stored(stack, address)
        assert len(stored["subscribers"]) == (1 if count else 0), address
        assert stored["tokens"] == count and len(stored["consents"]) == count, (address, stored)
        assert len(stored["correlation_ids"]) == count, address
        assert all(c.consent_text and c.consent_text_version for c in stored["consents"])
        correlation_ids.update(stored["correlation_ids"])
    assert correlation_ids <= accepted_ids and len(correlation_ids) == sum(expected.values())
    (subscriber,) = (await _stored(stack, twice))["subscribers"]
    assert subscriber.status == "pending" and subscriber.name == "Erste"

    for address, count in expected.items():
        if count:
            await stack.smtp.wait_for(address, count, timeout=60)
    await _mailer_caught_up(stack)
    assert {a: len(stack.smtp.to(a)) for a in expected} == expected


@contextlib.asynccontextmanager
async def second_instance(stack: Stack) -> AsyncIterator[tuple[object, httpx.AsyncClient, contextlib.AsyncExitStack]]:
    """Another subscriptions instance on the same database, as a second process behind a load balancer;
    closing the third item stops it (the client stays usable)."""
    app = create_subscriptions(stack.sub_settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app, client=("127.0.0.1", 5555)),
                                 base_url="http://bridgepost.test") as client, \
            contextlib.AsyncExitStack() as running:
        await running.enter_async_context(app.router.lifespan_context(app))
        await asyncio.wait_for(app.state.runtime.connected.wait(), 60)
        yield app, client, running


async def test_two_instances_admitting_the_same_new_addresses_make_one_subscriber_each(stack: Stack) -> None:
    limit = stack.sub_settings.confirmations_per_address_per_day
    addresses = [stack.address("batch-race") for _ in range(8)]
    async with second_instance(stack) as (_, other, _):
        clients = [stack.subscriptions, other]
        # Each address on both instances at once: the new address is inserted by both batches (on
        # PostgreSQL), the loser's batch goes again with the address known.
        plan = [(a, clients[i % 2]) for a in addresses for i in range(limit + 2)]
        answers = await asyncio.gather(*(_signup(client, a, stack.ip()) for a, client in plan))
    assert [r.status_code for r in answers] == [202] * len(plan), [r.text for r in answers if r.status_code != 202]
    for address in addresses:
        stored = await _stored(stack, address)
        assert len(stored["subscribers"]) == 1 and stored["subscribers"][0].status == "pending"
        # The per-address limit held across the instances.
        assert stored["tokens"] == limit and len(stored["consents"]) == limit, stored
    for address in addresses:
        await stack.smtp.wait_for(address, limit, timeout=60)
    await _mailer_caught_up(stack)
    assert [len(stack.smtp.to(a)) for a in addresses] == [limit] * len(addresses)


@contextlib.asynccontextmanager
async def database_locked(stack: Stack) -> AsyncIterator[None]:
    """Another connection holds what a sign-up's transaction needs, so the writer waits inside its batch."""
    url = stack.sub_settings.database_url
    if url.startswith("sqlite"):
        # The services of this process write too (relay, consumers), each transaction holding the file's
        # write lock from BEGIN IMMEDIATE to COMMIT across awaits. Waiting for the lock on the event loop
        # would keep such a transaction from ever committing (until the timeout: "database is locked",
        # CI 2026-12-06), so the wait happens in a thread and the loop goes on.
        conn = sqlite3.connect(url.split("///", 1)[1], isolation_level=None, timeout=60,
                               check_same_thread=False)
        try:
            await asyncio.to_thread(conn.execute, "BEGIN IMMEDIATE")
            try:
                yield
            finally:
                conn.execute("ROLLBACK")
        finally:
            conn.close()
        return
    import asyncpg
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE subscribers IN EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


async def test_a_signup_waiting_for_the_writer_when_the_service_stops_gets_503_not_a_hang(stack: Stack) -> None:
    async with second_instance(stack) as (app, client, running):
        admission = app.state.admission
        async with database_locked(stack):
            pending = asyncio.create_task(_signup(client, stack.address("batch-stopping"), stack.ip()))

            async def writing() -> bool:
                return admission.waiting == 1
            await stack.until(writing, timeout=10, what="the sign-up to wait in the writer's transaction")
            stopping = asyncio.create_task(running.aclose())
            answer = await asyncio.wait_for(pending, 5)
            assert answer.status_code == 503 and answer.headers["Retry-After"]
            late = await _signup(client, stack.address("batch-late"), stack.ip())
            assert late.status_code == 503
        await asyncio.wait_for(stopping, 30)


async def test_a_signup_the_database_refuses_fails_alone(stack: Stack, caplog) -> None:
    if stack.backend != "postgres":
        pytest.skip("SQLite stores a NUL character; PostgreSQL refuses it")
    # No HTTP server lets a NUL through in a header; in-process it reaches the consent log, which
    # PostgreSQL refuses: a sign-up whose data the database will not take, in a batch with others.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(stack.sub_app, raise_app_exceptions=False,
                                                               client=("127.0.0.1", 5555)),
                                 base_url="http://bridgepost.test") as client:
        good = [stack.address("batch-good") for _ in range(20)]
        bad = stack.address("batch-bad")
        requests = [_signup(client, a, stack.ip()) for a in good]
        requests.insert(10, client.post("/api/v1/subscriptions", headers={
            "X-Forwarded-For": stack.ip(), "User-Agent": "Bad\x00Agent/1"}, json={
            "email": bad, "language": "de", "topics": [], "regions": [], "consent": True}))
        with caplog.at_level(logging.WARNING, "services.subscriptions.usecases"):
            answers = await asyncio.gather(*requests)
    codes = [r.status_code for r in answers]
    assert codes[10] == 500 and codes[:10] + codes[11:] == [202] * 20, codes
    assert any("one by one" in r.getMessage() for r in caplog.records)  # it was in a batch with others
    for address in good:
        assert (await _stored(stack, address))["tokens"] == 1
    assert not (await _stored(stack, bad))["subscribers"]

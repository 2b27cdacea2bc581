"""The outbox relay (shared/outbox.py) against the real broker: order, and a round per `linger` under load."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from sqlalchemy import MetaData, func, select

from shared.db import Database, InfraTables
from shared.kafka import create_broker
from shared.messages import Envelope
from shared.outbox import OutboxRelay, add_to_outbox
from shared.settings import CommonSettings
from shared.topics import TopicNames
from tests.conftest import Broker, until
from tests.kafka_tools import read_all


async def test_commits_during_the_linger_go_out_together_in_order(kafka: Broker, tmp_path: Path) -> None:
    metadata = MetaData()
    infra = InfraTables(metadata)
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/outbox.db")
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    names = TopicNames(f"outbox{uuid.uuid4().hex[:8]}.")
    broker = create_broker(CommonSettings(kafka_bootstrap_servers=kafka.bootstrap, kafka_enable_idempotence=False),
                           "outbox-test")
    await broker.connect()
    relay = OutboxRelay(db, infra, broker, names, poll_seconds=30, linger=0.5)
    db.on_commit("outbox", relay.notify)
    sent: list[str] = []

    async def commit(n: int) -> None:
        event = Envelope(type=f"test.{n}")
        sent.append(str(event.event_id))
        async with db.transaction() as s:
            await add_to_outbox(s, infra, "test.v1", "key", event)

    async def unpublished() -> int:
        async with db.sessions() as s:
            return await s.scalar(select(func.count()).select_from(infra.outbox)
                                  .where(infra.outbox.c.published_at.is_(None)))

    async def until_published(rounds: int) -> None:
        async def done() -> bool:
            return relay.rounds >= rounds and not await unpublished()

        await until(done, 20, f"{rounds} relay rounds", every=0.02)

    relay.start()
    try:
        await commit(0)  # after a quiet spell: published at once, a round of its own
        await until_published(1)
        for n in range(1, 5):  # committed one by one while the relay lingers after its round
            await commit(n)
        await until_published(2)
        assert (relay.rounds, relay.published) == (2, 5), "the four commits during the linger took one round"
        await asyncio.sleep(0.6)  # a quiet spell again
        await commit(5)
        await until_published(3)
    finally:
        await relay.stop()
        await broker.stop()
        await db.dispose()
    records = await read_all(kafka.bootstrap, names("test.v1"))
    assert [json.loads(r.value)["event_id"] for r in records] == sent  # each once, in commit order

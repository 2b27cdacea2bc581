"""Small aiokafka helpers for tests: read a whole topic, publish raw records, wait for a group to catch up."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient


async def read_all(bootstrap: str, topic: str, timeout: float = 10.0) -> list:
    """Every record currently on `topic`, from offset 0 of every partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            await consumer.stop()
            consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
            await consumer.start()
            partitions = [TopicPartition(topic, p) for p in (await _partitions(consumer, topic))]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        records = []
        deadline = asyncio.get_running_loop().time() + timeout
        async def behind() -> bool:
            return any([await consumer.position(tp) < end[tp] for tp in partitions])

        while await behind():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"could not read {topic} to its end")
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                records.extend(recs)
        return records
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    for _ in range(50):
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return parts
        await consumer._client.force_metadata_update()  # noqa: SLF001 - test helper
        await asyncio.sleep(0.1)
    raise AssertionError(f"topic {topic} has no partitions")


async def publish_raw(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes, list]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def wait_caught_up(bootstrap: str, group: str, topic: str, timeout: float = 60.0) -> None:
    """Until `group` has committed the end offset of every partition of `topic`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in await _partitions(consumer, topic)]
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            end = await consumer.end_offsets(partitions)
            committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
            behind = {tp: end[tp] - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
                      for tp in partitions}
            if all(lag <= 0 for lag in behind.values()):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"group {group} still behind on {topic}: {behind}")
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()
        await admin.close()

"""Kafka topic names (SPEC §2.1), their partition counts, and creating them at start-up."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)

SUBSCRIBER = "subscriptions.subscriber.v1"
EVENT = "events.event.v1"
REGISTRATION = "events.registration.v1"
DELIVERY = "mailer.delivery.v1"
JOBS = "mailer.jobs.v1"

# Partitions bound how many instances of a consumer group share a topic's work.
PARTITIONS: dict[str, int] = {SUBSCRIBER: 6, EVENT: 3, REGISTRATION: 6, DELIVERY: 6, JOBS: 12}
TOPIC_ERROR_ALREADY_EXISTS = 36


def dlq(topic: str) -> str:
    return f"{topic}.dlq"


@dataclass(frozen=True)
class TopicNames:
    """Physical topic names: the contract's names behind an optional prefix (one broker, several stacks)."""

    prefix: str = ""

    def __call__(self, topic: str) -> str:
        return f"{self.prefix}{topic}"


async def ensure_topics(bootstrap_servers: str, names: TopicNames, topics: list[str] | None = None) -> set[str]:
    """Create every topic (and its DLQ) with its partition count; existing topics are left alone.

    The embedded broker forgets its topics when it restarts and auto-creates missing ones with one
    partition, so this runs at every start of every service. Returns the topics (contract names,
    DLQs included) this call created: the broker did not have them.
    """
    wanted = topics or list(PARTITIONS)
    new = [NewTopic(names(t), PARTITIONS.get(t, 1), 1) for t in wanted]
    new += [NewTopic(names(dlq(t)), 1, 1) for t in wanted]
    contract = {names(t): t for t in [*wanted, *map(dlq, wanted)]}
    created: set[str] = set()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=15000)
    await admin.start()
    try:
        response = await admin.create_topics(new)
        for topic, code, message in response.topic_errors:
            if code not in (0, TOPIC_ERROR_ALREADY_EXISTS):
                raise KafkaError(f"creating topic {topic} failed: {code} {message}")
            if code == 0:
                created.add(contract.get(topic, topic))
    finally:
        await admin.close()
    if created:
        log.info("created topics %s", ", ".join(sorted(created)))
    return created


async def topics_without_records(bootstrap_servers: str, names: TopicNames, topics: set[str]) -> set[str]:
    """The topics on which nothing was ever written on this broker (every partition ends at offset 0).

    Kafka's end offsets never go back (retention moves the start, not the end), so a topic an outbox
    has published to that is empty now was lost with the broker, or deleted and created again.
    """
    if not topics:
        return set()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=15000)
    await admin.start()
    try:
        described = await admin.describe_topics([names(t) for t in sorted(topics)])
    finally:
        await admin.close()
    partitions = {d["topic"]: [TopicPartition(d["topic"], p["partition"]) for p in d["partitions"]]
                  for d in described if d["error_code"] == 0}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                                request_timeout_ms=15000)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([tp for tps in partitions.values() for tp in tps])
    finally:
        await consumer.stop()
    return {t for t in topics if names(t) in partitions and all(ends[tp] == 0 for tp in partitions[names(t)])}

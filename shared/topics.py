"""Kafka topic names (SPEC §2.1), their partition counts, and creating them at start-up."""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


async def ensure_topics(bootstrap_servers: str, names: TopicNames, topics: list[str] | None = None) -> None:
    """Create every topic (and its DLQ) with its partition count; existing topics are left alone.

    The embedded broker forgets its topics when it restarts and auto-creates missing ones with one
    partition, so this runs at every start of every service.
    """
    wanted = topics or list(PARTITIONS)
    new = [NewTopic(names(t), PARTITIONS.get(t, 1), 1) for t in wanted]
    new += [NewTopic(names(dlq(t)), 1, 1) for t in wanted]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=15000)
    await admin.start()
    try:
        response = await admin.create_topics(new)
        for topic, code, message in response.topic_errors:
            if code not in (0, TOPIC_ERROR_ALREADY_EXISTS):
                raise KafkaError(f"creating topic {topic} failed: {code} {message}")
    finally:
        await admin.close()

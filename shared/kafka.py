"""Kafka wiring: the broker factory and at-least-once consumers with idempotency and a DLQ (SPEC §2.2).

`register_consumer` subscribes a handler with `AckPolicy.NACK_ON_ERROR`: the offset is committed only
after the handler returned (its effect is stored), never before (`ACK_FIRST` would lose messages).
A message that cannot be parsed, has an unknown type, or whose handler keeps failing with a
non-transient error goes to `<topic>.dlq` with the error and its origin in headers, and the partition
moves on. Transient errors (database or broker down) are retried with backoff and never go to the DLQ.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiokafka.errors import KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import insert
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import InfraTables, utcnow
from shared.messages import CORRELATION_HEADER
from shared.settings import CommonSettings
from shared.topics import TopicNames, dlq

log = logging.getLogger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError, PoolTimeout, KafkaError, ConnectionError, TimeoutError, OSError,
)
# Longest a handler retries transient errors in place before giving the message back (nack) so the
# consumer stays inside max.poll.interval and the partition is fetched again later.
TRANSIENT_RETRY_SECONDS = 60.0


def create_broker(settings: CommonSettings, client_id: str) -> KafkaBroker:
    return KafkaBroker(
        settings.kafka_bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=settings.kafka_enable_idempotence,
        request_timeout_ms=30000,
        logger=logging.getLogger(f"bridgepost.kafka.{client_id}"),
        log_level=logging.DEBUG,
    )


class AlreadyProcessed(Exception):
    """Raised inside a handler's transaction when its event was handled before (rolls back)."""


async def mark_processed(session: AsyncSession, infra: InfraTables, consumer: str, event_id: Any) -> None:
    """Record the event as handled by `consumer` in the effect's own transaction.

    Raises AlreadyProcessed when it was, so the caller's transaction (and its effect) rolls back.
    The insert is the check: two instances racing on one event cannot both commit.
    """
    try:
        async with session.begin_nested():
            await session.execute(insert(infra.processed_events).values(
                consumer=consumer, event_id=str(event_id), processed_at=utcnow()))
    except IntegrityError as exc:
        raise AlreadyProcessed(str(event_id)) from exc


class DeadLetters:
    """Publishes what a consumer could not handle to `<topic>.dlq`, keeping key, value and headers."""

    def __init__(self, broker: KafkaBroker, group_id: str, topic: str) -> None:
        self.broker, self.group_id, self.topic = broker, group_id, topic
        self.count = 0
        self.consumed = 0

    async def send(self, msg: KafkaMessage, error: BaseException, stage: str) -> None:
        record = msg.raw_message
        headers = {k: v for k, v in (msg.headers or {}).items() if isinstance(v, str)}
        headers.update({
            "x-dlq-error": describe(error)[:2000],
            "x-dlq-stage": stage,
            "x-dlq-consumer-group": self.group_id,
            "x-original-topic": record.topic,
            "x-original-partition": str(record.partition),
            "x-original-offset": str(record.offset),
            "x-failed-at": datetime.now(UTC).isoformat(),
        })
        await self.broker.publish(record.value or b"", dlq(record.topic), key=record.key, headers=headers)
        self.count += 1
        log.error("message %s/%d@%d to DLQ (%s): %s", record.topic, record.partition, record.offset,
                  stage, headers["x-dlq-error"][:300])


def describe(error: BaseException) -> str:
    """The error without the message's content (which may hold personal data)."""
    if isinstance(error, ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']} [{e['type']}]"
                             for e in error.errors(include_input=False, include_url=False)[:10])
        return f"ValidationError: {problems}"
    return f"{type(error).__name__}: {error}"


Handler = Callable[[Any, str | None], Awaitable[None]]


def consumer_group(service: str, topic: str, prefix: str = "") -> str:
    """One consumer group per service and topic: members of a group all read the same topic, so a
    new instance only rebalances that topic's partitions. The topic prefix keeps stacks apart."""
    return f"{prefix}{service}.{topic}"


def register_consumer(
    broker: KafkaBroker, settings: CommonSettings, names: TopicNames, topic: str, service: str,
    schema: TypeAdapter[Any], handler: Handler,
) -> DeadLetters:
    """Subscribe `handler(event, correlation_id)` to `topic` with commit-after-processing and a DLQ."""
    group_id = consumer_group(service, topic, names.prefix)
    dead_letters = DeadLetters(broker, group_id, topic)
    max_attempts = settings.consumer_max_attempts

    async def consume(msg: KafkaMessage) -> None:
        try:
            event = schema.validate_json(msg.body)
        except (ValidationError, ValueError) as exc:
            await dead_letters.send(msg, exc, "decode")
            return
        correlation_id = (msg.headers or {}).get(CORRELATION_HEADER)
        attempts, started = 0, asyncio.get_running_loop().time()
        while True:
            try:
                await handler(event, correlation_id)
                dead_letters.consumed += 1
                return
            except AlreadyProcessed:
                dead_letters.consumed += 1
                return
            except TRANSIENT_ERRORS as exc:
                waited = asyncio.get_running_loop().time() - started
                if waited > TRANSIENT_RETRY_SECONDS:
                    raise  # nack: the message is fetched again, nothing is committed past it
                log.warning("transient error on %s (%s), retrying: %s", topic, type(exc).__name__, exc)
                await asyncio.sleep(min(0.2 * 2 ** min(attempts, 5), 5.0))
                attempts += 1
            except DBAPIError as exc:  # a database error that is not about connectivity: a bug or bad data
                attempts += 1
                if attempts >= max_attempts:
                    await dead_letters.send(msg, exc, "handler")
                    return
                await asyncio.sleep(0.1 * attempts)
            except Exception as exc:  # noqa: BLE001 - any bug in a handler must not stop the partition
                attempts += 1
                if attempts >= max_attempts:
                    await dead_letters.send(msg, exc, "handler")
                    return
                log.warning("handler for %s failed (attempt %d): %r", topic, attempts, exc)
                await asyncio.sleep(0.1 * attempts)

    consume.__name__ = f"consume_{topic.replace('.', '_')}_{group_id.replace('-', '_')}"
    broker.subscriber(
        names(topic), group_id=group_id, ack_policy=AckPolicy.NACK_ON_ERROR, auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        **({"max_workers": settings.kafka_consumers_per_topic} if settings.kafka_consumers_per_topic > 1 else {}),
        title=f"{group_id}:{topic}",
    )(consume)
    return dead_letters

"""Kafka wiring: the broker factory and at-least-once consumers with idempotency and a DLQ (SPEC §2.2).

`register_consumer` subscribes a handler whose message's offset is committed only after the handler
returned (its effect is stored), never before (`ACK_FIRST` would lose messages). The commit is not
awaited by the handler: `OffsetCommits` sends it while the next message is handled, one commit for all
the messages handled meanwhile, so a partition is not held to one broker round trip per message. A
message handled whose commit was lost (crash, rebalance) is delivered again, and its processed-event
record makes that a no-op.
A message that cannot be parsed, has an unknown type, or whose handler keeps failing with a
non-transient error goes to `<topic>.dlq` with the error and its origin in headers, and the partition
moves on. Transient errors (database or broker down) are retried with backoff and never go to the DLQ.
While a message is handled, its correlation id (the `x-correlation-id` header) is the logging context, so
every line logged for it carries the id of the sign-up or event it belongs to (`shared.logs`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import InfraTables, utcnow
from shared.logs import log_context
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
# How long a batch consumer's fetch waits for a first message, in milliseconds; FastStream then sleeps as
# long before the next fetch, so this is what an idle batch consumer adds to a message's way at most.
BATCH_WAIT_MS = 20
# The producer's batch per partition (aiokafka's default is 16 KB): an outbox relay round of 500 events
# goes out in a request or two instead of thirty, each a round trip through a busy event loop.
PRODUCER_BATCH_BYTES = 512 * 1024


def create_broker(settings: CommonSettings, client_id: str) -> KafkaBroker:
    return KafkaBroker(
        settings.kafka_bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=settings.kafka_enable_idempotence,
        max_batch_size=PRODUCER_BATCH_BYTES,
        request_timeout_ms=30000,
        logger=logging.getLogger(f"bridgepost.kafka.{client_id}"),
        log_level=logging.DEBUG,
    )


async def start_broker(broker: KafkaBroker) -> None:
    """`broker.start()`, except that the consumers join their groups at the same time.

    FastStream starts its subscribers one after another, and each start waits until the group has given
    the consumer its partitions (aiokafka's `start`). The embedded broker lets a join wait half of
    KAFKA_SESSION_TIMEOUT_MS, so a service with four consumer groups took four such waits to connect
    (20 s with aiokafka's default session, measured 2026-12-06; 35 s after a SIGKILL). Together: one wait.
    """
    await broker.connect()
    async with asyncio.TaskGroup() as joining:
        for subscriber in broker.subscribers:
            joining.create_task(subscriber.start())
    for publisher in broker.publishers:
        await publisher.start()
    broker.running = True


class AlreadyProcessed(Exception):
    """Raised inside a handler's transaction when its event was handled before (rolls back)."""


async def mark_processed(session: AsyncSession, infra: InfraTables, consumer: str, event_id: Any) -> None:
    """Record the event as handled by `consumer` in the effect's own transaction.

    Raises AlreadyProcessed when it was, so the caller's transaction (and its effect) rolls back.
    """
    if not await first_handling(session, infra, consumer, event_id):
        raise AlreadyProcessed(str(event_id))


async def first_handling(session: AsyncSession, infra: InfraTables, consumer: str, event_id: Any) -> bool:
    """Record the event as handled by `consumer`; False when it was before (then leave its effect out).

    The insert is the check: two instances racing on one event cannot both commit (the second waits for
    the first's transaction and then finds the row). One statement: a conflict is ignored, not raised, so
    the transaction goes on (a batch's other events keep their effects).
    """
    values = dict(consumer=consumer, event_id=str(event_id), processed_at=utcnow())
    upsert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    result = await session.execute(upsert(infra.processed_events).values(**values).on_conflict_do_nothing())
    return result.rowcount != 0


async def first_handlings(session: AsyncSession, infra: InfraTables, consumer: str, event_ids: list[Any]) -> set[str]:
    """`first_handling` for several events in one statement: the ids (as text) not handled before."""
    ids = list(dict.fromkeys(str(event_id) for event_id in event_ids))
    if not ids:
        return set()
    now = utcnow()
    upsert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    table = infra.processed_events
    # Executed with a list of parameters (SQLAlchemy's "insertmanyvalues" still writes one multi-row
    # INSERT), not `.values([...])`: that form is a new statement to compile for every batch size.
    inserted = await session.execute(
        upsert(table).on_conflict_do_nothing().returning(table.c.event_id),
        [dict(consumer=consumer, event_id=event_id, processed_at=now) for event_id in ids])
    return set(inserted.scalars().all())


class OffsetCommits:
    """Commits the offsets of handled messages in the background, each partition up to the last handled.

    `handled(consumer, record)` notes that `record` is handled (its effect committed); one task per
    consumer then commits what was noted, and whatever is noted while that commit is on its way goes
    with the next one. Each consumer handles a partition in order, so the offset noted last for a
    partition covers everything before it. A commit refused because the partition went to another
    member (rebalance) is dropped: that member starts from the last commit and finds the messages
    handled already. Other commit failures are retried with what is noted by then.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._noted: dict[Any, dict[TopicPartition, int]] = {}
        self._tasks: dict[Any, asyncio.Task[None]] = {}

    def handled(self, consumer: Any, record: Any) -> None:
        noted = self._noted.setdefault(consumer, {})
        noted[TopicPartition(record.topic, record.partition)] = record.offset + 1
        task = self._tasks.get(consumer)
        if task is None or task.done():
            self._tasks[consumer] = asyncio.create_task(self._commit(consumer), name=f"commit-{self.name}")

    async def _commit(self, consumer: Any) -> None:
        noted = self._noted[consumer]
        failures = 0
        while noted:
            offsets = dict(noted)
            noted.clear()
            try:
                assigned = consumer.assignment()
                offsets = {tp: offset for tp, offset in offsets.items() if tp in assigned}
                if offsets:
                    await consumer.commit(offsets)
                failures = 0
            except (CommitFailedError, IllegalStateError) as exc:  # no longer this consumer's partitions
                log.debug("offsets of %s not committed (rebalance): %s", self.name, exc)
            except KafkaError as exc:
                failures += 1
                for tp, offset in offsets.items():  # again, unless a later offset was noted meanwhile
                    noted.setdefault(tp, offset)
                log.warning("committing offsets of %s failed (%s), retrying", self.name, describe(exc))
                await asyncio.sleep(min(0.1 * 2 ** min(failures, 5), 2.0))
            except Exception:  # noqa: BLE001 - a closed consumer at shutdown: its messages are redelivered
                log.debug("offsets of %s not committed", self.name, exc_info=True)
                return


class DeadLetters:
    """Publishes what a consumer could not handle to `<topic>.dlq`, keeping key, value and headers.

    Also what /metrics reports of the consumer: messages handled (`consumed`, duplicates included),
    `duplicates` (already processed: redelivered or replayed), failed attempts by reason (`failed`),
    dead-lettered (`count`), batches handled in one transaction each (`batches`), and the FastStream
    subscriber whose Kafka consumer knows the lag.
    `handler` is what the consumer calls for each event, `batch_handler` (if any) for several at once (a
    test can put faulty ones in their place).
    """

    def __init__(self, broker: KafkaBroker, group_id: str, topic: str, handler: Handler) -> None:
        self.broker, self.group_id, self.topic, self.handler = broker, group_id, topic, handler
        self.count = 0
        self.consumed = 0
        self.duplicates = 0
        self.batches = 0  # handled by `batch_handler`, one transaction each
        self.failed: Counter[str] = Counter()
        self.batch_handler: BatchHandler | None = None
        self.subscriber: Any = None
        self.offsets = OffsetCommits(group_id)

    async def send(self, record: Any, error: BaseException, stage: str) -> None:
        """Publish the Kafka `record` (key, value, headers as they came) with why and where it failed."""
        headers = {key: value.decode("utf-8", "replace") for key, value in record.headers or ()
                   if isinstance(value, bytes)}
        headers.update({
            "x-dlq-error": describe(error)[:2000],
            "x-dlq-stage": stage,
            "x-dlq-consumer-group": self.group_id,
            "x-original-topic": record.topic,
            "x-original-partition": str(record.partition),
            "x-original-offset": str(record.offset),
            "x-failed-at": datetime.now(UTC).isoformat(),
        })
        await self.broker.publish(bytes(record.value or b""), dlq(record.topic), key=record.key, headers=headers)
        self.count += 1
        log.error("message %s/%d@%d to DLQ (%s): %s", record.topic, record.partition, record.offset,
                  stage, headers["x-dlq-error"][:300])


def describe(error: BaseException) -> str:
    """The error without the message's content (which may hold personal data)."""
    if isinstance(error, ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']} [{e['type']}]"
                             for e in error.errors(include_input=False, include_url=False)[:10])
        return f"ValidationError: {problems}"
    if isinstance(error, StatementError):
        # str() of a failed statement lists its bound values (addresses, names): the driver's error only.
        return f"{type(error).__name__}: {error.orig!s}" if error.orig is not None else type(error).__name__
    return f"{type(error).__name__}: {error}"


Handler = Callable[[Any, str | None], Awaitable[None]]
# Handles several events (with their correlation ids) in one transaction, in the order given, leaving out
# those handled before; returns how many it left out. All or nothing: an error rolls every one back.
BatchHandler = Callable[[list[tuple[Any, str | None]]], Awaitable[int]]


def consumer_group(service: str, topic: str, prefix: str = "") -> str:
    """One consumer group per service and topic: members of a group all read the same topic, so a
    new instance only rebalances that topic's partitions. The topic prefix keeps stacks apart."""
    return f"{prefix}{service}.{topic}"


def register_consumer(
    broker: KafkaBroker, settings: CommonSettings, names: TopicNames, topic: str, service: str,
    schema: TypeAdapter[Any], handler: Handler, batch_handler: BatchHandler | None = None,
) -> DeadLetters:
    """Subscribe `handler(event, correlation_id)` to `topic` with commit-after-processing and a DLQ.

    With a `batch_handler`, what one fetch brings (up to `CONSUMER_BATCH_SIZE` messages) is handled in one
    transaction, one commit for all of them; if that fails otherwise than transiently, the batch's events
    are handled again one by one through `handler`, so only the faulty one goes to the DLQ.
    """
    group_id = consumer_group(service, topic, names.prefix)
    dead_letters = DeadLetters(broker, group_id, topic, handler)
    dead_letters.batch_handler = batch_handler
    max_attempts = settings.consumer_max_attempts

    async def consume(msg: KafkaMessage) -> None:
        record = msg.raw_message
        correlation_id = correlation_of(record)
        with log_context(correlation_id=correlation_id, service=service):
            try:
                try:
                    event = schema.validate_json(record.value or b"")
                except (ValidationError, ValueError) as exc:
                    await dead_letters.send(record, exc, "decode")
                else:
                    await handle(event, correlation_id, record)
            except Exception:
                # Given back: the partition is fetched again from this message, nothing committed past it.
                await msg.nack()
                raise
        dead_letters.offsets.handled(msg.consumer, record)

    async def consume_batch(msg: KafkaMessage) -> None:
        records = msg.raw_message
        with log_context(service=service):
            try:
                events, unreadable = [], []
                for record in records:
                    try:
                        events.append((schema.validate_json(record.value or b""), correlation_of(record), record))
                    except (ValidationError, ValueError) as exc:
                        unreadable.append((record, exc))
                if events:
                    await handle_batch(events)
                # After the others' effects: if this publish fails, the batch comes again and finds them done.
                for record, exc in unreadable:
                    await dead_letters.send(record, exc, "decode")
            except Exception:
                await msg.nack()  # every partition of the batch from its first message again
                raise
        last = {(record.topic, record.partition): record for record in records}
        for record in last.values():
            dead_letters.offsets.handled(msg.consumer, record)

    async def handle_batch(events: list[tuple[Any, str | None, Any]]) -> None:
        attempts, started = 0, asyncio.get_running_loop().time()
        while True:
            try:
                assert dead_letters.batch_handler is not None
                duplicates = await dead_letters.batch_handler([(event, cid) for event, cid, _ in events])
            except TRANSIENT_ERRORS as exc:
                dead_letters.failed["transient"] += 1
                if asyncio.get_running_loop().time() - started > TRANSIENT_RETRY_SECONDS:
                    raise
                log.warning("transient error on %s, retrying a batch of %d: %s", topic, len(events), describe(exc))
                await asyncio.sleep(min(0.2 * 2 ** min(attempts, 5), 5.0))
                attempts += 1
                continue
            except Exception as exc:  # noqa: BLE001 - one faulty event: find it, handle the others
                dead_letters.failed["batch"] += 1
                log.warning("a batch of %d on %s failed (%s); handling its events one by one", len(events),
                            topic, describe(exc))
                for event, correlation_id, record in events:
                    with log_context(correlation_id=correlation_id):
                        await handle(event, correlation_id, record)
                return
            dead_letters.batches += 1
            dead_letters.consumed += len(events)
            dead_letters.duplicates += duplicates
            if log.isEnabledFor(logging.INFO):
                for event, correlation_id, _ in events:
                    with log_context(correlation_id=correlation_id):
                        log.info("%s %s handled (%s)", getattr(event, "type", "event"),
                                 getattr(event, "event_id", ""), topic)
            return

    async def handle(event: Any, correlation_id: str | None, record: Any) -> None:
        attempts, started = 0, asyncio.get_running_loop().time()
        while True:
            try:
                await dead_letters.handler(event, correlation_id)
                dead_letters.consumed += 1
                log.info("%s %s handled (%s)", getattr(event, "type", "event"), getattr(event, "event_id", ""), topic)
                return
            except AlreadyProcessed:
                dead_letters.consumed += 1
                dead_letters.duplicates += 1
                log.debug("%s %s was handled before (%s)", getattr(event, "type", "event"),
                          getattr(event, "event_id", ""), topic)
                return
            except TRANSIENT_ERRORS as exc:
                dead_letters.failed["transient"] += 1
                waited = asyncio.get_running_loop().time() - started
                if waited > TRANSIENT_RETRY_SECONDS:
                    raise  # nack: the message is fetched again, nothing is committed past it
                log.warning("transient error on %s, retrying: %s", topic, describe(exc))
                await asyncio.sleep(min(0.2 * 2 ** min(attempts, 5), 5.0))
                attempts += 1
            except Exception as exc:  # noqa: BLE001 - any bug in a handler must not stop the partition
                # (a database error that is not about connectivity, too: a bug or bad data)
                dead_letters.failed["error"] += 1
                attempts += 1
                if attempts >= max_attempts:
                    await dead_letters.send(record, exc, "handler")
                    return
                log.warning("handler for %s failed (attempt %d): %s", topic, attempts, describe(exc))
                await asyncio.sleep(0.1 * attempts)

    consume.__name__ = consume_batch.__name__ = f"consume_{topic.replace('.', '_')}_{group_id.replace('-', '_')}"
    options: dict[str, Any] = dict(
        # MANUAL: FastStream neither commits nor seeks; `consume` does both (see OffsetCommits).
        group_id=group_id, ack_policy=AckPolicy.MANUAL, auto_offset_reset="earliest", decoder=_not_decoded,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms, title=f"{group_id}:{topic}",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_session_timeout_ms // 3,
    )
    if batch_handler is not None:
        options.update(batch=True, max_records=settings.consumer_batch_size, batch_timeout_ms=BATCH_WAIT_MS)
    elif settings.kafka_consumers_per_topic > 1:
        options.update(max_workers=settings.kafka_consumers_per_topic)
    subscriber = broker.subscriber(names(topic), **options)
    subscriber(consume_batch if batch_handler is not None else consume)
    dead_letters.subscriber = subscriber
    return dead_letters


async def _not_decoded(message: Any) -> None:
    """FastStream's decoding of each message (JSON) for a handler that reads the records' bytes itself:
    `consume` validates them with the topic's schema, so that decoding would be done for nothing."""
    return None


def correlation_of(record: Any) -> str | None:
    """The record's correlation id header, if it is a sane one (it ends up in every log line)."""
    value = next((value for key, value in record.headers or () if key == CORRELATION_HEADER), None)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or not value or not value.isprintable():
        return None
    return value[:64]


async def consumer_lag(dead_letters: DeadLetters) -> dict[int, int]:
    """Messages not yet handed to the handler, per partition this instance is assigned:
    the partition's highwater minus the consumer's position, both as the Kafka client last saw them.

    A partition is left out until the consumer has fetched from it (its highwater is unknown before).
    """
    subscriber = dead_letters.subscriber
    consumers = list(getattr(subscriber, "consumer_subgroup", None) or ()) or [getattr(subscriber, "consumer", None)]
    lag: dict[int, int] = {}
    for consumer in consumers:
        if consumer is None:
            continue
        for partition in list(consumer.assignment()):
            try:
                highwater = consumer.highwater(partition)
                if highwater is None:
                    continue
                # Immediate while the position is known; waits only during a rebalance or an offset reset.
                position = await asyncio.wait_for(consumer.position(partition), 0.5)
            except (AssertionError, KafkaError, TimeoutError):  # unassigned meanwhile, or no position yet
                continue
            lag[partition.partition] = max(0, highwater - position)
    return lag

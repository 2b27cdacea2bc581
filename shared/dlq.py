"""Operator tools for the dead-letter topics (SPEC §2.2): list what is in `<topic>.dlq`, and replay it.

`shared.kafka.DeadLetters` keeps a dead-lettered message's key, value and headers and adds `x-dlq-*`
(error, stage, consumer group) and `x-original-*` (topic, partition, offset) headers. A replay
republishes the message to its original topic with its key (so the same partition, in order per key)
once the cause is fixed; consumers deduplicate by `event_id`, so one that had handled it changes
nothing. What was replayed is remembered as the committed offset of the consumer group
`<prefix>bridgepost-dlq-replay.<topic>` on the DLQ topic: a second replay sends only what arrived since.
Listing never shows a message's body (it may hold personal data), only its envelope's type and id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from shared.topics import PARTITIONS, TopicNames, dlq

REPLAY_GROUP = "bridgepost-dlq-replay"
# Headers DeadLetters adds; a replayed message leaves without them (a new failure adds fresh ones).
DLQ_HEADER_PREFIXES = ("x-dlq-", "x-original-", "x-failed-at")
REPLAYED_FROM_HEADER = "x-replayed-from"
REQUEST_TIMEOUT_MS = 15000
COMMIT_EVERY = 500
EMAIL = re.compile(r"[^\s@'\"<>(),;]+@[^\s@'\"<>(),;]+\.[^\s@'\"<>(),;]+")


def topic_for(name: str, names: TopicNames) -> str:
    """The contract topic `name` means, given with or without the prefix and `.dlq`; ValueError if none."""
    topic = name.strip()
    if names.prefix and topic.startswith(names.prefix):
        topic = topic[len(names.prefix):]
    topic = topic.removesuffix(".dlq")
    if topic not in PARTITIONS:
        raise ValueError(f"unknown topic {name!r}; one of: {', '.join(PARTITIONS)}")
    return topic


def replay_group(names: TopicNames, topic: str) -> str:
    return f"{names.prefix}{REPLAY_GROUP}.{topic}"


def _printable(raw: bytes | str | None, limit: int) -> str:
    if raw is None:
        return ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def redact(text: str) -> str:
    """An error text without e-mail addresses (a database error may quote the failed row's values)."""
    return EMAIL.sub("<address>", text)


def _envelope(value: bytes | None) -> tuple[str, str]:
    """(type, event_id) of a message, or "" for what is not a JSON envelope; nothing else is read out."""
    try:
        data = json.loads(value or b"")
    except ValueError:
        return "", ""
    if not isinstance(data, dict):
        return "", ""
    kind, event_id = data.get("type"), data.get("event_id")
    return (_printable(kind, 64) if isinstance(kind, str) else "",
            _printable(event_id, 64) if isinstance(event_id, str) else "")


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message as an operator sees it: where it came from and why, not what it says."""

    topic: str  # the contract topic it failed on
    partition: int
    offset: int
    key: str
    event_type: str
    event_id: str
    error: str
    stage: str
    consumer_group: str
    origin: str  # "<original topic>/<partition>@<offset>"
    failed_at: str
    replayed: bool

    @classmethod
    def of(cls, topic: str, record: ConsumerRecord, replayed: bool) -> DeadLetter:
        headers = {k: (v or b"").decode("utf-8", "replace") for k, v in (record.headers or ())}
        kind, event_id = _envelope(record.value)
        origin = ""
        if "x-original-topic" in headers:
            origin = _printable(f"{headers['x-original-topic']}/{headers.get('x-original-partition', '?')}"
                                f"@{headers.get('x-original-offset', '?')}", 300)
        failed_at = headers.get("x-failed-at") or datetime.fromtimestamp(record.timestamp / 1000, UTC).isoformat()
        error = (headers.get("x-dlq-error") or "").strip().split("\n", 1)[0]
        return cls(topic=topic, partition=record.partition, offset=record.offset, key=_printable(record.key, 64),
                   event_type=kind, event_id=event_id, error=_printable(redact(error), 300),
                   stage=_printable(headers.get("x-dlq-stage"), 32),
                   consumer_group=_printable(headers.get("x-dlq-consumer-group"), 200),
                   origin=origin, failed_at=_printable(failed_at, 40), replayed=replayed)


@dataclass(frozen=True)
class DeadLetterQueue:
    """What is in one topic's DLQ: every message, oldest first, and whether each was replayed."""

    topic: str
    exists: bool
    messages: list[DeadLetter]

    @property
    def waiting(self) -> int:
        return sum(not m.replayed for m in self.messages)


@dataclass(frozen=True)
class Replay:
    topic: str
    messages: list[DeadLetter]  # replayed (or, in a dry run, to be replayed), oldest first
    duplicates: int  # further copies of a message already in this replay (several consumers failed on it)
    left: int  # still waiting after a --limit
    dry_run: bool


async def _start(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Start a client; one that could not connect is closed again (no "unclosed" warnings)."""
    try:
        await client.start()
    except BaseException:
        await client.stop()
        raise


async def partition_counts(bootstrap_servers: str, topics: list[str]) -> dict[str, int]:
    """Partitions of each physical topic on the broker; 0 for one that does not exist."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, request_timeout_ms=REQUEST_TIMEOUT_MS)
    await _start(consumer)
    try:
        existing = await consumer.topics()
        return {t: len(consumer.partitions_for_topic(t) or ()) if t in existing else 0 for t in topics}
    finally:
        await consumer.stop()


class DeadLetterTopics:
    def __init__(self, bootstrap_servers: str, names: TopicNames, enable_idempotence: bool = True) -> None:
        self.bootstrap_servers, self.names, self.enable_idempotence = bootstrap_servers, names, enable_idempotence

    @contextlib.asynccontextmanager
    async def _reader(self, topic: str) -> AsyncIterator[tuple[AIOKafkaConsumer, list[TopicPartition]]]:
        """A consumer in the topic's replay group, assigned (no group join) to every DLQ partition."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers, group_id=replay_group(self.names, topic),
            enable_auto_commit=False, auto_offset_reset="earliest", request_timeout_ms=REQUEST_TIMEOUT_MS)
        await _start(consumer)
        try:
            physical = self.names(dlq(topic))
            partitions = []
            if physical in await consumer.topics():  # asking for a missing topic could create it
                partitions = [TopicPartition(physical, p) for p in sorted(consumer.partitions_for_topic(physical))]
                consumer.assign(partitions)
            yield consumer, partitions
        finally:
            await consumer.stop()

    @staticmethod
    async def _positions(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]
                         ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int], dict[TopicPartition, int]]:
        """(first offset, first not yet replayed, end) of every partition."""
        first = await consumer.beginning_offsets(partitions)
        end = await consumer.end_offsets(partitions)
        replayed = {}
        for tp in partitions:
            committed = await consumer.committed(tp)
            replayed[tp] = max(first[tp], committed if committed is not None else first[tp])
        return first, replayed, end

    @staticmethod
    async def _read(consumer: AIOKafkaConsumer, start: dict[TopicPartition, int], end: dict[TopicPartition, int],
                    limit: int | None = None, timeout: float = 30.0) -> list[ConsumerRecord]:
        """Records from `start` to `end` of each partition (at most `limit`), by partition and offset."""
        wanted = [tp for tp in start if start[tp] < end[tp]]
        for tp in wanted:
            consumer.seek(tp, start[tp])
        records: dict[TopicPartition, list[ConsumerRecord]] = {tp: [] for tp in wanted}
        deadline = asyncio.get_running_loop().time() + timeout
        while wanted and (limit is None or sum(map(len, records.values())) < limit):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"could not read {wanted[0].topic} to its end in {timeout:.0f}s")
            batch = await consumer.getmany(*wanted, timeout_ms=500)
            for tp, recs in batch.items():
                records[tp].extend(r for r in recs if r.offset < end[tp])
            wanted = [tp for tp in wanted if (records[tp][-1].offset + 1 if records[tp] else start[tp]) < end[tp]]
        ordered = [r for tp in sorted(records, key=lambda tp: tp.partition) for r in records[tp]]
        return ordered if limit is None else ordered[:limit]

    async def contents(self, topic: str) -> DeadLetterQueue:
        async with self._reader(topic) as (consumer, partitions):
            if not partitions:
                return DeadLetterQueue(topic, False, [])
            first, replayed, end = await self._positions(consumer, partitions)
            records = await self._read(consumer, first, end)
        return DeadLetterQueue(topic, True, [
            DeadLetter.of(topic, r, r.offset < replayed[TopicPartition(r.topic, r.partition)]) for r in records])

    async def replay(self, topic: str, limit: int | None = None, dry_run: bool = False) -> Replay:
        """Republish what was not replayed yet (the oldest `limit`) to the original topic, then remember it."""
        async with self._reader(topic) as (consumer, partitions):
            if not partitions:
                raise LookupError(f"{self.names(dlq(topic))} does not exist (bridgepost topics create makes it)")
            _, start, end = await self._positions(consumer, partitions)
            waiting = sum(end[tp] - start[tp] for tp in partitions)
            records = await self._read(consumer, start, end, limit)
            seen: set[str] = set()
            fresh, duplicates = [], 0
            for record in records:
                origin = DeadLetter.of(topic, record, False).origin
                if origin and origin in seen:
                    duplicates += 1
                    continue
                seen.add(origin)
                fresh.append(record)
            if not dry_run and records:
                await self._republish(consumer, topic, records, {(r.partition, r.offset) for r in fresh})
        return Replay(topic, [DeadLetter.of(topic, r, not dry_run) for r in fresh], duplicates,
                      waiting - len(records), dry_run)

    async def _republish(self, consumer: AIOKafkaConsumer, topic: str, records: list[ConsumerRecord],
                         to_send: set[tuple[int, int]]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, acks="all",
                                    enable_idempotence=self.enable_idempotence, request_timeout_ms=30000)
        await _start(producer)
        try:
            for i in range(0, len(records), COMMIT_EVERY):
                chunk = records[i:i + COMMIT_EVERY]
                sends = []
                for r in chunk:
                    if (r.partition, r.offset) not in to_send:
                        continue
                    headers = [(k, v) for k, v in (r.headers or ()) if not k.startswith(DLQ_HEADER_PREFIXES)]
                    headers.append((REPLAYED_FROM_HEADER, f"{r.topic}/{r.partition}@{r.offset}".encode()))
                    sends.append(await producer.send(self.names(topic), r.value or b"", key=r.key, headers=headers))
                await asyncio.gather(*sends)
                # Committed only once the broker has them all: a crash in between replays them again,
                # which the consumers' deduplication makes harmless.
                last: dict[TopicPartition, int] = {}
                for r in chunk:
                    last[TopicPartition(r.topic, r.partition)] = r.offset + 1
                await consumer.commit(last)
        finally:
            await producer.stop()

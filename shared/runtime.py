"""What runs beside a service's HTTP app: the broker connection, the outbox relay, periodic jobs.

The service answers HTTP even while Kafka is unreachable: sign-ups land in the outbox and the relay
publishes them once the broker is connected (SPEC §2.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import FastAPI
from faststream.kafka import KafkaBroker
from sqlalchemy import func, select
from starlette.types import ASGIApp, Receive, Scope, Send

from shared import logs, messages
from shared.db import Database, utcnow
from shared.kafka import consumer_lag, describe, start_broker
from shared.outbox import OutboxRelay
from shared.settings import CommonSettings
from shared.topics import TopicNames, ensure_topics, topics_without_records

log = logging.getLogger(__name__)


class Worker(Protocol):
    """A background task of a service's own (e.g. the sign-up writer), run beside the HTTP app."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...


class Runtime:
    def __init__(self, name: str, settings: CommonSettings, db: Database, broker: KafkaBroker,
                 names: TopicNames, relay: OutboxRelay) -> None:
        self.name, self.settings, self.db = name, settings, db
        self.broker, self.names, self.relay = broker, names, relay
        self.connected = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.periodic: list[tuple[float, Callable[[], Awaitable[None]], asyncio.Event | None]] = []
        self.after_connect: list[Callable[[], Awaitable[None]]] = []
        # Started with the service, stopped first (before the database they write to is closed).
        self.workers: list[Worker] = []

    def every(self, seconds: float, job: Callable[[], Awaitable[None]], wake: asyncio.Event | None = None) -> None:
        """Run `job` every `seconds`, and at once whenever `wake` is set."""
        self.periodic.append((seconds, job, wake))

    async def start(self) -> None:
        logs.adopt_foreign_loggers()  # uvicorn installed its handlers after `configure_logging`
        # Tasks copy the context they are created in: whatever they (and the consumers and the relay
        # started by `_connect`) log carries the service's name.
        with logs.log_context(service=self.name):
            self._tasks.append(asyncio.create_task(self._connect(), name=f"{self.name}-connect"))
            for worker in self.workers:
                worker.start()
            for seconds, job, wake in self.periodic:
                self._tasks.append(asyncio.create_task(self._repeat(seconds, job, wake),
                                                       name=f"{self.name}-periodic"))

    async def _connect(self) -> None:
        attempt = 0
        while True:
            try:
                created = await ensure_topics(self.settings.kafka_bootstrap_servers, self.names)
                await self._resend_lost(created)
                await start_broker(self.broker)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep trying; HTTP keeps working meanwhile
                attempt += 1
                log.warning("%s: broker not reachable yet (%s), retrying", self.name, describe(exc))
                with contextlib.suppress(Exception):
                    await self.broker.stop()
                await asyncio.sleep(min(0.5 * 2 ** min(attempt, 5), 15.0))
        self.relay.start()
        for job in self.after_connect:
            await job()
        self.connected.set()
        log.info("%s: connected to Kafka at %s", self.name, self.settings.kafka_bootstrap_servers)

    async def _resend_lost(self, created: set[str]) -> None:
        """Before the relay starts: a topic this service published to that the broker did not have, or
        has without any record, was lost with the broker (the embedded one forgets everything when it
        restarts), so the outbox sends its retained rows again. Empty counts too, because every service
        creates every topic and another one may have been first."""
        retained = await self.relay.retained_topics()
        lost = (retained & created) | await topics_without_records(
            self.settings.kafka_bootstrap_servers, self.names, retained - created)
        if lost:
            count = await self.relay.resend(lost)
            log.warning("%s: the broker lost %s; publishing %d retained event(s) again",
                        self.name, ", ".join(sorted(lost)), count)

    async def _repeat(self, seconds: float, job: Callable[[], Awaitable[None]], wake: asyncio.Event | None) -> None:
        while True:
            if wake is None:
                await asyncio.sleep(seconds)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), seconds)
                wake.clear()
            try:
                await job()
            except Exception:  # noqa: BLE001 - a periodic job must not die
                log.exception("%s: periodic job failed", self.name)

    async def stop(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker.stop(), 10)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
        # Bounded: a broker that does not answer must not keep the process from exiting.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.relay.stop(), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.broker.stop(), 15)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.db.dispose(), 10)

    async def refresh_metrics(self, metrics: Any, dead_letters: list) -> None:
        """Before a scrape: consumer lag (from the Kafka clients, no request) and the outbox backlog."""
        lag: dict[tuple[str, ...], float] = {}
        for dl in dead_letters:
            for partition, behind in (await consumer_lag(dl)).items():
                lag[(dl.topic, str(partition))] = behind
        metrics.consumer_lag.set(lag)
        t = self.relay.infra.outbox
        async with self.db.sessions() as s:
            backlog, oldest = (await s.execute(
                select(func.count(), func.min(t.c.created_at)).where(t.c.published_at.is_(None)))).one()
        metrics.outbox_backlog.set_value(backlog or 0)
        metrics.outbox_oldest.set_value(max(0.0, (utcnow() - oldest).total_seconds()) if oldest else 0.0)

    async def broker_ready(self) -> None:
        if not self.connected.is_set():
            raise ConnectionError("not connected to Kafka yet")
        if not await self.broker.ping(timeout=3.0):
            raise ConnectionError("Kafka does not answer")


CORRELATION_HEADER = messages.CORRELATION_HEADER.encode()  # as ASGI gives header names: lower-case bytes


class CorrelationIds:
    """Every request gets a correlation id (taken from X-Correlation-ID if sent) that follows its events:
    `request.state.correlation_id`, the logging context of the request, and the answer's header.

    Plain ASGI rather than `@app.middleware("http")`, which costs a task group and memory streams per
    request (see `shared.web.RequestLog`).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == CORRELATION_HEADER), "")
        correlation_id = incoming[:64] if incoming.isprintable() and incoming else str(uuid.uuid4())
        scope.setdefault("state", {})["correlation_id"] = correlation_id
        header = (CORRELATION_HEADER, correlation_id.encode("latin-1"))

        async def with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != CORRELATION_HEADER]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        # Every line logged for this request carries the id (shared.logs), as will its events' consumers.
        with logs.log_context(correlation_id=correlation_id):
            await self.app(scope, receive, with_id)


def add_correlation_ids(app: FastAPI) -> None:
    """Every request gets a correlation id (taken from X-Correlation-ID if sent) that follows its events."""
    app.add_middleware(CorrelationIds)

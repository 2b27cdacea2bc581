"""Database wiring shared by the services: engine, unit of work, common tables, migrations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    event,
    insert,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from shared.sqlite_driver import InlineDBAPI

# BigInteger ids that still autoincrement on SQLite (which only does so for INTEGER PRIMARY KEY).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def bind_processor(self, dialect):
        """On SQLite, the stored text in one step: `process_bind_param` and then SQLAlchemy's DATETIME
        formatting cost two Python calls and a dict per value, a few percent of a sign-up's CPU (about
        a dozen times per sign-up and per mail). Same text: `YYYY-MM-DD HH:MM:SS.ffffff`, naive UTC."""
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            if value.tzinfo is not UTC:
                if value.tzinfo is None:
                    raise ValueError("naive datetime given; use timezone-aware UTC datetimes")
                value = value.astimezone(UTC)
            return value.replace(tzinfo=None).isoformat(" ", "microseconds")
        return process


def utcnow() -> datetime:
    return datetime.now(UTC)


class InfraTables:
    """Tables every service has: outbox, processed events, leases, staff keys and the audit log."""

    def __init__(self, metadata: MetaData) -> None:
        self.outbox = Table(
            "outbox", metadata,
            Column("id", BigId, primary_key=True, autoincrement=True),
            Column("event_id", String(36), nullable=False, unique=True),
            Column("topic", String(200), nullable=False),
            Column("key", String(200), nullable=False),
            Column("payload", Text, nullable=False),
            Column("headers", JSON, nullable=False),
            Column("created_at", UTCDateTime, nullable=False),
            Column("published_at", UTCDateTime, nullable=True),
            Index("ix_outbox_unpublished", "published_at", "id"),
        )
        self.processed_events = Table(
            "processed_events", metadata,
            Column("consumer", String(100), primary_key=True),
            Column("event_id", String(36), primary_key=True),
            Column("processed_at", UTCDateTime, nullable=False),
        )
        self.leases = Table(
            "leases", metadata,
            Column("name", String(100), primary_key=True),
            Column("holder", String(100), nullable=False),
            Column("expires_at", UTCDateTime, nullable=False),
        )
        self.api_keys = Table(
            "api_keys", metadata,
            Column("id", String(36), primary_key=True),
            Column("name", String(200), nullable=False),
            Column("role", String(20), nullable=False),
            Column("key_hash", String(64), nullable=False, unique=True),
            Column("prefix", String(16), nullable=False),
            Column("created_at", UTCDateTime, nullable=False),
            Column("revoked_at", UTCDateTime, nullable=True),
        )
        self.audit_log = Table(
            "audit_log", metadata,
            Column("id", BigId, primary_key=True, autoincrement=True),
            Column("occurred_at", UTCDateTime, nullable=False),
            Column("actor", String(200), nullable=False),
            Column("role", String(20), nullable=False),
            Column("action", String(100), nullable=False),
            Column("target", String(200), nullable=True),
            Column("details", JSON, nullable=False),
        )


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


SQLITE_SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")
SQLITE_DRIVERS = ("inline", "aiosqlite")


def create_engine(url: str) -> AsyncEngine:
    if is_sqlite(url):
        # `?synchronous=full` on a SQLite URL: fsync at every commit. The default, NORMAL (with WAL), loses
        # nothing when a process dies, but an OS crash or power cut may undo the last commits.
        parsed = make_url(url)
        synchronous = parsed.query.get("synchronous", "normal").upper()
        if synchronous not in SQLITE_SYNCHRONOUS:
            raise ValueError(f"synchronous={synchronous.lower()} in the SQLite URL: use one of "
                             f"{', '.join(m.lower() for m in SQLITE_SYNCHRONOUS)}")
        # `?driver=aiosqlite`: statements in aiosqlite's thread, one hand-over per cursor call, instead of
        # on the event loop (the default, `inline`; shared/sqlite_driver.py says why and what may wait).
        driver = parsed.query.get("driver", "inline")
        if driver not in SQLITE_DRIVERS:
            raise ValueError(f"driver={driver} in the SQLite URL: use one of {', '.join(SQLITE_DRIVERS)}")
        parsed = parsed.difference_update_query(["synchronous", "driver"])
        path = parsed.database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection per process: SQLite has one writer anyway, and this rules out
        # "database is locked" when a read transaction upgrades to a write.
        engine = create_async_engine(parsed, pool_size=1, max_overflow=0, pool_timeout=60,
                                     connect_args={"timeout": 30},
                                     **({"module": InlineDBAPI()} if driver == "inline" else {}))

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            # The driver would only send BEGIN before the first write, so reads that decide a write
            # (free places, rate limits) would run outside the transaction. We begin ourselves.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            if driver == "aiosqlite":  # (the inline driver waits for locks in a thread of its own)
                cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(conn) -> None:
            # IMMEDIATE takes the write lock at the start: transactions of several processes on one
            # SQLite file are serialised (busy_timeout waits), like row locks on PostgreSQL.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def wake_after_commit(session: AsyncSession, what: str) -> None:
    """Ask for `what`'s callbacks (e.g. "outbox", "mail") once this session's transaction commits."""
    session.info.setdefault("wake", set()).add(what)


class Database:
    """Engine, sessions and the unit of work. A commit that wrote work for a background loop (an
    outbox row, a mail) wakes that loop at once instead of leaving it to its next poll."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._wakers: dict[str, list[Callable[[], None]]] = {}

    def on_commit(self, what: str, callback: Callable[[], None]) -> None:
        """Run `callback` after every commit that called `wake_after_commit(session, what)`."""
        self._wakers.setdefault(what, []).append(callback)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: commits on success, rolls back on error."""
        async with self.sessions() as session:
            async with session.begin():
                yield session
            for what in session.info.pop("wake", ()):
                for callback in self._wakers.get(what, ()):
                    callback()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


async def acquire_lease(db: Database, leases: Table, name: str, holder: str, seconds: float) -> bool:
    """Hold a named lease (e.g. "the outbox relay") for `seconds`; True while this holder has it."""
    now = utcnow()
    expires = datetime.fromtimestamp(now.timestamp() + seconds, UTC)
    async with db.transaction() as s:
        result = await s.execute(
            update(leases)
            .where(leases.c.name == name)
            .where((leases.c.holder == holder) | (leases.c.expires_at < now))
            .values(holder=holder, expires_at=expires)
        )
        if result.rowcount:
            return True
    try:
        async with db.transaction() as s:
            await s.execute(insert(leases).values(name=name, holder=holder, expires_at=expires))
        return True
    except IntegrityError:
        return False


async def migrate(url: str, migrations: Path) -> None:
    """Bring a service's database to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            def upgrade(sync_conn) -> None:
                cfg = Config()
                cfg.set_main_option("script_location", str(migrations))
                cfg.attributes["connection"] = sync_conn
                command.upgrade(cfg, "head")

            await conn.run_sync(upgrade)
    finally:
        await engine.dispose()


def migrate_sync(url: str, migrations: Path) -> None:
    asyncio.run(migrate(url, migrations))

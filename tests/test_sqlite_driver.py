"""The SQLite driver (shared/sqlite_driver.py): statements on the event loop's thread, lock waits off it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError

from shared.db import Database

SCHEMA = "CREATE TABLE IF NOT EXISTS item (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)"


@pytest.fixture
async def db(tmp_path: Path):
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/d.db")
    async with db.transaction() as s:
        await s.execute(text(SCHEMA))
    yield db
    await db.dispose()


async def test_statements_run_on_the_event_loops_thread(db: Database) -> None:
    threads: list[int] = []

    @event.listens_for(db.engine.sync_engine, "connect")
    def _probe(dbapi_conn, _record) -> None:
        dbapi_conn.create_function("thread_probe", 0, lambda: threads.append(threading.get_ident()) or 1)

    await db.engine.dispose()  # the next connection gets the probe
    async with db.transaction() as s:
        assert await s.scalar(text("SELECT thread_probe()")) == 1
    assert threads == [threading.get_ident()]


async def test_a_locked_database_is_waited_for_in_a_thread_while_the_loop_goes_on(db: Database, tmp_path: Path) -> None:
    other = sqlite3.connect(tmp_path / "d.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process writing, say `bridgepost dlq replay`
    other.execute("INSERT INTO item (name) VALUES ('theirs')")
    released = threading.Timer(0.6, other.execute, ["COMMIT"])
    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    released.start()
    try:
        async with db.transaction() as s:  # BEGIN IMMEDIATE: refused at once, then waited for
            await s.execute(text("INSERT INTO item (name) VALUES ('ours')"))
        waited = time.monotonic() - started
    finally:
        ticker.cancel()
        released.join()
        other.close()
    assert waited >= 0.5, "the transaction began while the other writer held the lock"
    assert max(b - a for a, b in zip(ticks, ticks[1:], strict=False)) < 0.3, "the event loop stood still"
    async with db.sessions() as s:
        assert (await s.scalars(text("SELECT name FROM item ORDER BY id"))).all() == ["theirs", "ours"]


async def test_a_transaction_given_up_while_it_waits_for_the_lock_stops_waiting_and_leaves_no_harm(
    db: Database, tmp_path: Path,
) -> None:
    other = sqlite3.connect(tmp_path / "d.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")

    async def write() -> None:
        async with db.transaction() as s:
            await s.execute(text("INSERT INTO item (name) VALUES ('given up')"))

    try:
        task = asyncio.create_task(write())
        await asyncio.sleep(0.3)  # waiting for the lock in the driver's thread
        started = time.monotonic()
        task.cancel()  # a request whose client left, a service stopping
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 5, "the wait went on to its 30 s timeout"
        await db.engine.dispose()  # closing the connection after the thread let go of it: no crash
    finally:
        other.execute("COMMIT")
        other.close()
    async with db.transaction() as s:
        await s.execute(text("INSERT INTO item (name) VALUES ('later')"))
        assert (await s.scalars(text("SELECT name FROM item"))).all() == ["later"]


async def test_rows_are_fetched_with_the_statement_and_errors_are_sqlalchemys(db: Database) -> None:
    async with db.transaction() as s:
        await s.execute(text("INSERT INTO item (name) VALUES (:n)"), [{"n": f"n{i}"} for i in range(5)])
        result = await s.execute(text("SELECT name FROM item ORDER BY id"))
    assert result.scalars().all() == [f"n{i}" for i in range(5)]  # read after the commit
    with pytest.raises(IntegrityError):
        async with db.transaction() as s:
            await s.execute(text("INSERT INTO item (name) VALUES ('n6')"))
            await s.execute(text("INSERT INTO item (name) VALUES ('n0')"))
    async with db.engine.connect() as conn:  # a Core connection: SQLAlchemy wants an await per statement
        assert (await conn.execute(text("SELECT count(*) FROM item"))).scalar() == 5  # n6 rolled back


async def test_the_aiosqlite_thread_driver_on_request_and_unknown_drivers_refused(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/t.db?driver=aiosqlite")
    try:
        async with db.transaction() as s:
            await s.execute(text(SCHEMA))
            await s.execute(text("INSERT INTO item (name) VALUES ('x')"))
            assert await s.scalar(text("PRAGMA busy_timeout")) == 30000
    finally:
        await db.dispose()
    with pytest.raises(ValueError, match=r"driver=apsw in the SQLite URL: use one of inline, aiosqlite"):
        Database(f"sqlite+aiosqlite:///{tmp_path}/u.db?driver=apsw")


async def test_utc_datetimes_are_stored_as_sqlalchemys_datetime_text_and_read_back_in_utc(tmp_path: Path) -> None:
    """UTCDateTime binds in one step on SQLite (shared/db.py): the same text SQLAlchemy's DATETIME writes, so
    rows written before and after compare and sort alike; any zone is stored as UTC; naive times refused."""
    from datetime import UTC, datetime, timedelta, timezone
    from zoneinfo import ZoneInfo

    from sqlalchemy import Column, MetaData, String, Table, bindparam, insert, select, update
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.exc import StatementError

    from shared.db import UTCDateTime

    metadata = MetaData()
    times = Table("times", metadata, Column("id", String(8), primary_key=True), Column("at", UTCDateTime))
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/t.db")
    sqlalchemys = sqlite.DATETIME().bind_processor(sqlite.dialect())
    given = {
        "now": datetime.now(UTC),
        "round": datetime(2026, 1, 1, tzinfo=UTC),  # no microseconds: still six digits
        "early": datetime(999, 5, 6, 7, 8, 9, 10, tzinfo=UTC),
        "berlin": datetime(2026, 7, 1, 12, 0, tzinfo=ZoneInfo("Europe/Berlin")),
        "offset": datetime(2026, 3, 1, 23, 30, 0, 5, tzinfo=timezone(timedelta(hours=-3))),
        "none": None,
    }
    try:
        async with db.transaction() as s:
            await s.run_sync(lambda sync: metadata.create_all(sync.connection()))
            await s.execute(insert(times), [{"id": k, "at": v} for k, v in given.items()])
            await s.execute(update(times).where(times.c.id == bindparam("k")).values(at=bindparam("v")),
                            [{"k": "none", "v": None}])
        async with db.transaction() as s:
            stored = dict((await s.execute(text("SELECT id, at FROM times"))).all())
            read = dict((await s.execute(select(times.c.id, times.c.at))).all())
            found = (await s.scalars(select(times.c.id).where(times.c.at.in_([given["berlin"]]),
                                                              times.c.at <= given["now"]))).all()
        for key, value in given.items():
            if value is None:
                assert stored[key] is None and read[key] is None
                continue
            assert stored[key] == sqlalchemys(value.astimezone(UTC).replace(tzinfo=None)), key
            assert read[key] == value and read[key].tzinfo is UTC, key
        assert stored["round"] == "2026-01-01 00:00:00.000000" and stored["berlin"] == "2026-07-01 10:00:00.000000"
        assert found == ["berlin"]
        with pytest.raises(StatementError, match="naive datetime"):
            async with db.transaction() as s:
                await s.execute(insert(times).values(id="naive", at=datetime(2026, 1, 1)))
    finally:
        await db.dispose()

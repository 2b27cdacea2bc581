"""SQLite through `shared.sqlite_driver`: what SQLAlchemy gets back is unchanged, in one thread hop per statement.

Every service's default database is SQLite through aiosqlite; `shared.db.create_engine` gives SQLAlchemy an
adapter that runs a statement, fetches its rows and closes its cursor in one call on aiosqlite's thread.
These tests run real statements against a real SQLite file through `shared.db.Database`.
"""

from __future__ import annotations

from pathlib import Path

import aiosqlite
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from shared.db import Database
from shared.sqlite_driver import OneHopConnection

metadata = MetaData()
notes = Table("notes", metadata, Column("id", Integer, primary_key=True),
              Column("name", String(40), nullable=False, unique=True), Column("n", Integer, nullable=False))


@pytest.fixture
async def db(tmp_path: Path):
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/driver.db")
    async with database.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield database
    await database.dispose()


@pytest.fixture
def hops(monkeypatch) -> list[str]:
    """The calls queued to aiosqlite's thread, by function name."""
    calls: list[str] = []
    original = aiosqlite.Connection._execute

    async def counted(self, fn, *args, **kwargs):
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await original(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    return calls


async def test_the_engine_uses_the_one_hop_adapter(db: Database) -> None:
    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        assert isinstance(raw.dbapi_connection, OneHopConnection)


async def test_rows_rowcounts_and_keys_as_sqlalchemy_expects(db: Database) -> None:
    async with db.transaction() as s:
        first = await s.execute(insert(notes).values(name="a", n=1))
        assert first.inserted_primary_key == (1,)  # lastrowid
        many = await s.execute(insert(notes), [{"name": f"m{i}", "n": i} for i in range(5)])
        assert many.rowcount == 5
        returned = (await s.execute(insert(notes).values(name="r", n=7).returning(notes.c.id, notes.c.n))).one()
        assert (returned.id, returned.n) == (7, 7)
    async with db.transaction() as s:
        assert (await s.execute(update(notes).where(notes.c.n < 3).values(n=notes.c.n + 100))).rowcount == 4
        bulk = await s.execute(update(notes).where(notes.c.name == bindparam("k")).values(n=bindparam("v")),
                               [{"k": "m3", "v": 30}, {"k": "m4", "v": 40}, {"k": "nobody", "v": 0}])
        assert bulk.rowcount == 2  # summed over the parameter sets
        rows = (await s.execute(select(notes.c.name, notes.c.n).order_by(notes.c.id))).all()
        assert [tuple(r) for r in rows] == [("a", 101), ("m0", 100), ("m1", 101), ("m2", 102), ("m3", 30),
                                            ("m4", 40), ("r", 7)]
        assert list((await s.execute(select(notes.c.name.label("who")).limit(1))).keys()) == ["who"]
        assert (await s.execute(select(notes.c.id).where(notes.c.name == "absent"))).first() is None
        assert (await s.execute(text("DELETE FROM notes WHERE n > 100"))).rowcount == 3


async def test_errors_are_sqlalchemys_and_the_transaction_rolls_back(db: Database) -> None:
    with pytest.raises(IntegrityError):
        async with db.transaction() as s:
            await s.execute(insert(notes).values(name="x", n=1))
            await s.execute(insert(notes).values(name="x", n=2))
    async with db.sessions() as s:  # nothing of the failed transaction is left, the connection still works
        assert (await s.execute(select(notes))).all() == []


async def test_streamed_results_still_work(db: Database) -> None:
    async with db.transaction() as s:
        await s.execute(insert(notes), [{"name": f"s{i}", "n": i} for i in range(50)])
    async with db.engine.connect() as conn:
        result = await conn.stream(select(notes.c.n).order_by(notes.c.n))
        assert [n async for (n,) in result] == list(range(50))


async def test_one_hop_per_statement(db: Database, hops: list[str]) -> None:
    async with db.transaction() as s:
        await s.execute(select(notes.c.id))  # (the transaction's BEGIN IMMEDIATE is one hop too)
        hops.clear()
        await s.execute(select(notes.c.id).where(notes.c.n > 1))
        await s.execute(update(notes).where(notes.c.n > 1).values(n=0))
        await s.execute(insert(notes), [{"name": "h1", "n": 1}, {"name": "h2", "n": 2}])
        assert hops == ["_run", "_run", "_run"]  # SQLAlchemy's own adapter: 4 + 3 + 3
